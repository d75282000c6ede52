"""Reader for RecBole atomic files (`<prefix>.inter`, `.item`, `.user`).

Atomic files are UTF-8, tab-separated, with a header of `name:type` fields,
type one of token, token_seq (space-separated), float, float_seq. Columns are
mapped by header name, so their order does not matter.

  .inter  required: user_id, item_id; optional: rating, timestamp
          (no timestamp column: every timestamp is 0 and file order decides)
  .item   optional file; item_id required; the title is the first present of
          title / movie_title / item_name / name, the year of release_year /
          year, the genres of class / genre / genres / categories
  .user   optional file; user_id required; other fields are kept

Empty cells are allowed except in the id columns (RecBole treats them as
missing values): an empty rating is nan, an empty timestamp is an error.
"""

from __future__ import annotations

import math
import os

from absl import logging
import numpy as np

from recjax.data import textio
from recjax.data.types import DataError, RawDataset

ATOMIC_TYPES = ("token", "token_seq", "float", "float_seq")
TITLE_FIELDS = ("title", "movie_title", "item_name", "name")
YEAR_FIELDS = ("release_year", "year")
GENRE_FIELDS = ("class", "genre", "genres", "categories")


def parse_header(path: str, line: str) -> list[tuple[str, str]]:
  """'user_id:token\\titem_id:token' -> [('user_id', 'token'), ...]."""
  fields = []
  for column, spec in enumerate(line.split("\t"), 1):
    name, sep, typ = spec.strip().rpartition(":")
    if not sep or not name:
      raise textio.error(path, 1, f"header field {column} {spec!r} is not "
                         "'name:type'")
    if typ not in ATOMIC_TYPES:
      raise textio.error(path, 1, f"unknown type {typ!r} of header field "
                         f"{name!r} (expected one of {ATOMIC_TYPES})")
    if name in (n for n, _ in fields):
      raise textio.error(path, 1, f"duplicate header field {name!r}")
    fields.append((name, typ))
  return fields


def iter_records(path: str, required: tuple[str, ...] = ()):
  """Yields (lineno, {name: value}) with values converted by header type.

  token -> str, token_seq -> list[str], float -> float (nan if empty),
  float_seq -> list[float].
  """
  lines = textio.iter_lines(path, "utf-8")
  try:
    _, header_line = next(lines)
  except StopIteration:
    raise DataError(f"{path}: empty file (no header)") from None
  header = parse_header(path, header_line)
  names = [n for n, _ in header]
  missing = [r for r in required if r not in names]
  if missing:
    raise textio.error(path, 1, f"missing required column(s) {missing}; "
                       f"header has {names}")
  for lineno, line in lines:
    cells = line.split("\t")
    if len(cells) != len(header):
      raise textio.error(path, lineno, f"expected {len(header)} tab-separated "
                         f"columns ({names}), got {len(cells)}")
    record = {}
    for (name, typ), cell in zip(header, cells):
      if typ == "token":
        record[name] = cell.strip()
      elif typ == "token_seq":
        record[name] = cell.split()
      elif typ == "float":
        record[name] = textio.parse_float(cell, path, lineno, name, allow_empty=True,
                                          finite=name == "rating")
      else:
        record[name] = [textio.parse_float(x, path, lineno, name)
                        for x in cell.split()]
    for r in required:
      if not record[r]:
        raise textio.error(path, lineno, f"empty {r}")
    yield lineno, record


def _first(record: dict, names: tuple[str, ...]):
  for n in names:
    if n in record:
      return n
  return None


def read_item_file(path: str, notes: dict) -> dict[str, dict]:
  """item_id -> {"title", "year", "genres", other fields}; keeps the first
  line of a duplicated id and counts the rest in notes."""
  info = {}
  for lineno, rec in iter_records(path, required=("item_id",)):
    item = rec.pop("item_id")
    t, y, g = (_first(rec, TITLE_FIELDS), _first(rec, YEAR_FIELDS),
               _first(rec, GENRE_FIELDS))
    title = rec.pop(t) if t else ""
    year = rec.pop(y) if y else None
    genres = rec.pop(g) if g else []
    entry = {
        "title": " ".join(title) if isinstance(title, list) else title,
        "year": _year_str(year),
        "genres": genres if isinstance(genres, list) else [genres],
    }
    entry.update({k: _json_value(v) for k, v in rec.items()})
    if item in info:
      notes["metadata_duplicate_lines"] = (
          notes.get("metadata_duplicate_lines", 0) + 1)
      continue
    info[item] = entry
  return info


def read_user_file(path: str) -> dict[str, dict]:
  info = {}
  for lineno, rec in iter_records(path, required=("user_id",)):
    user = rec.pop("user_id")
    if user in info:
      raise textio.error(path, lineno, f"duplicate user id {user!r}")
    info[user] = {k: _json_value(v) for k, v in rec.items()}
  return info


def _year_str(year) -> str | None:
  if year is None or year == "" or year == []:
    return None
  if isinstance(year, float):
    return None if math.isnan(year) else str(int(year))
  if isinstance(year, list):
    year = " ".join(str(x) for x in year)
  return year if year.isdigit() else None


def _json_value(v):
  if isinstance(v, float) and math.isnan(v):
    return None
  return v


def atomic_paths(prefix: str) -> dict[str, str]:
  return {ext: f"{prefix}.{ext}" for ext in ("inter", "item", "user")}


def read_atomic(prefix: str, name: str | None = None) -> RawDataset:
  """Reads `<prefix>.inter` and, when present, `<prefix>.item` / `.user`."""
  paths = atomic_paths(prefix)
  name = name or os.path.basename(prefix)
  notes = {}
  item_info = (read_item_file(paths["item"], notes)
               if os.path.isfile(paths["item"]) else {})
  user_info = (read_user_file(paths["user"])
               if os.path.isfile(paths["user"]) else {})
  path = paths["inter"]
  users, items, ratings, times = [], [], [], []
  has_time = None
  for lineno, rec in iter_records(path, required=("user_id", "item_id")):
    if has_time is None:
      has_time = "timestamp" in rec
    users.append(rec["user_id"])
    items.append(rec["item_id"])
    r = rec.get("rating", math.nan)
    ratings.append(r if isinstance(r, float)
                   else textio.parse_float(str(r), path, lineno, "rating",
                                           allow_empty=True))
    if has_time:
      t = rec["timestamp"]
      if t == "" or (isinstance(t, float) and math.isnan(t)):
        raise textio.error(path, lineno, "empty timestamp")
      times.append(textio.parse_timestamp(t, path, lineno))
    else:
      times.append(0)
  if not users:
    raise DataError(f"{path}: no interactions")
  if not has_time:
    logging.warning("%s has no timestamp column: file order is used as the "
                    "chronological order", path)
    notes["no_timestamp_column"] = True
  sources = [paths["inter"]] + [paths[e] for e in ("item", "user")
                                if os.path.isfile(paths[e])]
  return RawDataset(
      name=name,
      users=np.array(users, dtype=object),
      items=np.array(items, dtype=object),
      ratings=np.array(ratings, dtype=np.float32),
      timestamps=np.array(times, dtype=np.int64),
      item_info=item_info, user_info=user_info,
      source=", ".join(sources), notes=notes)
