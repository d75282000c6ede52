"""Retrieval prompts for the LLM tower, and a text vocabulary trained on the catalogue.

A prompt names the user's most recent items, oldest first, and asks for the next one:

    user watched: <item> Toy Story (1995) ; <item> Heat (1995) ; ... what next ? </s>

`item_repr` chooses how an item appears:
  "title"        its title tokens only;
  "token"        one item-token position only (`llm_item_ids` holds the item id there; the
                 bridge embeds it from the shared item memory, `recjax.models.bridge`);
  "title+token"  the item token followed by the title.
When the prompt would exceed `prompt_len`, the OLDEST items are dropped whole (never a
partial title), so the most recent item is always shown; a title longer than `title_len`
tokens is cut.

Everything is plain NumPy on the host: `PromptBuilder(histories int32[B, L])` returns
{"llm_input_ids": int32[B, T], "llm_input_mask": bool[B, T], "llm_item_ids": int32[B, T]},
the batch keys `recjax.models.joint.JointModel` reads; `catalogue()` returns the
tokenized titles of every item row (`title_ids int32[N + 1, Tt]`, `title_mask`).

Tokenizers: any `tokenize(list[str]) -> list[list[int]]` without special tokens, pad 0 and
eos 1 (T5's). `load_text_tokenizer` wraps a Hugging Face T5 tokenizer directory
(FLAN-T5 checkpoints); `train_text_vocab` trains a SentencePiece model on the catalogue's
titles (and the prompt template) for a T5 trained from scratch, where no pretrained
vocabulary is available. It needs the `sentencepiece` package (`pip install recjax[hf]`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import hashlib
import os
import socket
import uuid

import numpy as np

Tokenize = Callable[[Sequence[str]], list[list[int]]]

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
ITEM_PIECE = "<item>"          # the item-token placeholder's piece in a trained vocabulary
ITEM_REPRS = ("title", "token", "title+token")


@dataclasses.dataclass(frozen=True)
class PromptConfig:
  prompt_len: int = 64            # T: prompt tokens, eos included
  num_items: int = 10             # most recent history items offered to the prompt
  title_len: int = 12             # tokens kept per title (in prompts and the catalogue)
  item_repr: str = "title+token"  # see the module docstring
  prefix: str = "user watched:"
  separator: str = ";"
  suffix: str = "what next?"

  def __post_init__(self):
    if self.item_repr not in ITEM_REPRS:
      raise ValueError(f"prompt.item_repr: unknown {self.item_repr!r} {ITEM_REPRS}")
    if self.prompt_len < 2 or self.num_items < 1 or self.title_len < 1:
      raise ValueError(f"prompt: prompt_len >= 2, num_items >= 1, title_len >= 1 needed, "
                       f"got {self.prompt_len}, {self.num_items}, {self.title_len}")


class PromptBuilder:
  """Builds fixed-length prompts from item histories (see the module docstring)."""

  def __init__(self, tokenize: Tokenize, titles: Sequence[str], cfg: PromptConfig,
               item_token_id: int = UNK_ID):
    """titles: N + 1 strings, [0] = padding ""; item_token_id: the placeholder's id."""
    self.cfg = cfg
    self.item_token_id = int(item_token_id)
    pieces = tokenize([cfg.prefix, cfg.separator, cfg.suffix])
    self.prefix, self.separator, self.suffix = (np.asarray(p, np.int32) for p in pieces)
    tokens = tokenize(list(titles))
    # Titles longer than title_len lose their tail (often the "(year)"): counted.
    self.titles_cut = sum(len(t) > cfg.title_len for t in tokens[1:])  # (catalogue too)
    self.titles = [np.asarray(t[:cfg.title_len], np.int32) for t in tokens]
    fixed = len(self.prefix) + len(self.suffix) + 1          # + eos
    longest = max((self._item_len(i) for i in range(1, len(self.titles))), default=0)
    if fixed + longest > cfg.prompt_len:
      raise ValueError(f"prompt.prompt_len={cfg.prompt_len} cannot hold the template "
                       f"({fixed} tokens) and the longest item ({longest} tokens)")

  def _item_len(self, item: int) -> int:
    n = len(self.separator)
    if self.cfg.item_repr != "title":
      n += 1
    if self.cfg.item_repr != "token":
      n += len(self.titles[item])
    return n

  def _item_tokens(self, item: int) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, item ids) of one item's piece, separator included."""
    ids, items = [], []
    if self.cfg.item_repr != "title":
      ids.append(np.array([self.item_token_id], np.int32))
      items.append(np.array([item], np.int32))
    if self.cfg.item_repr != "token":
      ids.append(self.titles[item])
      items.append(np.zeros(len(self.titles[item]), np.int32))
    ids.append(self.separator)
    items.append(np.zeros(len(self.separator), np.int32))
    return np.concatenate(ids), np.concatenate(items)

  def _chosen(self, hist: np.ndarray, budget: int) -> list[int]:
    """The most recent items that fit `budget` tokens (whole items only), newest first."""
    chosen, used = [], 0
    for item in hist[hist > 0][-self.cfg.num_items:][::-1]:
      n = self._item_len(int(item))
      if used + n > budget:
        break
      chosen.append(int(item))
      used += n
    return chosen

  def _budget(self) -> int:
    return self.cfg.prompt_len - len(self.prefix) - len(self.suffix) - 1

  def coverage(self, histories: np.ndarray) -> dict:
    """How much of the offered history the prompts show, over int32[B, L] histories:
    {"rows", "items_offered" (min(num_items, history) summed), "items_shown",
    "items_dropped" (offered but past the token budget), "mean_items_shown",
    "rows_with_drops", "titles_cut" (catalogue titles longer than title_len)}."""
    histories = np.asarray(histories)
    offered = np.minimum((histories > 0).sum(1), self.cfg.num_items)
    shown = np.array([len(self._chosen(h, self._budget())) for h in histories])
    return {"rows": int(len(histories)), "items_offered": int(offered.sum()),
            "items_shown": int(shown.sum()), "items_dropped": int((offered - shown).sum()),
            "mean_items_shown": float(shown.mean()) if len(shown) else 0.0,
            "rows_with_drops": int((shown < offered).sum()), "titles_cut": self.titles_cut}

  def __call__(self, histories: np.ndarray) -> dict[str, np.ndarray]:
    """int32[B, L] left-padded histories -> prompt arrays [B, T] (module docstring)."""
    cfg = self.cfg
    histories = np.asarray(histories)
    b, t = histories.shape[0], cfg.prompt_len
    ids = np.zeros((b, t), np.int32)
    item_ids = np.zeros((b, t), np.int32)
    mask = np.zeros((b, t), bool)
    budget = self._budget()
    for row, hist in enumerate(histories):
      chosen = self._chosen(hist, budget)            # newest first, until full
      parts_ids, parts_items = [self.prefix], [np.zeros(len(self.prefix), np.int32)]
      for item in chosen[::-1]:                      # oldest first in the prompt
        a, c = self._item_tokens(item)
        parts_ids.append(a)
        parts_items.append(c)
      parts_ids += [self.suffix, np.array([EOS_ID], np.int32)]
      parts_items += [np.zeros(len(self.suffix) + 1, np.int32)]
      row_ids = np.concatenate(parts_ids)
      ids[row, :len(row_ids)] = row_ids
      item_ids[row, :len(row_ids)] = np.concatenate(parts_items)
      mask[row, :len(row_ids)] = True
    return {"llm_input_ids": ids, "llm_input_mask": mask, "llm_item_ids": item_ids}

  def catalogue(self) -> dict[str, np.ndarray]:
    """{"title_ids": int32[N + 1, Tt], "title_mask": bool[N + 1, Tt]} (row 0 empty)."""
    n, length = len(self.titles), self.cfg.title_len
    ids = np.zeros((n, length), np.int32)
    mask = np.zeros((n, length), bool)
    for i, title in enumerate(self.titles):
      if i == 0 or not len(title):
        continue
      ids[i, :len(title)] = title
      mask[i, :len(title)] = True
    return {"title_ids": ids, "title_mask": mask}


# ---- tokenizers ----------------------------------------------------------------------------

def load_text_tokenizer(path: str) -> tuple[Tokenize, int, int]:
  """A Hugging Face T5 tokenizer directory -> (tokenize, vocab size, item token id)."""
  from recjax import tokenizer as tok_lib  # transformers, imported lazily
  tok = tok_lib.load_tokenizer(path)

  def tokenize(texts):
    return tok(list(texts), add_special_tokens=False)["input_ids"]

  return tokenize, len(tok), tok.unk_token_id


def train_text_vocab(texts: Sequence[str], vocab_size: int, cache_dir: str,
                     extra_texts: Sequence[str] = ()) -> tuple[Tokenize, int, int]:
  """Trains (or loads the cached) SentencePiece unigram model on `texts`.

  T5 conventions (pad 0, eos 1, unk 2, no bos) and a user-defined `<item>` piece for the
  item-token placeholder. Cached under `cache_dir/spm-<hash of the corpus and size>/`.
  Returns (tokenize, vocab size, item token id).
  """
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  corpus = "\n".join(t.replace("\n", " ") for t in list(texts) + list(extra_texts) if t)
  options = dict(model_type="unigram", pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
                 pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
                 user_defined_symbols=[ITEM_PIECE], character_coverage=1.0,
                 hard_vocab_limit=False)
  # The key covers the trainer's options too: changing one must not reuse a stale model.
  key = hashlib.sha256(f"{vocab_size}\n{sorted(options.items())}\n{corpus}".encode()
                       ).hexdigest()[:16]
  directory = os.path.join(os.path.expanduser(cache_dir), f"spm-{key}")
  model = os.path.join(directory, "spiece.model")
  if not os.path.exists(model):
    os.makedirs(directory, exist_ok=True)
    # Unique per process and host (hosts may share a cache directory).
    tmp_prefix = os.path.join(directory, f"tmp-{socket.gethostname()}-{os.getpid()}-"
                                         f"{uuid.uuid4().hex[:8]}")
    with open(tmp_prefix + ".txt", "w", encoding="utf-8") as f:
      f.write(corpus)
    spm.SentencePieceTrainer.train(
        input=tmp_prefix + ".txt", model_prefix=tmp_prefix, vocab_size=vocab_size,
        minloglevel=2, num_threads=1, **options)
    os.replace(tmp_prefix + ".model", model)        # atomic: concurrent runs are safe
    for suffix in (".txt", ".vocab"):
      if os.path.exists(tmp_prefix + suffix):
        os.remove(tmp_prefix + suffix)
  sp = spm.SentencePieceProcessor(model_file=model)

  def tokenize(texts):
    return sp.encode(list(texts))

  return tokenize, sp.get_piece_size(), sp.piece_to_id(ITEM_PIECE)


def display_titles(titles: Sequence[str], info: Sequence[dict]) -> list[str]:
  """Titles as prompts show them: "Heat (1995)" when the item has a year, else the title."""
  out = []
  for title, extra in zip(titles, info):
    year = (extra or {}).get("year")
    out.append(f"{title} ({year})" if title and year and str(year) not in title else title)
  return out


def item_texts(titles: Sequence[str], info: Sequence[dict]) -> list[str]:
  """Title plus every text field (year, genres, ...): the corpus of a trained vocabulary."""
  out = []
  for title, extra in zip(titles, info):
    words = [title]
    for value in (extra or {}).values():
      values = value if isinstance(value, (list, tuple)) else [value]
      words += [str(v) for v in values if isinstance(v, (str, int, float))]
    out.append(" ".join(w for w in words if w))
  return out
