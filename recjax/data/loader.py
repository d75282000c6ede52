"""Dataset names -> source files -> cached, preprocessed SequenceData.

Names:
  ml-100k                 data_dir/ml-100k/u.{data,item,user} (GroupLens) or
                          data_dir/ml-100k/ml-100k.{inter,item,user} (RecBole
                          atomic); downloaded when absent (GroupLens zip,
                          falling back to the RecBole wheel on PyPI)
  ml-1m                   data_dir/ml-1m/{ratings,movies,users}.dat;
                          downloaded from GroupLens when absent
  amazon2014-<Category>   reviews_<Category>_5.json.gz (+ meta_<Category>...)
  amazon2018-<Category>   <Category>_5.json.gz (+ meta_<Category>.json.gz)
                          in data_dir/amazon<year>/ or data_dir/ (manual)
  atomic:<path/prefix>    <prefix>.inter (+ .item, .user); a relative prefix
                          is looked up under data_dir first
  tfds:<tfds name>        e.g. tfds:movielens/100k-ratings (needs TensorFlow)

The preprocessed result is cached in cache_dir/<name>-<key>/, where key hashes
the preprocessing config, the format version and the source files (sha256 of
files up to 64 MiB, size + mtime of larger ones).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from typing import Callable

from absl import logging

from recjax.data import amazon
from recjax.data import atomic
from recjax.data import download as download_lib
from recjax.data import movielens
from recjax.data import tfds_source
from recjax.data.preprocess import as_config, format_stats, preprocess
from recjax.data.types import FORMAT_VERSION, DataError, RawDataset
from recjax.data.types import SequenceData

HASH_LIMIT_BYTES = 64 << 20


@dataclasses.dataclass
class Source:
  """Resolved source: the files it reads and how to read them."""
  name: str
  files: list[str]          # what the cache key fingerprints
  read: Callable[[], RawDataset]
  fingerprint_extra: str = ""


def _have(directory: str, files) -> bool:
  return all(os.path.isfile(os.path.join(directory, f)) for f in files)


def _movielens_source(name: str, data_dir: str, download: bool) -> Source:
  directory = os.path.join(data_dir, name)
  if name == "ml-100k":
    prefix = os.path.join(directory, "ml-100k")
    atomic_files = ("ml-100k.inter", "ml-100k.item", "ml-100k.user")
    if (not _have(directory, movielens.ML100K_FILES)
        and not _have(directory, atomic_files) and download):
      download_lib.download_ml100k(data_dir)
    if _have(directory, movielens.ML100K_FILES):
      files = [os.path.join(directory, f) for f in movielens.ML100K_FILES]
      genre = os.path.join(directory, "u.genre")
      files += [genre] if os.path.isfile(genre) else []
      return Source(name, files, lambda: movielens.read_ml100k(directory))
    if _have(directory, atomic_files):
      return Source(name, [os.path.join(directory, f) for f in atomic_files],
                    lambda: atomic.read_atomic(prefix, name))
    wanted = " or ".join([", ".join(movielens.ML100K_FILES),
                          ", ".join(atomic_files)])
  else:
    if not _have(directory, movielens.ML1M_FILES) and download:
      try:
        download_lib.download_grouplens(name, data_dir)
      except OSError as e:
        url = download_lib.GROUPLENS[name][0]
        raise DataError(
            f"{name}: download of {url} failed ({e}); place "
            f"{', '.join(movielens.ML1M_FILES)} in {directory} by hand") from e
    if _have(directory, movielens.ML1M_FILES):
      return Source(name, [os.path.join(directory, f)
                           for f in movielens.ML1M_FILES],
                    lambda: movielens.read_ml1m(directory))
    wanted = ", ".join(movielens.ML1M_FILES)
  raise DataError(f"{name}: files not found in {directory} (need {wanted}); "
                  "pass download=True or place them there")


def resolve_source(name: str, data_dir: str, download: bool = True) -> Source:
  """Finds (and for MovieLens, downloads if allowed) the files of `name`."""
  if name in ("ml-100k", "ml-1m"):
    return _movielens_source(name, data_dir, download)
  m = re.fullmatch(r"amazon(2014|2018)-(\w[\w.-]*)", name)
  if m:
    version, category = m.groups()
    reviews, meta = amazon.find_files(data_dir, version, category)
    if reviews is None:
      raise DataError(amazon.missing_message(data_dir, version, category))
    return Source(name, [f for f in (reviews, meta) if f],
                  lambda: amazon.read_amazon_files(reviews, meta, version,
                                                   name))
  if name.startswith("atomic:"):
    prefix = name[len("atomic:"):]
    if not os.path.isabs(prefix) and os.path.isfile(
        os.path.join(data_dir, prefix) + ".inter"):
      prefix = os.path.join(data_dir, prefix)
    paths = atomic.atomic_paths(prefix)
    if not os.path.isfile(paths["inter"]):
      raise DataError(f"{name}: {paths['inter']} not found")
    return Source(name, [p for p in paths.values() if os.path.isfile(p)],
                  lambda: atomic.read_atomic(prefix))
  if name.startswith("tfds:"):
    tfds_name = name[len("tfds:"):]
    tfds_dir = os.path.join(data_dir, "tfds")
    return Source(name, [], lambda: tfds_source.read_tfds(
        tfds_name, data_dir=tfds_dir, download=download),
                  fingerprint_extra=tfds_name)
  raise ValueError(f"unknown dataset {name!r}: expected ml-100k, ml-1m, "
                   "amazon2014-<Category>, amazon2018-<Category>, "
                   "atomic:<prefix> or tfds:<name>")


def _file_fingerprint(path: str) -> dict:
  st = os.stat(path)
  fp = {"file": os.path.basename(path), "size": st.st_size}
  if st.st_size <= HASH_LIMIT_BYTES:
    fp["sha256"] = download_lib.file_digests(path)["sha256"]
  else:
    fp["mtime_ns"] = st.st_mtime_ns
  return fp


def cache_key(source: Source, cfg) -> str:
  """16 hex digits of sha256 over (format version, cfg, source files)."""
  payload = {
      "format_version": FORMAT_VERSION,
      "name": source.name,
      "config": as_config(cfg).to_dict(),
      "files": [_file_fingerprint(f) for f in source.files],
      "extra": source.fingerprint_extra,
  }
  blob = json.dumps(payload, sort_keys=True).encode()
  return hashlib.sha256(blob).hexdigest()[:16]


def cache_path(name: str, cache_dir: str, source: Source, cfg) -> str:
  safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")
  return os.path.join(cache_dir, f"{safe}-{cache_key(source, cfg)}")


def load_sequence_data(name: str, data_dir: str, cache_dir: str, cfg=None,
                       download: bool = True) -> SequenceData:
  """Reads, preprocesses and caches a dataset (see the module docstring).

  Args:
    name: dataset name (ml-100k, ml-1m, amazon2014-<Category>, ...).
    data_dir: where raw files are found (and downloaded to); `~` expanded.
    cache_dir: where preprocessed datasets are cached; `~` expanded.
    cfg: PreprocessConfig or a ConfigDict with its fields.
    download: allow downloading missing MovieLens files.
  Returns:
    The preprocessed SequenceData (from the cache when the key matches).
  """
  cfg = as_config(cfg)
  data_dir = os.path.expanduser(data_dir)
  cache_dir = os.path.expanduser(cache_dir)
  source = resolve_source(name, data_dir, download)
  path = cache_path(name, cache_dir, source, cfg)
  if os.path.isfile(os.path.join(path, "meta.json")):
    try:
      data = SequenceData.load(path)
      logging.info("Dataset %s: cache hit, loaded %s", name, path)
      return data
    except DataError as e:
      logging.warning("Dataset %s: cache at %s unreadable (%s); rebuilding",
                      name, path, e)
  logging.info("Dataset %s: cache miss, preprocessing %s", name,
               ", ".join(source.files) or name)
  data = preprocess(source.read(), cfg)
  data.save(path)
  logging.info("Dataset %s: saved to %s\n%s", name, path,
               format_stats(data.stats))
  return data
