"""Retrieval prompts and the catalogue vocabulary (recjax.data.prompts)."""

import os

import numpy as np
import pytest

from recjax.data import prompts

pytest.importorskip("sentencepiece")

# A word-level toy tokenizer: every distinct word gets an id >= 10.
_VOCAB: dict[str, int] = {}


def toy_tokenize(texts):
  return [[_VOCAB.setdefault(w, 10 + len(_VOCAB)) for w in t.split()] for t in texts]


TITLES = ["", "alpha one", "beta", "gamma three words four", "delta"]
ITEM = 7


def builder(**kwargs):
  cfg = prompts.PromptConfig(**{"prefix": "saw", "separator": ";", "suffix": "next ?",
                                **kwargs})
  return prompts.PromptBuilder(toy_tokenize, TITLES, cfg, item_token_id=ITEM)


def words(ids):
  inverse = {v: k for k, v in _VOCAB.items()}
  return [inverse.get(int(i), {ITEM: "<item>", 1: "</s>", 0: "<pad>"}.get(int(i)))
          for i in ids]


def test_title_and_token_prompt_layout():
  out = builder(prompt_len=24, num_items=10)(np.array([[0, 0, 2, 1, 4]], np.int32))
  ids, mask, items = out["llm_input_ids"][0], out["llm_input_mask"][0], out["llm_item_ids"][0]
  n = int(mask.sum())
  assert mask[:n].all() and not mask[n:].any() and (ids[n:] == 0).all()
  assert words(ids[:n]) == ["saw", "<item>", "beta", ";", "<item>", "alpha", "one", ";",
                            "<item>", "delta", ";", "next", "?", "</s>"]
  # Item ids sit exactly at the placeholder positions, oldest item first.
  assert list(items[:n][ids[:n] == ITEM]) == [2, 1, 4]
  assert (items[ids != ITEM] == 0).all()


@pytest.mark.parametrize("repr_, expected", [
    ("title", ["saw", "alpha", "one", ";", "delta", ";", "next", "?", "</s>"]),
    ("token", ["saw", "<item>", ";", "<item>", ";", "next", "?", "</s>"]),
])
def test_item_representations(repr_, expected):
  out = builder(prompt_len=20, item_repr=repr_)(np.array([[1, 4]], np.int32))
  n = int(out["llm_input_mask"][0].sum())
  assert words(out["llm_input_ids"][0][:n]) == expected
  assert (out["llm_item_ids"][0] > 0).sum() == (2 if repr_ == "token" else 0)


def test_oldest_items_dropped_whole_when_too_long():
  # Template: saw + next ? + </s> = 4 tokens; "gamma three words four ;" = 6 with the token.
  out = builder(prompt_len=14, title_len=4)(np.array([[1, 3, 4]], np.int32))
  n = int(out["llm_input_mask"][0].sum())
  assert words(out["llm_input_ids"][0][:n]) == ["saw", "<item>", "gamma", "three", "words",
                                               "four", ";", "<item>", "delta", ";", "next",
                                               "?", "</s>"]
  # num_items caps the history too, and title_len cuts long titles.
  out = builder(prompt_len=64, num_items=1, title_len=2)(np.array([[4, 3]], np.int32))
  n = int(out["llm_input_mask"][0].sum())
  assert words(out["llm_input_ids"][0][:n]) == ["saw", "<item>", "gamma", "three", ";",
                                               "next", "?", "</s>"]


def test_coverage_counts_shown_dropped_and_cut():
  """What the prompts leave out is counted, with the same choice as the prompts."""
  b = builder(prompt_len=14, title_len=3)        # "gamma three words four" is cut to 3
  hist = np.array([[1, 3, 4], [0, 0, 4], [0, 0, 0]], np.int32)
  cov = b.coverage(hist)
  shown = [int((b(hist[i:i + 1])["llm_item_ids"][0] > 0).sum()) for i in range(3)]
  assert cov == {"rows": 3, "items_offered": 4, "items_shown": sum(shown),
                 "items_dropped": 4 - sum(shown), "mean_items_shown": sum(shown) / 3,
                 "rows_with_drops": 1, "titles_cut": 1}
  assert shown == [2, 1, 0]


def test_empty_history_and_catalogue():
  b = builder(prompt_len=16, title_len=3)
  out = b(np.zeros((2, 4), np.int32))
  n = int(out["llm_input_mask"][0].sum())
  assert words(out["llm_input_ids"][0][:n]) == ["saw", "next", "?", "</s>"]
  cat = b.catalogue()
  assert cat["title_ids"].shape == (5, 3) and cat["title_mask"].dtype == bool
  assert not cat["title_mask"][0].any()                  # padding row: no title
  assert list(cat["title_mask"].sum(1)) == [0, 2, 1, 3, 1]


def test_bad_config_and_too_short_prompt():
  with pytest.raises(ValueError, match="item_repr"):
    prompts.PromptConfig(item_repr="emoji")
  with pytest.raises(ValueError, match="prompt_len=5"):
    builder(prompt_len=5)


def test_trained_vocabulary_is_t5_shaped_and_cached(tmp_path):
  texts = prompts.item_texts(["Heat", "Toy Story", "Casino"],
                             [{"year": "1995", "genres": ["Action", "Crime"]}, {}, {}])
  assert texts[0] == "Heat 1995 Action Crime"
  assert prompts.display_titles(["Heat", "Casino (1995)"],
                                [{"year": "1995"}, {"year": "1995"}]) == [
                                    "Heat (1995)", "Casino (1995)"]
  corpus = texts * 20 + ["user watched: ; what next?"] * 10
  tokenize, size, item_id = prompts.train_text_vocab(corpus, 60, str(tmp_path))
  ids = tokenize(["Toy Story"])[0]
  assert ids and min(ids) > 2 and max(ids) < size       # no pad/eos/unk for known text
  assert item_id == 3                                    # the user-defined <item> piece
  (cached,) = os.listdir(tmp_path)
  mtime = os.path.getmtime(tmp_path / cached / "spiece.model")
  tokenize2, size2, _ = prompts.train_text_vocab(corpus, 60, str(tmp_path))
  assert size2 == size and tokenize2(["Toy Story"])[0] == ids
  assert os.path.getmtime(tmp_path / cached / "spiece.model") == mtime   # reused
