"""Line-oriented text reading with errors that name the file and the line.

Every reader goes through `iter_lines`, so a bad byte, a truncated gzip file or
a malformed value always surfaces as a `DataError` of the form
`"<path>, line <n>: <problem>"` (1-based line numbers).
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from typing import Iterator

from recjax.data.types import DataError


def where(path: str, lineno: int | None = None) -> str:
  return f"{path}, line {lineno}" if lineno is not None else f"{path}"


def error(path: str, lineno: int | None, message: str) -> DataError:
  return DataError(f"{where(path, lineno)}: {message}")


def iter_lines(path: str, encoding: str = "utf-8",
               skip_blank: bool = True) -> Iterator[tuple[int, str]]:
  """Yields (1-based line number, line without the newline).

  Files ending in ".gz" are decompressed. Blank lines are skipped (they carry
  no data; a trailing newline at the end of a file is common).

  Raises:
    DataError: the file is missing, cannot be decompressed, or a line cannot
      be decoded with `encoding`.
  """
  if not os.path.isfile(path):
    raise DataError(f"{path}: file not found")
  opener = gzip.open if path.endswith(".gz") else open
  lineno = 0
  try:
    with opener(path, "rb") as f:
      for lineno, raw in enumerate(f, 1):
        try:
          line = raw.decode(encoding)
        except UnicodeDecodeError as e:
          raise error(path, lineno, f"cannot decode as {encoding}: "
                      f"byte {raw[e.start:e.start + 1]!r} at column "
                      f"{e.start + 1}") from None
        line = line.rstrip("\r\n")
        if skip_blank and not line.strip():
          continue
        yield lineno, line
  except (gzip.BadGzipFile, EOFError, zlib.error) as e:
    raise error(path, lineno + 1, f"corrupt gzip data: {e}") from None


def parse_float(value: str, path: str, lineno: int, field: str,
                allow_empty: bool = False, finite: bool = False) -> float:
  """Parses a float; '' -> nan when allow_empty. With `finite` (ratings), nan/inf written
  in the file are errors."""
  value = value.strip()
  if allow_empty and value == "":
    return math.nan
  try:
    x = float(value)
  except ValueError:
    raise error(path, lineno,
                f"non-numeric {field} {value!r}") from None
  if finite and not math.isfinite(x):
    raise error(path, lineno, f"non-finite {field} {value!r}")
  return x


_INT64_MIN, _INT64_MAX = -2**63, 2**63 - 1


def _in_int64(t: int, path: str, lineno: int, field: str, value) -> int:
  if not _INT64_MIN <= t <= _INT64_MAX:
    raise error(path, lineno, f"{field} {value!r} out of the int64 range")
  return t


def parse_timestamp(value, path: str, lineno: int,
                    field: str = "timestamp") -> int:
  """Parses an integer timestamp ("881250949", "881250949.0" or a number).

  Fractional seconds are truncated toward zero. nan/inf are errors.
  """
  if isinstance(value, bool):
    raise error(path, lineno, f"non-numeric {field} {value!r}")
  if isinstance(value, int):
    return _in_int64(value, path, lineno, field, value)
  if isinstance(value, float):
    if not math.isfinite(value):
      raise error(path, lineno, f"non-finite {field} {value!r}")
    return _in_int64(int(value), path, lineno, field, value)
  text = value.strip() if isinstance(value, str) else value
  try:
    return _in_int64(int(text), path, lineno, field, value)
  except (TypeError, ValueError):
    pass
  try:
    x = float(text)
  except (TypeError, ValueError):
    raise error(path, lineno, f"non-numeric {field} {value!r}") from None
  if not math.isfinite(x):
    raise error(path, lineno, f"non-finite {field} {value!r}")
  return _in_int64(int(x), path, lineno, field, value)


def split_fields(line: str, sep: str, expected: int, path: str,
                 lineno: int) -> list[str]:
  """Splits `line` on `sep` and checks the column count."""
  fields = line.split(sep)
  if len(fields) != expected:
    raise error(path, lineno, f"expected {expected} {sep!r}-separated "
                f"columns, got {len(fields)}: {line[:120]!r}")
  return fields
