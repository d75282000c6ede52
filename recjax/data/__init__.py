"""recjax data layer: readers, downloads, preprocessing, cached sequences.

Typical use:

  from recjax import data
  seqs = data.load_sequence_data("ml-100k", data_dir, cache_dir,
                                 data.PreprocessConfig(k_core=5))
  print(data.format_stats(seqs.stats))
  history, target, history_len = seqs.eval_examples("valid", max_len=50)
"""

from recjax.data.amazon import read_amazon
from recjax.data.amazon import read_amazon_files
from recjax.data.atomic import read_atomic
from recjax.data.download import ChecksumError
from recjax.data.download import download_ml100k
from recjax.data.download import fetch
from recjax.data.download import verify
from recjax.data.loader import load_sequence_data
from recjax.data.loader import resolve_source
from recjax.data.movielens import read_ml100k
from recjax.data.movielens import read_ml1m
from recjax.data.preprocess import format_stats
from recjax.data.preprocess import PreprocessConfig
from recjax.data.preprocess import preprocess
from recjax.data.tfds_source import read_tfds
from recjax.data.types import DataError
from recjax.data.types import RawDataset
from recjax.data.types import SequenceData

__all__ = [
    "ChecksumError",
    "DataError",
    "PreprocessConfig",
    "RawDataset",
    "SequenceData",
    "download_ml100k",
    "fetch",
    "format_stats",
    "load_sequence_data",
    "preprocess",
    "read_amazon",
    "read_amazon_files",
    "read_atomic",
    "read_ml100k",
    "read_ml1m",
    "read_tfds",
    "resolve_source",
    "verify",
]
