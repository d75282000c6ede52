"""Training windows and batches: coverage, determinism, per-process shares."""

import numpy as np
import pytest

from recjax.data import pipeline

# Three users' training sequences: lengths 7, 2, 1.
ITEMS = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], np.int32)
OFFSETS = np.array([0, 7, 9, 10])


@pytest.mark.parametrize("stride", [1, 2, 3, 4])
def test_every_target_exactly_once_with_its_history(stride):
  ds, stats = pipeline.train_dataset(
      ITEMS, OFFSETS, max_len=4, stride=stride, windows_per_user=0,
      batch_size=3, num_epochs=1, seed=0)
  seen = []
  for _, b in pipeline.iterate_from(ds, 0):
    for row in range(b["inputs"].shape[0]):
      s = b["labels"].shape[1]
      for j in range(s):
        if b["mask"][row, j]:
          label = b["labels"][row, j]
          pos = 4 - s + j          # position of the label's last input
          history = [x for x in b["inputs"][row, :pos + 1] if x]
          seen.append((label, tuple(history)))
  # Targets: items 2..7 (user 0) and 9 (user 1); user 2 has none.
  assert sorted(l for l, _ in seen) == [2, 3, 4, 5, 6, 7, 9]
  assert stats["num_targets_per_epoch"] == 7
  for label, history in seen:
    seq = [1, 2, 3, 4, 5, 6, 7] if label <= 7 else [8, 9]
    t = seq.index(label)
    expected = tuple(seq[max(0, t - 4):t])
    # Each target sees >= max_len - stride + 1 items (or all it has).
    assert history == expected[len(expected) - len(history):]
    assert len(history) >= min(t, 4 - min(stride, 4) + 1)


def test_stride_longer_than_window_is_refused():
  """stride > max_len would leave stride - max_len targets per gap untrained."""
  with pytest.raises(ValueError, match="stride=5 > max_len=4"):
    pipeline.train_dataset(ITEMS, OFFSETS, max_len=4, stride=5, windows_per_user=0,
                           batch_size=3, num_epochs=1, seed=0)


@pytest.mark.parametrize("power", [0.5, 1.0])
def test_user_weights_give_each_target_its_users_weight(power):
  # User 0 has 6 targets, user 1 one, user 2 none: weights 6**-p and 1, mean 1.
  ds, _ = pipeline.train_dataset(
      ITEMS, OFFSETS, max_len=4, stride=2, windows_per_user=0,
      batch_size=3, num_epochs=1, seed=0, user_weight_power=power)
  raw = np.array([6.0 ** -power, 1.0])
  scale = 7 / (6 * raw[0] + raw[1])
  got = []
  for _, b in pipeline.iterate_from(ds, 0):
    assert b["weights"].dtype == np.float32
    np.testing.assert_array_equal(b["weights"][~b["mask"]], 0.0)
    got += [(int(l), float(w)) for l, w in zip(b["labels"][b["mask"]],
                                             b["weights"][b["mask"]])]
  assert sorted(l for l, _ in got) == [2, 3, 4, 5, 6, 7, 9]
  for label, weight in got:
    want = scale * (raw[1] if label == 9 else raw[0])
    np.testing.assert_allclose(weight, want, rtol=1e-6)
  np.testing.assert_allclose(sum(w for _, w in got), 7.0, rtol=1e-6)
  if power == 1.0:   # both users weigh the same in total
    np.testing.assert_allclose(sum(w for l, w in got if l != 9),
                               sum(w for l, w in got if l == 9), rtol=1e-6)
  # Without the option there is no weights entry (and no cost).
  plain, _ = pipeline.train_dataset(
      ITEMS, OFFSETS, max_len=4, stride=2, windows_per_user=0,
      batch_size=3, num_epochs=1, seed=0)
  assert "weights" not in plain[0]
  with pytest.raises(ValueError, match="user_weight_power"):
    pipeline.user_target_weights(OFFSETS, -1.0)


def test_windows_per_user_keeps_the_last_window():
  ends, starts = pipeline.window_ends(OFFSETS, stride=4, windows_per_user=1)
  np.testing.assert_array_equal(ends, [6, 8])
  np.testing.assert_array_equal(starts, [0, 7])


def test_order_is_a_function_of_seed_and_step():
  kw = dict(max_len=4, stride=1, windows_per_user=0, batch_size=4,
            num_epochs=3, seed=7)
  a, _ = pipeline.train_dataset(ITEMS, OFFSETS, **kw)
  b, _ = pipeline.train_dataset(ITEMS, OFFSETS, **kw)
  full = [batch for _, batch in pipeline.iterate_from(a, 0)]
  resumed = [batch for _, batch in pipeline.iterate_from(b, 2)]
  for x, y in zip(full[2:], resumed, strict=True):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  c, _ = pipeline.train_dataset(ITEMS, OFFSETS, **{**kw, "seed": 8})
  assert any(not np.array_equal(x["labels"], y["labels"])
             for x, (_, y) in zip(full, pipeline.iterate_from(c, 0)))


def test_epochs_reshuffle_and_nothing_is_dropped():
  ds, stats = pipeline.train_dataset(
      ITEMS, OFFSETS, max_len=4, stride=1, windows_per_user=0, batch_size=4,
      num_epochs=3, seed=0)
  # 7 windows x 3 epochs = 21 rows -> 6 batches, 3 padded rows at the end.
  assert len(ds) == 6 and stats["padded_rows_in_last_batch"] == 3
  labels = np.concatenate([b["labels"][b["mask"]] for _, b in
                           pipeline.iterate_from(ds, 0)])
  assert sorted(labels.tolist()) == sorted([2, 3, 4, 5, 6, 7, 9] * 3)
  last = ds[5]
  assert last["mask"].sum() == 1 and np.all(last["inputs"][1:] == 0)


def test_process_shares_partition_the_global_batch():
  kw = dict(max_len=4, stride=1, windows_per_user=0, batch_size=4,
            num_epochs=2, seed=3)
  full, _ = pipeline.train_dataset(ITEMS, OFFSETS, **kw)
  p0, _ = pipeline.train_dataset(ITEMS, OFFSETS, process_index=0,
                                 process_count=2, **kw)
  p1, _ = pipeline.train_dataset(ITEMS, OFFSETS, process_index=1,
                                 process_count=2, **kw)
  for step in range(len(full)):
    for k in ("inputs", "labels", "mask"):
      np.testing.assert_array_equal(
          np.concatenate([p0[step][k], p1[step][k]]), full[step][k])
  with pytest.raises(ValueError, match="divisible"):
    pipeline.train_dataset(ITEMS, OFFSETS, process_count=3, **kw)
