"""Readers for the Amazon review datasets (McAuley lab), 2014 and 2018.

Downloads are manual: put the files in the data directory (see
`expected_files` and `AMAZON_URLS`); plain `.json` files work too.

2014 (http://jmcauley.ucsd.edu/data/amazon/):
  reviews_<Category>_5.json.gz   JSON lines: reviewerID, asin, overall,
                                 unixReviewTime, ...
  meta_<Category>.json.gz        one dict per line, often a Python literal
                                 ({'asin': ..., 'title': ..., 'categories':
                                 [[...]]}): parsed with json, falling back to
                                 ast.literal_eval
2018 (https://nijianmo.github.io/amazon/):
  <Category>_5.json.gz           JSON lines: reviewerID, asin, overall,
                                 unixReviewTime, ...
  meta_<Category>.json.gz        JSON lines: asin, title, category, brand, ...

Only metadata of items that occur in the reviews is kept (the rest is counted
in notes["metadata_items_without_interactions"]). A missing metadata file is
allowed (titles become "" and are counted by preprocessing) with a warning.
"""

from __future__ import annotations

import ast
import html
import json
import math
import os

from absl import logging
import numpy as np

from recjax.data import textio
from recjax.data.types import DataError, RawDataset

AMAZON_URLS = {
    "2014": ("http://snap.stanford.edu/data/amazon/productGraph/"
             "categoryFiles/{file}"),
    "2018": ("https://datarepo.eng.ucsd.edu/mcauley_group/data/amazon_v2/"
             "categoryFilesSmall/{file} (reviews), "
             "https://datarepo.eng.ucsd.edu/mcauley_group/data/amazon_v2/"
             "metaFiles2/{file} (metadata)"),
}

REVIEW_FIELDS = ("reviewerID", "asin", "overall", "unixReviewTime")


def expected_files(version: str, category: str) -> tuple[str, str]:
  """(reviews file, metadata file) names for a version and category."""
  if version == "2014":
    return f"reviews_{category}_5.json.gz", f"meta_{category}.json.gz"
  if version == "2018":
    return f"{category}_5.json.gz", f"meta_{category}.json.gz"
  raise ValueError(f"unknown Amazon version {version!r} (2014 or 2018)")


def _parse_dict(line: str, path: str, lineno: int, literal_ok: bool) -> dict:
  try:
    obj = json.loads(line)
  except json.JSONDecodeError as e:
    if not literal_ok:
      raise textio.error(path, lineno, f"malformed JSON: {e.msg} at column "
                         f"{e.colno}") from None
    try:
      obj = ast.literal_eval(line)
    except (ValueError, SyntaxError, MemoryError, RecursionError) as e2:
      raise textio.error(path, lineno, "neither JSON nor a Python literal: "
                         f"{e2.__class__.__name__}: {e2}") from None
  if not isinstance(obj, dict):
    raise textio.error(path, lineno,
                       f"expected an object, got {type(obj).__name__}")
  return obj


def read_reviews(path: str):
  """Returns lists (users, items, ratings, timestamps) of a reviews file."""
  users, items, ratings, times = [], [], [], []
  for lineno, line in textio.iter_lines(path, "utf-8"):
    rec = _parse_dict(line, path, lineno, literal_ok=False)
    for f in REVIEW_FIELDS:
      if f not in rec or rec[f] is None or rec[f] == "":
        raise textio.error(path, lineno, f"missing field {f!r}")
    users.append(str(rec["reviewerID"]))
    items.append(str(rec["asin"]))
    r = rec["overall"]
    if isinstance(r, bool) or not isinstance(r, (int, float, str)):
      raise textio.error(path, lineno, f"non-numeric overall {r!r}")
    # A string goes through parse_float; a JSON number (NaN / Infinity too) as its text.
    ratings.append(textio.parse_float(r if isinstance(r, str) else repr(r), path, lineno,
                                      "overall", finite=True))
    times.append(textio.parse_timestamp(rec["unixReviewTime"], path, lineno,
                                        "unixReviewTime"))
  if not users:
    raise DataError(f"{path}: no reviews")
  return users, items, ratings, times


def _clean(text) -> str:
  return html.unescape(" ".join(str(text).split())) if text else ""


def _genres(rec: dict) -> list[str]:
  """2014: categories = [[...], ...]; 2018: category = [...]."""
  out = []
  cats = rec.get("categories", rec.get("category")) or []
  for c in cats:
    for g in (c if isinstance(c, (list, tuple)) else [c]):
      g = _clean(g)
      if g and g not in out:
        out.append(g)
  return out


def read_meta(path: str, wanted: set[str], notes: dict,
              literal_ok: bool) -> dict[str, dict]:
  """asin -> {"title", "year": None, "genres", "brand"} for asins in wanted."""
  info = {}
  seen_unwanted = set()
  for lineno, line in textio.iter_lines(path, "utf-8"):
    rec = _parse_dict(line, path, lineno, literal_ok)
    asin = rec.get("asin")
    if not asin:
      raise textio.error(path, lineno, "missing field 'asin'")
    asin = str(asin)
    if asin not in wanted:
      seen_unwanted.add(asin)
      continue
    if asin in info:
      notes["metadata_duplicate_lines"] = (
          notes.get("metadata_duplicate_lines", 0) + 1)
      continue
    entry = {"title": _clean(rec.get("title")), "year": None,
             "genres": _genres(rec)}
    if rec.get("brand"):
      entry["brand"] = _clean(rec["brand"])
    price = rec.get("price")
    if price not in (None, "") and not (isinstance(price, float)
                                         and math.isnan(price)):
      entry["price"] = _clean(price)
    info[asin] = entry
  notes["metadata_items_without_interactions"] = len(seen_unwanted)
  return info


def find_files(data_dir: str, version: str, category: str
               ) -> tuple[str | None, str | None]:
  """Looks in data_dir/amazon<version>/ and data_dir/ for .json.gz / .json."""
  found = []
  for name in expected_files(version, category):
    hit = None
    for d in (os.path.join(data_dir, f"amazon{version}"), data_dir):
      for n in (name, name[:-3]):
        if os.path.isfile(os.path.join(d, n)):
          hit = hit or os.path.join(d, n)
    found.append(hit)
  return found[0], found[1]


def missing_message(data_dir: str, version: str, category: str) -> str:
  reviews, meta = expected_files(version, category)
  url = AMAZON_URLS[version]
  return (f"Amazon {version} {category}: {reviews} not found in "
          f"{os.path.join(data_dir, 'amazon' + version)} or {data_dir}. "
          f"Amazon files are downloaded by hand: get {reviews} and {meta} "
          f"from {url.format(file='<file>')} and place them there.")


def read_amazon(data_dir: str, version: str, category: str) -> RawDataset:
  """Reads reviews (required) and metadata (optional) of one category."""
  reviews_path, meta_path = find_files(data_dir, version, category)
  if reviews_path is None:
    raise DataError(missing_message(data_dir, version, category))
  return read_amazon_files(reviews_path, meta_path, version,
                           f"amazon{version}-{category}")


def read_amazon_files(reviews_path: str, meta_path: str | None, version: str,
                      name: str) -> RawDataset:
  users, items, ratings, times = read_reviews(reviews_path)
  notes = {}
  if meta_path is None:
    logging.warning("%s: no metadata file next to %s; all titles are empty",
                    name, reviews_path)
    item_info = {}
    notes["metadata_file"] = None
  else:
    item_info = read_meta(meta_path, set(items), notes,
                          literal_ok=(version == "2014"))
  sources = [reviews_path] + ([meta_path] if meta_path else [])
  return RawDataset(
      name=name,
      users=np.array(users, dtype=object),
      items=np.array(items, dtype=object),
      ratings=np.array(ratings, dtype=np.float32),
      timestamps=np.array(times, dtype=np.int64),
      item_info=item_info, user_info={},
      source=", ".join(sources), notes=notes)
