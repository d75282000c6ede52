"""RawDataset -> SequenceData: filters, chronological order, id maps, stats.

Steps, in this order (each one's dropped rows/users/items are recorded in
stats["steps"] with the reason):
  1. min_rating             drop rows with rating < min_rating (and rows with
                            no rating, when min_rating is set)
  2. dedup                  repeated (user, item) pairs: "none" keeps all,
                            "keep_first" / "keep_last" keep the earliest /
                            latest in chronological order
  3. k_core                 iteratively drop users and items with fewer than
                            k interactions until none is left (0 = off)
  4. max_seq_len            keep each user's most recent N rows (0 = off)
  5. min_user_interactions  drop users with fewer rows (leave-one-out needs 3)

Chronological order: rows of a user are sorted by timestamp; ties keep file
order (stable). `time_order="recbole"` sorts instead on the key RecBole 1.2.1
sorts on with its ML-100K preset (`normalize_all: True` min-max scales the
timestamp field into float32 before the stable "TO" sort), which merges
timestamps closer than float32 resolves (about 1 s over ML-100K's 7 months)
into ties kept in file order. On ML-100K this reproduces RecBole's split
exactly; the exact order differs from it in 4 test targets, 5 validation
targets and 37 test histories of 943 users (README, "Datasets and
preprocessing"). Id maps: user ids 0..U-1 and item ids 1..I follow the
numeric-aware sort of the raw ids ("2" < "10" < "a"), 0 is the padding item;
only ids that survive filtering get an id.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from absl import logging
import numpy as np

from recjax.data.types import PAD_ITEM, DataError, RawDataset, SequenceData

DEDUP_MODES = ("none", "keep_first", "keep_last")
TIME_ORDERS = ("exact", "recbole")


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
  """Preprocessing options (an ml_collections ConfigDict with the same fields
  is accepted wherever this is)."""
  # Drop rows with rating below this; None keeps every row.
  min_rating: float | None = None
  # Repeated (user, item) pairs: "none" | "keep_first" | "keep_last".
  dedup: str = "none"
  # Iterative user-and-item k-core; 0 = off.
  k_core: int = 0
  # Users with fewer interactions are dropped (>= 3 for leave-one-out).
  min_user_interactions: int = 3
  # Keep only each user's most recent N interactions; 0 = keep all.
  max_seq_len: int = 0
  # "exact": integer timestamps; "recbole": RecBole's float32 min-max scaled
  # timestamps (near-ties become ties in file order; see the module docstring).
  time_order: str = "exact"

  def __post_init__(self):
    if self.dedup not in DEDUP_MODES:
      raise ValueError(f"dedup must be one of {DEDUP_MODES}, "
                       f"got {self.dedup!r}")
    if self.time_order not in TIME_ORDERS:
      raise ValueError(f"time_order must be one of {TIME_ORDERS}, "
                       f"got {self.time_order!r}")
    if self.k_core < 0:
      raise ValueError(f"k_core must be >= 0, got {self.k_core}")
    if self.min_user_interactions < 3:
      raise ValueError("min_user_interactions must be >= 3 (leave-one-out "
                       f"needs train, valid and test), got "
                       f"{self.min_user_interactions}")
    if self.max_seq_len and self.max_seq_len < self.min_user_interactions:
      raise ValueError(f"max_seq_len ({self.max_seq_len}) must be 0 or >= "
                       f"min_user_interactions ({self.min_user_interactions})")
    if self.min_rating is not None and not math.isfinite(self.min_rating):
      raise ValueError(f"min_rating must be finite, got {self.min_rating}")

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def as_config(cfg=None) -> PreprocessConfig:
  """PreprocessConfig from a PreprocessConfig, ConfigDict, mapping or None.

  Unknown keys of a ConfigDict/mapping are ignored with a warning (so a
  `config.data` block may carry other fields such as the dataset name).
  """
  if cfg is None:
    return PreprocessConfig()
  if isinstance(cfg, PreprocessConfig):
    return cfg
  d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
  names = {f.name for f in dataclasses.fields(PreprocessConfig)}
  unknown = sorted(set(d) - names)
  if unknown:
    logging.warning("PreprocessConfig ignores fields %s", unknown)
  kwargs = {k: v for k, v in d.items() if k in names}
  if kwargs.get("min_rating") is not None:
    kwargs["min_rating"] = float(kwargs["min_rating"])
  for k in ("k_core", "min_user_interactions", "max_seq_len"):
    if k in kwargs:
      kwargs[k] = int(kwargs[k])
  return PreprocessConfig(**kwargs)


# -------------------------------------------------------------- id maps --
def natural_key(raw_id: str):
  """Numeric-aware sort key: integers by value first, then other strings."""
  s = str(raw_id)
  if s.isdigit() or (s[:1] == "-" and s[1:].isdigit()):
    return (0, int(s), s)
  return (1, 0, s)


def factorize(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Codes in natural-key order of the unique values.

  Returns:
    uniques: object[K] sorted by natural_key; codes: int64[N] into uniques.
  """
  uniq, inverse = np.unique(np.asarray(raw, dtype=str), return_inverse=True)
  order = sorted(range(len(uniq)), key=lambda k: natural_key(uniq[k]))
  rank = np.empty(len(uniq), dtype=np.int64)
  rank[order] = np.arange(len(uniq))
  return uniq[order].astype(object), rank[inverse.reshape(-1)]


def recbole_time_key(t: np.ndarray) -> np.ndarray:
  """float32[N] RecBole 1.2.1's sort key for int64[N] timestamps.

  Its ML-100K preset sets `normalize_all: True`, so the timestamp column
  is min-max scaled (in float64) and stored as float32 before the stable sort
  by time; timestamps that round to the same float32 become ties. RecBole
  scales after its own filters; here the min and max are over the rows as
  read (the same when nothing is filtered, as in the ML-100K reference).
  """
  t = np.asarray(t, dtype=np.int64)
  lo, hi = int(t.min()), int(t.max())
  if hi == lo:
    return np.zeros(t.shape, np.float32)
  return ((t - lo) / (hi - lo)).astype(np.float32)


# ---------------------------------------------------------------- steps --
class _Rows:
  """Columnar rows in chronological order with a running step log."""

  def __init__(self, raw: RawDataset, name: str, time_order: str = "exact"):
    self.name = name
    self.user_ids, u = factorize(raw.users)
    self.item_ids, i = factorize(raw.items)
    t = np.asarray(raw.timestamps, dtype=np.int64)
    file_row = np.arange(len(u))
    exact = np.lexsort((file_row, t, u))   # user, then time, then file order
    order = exact
    if time_order == "recbole":
      order = np.lexsort((file_row, recbole_time_key(t), u))
    exact_rank = np.empty(len(u), dtype=np.int64)
    exact_rank[exact] = np.arange(len(u))
    self.u, self.i, self.t = u[order], i[order], t[order]
    self.r = np.asarray(raw.ratings, dtype=np.float32)[order]
    self.x = exact_rank[order]   # each row's rank in the exact order
    self.steps: list[dict] = []

  def __len__(self):
    return len(self.u)

  def keep(self, mask: np.ndarray, step: str, reason: str, **extra) -> None:
    before = (len(self), len(np.unique(self.u)), len(np.unique(self.i)))
    for f in ("u", "i", "t", "r", "x"):
      setattr(self, f, getattr(self, f)[mask])
    after = (len(self), len(np.unique(self.u)), len(np.unique(self.i)))
    entry = {"step": step, "reason": reason,
             "rows_dropped": before[0] - after[0],
             "users_dropped": before[1] - after[1],
             "items_dropped": before[2] - after[2],
             "rows_after": after[0]}
    entry.update(extra)
    self.steps.append(entry)
    if not len(self):
      raise DataError(f"{self.name}: no interactions left after step "
                      f"{step!r} ({reason}); loosen that setting")

  def position_in_user(self) -> tuple[np.ndarray, np.ndarray]:
    """(0-based position of each row in its user's sequence, user length)."""
    starts = np.flatnonzero(np.r_[True, self.u[1:] != self.u[:-1]])
    lengths = np.diff(np.r_[starts, len(self)])
    run = np.repeat(np.arange(len(starts)), lengths)
    return np.arange(len(self)) - starts[run], lengths[run]


def _min_rating(rows: _Rows, cfg: PreprocessConfig) -> None:
  if cfg.min_rating is None:
    return
  missing = int(np.isnan(rows.r).sum())
  rows.keep(~np.isnan(rows.r) & (rows.r >= cfg.min_rating), "min_rating",
            f"rating < {cfg.min_rating:g} or missing",
            rows_missing_rating=missing)


def _dedup(rows: _Rows, cfg: PreprocessConfig) -> None:
  if cfg.dedup == "none":
    return
  pair = rows.u * (int(rows.i.max()) + 1) + rows.i
  if cfg.dedup == "keep_first":
    _, first = np.unique(pair, return_index=True)
  else:
    _, first = np.unique(pair[::-1], return_index=True)
    first = len(pair) - 1 - first
  mask = np.zeros(len(rows), dtype=bool)
  mask[first] = True
  which = "earliest" if cfg.dedup == "keep_first" else "latest"
  rows.keep(mask, "dedup", f"repeated (user, item) pair; kept the {which}")


def _k_core(rows: _Rows, cfg: PreprocessConfig) -> None:
  k = cfg.k_core
  if k <= 0:
    return
  mask = np.ones(len(rows), dtype=bool)
  rounds = 0
  while True:
    uc = np.bincount(rows.u[mask], minlength=len(rows.user_ids))
    ic = np.bincount(rows.i[mask], minlength=len(rows.item_ids))
    new = mask & (uc[rows.u] >= k) & (ic[rows.i] >= k)
    rounds += 1
    if new.sum() == mask.sum():
      break
    mask = new
  rows.keep(mask, "k_core", f"user or item with < {k} interactions "
            "(iterated until stable)", rounds=rounds)


def _max_seq_len(rows: _Rows, cfg: PreprocessConfig) -> None:
  if cfg.max_seq_len <= 0:
    return
  pos, length = rows.position_in_user()
  rows.keep(pos >= length - cfg.max_seq_len, "max_seq_len",
            f"older than the user's {cfg.max_seq_len} most recent")


def _min_user(rows: _Rows, cfg: PreprocessConfig) -> None:
  _, length = rows.position_in_user()
  rows.keep(length >= cfg.min_user_interactions, "min_user_interactions",
            f"user with < {cfg.min_user_interactions} interactions "
            "(cannot be split leave-one-out)")


# ------------------------------------------------------------ statistics --
def _summary(x: np.ndarray) -> dict[str, float]:
  return {"min": int(x.min()), "median": float(np.median(x)),
          "mean": round(float(x.mean()), 4), "max": int(x.max())}


def _compute_stats(raw: RawDataset, rows: _Rows, data: dict,
                   cfg: PreprocessConfig) -> dict:
  num_users, num_items = data["num_users"], data["num_items"]
  n = len(rows)
  lengths = np.diff(data["offsets"])
  same_user = rows.u[1:] == rows.u[:-1]
  raw_items = set(rows.item_ids.tolist())
  meta_unused = sum(1 for k in raw.item_info if k not in raw_items)
  meta_unused += int(raw.notes.get("metadata_items_without_interactions", 0))
  missing_titles = sum(1 for t in data["item_titles"][1:] if not t)
  item_pop = np.bincount(data["items"], minlength=num_items + 1)[1:]
  ratings = rows.r[~np.isnan(rows.r)]
  return {
      "name": data["name"],
      "source": raw.source,
      "users": num_users,
      "items": num_items,
      "interactions": n,
      "density": n / (num_users * num_items),
      "seq_len": _summary(lengths),
      "item_interactions": _summary(item_pop),
      "timestamp_ties": int((same_user & (rows.t[1:] == rows.t[:-1])).sum()),
      # max_seq_len and min_user run after the k-core and can leave users or items
      # below k again: counted, not hidden (0 and 0 when k_core is off or still holds).
      "below_k_core": {"users": int((lengths < cfg.k_core).sum()),
                       "items": int((item_pop < cfg.k_core).sum())},
      "time_order": cfg.time_order,
      "rows_out_of_exact_order": int((np.sort(rows.x) != rows.x).sum()),
      "rows_out_of_time_order": int((same_user & (rows.t[1:] < rows.t[:-1])).sum()),
      "timestamp_range": [int(rows.t.min()), int(rows.t.max())],
      "rating_mean": float(ratings.mean()) if len(ratings) else None,
      "rows_without_rating": int(n - len(ratings)),
      "raw": {"rows": raw.num_rows, "users": len(rows.user_ids),
              "items": len(rows.item_ids)},
      "steps": rows.steps,
      "metadata": {
          "items_in_metadata": len(raw.item_info),
          "items_without_title": missing_titles,
          "metadata_items_without_interactions": meta_unused,
          **{k: v for k, v in raw.notes.items()
             if k != "metadata_items_without_interactions"},
      },
      "config": cfg.to_dict(),
  }


# ------------------------------------------------------------- preprocess --
def preprocess(raw: RawDataset, cfg=None) -> SequenceData:
  """Filters, orders and re-indexes raw interactions (see module docstring).

  Args:
    raw: interactions as read from the files.
    cfg: PreprocessConfig, ConfigDict/mapping with its fields, or None.
  Returns:
    SequenceData with stats and the config used.
  Raises:
    DataError (a ValueError): the raw data is empty, or a step removed every
      interaction (the message names the step).
  """
  cfg = as_config(cfg)
  if raw.num_rows == 0:
    raise DataError(f"{raw.source}: no interactions")
  rows = _Rows(raw, raw.name, cfg.time_order)
  for step in (_min_rating, _dedup, _k_core, _max_seq_len, _min_user):
    step(rows, cfg)

  user_keep, u_new = np.unique(rows.u, return_inverse=True)
  item_keep, i_new = np.unique(rows.i, return_inverse=True)
  num_users, num_items = len(user_keep), len(item_keep)
  offsets = np.zeros(num_users + 1, dtype=np.int64)
  np.cumsum(np.bincount(u_new, minlength=num_users), out=offsets[1:])
  item_raw = np.empty(num_items + 1, dtype=object)
  item_raw[0] = PAD_ITEM
  item_raw[1:] = rows.item_ids[item_keep]
  titles, infos = [""], [{}]
  for raw_id in item_raw[1:]:
    info = dict(raw.item_info.get(raw_id, {}))
    titles.append(str(info.pop("title", "") or ""))
    infos.append(info)
  data = {
      "name": raw.name,
      "num_users": num_users,
      "num_items": num_items,
      "user_raw_ids": rows.user_ids[user_keep],
      "item_raw_ids": item_raw,
      "item_titles": titles,
      "item_info": infos,
      "offsets": offsets,
      "items": (i_new.reshape(-1) + 1).astype(np.int32),
      "timestamps": rows.t.astype(np.int64),
      "ratings": rows.r.astype(np.float32),
  }
  stats = _compute_stats(raw, rows, data, cfg)
  return SequenceData(**data, stats=stats, config=cfg.to_dict())


def format_stats(stats: dict) -> str:
  """A plain-text table of the statistics (for logs and the console)."""
  s = stats["seq_len"]
  m = stats["metadata"]
  lines = [
      f"dataset      {stats['name']}",
      f"source       {stats['source']}",
      f"raw          {stats['raw']['rows']:,} rows, "
      f"{stats['raw']['users']:,} users, {stats['raw']['items']:,} items",
      "",
      f"{'step':<23}{'rows dropped':>13}{'users':>8}{'items':>8}"
      f"{'rows left':>12}  reason",
  ]
  for st in stats["steps"]:
    lines.append(f"{st['step']:<23}{st['rows_dropped']:>13,}"
                 f"{st['users_dropped']:>8,}{st['items_dropped']:>8,}"
                 f"{st['rows_after']:>12,}  {st['reason']}")
  if not stats["steps"]:
    lines.append("(no filtering step was enabled)")
  lines += [
      "",
      f"users        {stats['users']:,}",
      f"items        {stats['items']:,}",
      f"interactions {stats['interactions']:,}",
      f"density      {stats['density']:.6f}",
      f"seq length   min {s['min']}  median {s['median']:g}  "
      f"mean {s['mean']:.2f}  max {s['max']}",
      f"same-time    {stats['timestamp_ties']:,} rows share their user's "
      "previous timestamp (file order kept)",
  ]
  below = stats.get("below_k_core", {})
  if below.get("users") or below.get("items"):
    lines.append(
        f"k-core       {below['users']:,} users and {below['items']:,} items end below "
        f"k_core={stats['config']['k_core']} (max_seq_len / min_user run after the k-core)")
  if stats.get("time_order", "exact") != "exact":
    lines.append(
        f"time order   {stats['time_order']}: {stats['rows_out_of_exact_order']:,}"
        f" rows placed differently from the exact order, "
        f"{stats['rows_out_of_time_order']:,} directly after a later timestamp")
  lines += [
      f"titles       {stats['items'] - m['items_without_title']:,} known, "
      f"{m['items_without_title']:,} unknown",
      f"metadata     {m['items_in_metadata']:,} items read, "
      f"{m['metadata_items_without_interactions']:,} without interactions "
      "(ignored)",
  ]
  extra = {k: v for k, v in m.items() if k not in (
      "items_in_metadata", "items_without_title",
      "metadata_items_without_interactions")}
  if extra:
    lines.append(f"notes        {extra}")
  return "\n".join(lines)
