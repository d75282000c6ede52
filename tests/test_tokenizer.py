"""Tests for recjax.tokenizer on a tiny SentencePiece model built offline."""

import os

import numpy as np
import pytest

from recjax import tokenizer as tok_lib
from recjax import trie as trie_lib

spm = pytest.importorskip("sentencepiece")
transformers = pytest.importorskip("transformers")

TITLES = ["Star Wars: A New Hope (1977)", "The Matrix Reloaded",
          "Toy Story 2 (1999)", "Pulp Fiction", "Amelie", "Heat (1995)",
          "The Lord of the Rings: The Two Towers"]


@pytest.fixture(scope="module")
def spiece_dir(tmp_path_factory):
  """A directory holding only spiece.model (like a bare T5 checkpoint)."""
  root = tmp_path_factory.mktemp("spm")
  words = ("user watched liked rated movie movies the a of and next item "
           "recommend history title star wars matrix toy story pulp fiction "
           "heat lord rings towers hope new reloaded amelie").split()
  rng = np.random.default_rng(0)
  lines = [" ".join(rng.choice(words, size=8)) for _ in range(300)]
  lines += TITLES * 5 + [f"{i} {i * 7} ({1900 + i})" for i in range(100)]
  corpus = root / "corpus.txt"
  corpus.write_text("\n".join(lines))
  spm.SentencePieceTrainer.train(
      input=str(corpus), model_prefix=str(root / "spiece"), vocab_size=200,
      model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
      pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
      character_coverage=1.0, hard_vocab_limit=False, minloglevel=2)
  out = root / "bare"
  out.mkdir()
  os.replace(root / "spiece.model", out / "spiece.model")
  return str(out)


@pytest.fixture(scope="module")
def hf_dir(spiece_dir, tmp_path_factory):
  """The same tokenizer saved by transformers (tokenizer.json + config)."""
  out = str(tmp_path_factory.mktemp("hf_tok"))
  transformers.T5Tokenizer.from_pretrained(spiece_dir).save_pretrained(out)
  return out


@pytest.fixture(scope="module")
def tok(hf_dir):
  return tok_lib.load_tokenizer(hf_dir)


def test_load_both_layouts(spiece_dir, hf_dir, tok):
  bare = tok_lib.load_tokenizer(spiece_dir)
  assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
  assert (bare.pad_token_id, bare.eos_token_id, bare.unk_token_id) == (0, 1, 2)
  # T5's 100 sentinels sit after the SentencePiece vocabulary.
  sp = spm.SentencePieceProcessor(model_file=os.path.join(spiece_dir,
                                                          "spiece.model"))
  assert 100 < sp.vocab_size() <= 200 and len(tok) == sp.vocab_size() + 100
  assert tok.convert_tokens_to_ids("<extra_id_0>") == len(tok) - 1
  for text in TITLES:
    want = sp.encode(text)
    assert tok(text, add_special_tokens=False)["input_ids"] == want
    assert bare(text, add_special_tokens=False)["input_ids"] == want


def test_encode_batch_fixed_length(tok):
  texts = ["Pulp Fiction", "", TITLES[-1] * 3]
  ids, mask = tok_lib.encode_batch(tok, texts, max_len=12)
  assert ids.shape == mask.shape == (3, 12)
  assert ids.dtype == mask.dtype == np.int32
  lengths = mask.sum(1)
  for row, n in zip(range(3), lengths):
    assert ids[row, n - 1] == tok.eos_token_id  # eos last
    assert (ids[row, n:] == 0).all() and mask[row, :n].all()
  assert lengths[1] == 1 and lengths[2] == 12  # empty text: just eos.
  short = tok("Pulp Fiction", add_special_tokens=False)["input_ids"]
  assert ids[0, :lengths[0] - 1].tolist() == short
  # Equals Hugging Face's own padding/truncation, both sides.
  for side in ("right", "left"):
    ids, mask = tok_lib.encode_batch(tok, texts, max_len=12,
                                     truncation_side=side)
    tok.truncation_side = side
    try:
      want = tok(texts, max_length=12, truncation=True, padding="max_length")
    finally:
      tok.truncation_side = "right"
    np.testing.assert_array_equal(ids, want["input_ids"])
    np.testing.assert_array_equal(mask, want["attention_mask"])
  # Left truncation keeps the end of the text.
  full = tok(texts[2], add_special_tokens=False)["input_ids"]
  assert ids[2, :11].tolist() == full[-11:]
  ids, mask = tok_lib.encode_batch(tok, texts, max_len=5, add_eos=False)
  assert tok.eos_token_id not in ids and mask[2].all()
  with pytest.raises(ValueError):
    tok_lib.encode_batch(tok, texts, max_len=5, truncation_side="middle")


def test_round_trip_and_titles(tok):
  ids, _ = tok_lib.encode_batch(tok, TITLES, max_len=48)
  assert tok_lib.decode_batch(tok, ids) == TITLES
  # Decoding stops at the first eos, whatever follows (beam outputs).
  ids[:, -1] = 7
  assert tok_lib.decode_batch(tok, ids) == TITLES
  seqs = tok_lib.tokenize_titles(tok, TITLES)
  assert all(s[-1] == tok.eos_token_id and tok.eos_token_id not in s[:-1]
             for s in seqs)
  trie = trie_lib.build_trie(seqs)
  assert trie.num_sequences == len(TITLES)
  assert sorted(trie_lib.trie_sequences(trie)) == sorted(map(tuple, seqs))
  padded, mask = tok_lib.pad_token_lists(seqs)
  assert padded.shape == (len(TITLES), max(map(len, seqs)))
  assert tok_lib.decode_batch(tok, padded) == TITLES
  np.testing.assert_array_equal(mask.sum(1), [len(s) for s in seqs])


def test_constrained_generation_returns_titles(tok):
  """The whole path of README's "only real items": tokenize the catalogue's titles, build
  the trie, beam-search a (tiny, random) T5 under it, decode: every beam is a title."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from recjax import decoding  # pylint: disable=g-import-not-at-top
  from recjax.models.t5 import T5, T5Config  # pylint: disable=g-import-not-at-top

  trie = trie_lib.build_trie(tok_lib.tokenize_titles(tok, TITLES))
  cfg = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=2,
                 num_decoder_layers=2, dropout_rate=0.0)
  module = T5(cfg)
  ids, mask = tok_lib.encode_batch(tok, ["user liked star wars and heat", "next movie"],
                                   max_len=16)
  ids, mask = jnp.asarray(ids), jnp.asarray(mask)
  params = jax.jit(module.init)(jax.random.key(0), ids, ids[:, :1])["params"]
  tokens, scores = decoding.generate(module, params, ids, mask, max_decode_len=trie.max_len,
                                     method="beam", num_beams=4, trie=trie,
                                     return_all_beams=True)
  assert tokens.shape == (2, 4, trie.max_len) and bool(jnp.all(scores > -1e8))
  texts = tok_lib.decode_batch(tok, np.asarray(tokens).reshape(8, -1))
  assert set(texts) <= set(TITLES) and len(set(texts[:4])) == 4
