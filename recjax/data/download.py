"""Downloads with checksums, atomic writes and a cache directory.

`fetch` is the generic primitive: it streams a URL into a temporary file next
to the destination, checks the digest(s) and renames; a destination that is
already present with the right digest is reused without any network access.
A checksum mismatch raises `ChecksumError` naming the file, the expected and
the actual digest, and removes the file.

MovieLens-100K has a fallback: when GroupLens cannot be reached, the RecBole
1.2.1 wheel from PyPI (fetched with `pip download`, never installed or
imported) carries the full dataset in atomic format; the wheel and each of the
three extracted files are verified against pinned sha256 digests.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
import zipfile

from absl import logging

from recjax.data.types import ChecksumError, DataError

GROUPLENS = {
    "ml-100k": ("https://files.grouplens.org/datasets/movielens/ml-100k.zip",
                "0e33842e24a9c977be4e0107933c0723",
                ("u.data", "u.item", "u.user", "u.genre")),
    "ml-1m": ("https://files.grouplens.org/datasets/movielens/ml-1m.zip",
              "c4d9eecfca2ab87c1945afe126590906",
              ("ratings.dat", "movies.dat", "users.dat")),
}

RECBOLE_REQUIREMENT = "recbole==1.2.1"
RECBOLE_WHEEL = "recbole-1.2.1-py3-none-any.whl"
RECBOLE_WHEEL_SHA256 = (
    "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407")
# wheel member -> sha256 of its content.
RECBOLE_ML100K_MEMBERS = {
    "recbole/dataset_example/ml-100k/ml-100k.inter":
        "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "recbole/dataset_example/ml-100k/ml-100k.item":
        "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
    "recbole/dataset_example/ml-100k/ml-100k.user":
        "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
}

DEFAULT_TIMEOUT = 20.0
_CHUNK = 1 << 20


# ----------------------------------------------------------- checksums --
def file_digests(path: str, algorithms=("sha256",)) -> dict[str, str]:
  """{algorithm: hex digest} of a file, read once."""
  hashers = {a: hashlib.new(a) for a in algorithms}
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      for h in hashers.values():
        h.update(chunk)
  return {a: h.hexdigest() for a, h in hashers.items()}


def _expected(sha256: str | None, md5: str | None) -> dict[str, str]:
  return {a: d.lower() for a, d in (("sha256", sha256), ("md5", md5)) if d}


def _check(name: str, expected: dict[str, str], actual: dict[str, str],
           remove: str | None) -> None:
  for algo, want in expected.items():
    if actual[algo] != want:
      if remove and os.path.exists(remove):
        os.remove(remove)
      raise ChecksumError(
          f"{name}: {algo} mismatch: expected {want}, actual {actual[algo]}"
          + (" (file removed)" if remove else ""))


def verify(path: str, *, sha256: str | None = None, md5: str | None = None,
           remove_on_mismatch: bool = True) -> None:
  """Raises ChecksumError (and removes the file) if a digest differs."""
  expected = _expected(sha256, md5)
  if expected:
    _check(path, expected, file_digests(path, tuple(expected)),
           path if remove_on_mismatch else None)


# ---------------------------------------------------------------- fetch --
def fetch(url: str, dest: str, *, sha256: str | None = None,
          md5: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> str:
  """Downloads url to dest (a file path, or a directory: dest/<url name>).

  Skips the download when dest exists and matches the given digest(s) (or
  exists and no digest is given). Writes to a temporary file in the same
  directory and renames it, so dest is never half-written.

  Returns:
    The destination path.
  Raises:
    ChecksumError: the downloaded file has the wrong digest (it is removed).
    OSError (urllib.error.URLError, TimeoutError): the download failed.
  """
  if dest.endswith(("/", os.sep)) or os.path.isdir(dest):
    name = os.path.basename(urllib.parse.urlparse(url).path) or "download"
    dest = os.path.join(dest, name)
  expected = _expected(sha256, md5)
  if os.path.isfile(dest):
    try:
      verify(dest, sha256=sha256, md5=md5)
      logging.info("Using cached %s", dest)
      return dest
    except ChecksumError as e:
      logging.warning("Cached file is invalid, downloading again: %s", e)
  directory = os.path.dirname(os.path.abspath(dest))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(dest)}.",
                             suffix=".part", dir=directory)
  try:
    hashers = {a: hashlib.new(a) for a in expected}
    logging.info("Downloading %s -> %s", url, dest)
    with os.fdopen(fd, "wb") as out, urllib.request.urlopen(
        url, timeout=timeout) as resp:
      while chunk := resp.read(_CHUNK):
        out.write(chunk)
        for h in hashers.values():
          h.update(chunk)
    _check(f"{dest} (from {url})", expected,
           {a: h.hexdigest() for a, h in hashers.items()}, remove=tmp)
    os.replace(tmp, dest)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return dest


def _write_atomic(path: str, data: bytes) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.",
                             suffix=".part", dir=directory)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def extract_members(zip_path: str, members: dict[str, str],
                    sha256: dict[str, str] | None = None) -> list[str]:
  """Extracts only the named members (member -> destination path).

  Every member is read and verified before anything is written.

  Raises:
    DataError: the zip is unreadable or a member is missing.
    ChecksumError: a member's sha256 differs from sha256[member].
  """
  sha256 = sha256 or {}
  contents = {}
  try:
    with zipfile.ZipFile(zip_path) as z:
      names = set(z.namelist())
      for member in members:
        if member not in names:
          raise DataError(f"{zip_path}: member {member} not found")
        contents[member] = z.read(member)
  except zipfile.BadZipFile as e:
    raise DataError(f"{zip_path}: not a valid zip file: {e}") from e
  for member, data in contents.items():
    if member in sha256:
      _check(f"{zip_path}!{member}", {"sha256": sha256[member]},
             {"sha256": hashlib.sha256(data).hexdigest()}, remove=None)
  for member, dest in members.items():
    _write_atomic(dest, contents[member])
  return list(members.values())


# ------------------------------------------------------------ MovieLens --
def download_grouplens(name: str, data_dir: str,
                       timeout: float = DEFAULT_TIMEOUT) -> str:
  """Fetches the GroupLens zip of ml-100k / ml-1m (md5 checked) into
  data_dir/downloads/ and extracts its data files into data_dir/<name>/.

  Returns:
    data_dir/<name>.
  """
  url, md5, files = GROUPLENS[name]
  zip_path = fetch(url, os.path.join(data_dir, "downloads", f"{name}.zip"),
                   md5=md5, timeout=timeout)
  out = os.path.join(data_dir, name)
  extract_members(zip_path, {f"{name}/{f}": os.path.join(out, f)
                             for f in files})
  return out


def _run_pip(args: list[str], timeout: float) -> subprocess.CompletedProcess:
  """Runs `python -m pip <args>` (the seam tests replace)."""
  return subprocess.run([sys.executable, "-m", "pip", *args],
                        capture_output=True, text=True, timeout=timeout,
                        check=False)


def pip_download_wheel(requirement: str, filename: str, sha256: str,
                       dest_dir: str, timeout: float = 300.0) -> str:
  """Downloads one wheel with pip (no dependencies, no install) into
  dest_dir, verifying its sha256; reuses a valid copy already there."""
  dest = os.path.join(dest_dir, filename)
  if os.path.isfile(dest):
    try:
      verify(dest, sha256=sha256)
      logging.info("Using cached %s", dest)
      return dest
    except ChecksumError as e:
      logging.warning("Cached wheel is invalid, downloading again: %s", e)
  os.makedirs(dest_dir, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=dest_dir, prefix=".pip-") as tmp:
    logging.info("pip download %s -> %s", requirement, dest_dir)
    try:
      proc = _run_pip(["download", "--no-deps", "--only-binary=:all:",
                       requirement, "-d", tmp], timeout)
    except subprocess.TimeoutExpired as e:
      raise DataError(f"pip download {requirement} timed out after "
                      f"{timeout}s") from e
    got = os.path.join(tmp, filename)
    if proc.returncode != 0 or not os.path.isfile(got):
      tail = ((proc.stderr or "") + (proc.stdout or ""))[-800:]
      raise DataError(f"pip download {requirement} failed (exit "
                      f"{proc.returncode}, {filename} "
                      f"{'present' if os.path.isfile(got) else 'absent'}): "
                      f"{tail}")
    verify(got, sha256=sha256)
    os.replace(got, dest)
  return dest


def download_recbole_ml100k(data_dir: str, timeout: float = 300.0) -> str:
  """ML-100K atomic files from the RecBole wheel into data_dir/ml-100k/.

  Returns:
    The atomic prefix data_dir/ml-100k/ml-100k.
  """
  wheel = pip_download_wheel(RECBOLE_REQUIREMENT, RECBOLE_WHEEL,
                             RECBOLE_WHEEL_SHA256,
                             os.path.join(data_dir, "downloads"), timeout)
  prefix = os.path.join(data_dir, "ml-100k", "ml-100k")
  extract_members(
      wheel,
      {m: prefix + os.path.splitext(m)[1] for m in RECBOLE_ML100K_MEMBERS},
      sha256=RECBOLE_ML100K_MEMBERS)
  return prefix


def download_ml100k(data_dir: str, timeout: float = DEFAULT_TIMEOUT) -> str:
  """GroupLens first, then the RecBole wheel. Returns the directory with
  either u.data/u.item/u.user or ml-100k.{inter,item,user}."""
  try:
    return download_grouplens("ml-100k", data_dir, timeout)
  except (OSError, DataError) as e:
    logging.warning("GroupLens ml-100k download failed (%s); falling back to "
                    "the RecBole %s wheel from PyPI", e, RECBOLE_REQUIREMENT)
    first = e
  try:
    return os.path.dirname(download_recbole_ml100k(data_dir))
  except (OSError, DataError) as e:
    raise DataError(
        f"ml-100k: could not download. GroupLens: {first}. RecBole wheel: "
        f"{e}. Place u.data/u.item/u.user (or ml-100k.inter/.item/.user) in "
        f"{os.path.join(data_dir, 'ml-100k')} by hand.") from e
