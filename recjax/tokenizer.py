"""T5 / FLAN-T5 tokenizer: fixed-length numpy batches from a HF directory.

`transformers` is imported lazily (only `load_tokenizer` needs it); everything
else works on the loaded tokenizer object. T5 conventions: pad = 0, eos = 1,
unk = 2, no bos; an eos is appended to every encoded text.

    tok = load_tokenizer("/path/to/flan-t5-base")   # dir with spiece.model
    ids, mask = encode_batch(tok, texts, max_len=128)
    texts = decode_batch(tok, ids)
    trie = recjax.trie.build_trie(tokenize_titles(tok, titles))
"""

from collections.abc import Sequence
import os
from typing import Any

import numpy as np

Tokenizer = Any  # a transformers tokenizer (T5Tokenizer in transformers 5.x).


def load_tokenizer(path: str) -> Tokenizer:
  """Loads a T5 tokenizer from a local directory (or hub id, if reachable).

  A directory written by `save_pretrained` (tokenizer.json and
  tokenizer_config.json) loads with `AutoTokenizer`; a directory holding only
  a SentencePiece `spiece.model` loads with `T5Tokenizer` (which then adds
  T5's 100 sentinel tokens `<extra_id_*>`).

  Raises:
    ValueError if the special ids are not T5's (pad 0, eos 1).
  """
  import transformers  # pylint: disable=g-import-not-at-top

  has_config = os.path.isfile(os.path.join(path, "tokenizer_config.json"))
  if os.path.isdir(path) and not has_config:
    tok = transformers.T5Tokenizer.from_pretrained(path)
  else:
    tok = transformers.AutoTokenizer.from_pretrained(path)
  if tok.pad_token_id != 0 or tok.eos_token_id != 1:
    raise ValueError(f"not a T5 tokenizer: pad={tok.pad_token_id}, "
                     f"eos={tok.eos_token_id} (expected 0 and 1)")
  return tok


def encode_batch(tokenizer: Tokenizer, texts: Sequence[str], max_len: int, *,
                 add_eos: bool = True, truncation_side: str = "right"
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Encodes texts to fixed-length arrays, right-padded with pad (0).

  Args:
    tokenizer: from `load_tokenizer`.
    texts: B strings.
    max_len: L, the length of every row (eos included).
    add_eos: append eos (T5 does, for inputs and targets).
    truncation_side: "right" keeps the first tokens, "left" the last ones
      (e.g. for a long user history where recent items matter). The eos is
      kept in both cases, as Hugging Face's tokenizer does.

  Returns:
    ids int32[B, L] and mask int32[B, L] (1 for tokens, eos included).
  """
  if truncation_side not in ("right", "left"):
    raise ValueError(f"truncation_side must be 'right' or 'left', got "
                     f"{truncation_side!r}")
  budget = max_len - 1 if add_eos else max_len
  if budget < 0:
    raise ValueError(f"max_len={max_len} leaves no room for eos")
  pieces = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
  ids = np.full((len(pieces), max_len), tokenizer.pad_token_id, np.int32)
  mask = np.zeros((len(pieces), max_len), np.int32)
  for row, seq in enumerate(pieces):
    if len(seq) > budget:
      seq = seq[:budget] if truncation_side == "right" else seq[len(seq) -
                                                                  budget:]
    if add_eos:
      seq = list(seq) + [tokenizer.eos_token_id]
    ids[row, :len(seq)] = seq
    mask[row, :len(seq)] = 1
  return ids, mask


def decode_batch(tokenizer: Tokenizer, ids: np.ndarray,
                 stop_at_eos: bool = True) -> list[str]:
  """Token ids int[B, L] (e.g. from `recjax.decoding.generate`) -> B strings.

  Each row is cut at its first eos (when `stop_at_eos`); pad, eos and other
  special tokens are dropped.
  """
  out = []
  for row in np.asarray(ids).tolist():
    if stop_at_eos and tokenizer.eos_token_id in row:
      row = row[:row.index(tokenizer.eos_token_id)]
    out.append(tokenizer.decode(row, skip_special_tokens=True))
  return out


def tokenize_titles(tokenizer: Tokenizer, titles: Sequence[str]
                    ) -> list[list[int]]:
  """Token ids of each title followed by eos, as the decoder should emit them
  (input for `recjax.trie.build_trie` and `recjax.decoding.score_candidates`).
  """
  pieces = tokenizer(list(titles), add_special_tokens=False)["input_ids"]
  return [list(seq) + [tokenizer.eos_token_id] for seq in pieces]


def pad_token_lists(seqs: Sequence[Sequence[int]], max_len: int | None = None,
                    pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads token lists to int32[N, L] ids and mask (L = longest if None);
  longer lists are cut (e.g. candidate titles for `score_candidates`)."""
  length = max_len if max_len is not None else max(len(s) for s in seqs)
  ids = np.full((len(seqs), length), pad_id, np.int32)
  mask = np.zeros((len(seqs), length), np.int32)
  for row, seq in enumerate(seqs):
    seq = list(seq)[:length]
    ids[row, :len(seq)] = seq
    mask[row, :len(seq)] = 1
  return ids, mask
