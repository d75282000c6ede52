"""Preprocessing: filters and their counts, order, id maps, leave-one-out,
save/load, and the loader's cache. No network."""

import dataclasses
import logging
import socket

import ml_collections
import numpy as np
import pytest

from recjax.data import loader
from recjax.data.preprocess import PreprocessConfig
from recjax.data.preprocess import format_stats
from recjax.data.preprocess import natural_key
from recjax.data.preprocess import preprocess
from recjax.data.types import DataError
from recjax.data.types import RawDataset
from recjax.data.types import SequenceData
from script_testing import load_script


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError("a data test tried to use the network")
  monkeypatch.setattr(socket.socket, "connect", refuse)
  monkeypatch.setattr(socket, "getaddrinfo", refuse)


def make_raw(rows, item_info=None, name="toy"):
  """rows: (user, item, rating, timestamp) tuples in file order."""
  users, items, ratings, times = zip(*rows)
  return RawDataset(
      name=name,
      users=np.array([str(u) for u in users], dtype=object),
      items=np.array([str(i) for i in items], dtype=object),
      ratings=np.array(ratings, dtype=np.float32),
      timestamps=np.array(times, dtype=np.int64),
      item_info=item_info if item_info is not None else {},
      user_info={}, source="<test rows>")


def sequences_raw(data):
  """{raw user: [raw items in order]} of a SequenceData."""
  return {data.user_raw_ids[u]: [data.item_raw_ids[i]
                                 for i in data.sequence(u)]
          for u in range(data.num_users)}


def step(stats, name):
  [entry] = [s for s in stats["steps"] if s["step"] == name]
  return entry


# ------------------------------------------------------------- order/ids --
def test_chronological_with_stable_tie_break_on_file_order():
  rows = [("u", "a", 1, 5), ("u", "b", 1, 3), ("u", "c", 1, 5),
          ("u", "d", 1, 3), ("u", "e", 1, 4)]
  data = preprocess(make_raw(rows))
  assert sequences_raw(data) == {"u": ["b", "d", "e", "a", "c"]}
  np.testing.assert_array_equal(data.timestamps, [3, 3, 4, 5, 5])
  assert data.stats["timestamp_ties"] == 2


def test_recbole_time_order_merges_float32_near_ties():
  """RecBole min-max scales timestamps into float32 before its stable sort:
  over a 2**27 s range the last seconds all round to 1.0 and keep file order;
  seconds near the minimum stay apart only if the minimum is subtracted."""
  base, hi = 874_724_710, 2**27      # ML-100K's first timestamp as the base
  rows = [("u", "early", 1, 0), ("u", "x", 1, hi - 1), ("u", "y", 1, hi - 2),
          ("u", "z", 1, hi), ("v", "a", 1, 10), ("v", "b", 1, 5),
          ("v", "c", 1, hi)]
  rows = [(u, i, r, base + t) for u, i, r, t in rows]
  exact = preprocess(make_raw(rows))
  assert sequences_raw(exact) == {"u": ["early", "y", "x", "z"],
                                  "v": ["b", "a", "c"]}
  assert exact.stats["time_order"] == "exact"
  assert exact.stats["rows_out_of_exact_order"] == 0
  assert exact.stats["rows_out_of_time_order"] == 0
  rb = preprocess(make_raw(rows), PreprocessConfig(time_order="recbole"))
  # x, y, z all scale to float32 1.0: file order; 5 and 10 s stay apart.
  assert sequences_raw(rb) == {"u": ["early", "x", "y", "z"],
                               "v": ["b", "a", "c"]}
  np.testing.assert_array_equal(rb.timestamps[:4] - base,
                                [0, hi - 1, hi - 2, hi])
  assert rb.stats["rows_out_of_exact_order"] == 2
  assert rb.stats["rows_out_of_time_order"] == 1
  assert "time order   recbole: 2 rows" in format_stats(rb.stats)
  # Counted over the rows that survive the filters: user u's swapped x, y go
  # with u (3 rows < 4), v's 4 rows keep their exact order.
  kept = preprocess(make_raw(rows[:3] + rows[4:] + [("v", "d", 1, base + 20)]),
                    PreprocessConfig(time_order="recbole",
                                     min_user_interactions=4))
  assert sequences_raw(kept) == {"v": ["b", "a", "d", "c"]}
  assert kept.stats["rows_out_of_exact_order"] == 0
  with pytest.raises(ValueError, match="time_order"):
    PreprocessConfig(time_order="float32")


def test_id_maps_numeric_aware_and_padding():
  rows = [("10", "x", 1, 1), ("10", "20", 1, 2), ("10", "3", 1, 3),
          ("2", "x", 1, 1), ("2", "3", 1, 2), ("2", "100", 1, 3),
          ("b", "x", 1, 1), ("b", "x", 1, 2), ("b", "3", 1, 3),
          ("a", "3", 1, 1), ("a", "x", 1, 2), ("a", "20", 1, 3)]
  data = preprocess(make_raw(rows))
  assert list(data.user_raw_ids) == ["2", "10", "a", "b"]
  assert list(data.item_raw_ids) == ["<pad>", "3", "20", "100", "x"]
  assert data.user_raw_ids.dtype == object and data.item_raw_ids.dtype == object
  assert data.items.dtype == np.int32 and data.offsets.dtype == np.int64
  assert data.items.min() == 1 and data.items.max() == data.num_items == 4
  np.testing.assert_array_equal(data.offsets, [0, 3, 6, 9, 12])
  np.testing.assert_array_equal(data.sequence(1), [4, 2, 1])   # user "10"
  assert sorted(["10", "9", "b", "a1", "-1"], key=natural_key) == [
      "-1", "9", "10", "a1", "b"]


def test_titles_and_metadata_counts():
  info = {"a": {"title": "Alpha", "year": "1999", "genres": ["Drama"]},
          "zzz": {"title": "Never rated", "year": None, "genres": []}}
  rows = [("u", "a", 1, 1), ("u", "b", 1, 2), ("u", "a", 1, 3)]
  data = preprocess(make_raw(rows, info))
  assert data.item_titles == ["", "Alpha", ""]
  assert data.item_info == [{}, {"year": "1999", "genres": ["Drama"]}, {}]
  meta = data.stats["metadata"]
  assert meta["items_without_title"] == 1
  assert meta["metadata_items_without_interactions"] == 1
  assert meta["items_in_metadata"] == 2
  assert "1 unknown" in format_stats(data.stats)


def test_reader_notes_reach_the_stats():
  raw = make_raw([("u", "a", 1, 1), ("u", "b", 1, 2), ("u", "c", 1, 3)],
                 {"a": {"title": "A"}, "gone": {"title": "G"}})
  raw.notes.update(metadata_items_without_interactions=5,
                   metadata_duplicate_lines=2)
  meta = preprocess(raw).stats["metadata"]
  assert meta["metadata_items_without_interactions"] == 6
  assert meta["metadata_duplicate_lines"] == 2
  assert meta["items_without_title"] == 2


# ---------------------------------------------------------------- k-core --
def brute_force_k_core(rows, k):
  rows = list(rows)
  while True:
    uc, ic = {}, {}
    for u, i, *_ in rows:
      uc[u] = uc.get(u, 0) + 1
      ic[i] = ic.get(i, 0) + 1
    kept = [r for r in rows if uc[r[0]] >= k and ic[r[1]] >= k]
    if len(kept) == len(rows):
      return kept
    rows = kept


def test_k_core_is_iterative_on_crafted_example():
  core = [(u, i, 1, t) for t, (u, i) in enumerate(
      (u, i) for u in ("u1", "u2", "u3") for i in "abc")]
  # d has 3 users, but u4 only keeps d after its count-1 items x, y go;
  # then u4 (1 row) goes, d falls to 2 and goes, and u5/u6 fall to 2 rows.
  extra = [("u4", "d", 1, 1), ("u4", "x", 1, 2), ("u4", "y", 1, 3),
           ("u5", "a", 1, 1), ("u5", "b", 1, 2), ("u5", "d", 1, 3),
           ("u6", "a", 1, 1), ("u6", "c", 1, 2), ("u6", "d", 1, 3)]
  data = preprocess(make_raw(core + extra), PreprocessConfig(k_core=3))
  assert sequences_raw(data) == {u: ["a", "b", "c"]
                                 for u in ("u1", "u2", "u3")}
  kc = step(data.stats, "k_core")
  assert (kc["rows_dropped"], kc["users_dropped"], kc["items_dropped"]) == (
      9, 3, 3)
  assert kc["rounds"] >= 4
  assert kc["rows_after"] == 9
  # One non-iterated pass would have kept u5, u6 and d.
  assert data.num_items == 3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_k_core_matches_brute_force(seed):
  rng = np.random.default_rng(seed)
  rows = [(f"u{rng.integers(40)}", f"i{int(rng.zipf(1.6)) % 60}", 1.0, t)
          for t in range(700)]
  data = preprocess(make_raw(rows), PreprocessConfig(k_core=4))
  want = brute_force_k_core(rows, 4)
  users = {r[0] for r in want}
  items = {r[1] for r in want}
  assert set(data.user_raw_ids) == users
  assert set(data.item_raw_ids[1:]) == items
  assert data.num_interactions == len(want)
  uc = np.bincount(np.repeat(np.arange(data.num_users), data.seq_lengths()))
  assert uc.min() >= 4 and np.bincount(data.items)[1:].min() >= 4
  assert step(data.stats, "k_core")["rows_dropped"] == len(rows) - len(want)


# --------------------------------------------------- filters and counts --
def test_min_rating_counts_including_missing():
  rows = [("u", i, r, t) for t, (i, r) in enumerate(
      [("a", 5), ("b", 3), ("c", np.nan), ("d", 4), ("e", 4.5), ("f", 1)])]
  data = preprocess(make_raw(rows), {"min_rating": 4})
  assert sequences_raw(data) == {"u": ["a", "d", "e"]}
  s = step(data.stats, "min_rating")
  assert s["rows_dropped"] == 3 and s["rows_missing_rating"] == 1
  assert s["items_dropped"] == 3 and s["reason"] == "rating < 4 or missing"
  assert data.stats["raw"] == {"rows": 6, "users": 1, "items": 6}


@pytest.mark.parametrize("mode,want_times,want_ratings", [
    ("keep_first", [1, 2, 5], [2, 3, 6]),
    ("keep_last", [3, 4, 5], [7, 5, 6])])
def test_dedup_keeps_earliest_or_latest(mode, want_times, want_ratings):
  # Two "a" rows at t=3: the later one in the file (rating 7) is the latest.
  rows = [("u", "a", 1, 3), ("u", "a", 2, 1), ("u", "b", 3, 2),
          ("u", "c", 6, 5), ("u", "b", 5, 4), ("u", "a", 7, 3)]
  data = preprocess(make_raw(rows), PreprocessConfig(dedup=mode))
  np.testing.assert_array_equal(data.timestamps, want_times)
  np.testing.assert_array_equal(data.ratings, want_ratings)
  assert data.num_interactions == 3
  s = step(data.stats, "dedup")
  assert (s["rows_dropped"], s["users_dropped"], s["items_dropped"]) == (
      3, 0, 0)


def test_no_dedup_keeps_repeats():
  rows = [("u", "a", 1, 1), ("u", "a", 1, 2), ("u", "a", 1, 3)]
  data = preprocess(make_raw(rows))
  np.testing.assert_array_equal(data.items, [1, 1, 1])
  assert [s["step"] for s in data.stats["steps"]] == ["min_user_interactions"]


def test_max_seq_len_keeps_most_recent_and_counts():
  rows = [("u", f"i{t}", 1, t) for t in (5, 1, 4, 2, 3, 6)]
  rows += [("v", "i1", 1, 0), ("v", "i2", 1, 1), ("v", "i3", 1, 2)]
  data = preprocess(make_raw(rows), PreprocessConfig(max_seq_len=4))
  assert sequences_raw(data)["u"] == ["i3", "i4", "i5", "i6"]
  assert sequences_raw(data)["v"] == ["i1", "i2", "i3"]
  s = step(data.stats, "max_seq_len")
  assert (s["rows_dropped"], s["users_dropped"], s["items_dropped"]) == (
      2, 0, 0)


def test_k_core_broken_by_later_steps_is_reported():
  """max_seq_len runs after the k-core: users and items it leaves below k are counted
  (against an independent count of the output) and shown."""
  rng = np.random.default_rng(0)
  rows = [(f"u{u}", f"i{k}", 1, t) for u in range(8)
          for t, k in enumerate(rng.permutation(6)[:5])]
  data = preprocess(make_raw(rows), PreprocessConfig(k_core=4, max_seq_len=3))
  lengths = np.diff(data.offsets)
  counts = np.bincount(data.items, minlength=data.num_items + 1)[1:]
  want = {"users": int((lengths < 4).sum()), "items": int((counts < 4).sum())}
  assert want["users"] == 8 and want["items"] > 0  # every user kept 3 < 4 items
  assert data.stats["below_k_core"] == want
  assert (f"8 users and {want['items']} items end below k_core=4"
          in format_stats(data.stats))
  held = preprocess(make_raw(rows), PreprocessConfig(k_core=4))
  assert held.stats["below_k_core"] == {"users": 0, "items": 0}
  assert "k-core " not in format_stats(held.stats)


def test_short_users_dropped_and_counted():
  rows = [("u", "a", 1, 1), ("u", "b", 1, 2), ("u", "c", 1, 3),
          ("v", "a", 1, 1), ("v", "z", 1, 2)]
  data = preprocess(make_raw(rows), PreprocessConfig(min_user_interactions=3))
  assert list(data.user_raw_ids) == ["u"]
  s = step(data.stats, "min_user_interactions")
  assert (s["rows_dropped"], s["users_dropped"], s["items_dropped"]) == (
      2, 1, 1)


@pytest.mark.parametrize("cfg,step_name", [
    (PreprocessConfig(min_rating=6), "min_rating"),
    (PreprocessConfig(k_core=4), "k_core"),
    (PreprocessConfig(min_user_interactions=4), "min_user_interactions"),
])
def test_empty_after_filter_names_the_step(cfg, step_name):
  rows = [("u", "a", 5, 1), ("u", "b", 5, 2), ("u", "c", 5, 3)]
  with pytest.raises(ValueError, match=f"after step '{step_name}'"):
    preprocess(make_raw(rows), cfg)


def test_config_validation_and_configdict():
  with pytest.raises(ValueError, match="dedup"):
    PreprocessConfig(dedup="first")
  with pytest.raises(ValueError, match="min_user_interactions"):
    PreprocessConfig(min_user_interactions=2)
  with pytest.raises(ValueError, match="max_seq_len"):
    PreprocessConfig(max_seq_len=2)
  cd = ml_collections.ConfigDict(dict(
      min_rating=None, dedup="keep_last", k_core=0, min_user_interactions=3,
      max_seq_len=0))
  rows = [("u", "a", 1, 1), ("u", "a", 1, 2), ("u", "b", 1, 3),
          ("u", "c", 1, 4)]
  data = preprocess(make_raw(rows), cd)
  assert data.config == dataclasses.asdict(PreprocessConfig(dedup="keep_last"))
  assert data.num_interactions == 3


def test_stats_summary():
  rows = ([("u", i, 4, t) for t, i in enumerate("abcde")]
          + [("v", i, 2, t) for t, i in enumerate("abc")])
  st = preprocess(make_raw(rows)).stats
  assert (st["users"], st["items"], st["interactions"]) == (2, 5, 8)
  assert st["density"] == pytest.approx(8 / 10)
  assert st["seq_len"] == {"min": 3, "median": 4.0, "mean": 4.0, "max": 5}
  assert st["rating_mean"] == pytest.approx(3.25)
  table = format_stats(st)
  for text in ("users        2", "interactions 8", "min_user_interactions",
               "density      0.800000"):
    assert text in table


# ---------------------------------------------------------- leave-one-out --
@pytest.fixture
def loo_data():
  rows = [("u", f"i{k}", 1, k) for k in range(1, 7)]      # items 1..6
  rows += [("v", f"i{k}", 1, t) for t, k in enumerate((3, 1, 2))]
  return preprocess(make_raw(rows))


def test_train_sequences(loo_data):
  items, offsets = loo_data.train_sequences()
  np.testing.assert_array_equal(items, [1, 2, 3, 4, 3])
  np.testing.assert_array_equal(offsets, [0, 4, 5])
  assert items.dtype == np.int32 and offsets.dtype == np.int64


def test_eval_examples_valid_and_test(loo_data):
  h, t, n = loo_data.eval_examples("valid", max_len=3)
  np.testing.assert_array_equal(h, [[2, 3, 4], [0, 0, 3]])
  np.testing.assert_array_equal(t, [5, 1])
  np.testing.assert_array_equal(n, [3, 1])
  h, t, n = loo_data.eval_examples("test", max_len=6)
  np.testing.assert_array_equal(h, [[0, 1, 2, 3, 4, 5], [0, 0, 0, 0, 3, 1]])
  np.testing.assert_array_equal(t, [6, 2])
  np.testing.assert_array_equal(n, [5, 2])
  assert h.dtype == t.dtype == n.dtype == np.int32
  h, _, n = loo_data.eval_examples("test", max_len=1)
  np.testing.assert_array_equal(h, [[5], [1]])
  np.testing.assert_array_equal(n, [1, 1])
  with pytest.raises(ValueError):
    loo_data.eval_examples("train", 3)


def test_seen_items_are_the_whole_prefix(loo_data):
  """Everything before the target, not only the last max_len (the evaluators' exclusion)."""
  for split, want in (("valid", [[1, 2, 3, 4], [3]]), ("test", [[1, 2, 3, 4, 5], [3, 1]])):
    seen = loo_data.seen_items(split)
    assert [seen.indices[a:b].tolist() for a, b in zip(seen.indptr[:-1], seen.indptr[1:])
            ] == want
    assert seen.max_len == len(want[0])
    np.testing.assert_array_equal(seen.padded(0, 2), [want[0], want[1] + [0] * (
        len(want[0]) - len(want[1]))])
    mask = seen.mask(loo_data.num_items + 1)
    assert [np.flatnonzero(m).tolist() for m in mask] == [sorted(w) for w in want]


def test_item_popularity(loo_data):
  np.testing.assert_array_equal(loo_data.item_popularity(),
                                [0, 1, 1, 2, 1, 0, 0])
  np.testing.assert_array_equal(loo_data.item_popularity("train_valid"),
                                [0, 2, 1, 2, 1, 1, 0])
  np.testing.assert_array_equal(loo_data.item_popularity("all"),
                                [0, 2, 2, 2, 1, 1, 1])


# -------------------------------------------------------------- save/load --
def assert_same(a: SequenceData, b: SequenceData):
  for f in dataclasses.fields(SequenceData):
    x, y = getattr(a, f.name), getattr(b, f.name)
    if isinstance(x, np.ndarray):
      assert x.dtype == y.dtype, f.name
      np.testing.assert_array_equal(x, y, err_msg=f.name)
    else:
      assert x == y, f.name


def test_save_load_round_trip(tmp_path):
  info = {"a": {"title": "Amélie", "year": "2001", "genres": ["Comedy"],
                "extra": {"k": [1, 2]}}}
  rows = [("u", "a", 4.5, 3), ("u", "b", np.nan, 2), ("u", "c", 1, 1),
          ("w", "a", 2, 9), ("w", "b", 2, 8), ("w", "c", 2, 7)]
  data = preprocess(make_raw(rows, info), PreprocessConfig(k_core=2))
  data.save(str(tmp_path / "saved"))
  back = SequenceData.load(str(tmp_path / "saved"))
  assert_same(data, back)
  assert back.item_titles[1] == "Amélie"
  assert np.isnan(back.ratings).sum() == 1
  data.save(str(tmp_path / "saved"))       # overwrite in place
  assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]


def test_load_incomplete_dir_is_data_error(tmp_path):
  with pytest.raises(DataError, match="cannot load"):
    SequenceData.load(str(tmp_path))


# ------------------------------------------------------------------ cache --
def write_atomic(tmp_path, extra_row=""):
  d = tmp_path / "data"
  d.mkdir(exist_ok=True)
  (d / "toy.inter").write_text(
      "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
      + "".join(f"u{u}\ti{(u + k) % 5}\t{1 + k}\t{k}\n"
                for u in range(4) for k in range(4)) + extra_row)
  (d / "toy.item").write_text("item_id:token\ttitle:token_seq\n"
                              + "".join(f"i{k}\tItem {k}\n" for k in range(5)))
  return d


def test_cache_hit_then_miss_on_config_or_file_change(tmp_path, monkeypatch,
                                                      caplog):
  data_dir = write_atomic(tmp_path)
  cache_dir = str(tmp_path / "cache")
  calls = []
  real = loader.preprocess
  monkeypatch.setattr(loader, "preprocess",
                      lambda raw, cfg: calls.append(cfg) or real(raw, cfg))
  caplog.set_level(logging.INFO)
  load = lambda cfg: loader.load_sequence_data(  # noqa: E731
      "atomic:toy", str(data_dir), cache_dir, cfg, download=False)

  first = load(PreprocessConfig())
  assert len(calls) == 1 and "cache miss" in caplog.text
  assert first.item_titles[1] == "Item 0"
  caplog.clear()
  second = load(PreprocessConfig())
  assert len(calls) == 1 and "cache hit" in caplog.text
  assert_same(first, second)

  third = load(PreprocessConfig(min_rating=2))
  assert len(calls) == 2 and third.num_interactions == 12
  assert len(list((tmp_path / "cache").iterdir())) == 2

  write_atomic(tmp_path, extra_row="u9\ti1\t5\t1\n")   # same cfg, new file
  fourth = load(PreprocessConfig())
  assert len(calls) == 3 and fourth.num_interactions == 16   # u9 too short

  # A damaged cache entry is rebuilt, not trusted.
  [entry] = [p for p in (tmp_path / "cache").iterdir()
             if loader.cache_key(loader.resolve_source(
                 "atomic:toy", str(data_dir), False), PreprocessConfig())
             in p.name]
  (entry / "arrays.npz").write_bytes(b"junk")
  assert_same(load(PreprocessConfig()), fourth)
  assert len(calls) == 4


def write_grouplens_ml100k(d):
  """Two users, three films, in GroupLens' ML-100K layout under `d`."""
  d.mkdir(parents=True)
  (d / "u.data").write_text("".join(f"{u}\t{i}\t4\t{10 * i}\n"
                                    for u in (1, 2) for i in (1, 2, 3)))
  (d / "u.item").write_bytes("".join(
      f"{i}|Film {i} (199{i})|||u|0|" + "|".join(["0"] * 17) + "|1\n"
      for i in (1, 2, 3)).encode("latin-1"))
  (d / "u.user").write_text("1|20|M|x|1\n2|30|F|y|2\n")


def test_loader_reads_grouplens_ml100k_without_download(tmp_path):
  write_grouplens_ml100k(tmp_path / "ml-100k")
  data = loader.load_sequence_data("ml-100k", str(tmp_path),
                                   str(tmp_path / "cache"), None,
                                   download=False)
  assert (data.num_users, data.num_items) == (2, 3)
  assert data.item_titles[1:] == ["Film 1", "Film 2", "Film 3"]
  assert data.item_info[3] == {"year": "1993", "genres": ["Western"],
                               "release_date": "", "url": "u"}


def test_loader_expands_home_in_directories(tmp_path, monkeypatch):
  """`~/...` directories (as the configs write them) resolve under $HOME."""
  write_grouplens_ml100k(tmp_path / "data" / "ml-100k")
  monkeypatch.setenv("HOME", str(tmp_path))
  monkeypatch.chdir(tmp_path)
  data = loader.load_sequence_data("ml-100k", "~/data", "~/cache", None,
                                   download=False)
  assert (data.num_users, data.num_items) == (2, 3)
  assert any((tmp_path / "cache").iterdir())
  assert not (tmp_path / "~").exists()


def test_loader_missing_files_and_unknown_name(tmp_path):
  with pytest.raises(DataError, match="pass download=True"):
    loader.load_sequence_data("ml-1m", str(tmp_path), str(tmp_path), None,
                              download=False)
  with pytest.raises(ValueError, match="unknown dataset"):
    loader.load_sequence_data("netflix", str(tmp_path), str(tmp_path))
  with pytest.raises(DataError, match="downloaded by hand"):
    loader.load_sequence_data("amazon2018-Toys", str(tmp_path), str(tmp_path))


def test_compare_split_recbole_counts_differences():
  """experiments/compare_split_recbole.py: the per-user split comparison."""
  module = load_script("compare_split_recbole")
  rows = [("u", "a", 1, 1), ("u", "b", 1, 2), ("u", "c", 1, 3),
          ("u", "d", 1, 4), ("v", "x", 1, 1), ("v", "y", 1, 2),
          ("v", "z", 1, 3)]
  data = preprocess(make_raw(rows))
  same = {"valid": {"u": ["c", ["a", "b"]], "v": ["y", ["x"]]},
          "test": {"u": ["d", ["a", "b", "c"]], "v": ["z", ["x", "y"]]}}
  counts = module.compare(data, same, max_len=50)
  assert counts == {"users": 2, "users_missing_in_recbole": 0,
                    "valid_targets": 0, "test_targets": 0,
                    "valid_histories": 0, "test_histories": 0}
  other = {"valid": {"u": ["b", ["a", "c"]]},      # v missing; u's c, b swapped
           "test": {"u": ["d", ["a", "c", "b"]]}}
  counts = module.compare(data, other, max_len=50)
  assert counts == {"users": 2, "users_missing_in_recbole": 1,
                    "valid_targets": 1, "test_targets": 0,
                    "valid_histories": 1, "test_histories": 1}
  # Only the last max_len history items are compared.
  assert module.compare(data, {"valid": {"u": ["c", ["b"]]},
                               "test": {"u": ["d", ["b", "c"]]}},
                        max_len=1)["test_histories"] == 1
  assert module.compare(data, {"valid": {"u": ["c", ["b"]]},
                               "test": {"u": ["d", ["c"]]}},
                        max_len=1)["test_histories"] == 0
