"""Readers for the original GroupLens MovieLens-100K and MovieLens-1M files.

ML-100K (directory with u.data, u.item, u.user and optionally u.genre):
  u.data  tab-separated  user, item, rating, timestamp
  u.item  '|'-separated, latin-1: id|title (year)|release date|video date|url|
          19 genre flags (order given by u.genre)
  u.user  '|'-separated: id|age|gender|occupation|zip
ML-1M (directory with ratings.dat, movies.dat, users.dat), '::'-separated,
latin-1:
  ratings.dat  UserID::MovieID::Rating::Timestamp
  movies.dat   MovieID::Title (Year)::Genre|Genre|...
  users.dat    UserID::Gender::Age::Occupation::Zip

Titles are stored without the trailing "(year)"; the year goes to "year".
MovieLens is a closed dataset: a rating whose item (or user) is missing from
the movie (user) file means mismatched files and raises a DataError.
"""

from __future__ import annotations

import os
import re

import numpy as np

from recjax.data import textio
from recjax.data.types import DataError, RawDataset

ML100K_FILES = ("u.data", "u.item", "u.user")
ML1M_FILES = ("ratings.dat", "movies.dat", "users.dat")

# u.genre of ML-100K, used when the file is absent.
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy",
    "Crime", "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror",
    "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western")

_TITLE_YEAR = re.compile(r"^(.*?)\s*\((\d{4})\)\s*$")


def split_title_year(title: str) -> tuple[str, str | None]:
  """'Toy Story (1995)' -> ('Toy Story', '1995'); no year -> (title, None)."""
  m = _TITLE_YEAR.match(title)
  if m:
    return m.group(1).strip(), m.group(2)
  return title.strip(), None


def _check_known(path: str, lineno: int, kind: str, raw_id: str,
                 known: dict, meta_path: str) -> None:
  if raw_id not in known:
    raise textio.error(path, lineno,
                       f"unknown {kind} {raw_id!r} (not in {meta_path})")


def _read_ratings(path: str, sep: str, encoding: str):
  users, items, ratings, times, linenos = [], [], [], [], []
  for lineno, line in textio.iter_lines(path, encoding):
    u, i, r, t = textio.split_fields(line, sep, 4, path, lineno)
    users.append(u.strip())
    items.append(i.strip())
    ratings.append(textio.parse_float(r, path, lineno, "rating", finite=True))
    times.append(textio.parse_timestamp(t, path, lineno))
    linenos.append(lineno)
  if not users:
    raise DataError(f"{path}: no interactions")
  return users, items, ratings, times, linenos


def _to_raw(name, users, items, ratings, times, item_info, user_info, source):
  return RawDataset(
      name=name,
      users=np.array(users, dtype=object),
      items=np.array(items, dtype=object),
      ratings=np.array(ratings, dtype=np.float32),
      timestamps=np.array(times, dtype=np.int64),
      item_info=item_info, user_info=user_info, source=source)


def _cross_check(ratings_path, users, items, linenos, item_info, item_path,
                 user_info, user_path):
  for u, i, lineno in zip(users, items, linenos):
    _check_known(ratings_path, lineno, "item", i, item_info, item_path)
    if user_info:
      _check_known(ratings_path, lineno, "user", u, user_info, user_path)


def _put(table: dict, key: str, value: dict, path: str, lineno: int, kind):
  if not key:
    raise textio.error(path, lineno, f"empty {kind} id")
  if key in table:
    raise textio.error(path, lineno, f"duplicate {kind} id {key!r}")
  table[key] = value


# ------------------------------------------------------------------ 100K --
def read_ml100k_genres(path: str) -> tuple[str, ...]:
  """u.genre: 'name|index' lines; indices must be 0..n-1."""
  by_index = {}
  for lineno, line in textio.iter_lines(path, "latin-1"):
    name, idx = textio.split_fields(line, "|", 2, path, lineno)
    try:
      by_index[int(idx)] = name
    except ValueError:
      raise textio.error(path, lineno, f"non-numeric genre index {idx!r}")
  if sorted(by_index) != list(range(len(by_index))):
    raise DataError(f"{path}: genre indices are not 0..{len(by_index) - 1}")
  return tuple(by_index[k] for k in range(len(by_index)))


def read_ml100k_items(path: str, genres=ML100K_GENRES) -> dict[str, dict]:
  info = {}
  ncols = 5 + len(genres)
  for lineno, line in textio.iter_lines(path, "latin-1"):
    f = textio.split_fields(line, "|", ncols, path, lineno)
    flags = f[5:]
    if any(x not in ("0", "1") for x in flags):
      raise textio.error(path, lineno, f"genre flags must be 0/1: {flags}")
    title, year = split_title_year(f[1])
    if year is None and re.search(r"\d{4}$", f[2].strip()):
      year = f[2].strip()[-4:]   # release date, e.g. 01-Jan-1995
    _put(info, f[0].strip(), {
        "title": title,
        "year": year,
        "genres": [g for g, x in zip(genres, flags) if x == "1"],
        "release_date": f[2],
        "url": f[4],
    }, path, lineno, "item")
  return info


def read_ml100k_users(path: str) -> dict[str, dict]:
  info = {}
  for lineno, line in textio.iter_lines(path, "latin-1"):
    uid, age, gender, occupation, zip_code = textio.split_fields(
        line, "|", 5, path, lineno)
    _put(info, uid.strip(), {"age": age, "gender": gender,
                             "occupation": occupation, "zip": zip_code},
         path, lineno, "user")
  return info


def read_ml100k(directory: str, name: str = "ml-100k") -> RawDataset:
  """Reads the GroupLens ML-100K files from `directory`."""
  p = {f: os.path.join(directory, f) for f in ML100K_FILES + ("u.genre",)}
  genres = (read_ml100k_genres(p["u.genre"]) if os.path.isfile(p["u.genre"])
            else ML100K_GENRES)
  item_info = read_ml100k_items(p["u.item"], genres)
  user_info = read_ml100k_users(p["u.user"])
  users, items, ratings, times, linenos = _read_ratings(
      p["u.data"], "\t", "utf-8")
  _cross_check(p["u.data"], users, items, linenos, item_info, p["u.item"],
               user_info, p["u.user"])
  return _to_raw(name, users, items, ratings, times, item_info, user_info,
                 source=", ".join(p[f] for f in ML100K_FILES))


# -------------------------------------------------------------------- 1M --
def read_ml1m_items(path: str) -> dict[str, dict]:
  info = {}
  for lineno, line in textio.iter_lines(path, "latin-1"):
    mid, title, genres = textio.split_fields(line, "::", 3, path, lineno)
    title, year = split_title_year(title)
    _put(info, mid.strip(), {
        "title": title, "year": year,
        "genres": [g for g in genres.strip().split("|") if g],
    }, path, lineno, "item")
  return info


def read_ml1m_users(path: str) -> dict[str, dict]:
  info = {}
  for lineno, line in textio.iter_lines(path, "latin-1"):
    uid, gender, age, occupation, zip_code = textio.split_fields(
        line, "::", 5, path, lineno)
    _put(info, uid.strip(), {"gender": gender, "age": age,
                             "occupation": occupation, "zip": zip_code},
         path, lineno, "user")
  return info


def read_ml1m(directory: str, name: str = "ml-1m") -> RawDataset:
  """Reads the GroupLens ML-1M files from `directory`."""
  p = {f: os.path.join(directory, f) for f in ML1M_FILES}
  item_info = read_ml1m_items(p["movies.dat"])
  user_info = read_ml1m_users(p["users.dat"])
  users, items, ratings, times, linenos = _read_ratings(
      p["ratings.dat"], "::", "latin-1")
  _cross_check(p["ratings.dat"], users, items, linenos, item_info,
               p["movies.dat"], user_info, p["users.dat"])
  return _to_raw(name, users, items, ratings, times, item_info, user_info,
                 source=", ".join(p[f] for f in ML1M_FILES))
