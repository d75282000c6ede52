"""Downloader: checksums, atomic writes, cache reuse, and the ML-100K
GroupLens -> RecBole-wheel fallback with a fake wheel and a mocked pip.

URLs are file:// URLs into tmp_path; real sockets are made to fail."""

import hashlib
import io
import os
import socket
import subprocess
import zipfile

import pytest

from recjax.data import atomic
from recjax.data import download
from recjax.data import loader
from recjax.data.types import ChecksumError, DataError

MEMBER = "recbole/dataset_example/ml-100k/ml-100k.{}"
INTER = ("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
         + "".join(f"{u}\t{i}\t{(u + i) % 5 + 1}\t{100 * i + u}\n"
                   for u in (1, 2, 3) for i in (1, 2, 3, 4)))
ITEM = ("item_id:token\tmovie_title:token_seq\trelease_year:token\t"
        "class:token_seq\n"
        + "".join(f"{i}\tFilm {i}\t199{i}\tDrama\n" for i in (1, 2, 3, 4)))
USER = "user_id:token\tage:token\n1\t20\n2\t30\n3\t40\n"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError("a data test tried to use the network")
  monkeypatch.setattr(socket.socket, "connect", refuse)
  monkeypatch.setattr(socket, "getaddrinfo", refuse)


def sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def md5(data: bytes) -> str:
  return hashlib.md5(data).hexdigest()


def leftovers(directory):
  return [p for p in os.listdir(directory) if p.startswith(".")]


# --------------------------------------------------------------- fetch --
def test_fetch_checksum_ok_then_cached(tmp_path):
  src = tmp_path / "src.bin"
  src.write_bytes(b"hello" * 1000)
  data = src.read_bytes()
  dest = tmp_path / "cache" / "out.bin"
  got = download.fetch(src.as_uri(), str(dest), sha256=sha256(data),
                       md5=md5(data))
  assert got == str(dest) and dest.read_bytes() == data
  assert not leftovers(dest.parent)
  src.unlink()       # a second call must not need the source any more
  assert download.fetch(src.as_uri(), str(dest), sha256=sha256(data)) == str(
      dest)


def test_fetch_into_directory_uses_url_name(tmp_path):
  src = tmp_path / "archive.zip"
  src.write_bytes(b"zip")
  (tmp_path / "cache").mkdir()
  got = download.fetch(src.as_uri(), str(tmp_path / "cache"))
  assert got == str(tmp_path / "cache" / "archive.zip")


@pytest.mark.parametrize("algo", ["sha256", "md5"])
def test_fetch_checksum_mismatch_removes_file(tmp_path, algo):
  src = tmp_path / "src.bin"
  src.write_bytes(b"tampered")
  dest = tmp_path / "cache" / "out.bin"
  want = "0" * (64 if algo == "sha256" else 32)
  actual = hashlib.new(algo, b"tampered").hexdigest()
  with pytest.raises(ChecksumError) as e:
    download.fetch(src.as_uri(), str(dest), **{algo: want})
  msg = str(e.value)
  assert str(dest) in msg and want in msg and actual in msg, msg
  assert not dest.exists() and not leftovers(dest.parent)


def test_fetch_replaces_invalid_cached_file(tmp_path):
  src = tmp_path / "src.bin"
  src.write_bytes(b"good")
  dest = tmp_path / "out.bin"
  dest.write_bytes(b"stale")
  download.fetch(src.as_uri(), str(dest), sha256=sha256(b"good"))
  assert dest.read_bytes() == b"good"


def test_fetch_failure_leaves_nothing(tmp_path):
  with pytest.raises(OSError):
    download.fetch((tmp_path / "missing").as_uri(), str(tmp_path / "o"))
  assert os.listdir(tmp_path) == []


def test_verify_removes_on_mismatch(tmp_path):
  path = tmp_path / "f"
  path.write_bytes(b"abc")
  download.verify(str(path), sha256=sha256(b"abc"))
  with pytest.raises(ChecksumError, match="sha256 mismatch"):
    download.verify(str(path), sha256=sha256(b"xyz"))
  assert not path.exists()


# ------------------------------------------------------- wheel fallback --
def fake_wheel(path, members=None):
  members = members or {MEMBER.format("inter"): INTER,
                        MEMBER.format("item"): ITEM,
                        MEMBER.format("user"): USER,
                        "recbole/__init__.py": "raise ImportError('never')\n"}
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w") as z:
    for name, text in members.items():
      z.writestr(name, text)
  path.write_bytes(buf.getvalue())
  return path


@pytest.fixture
def fake_pypi(tmp_path, monkeypatch):
  """A fake wheel whose digests are pinned, a pip that 'downloads' it, and a
  GroupLens URL that fails at once."""
  (tmp_path / "pypi").mkdir()
  wheel = fake_wheel(tmp_path / "pypi" / download.RECBOLE_WHEEL)
  monkeypatch.setattr(download, "RECBOLE_WHEEL_SHA256",
                      sha256(wheel.read_bytes()))
  monkeypatch.setattr(download, "RECBOLE_ML100K_MEMBERS", {
      MEMBER.format(e): sha256(t.encode()) for e, t in
      (("inter", INTER), ("item", ITEM), ("user", USER))})
  url, md5sum, files = download.GROUPLENS["ml-100k"]
  monkeypatch.setitem(download.GROUPLENS, "ml-100k", (
      (tmp_path / "unreachable" / "ml-100k.zip").as_uri(), md5sum, files))
  calls = []

  def fake_run_pip(args, timeout):
    calls.append(args)
    dest = args[args.index("-d") + 1]
    with open(os.path.join(dest, download.RECBOLE_WHEEL), "wb") as f:
      f.write(wheel.read_bytes())
    return subprocess.CompletedProcess(args, 0, "", "")

  monkeypatch.setattr(download, "_run_pip", fake_run_pip)
  return wheel, calls


def test_wheel_fallback_extracts_and_checks(tmp_path, fake_pypi):
  _, calls = fake_pypi
  data_dir = tmp_path / "data"
  out = download.download_ml100k(str(data_dir))
  assert out == str(data_dir / "ml-100k")
  assert calls == [["download", "--no-deps", "--only-binary=:all:",
                    "recbole==1.2.1", "-d", calls[0][-1]]]
  assert sorted(os.listdir(out)) == ["ml-100k.inter", "ml-100k.item",
                                     "ml-100k.user"]
  assert (data_dir / "ml-100k" / "ml-100k.inter").read_text() == INTER
  assert (data_dir / "downloads" / download.RECBOLE_WHEEL).is_file()
  raw = atomic.read_atomic(os.path.join(out, "ml-100k"), "ml-100k")
  assert raw.num_rows == 12 and raw.item_info["3"]["title"] == "Film 3"
  # The verified wheel is cached: no second pip call.
  download.download_recbole_ml100k(str(data_dir))
  assert len(calls) == 1


def test_wheel_member_checksum_mismatch_writes_nothing(tmp_path, fake_pypi,
                                                       monkeypatch):
  members = dict(download.RECBOLE_ML100K_MEMBERS)
  members[MEMBER.format("item")] = "f" * 64
  monkeypatch.setattr(download, "RECBOLE_ML100K_MEMBERS", members)
  with pytest.raises(ChecksumError) as e:
    download.download_recbole_ml100k(str(tmp_path / "data"))
  msg = str(e.value)
  assert MEMBER.format("item") in msg and "f" * 64 in msg
  assert sha256(ITEM.encode()) in msg
  assert not (tmp_path / "data" / "ml-100k").exists()


def test_wheel_checksum_mismatch_removes_wheel(tmp_path, fake_pypi,
                                               monkeypatch):
  monkeypatch.setattr(download, "RECBOLE_WHEEL_SHA256", "e" * 64)
  with pytest.raises(DataError, match="could not download") as e:
    download.download_ml100k(str(tmp_path / "data"))
  assert "sha256 mismatch" in str(e.value) and "e" * 64 in str(e.value)
  downloads = tmp_path / "data" / "downloads"
  assert not (downloads / download.RECBOLE_WHEEL).exists()
  assert [p for p in os.listdir(downloads)] == []


def test_pip_failure_reports_both_sources(tmp_path, monkeypatch):
  monkeypatch.setitem(download.GROUPLENS, "ml-100k", (
      (tmp_path / "nowhere.zip").as_uri(), "0" * 32, ("u.data",)))
  monkeypatch.setattr(download, "_run_pip", lambda args, timeout: (
      subprocess.CompletedProcess(args, 1, "", "ERROR: No matching dist")))
  with pytest.raises(DataError) as e:
    download.download_ml100k(str(tmp_path / "data"))
  msg = str(e.value)
  assert "GroupLens" in msg and "No matching dist" in msg
  assert "by hand" in msg


def test_grouplens_zip_path_checks_md5(tmp_path, monkeypatch):
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w") as z:
    z.writestr("ml-100k/u.data", "1\t1\t5\t1\n")
    z.writestr("ml-100k/u.item", "1|X (1999)|||u|" + "|".join("0" * 19)
               + "\n")
    z.writestr("ml-100k/README", "not extracted")
  src = tmp_path / "ml-100k.zip"
  src.write_bytes(buf.getvalue())
  files = ("u.data", "u.item")
  monkeypatch.setitem(download.GROUPLENS, "ml-100k",
                      (src.as_uri(), md5(buf.getvalue()), files))
  monkeypatch.setattr(download, "_run_pip", lambda *a: pytest.fail("pip"))
  out = download.download_ml100k(str(tmp_path / "data"))
  assert sorted(os.listdir(out)) == ["u.data", "u.item"]
  assert (tmp_path / "data" / "downloads" / "ml-100k.zip").is_file()


def test_load_sequence_data_downloads_through_fallback(tmp_path, fake_pypi):
  data = loader.load_sequence_data("ml-100k", str(tmp_path / "data"),
                                   str(tmp_path / "cache"), None,
                                   download=True)
  assert (data.num_users, data.num_items, data.num_interactions) == (3, 4, 12)
  assert data.item_titles == ["", "Film 1", "Film 2", "Film 3", "Film 4"]
  assert data.item_info[1] == {"year": "1991", "genres": ["Drama"]}


def test_ml1m_download_failure_is_a_data_error(tmp_path, monkeypatch):
  url, md5sum, files = download.GROUPLENS["ml-1m"]
  monkeypatch.setitem(download.GROUPLENS, "ml-1m", (
      (tmp_path / "unreachable.zip").as_uri(), md5sum, files))
  with pytest.raises(DataError, match="by hand"):
    loader.load_sequence_data("ml-1m", str(tmp_path / "data"),
                              str(tmp_path / "cache"), None, download=True)
