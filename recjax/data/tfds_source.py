"""Optional source: tensorflow-datasets MovieLens builders.

`tfds:movielens/100k-ratings`, `tfds:movielens/1m-ratings`, ... Those
builders parse with `tf.io.gfile`, so TensorFlow must be installed (the
`tensorflow-datasets` package alone is not enough). Imports are lazy; without
TensorFlow a clear ImportError is raised before anything is read or fetched.
"""

from __future__ import annotations

import importlib.util

import numpy as np

from recjax.data.movielens import split_title_year
from recjax.data.types import DataError, RawDataset


def _require_tensorflow(name: str) -> None:
  if importlib.util.find_spec("tensorflow") is None:
    raise ImportError(
        f"tfds:{name} needs TensorFlow: the tensorflow-datasets MovieLens "
        "builders parse with tf.io.gfile. Install it (pip install tensorflow) "
        "or use the built-in readers (ml-100k, ml-1m, atomic:...).")
  if importlib.util.find_spec("tensorflow_datasets") is None:
    raise ImportError(f"tfds:{name} needs tensorflow-datasets "
                      "(pip install 'recjax[tfds]').")


_USER_FIELDS = ("user_gender", "bucketized_user_age", "user_occupation_text",
                "user_zip_code")


def _str(x) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def read_tfds(name: str, data_dir: str | None = None,
              download: bool = False) -> RawDataset:
  """Reads a tfds MovieLens ratings dataset (split "train", all rows).

  Args:
    name: tfds name, e.g. "movielens/100k-ratings".
    data_dir: tfds data_dir (None = tfds default).
    download: let tfds download and prepare the dataset if absent.
  """
  _require_tensorflow(name)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder(name, data_dir=data_dir)
  if download:
    builder.download_and_prepare()
  try:
    ds = builder.as_dataset(split="train", shuffle_files=False)
  except (AssertionError, OSError) as e:  # tfds: "could not find data"
    raise DataError(f"tfds:{name}: not prepared in {builder.data_dir} "
                    f"(pass download=True): {e}") from e
  genre_names = None
  if "movie_genres" in builder.info.features:
    genre_names = builder.info.features["movie_genres"].feature.names
  users, items, ratings, times = [], [], [], []
  item_info, user_info = {}, {}
  # One example at a time: the Sequence (ragged) genre feature does not batch.
  for ex in tfds.as_numpy(ds):
    u, i = _str(ex["user_id"]), _str(ex["movie_id"])
    users.append(u)
    items.append(i)
    ratings.append(float(ex["user_rating"]))
    times.append(int(ex["timestamp"]))
    if i not in item_info and "movie_title" in ex:
      title, year = split_title_year(_str(ex["movie_title"]))
      genres = ([genre_names[int(g)] for g in ex["movie_genres"]]
                if genre_names is not None and "movie_genres" in ex else [])
      item_info[i] = {"title": title, "year": year, "genres": genres}
    if u not in user_info:
      user_info[u] = {f: (_str(ex[f]) if isinstance(ex[f], bytes)
                          else np.asarray(ex[f]).item())
                      for f in _USER_FIELDS if f in ex}
  if not users:
    raise DataError(f"tfds:{name}: no examples")
  return RawDataset(
      name=name.replace("/", "-"),
      users=np.array(users, dtype=object),
      items=np.array(items, dtype=object),
      ratings=np.array(ratings, dtype=np.float32),
      timestamps=np.array(times, dtype=np.int64),
      item_info=item_info, user_info=user_info,
      source=f"tfds:{name} ({builder.data_dir})")
