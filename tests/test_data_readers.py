"""Readers: GroupLens ML-100K / ML-1M, RecBole atomic, Amazon 2014/2018, tfds.

Every test writes its own small files into tmp_path; nothing touches the
network (socket connects and DNS lookups are made to fail).
"""

import gzip
import json
import socket

import numpy as np
import pytest

from recjax.data import amazon
from recjax.data import atomic
from recjax.data import movielens
from recjax.data import tfds_source
from recjax.data.types import DataError


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError("a data test tried to use the network")
  monkeypatch.setattr(socket.socket, "connect", refuse)
  monkeypatch.setattr(socket, "getaddrinfo", refuse)


def write(path, text, encoding="utf-8"):
  path.parent.mkdir(parents=True, exist_ok=True)
  data = text.encode(encoding) if isinstance(text, str) else text
  if str(path).endswith(".gz"):
    data = gzip.compress(data)
  path.write_bytes(data)
  return str(path)


def assert_names(excinfo, path, line=None):
  msg = str(excinfo.value)
  assert str(path) in msg, msg
  if line is not None:
    assert f"line {line}:" in msg, msg


# ------------------------------------------------------------ ML-100K --
GENRES = "unknown|0\nAction|1\nComedy|2\n"
ITEMS_100K = ("1|Toy Story (1995)|01-Jan-1995||http://x|0|0|1\n"
              "2|Mis\xe9rables, Les (1995)|01-Jan-1995||http://y|0|1|1\n"
              "3|unknown||||1|0|0\n")
USERS_100K = "1|24|M|technician|85711\n2|53|F|other|94043\n"


def ml100k_dir(tmp_path, data="1\t2\t5\t881250949\n2\t1\t3\t881250950\n"
               "1\t3\t4\t881250940\n", items=ITEMS_100K):
  d = tmp_path / "ml-100k"
  write(d / "u.data", data)
  write(d / "u.item", items, "latin-1")
  write(d / "u.user", USERS_100K)
  write(d / "u.genre", GENRES + "\n")
  return d


def test_ml100k_reads_ratings_titles_genres_users(tmp_path):
  raw = movielens.read_ml100k(str(ml100k_dir(tmp_path)))
  assert raw.name == "ml-100k"
  assert list(raw.users) == ["1", "2", "1"]
  assert list(raw.items) == ["2", "1", "3"]
  assert raw.ratings.dtype == np.float32 and raw.timestamps.dtype == np.int64
  np.testing.assert_array_equal(raw.ratings, [5, 3, 4])
  np.testing.assert_array_equal(raw.timestamps,
                                [881250949, 881250950, 881250940])
  assert raw.item_info["1"]["title"] == "Toy Story"
  assert raw.item_info["1"]["year"] == "1995"
  assert raw.item_info["1"]["genres"] == ["Comedy"]
  assert raw.item_info["2"]["title"] == "Misérables, Les"  # latin-1 decoded
  assert raw.item_info["2"]["genres"] == ["Action", "Comedy"]
  assert raw.item_info["3"] == {"title": "unknown", "year": None,
                                "genres": ["unknown"], "release_date": "",
                                "url": ""}
  assert raw.user_info["2"] == {"age": "53", "gender": "F",
                                "occupation": "other", "zip": "94043"}
  assert "u.data" in raw.source


@pytest.mark.parametrize("data,line,what", [
    ("1\t2\t5\t1\n1\t2\t5\n", 2, "expected 4"),
    ("1\t2\t5\t1\n\n1\t2\tfive\t3\n", 3, "non-numeric rating 'five'"),
    ("1\t2\t5\tnoon\n", 1, "non-numeric timestamp"),
    ("1\t2\t5\t1\n1\t2\tnan\t3\n", 2, "non-finite rating 'nan'"),
    ("1\t2\t-inf\t1\n", 1, "non-finite rating '-inf'"),
    ("1\t2\t5\t99999999999999999999\n", 1, "timestamp '99999999999999999999' out of "
     "the int64 range"),
    ("1\t2\t5\t1\n1\t9\t5\t1\n", 2, "unknown item '9'"),
    ("7\t2\t5\t1\n", 1, "unknown user '7'"),
])
def test_ml100k_bad_ratings_name_file_and_line(tmp_path, data, line, what):
  d = ml100k_dir(tmp_path, data=data)
  with pytest.raises(DataError, match=what) as e:
    movielens.read_ml100k(str(d))
  assert_names(e, d / "u.data", line)


@pytest.mark.parametrize("items,line,what", [
    (ITEMS_100K + "4|Short|x\n", 4, "expected 8"),
    (ITEMS_100K + "1|Again (1990)|||u|0|0|1\n", 4, "duplicate item id '1'"),
    ("1|Bad flags (1990)|||u|0|2|1\n", 1, "genre flags"),
])
def test_ml100k_bad_items(tmp_path, items, line, what):
  d = ml100k_dir(tmp_path, data="1\t1\t5\t1\n", items=items)
  with pytest.raises(DataError, match=what) as e:
    movielens.read_ml100k(str(d))
  assert_names(e, d / "u.item", line)


def test_ml100k_bad_encoding_in_ratings(tmp_path):
  d = ml100k_dir(tmp_path)
  write(d / "u.data", b"1\t2\t5\t1\n1\t\xff\t5\t1\n")
  with pytest.raises(DataError, match="cannot decode") as e:
    movielens.read_ml100k(str(d))
  assert_names(e, d / "u.data", 2)


def test_ml100k_missing_file(tmp_path):
  d = ml100k_dir(tmp_path)
  (d / "u.user").unlink()
  with pytest.raises(DataError, match="not found") as e:
    movielens.read_ml100k(str(d))
  assert_names(e, d / "u.user")


# --------------------------------------------------------------- ML-1M --
def ml1m_dir(tmp_path, ratings="1::2::5::978300760\n2::1::3::978302109\n"):
  d = tmp_path / "ml-1m"
  write(d / "ratings.dat", ratings, "latin-1")
  write(d / "movies.dat",
        "1::Toy Story (1995)::Animation|Children's|Comedy\n"
        "2::Mis\xe9rables, Les (1995)::Drama|Musical\n", "latin-1")
  write(d / "users.dat", "1::F::1::10::48067\n2::M::56::16::70072\n")
  return d


def test_ml1m_reads_latin1_double_colon(tmp_path):
  raw = movielens.read_ml1m(str(ml1m_dir(tmp_path)))
  assert raw.name == "ml-1m"
  assert list(raw.users) == ["1", "2"] and list(raw.items) == ["2", "1"]
  np.testing.assert_array_equal(raw.timestamps, [978300760, 978302109])
  assert raw.item_info["2"] == {"title": "Misérables, Les", "year": "1995",
                                "genres": ["Drama", "Musical"]}
  assert raw.item_info["1"]["genres"] == ["Animation", "Children's",
                                          "Comedy"]
  assert raw.user_info["1"] == {"gender": "F", "age": "1",
                                "occupation": "10", "zip": "48067"}


@pytest.mark.parametrize("ratings,line,what", [
    ("1::2::5::1\n1::2::5::x\n", 2, "non-numeric timestamp 'x'"),
    ("1::2::5::1\n1::2::5::1::9\n", 2, "expected 4"),
    ("1::2::5::1\n1|2|5|1\n", 2, "expected 4"),
    ("1::3::5::1\n", 1, "unknown item '3'"),
])
def test_ml1m_errors_name_file_and_line(tmp_path, ratings, line, what):
  d = ml1m_dir(tmp_path, ratings)
  with pytest.raises(DataError, match=what) as e:
    movielens.read_ml1m(str(d))
  assert_names(e, d / "ratings.dat", line)


# -------------------------------------------------------------- atomic --
def atomic_files(tmp_path, inter=None, item=None, user=None):
  prefix = tmp_path / "ds" / "toy"
  inter = inter if inter is not None else (
      "item_id:token\ttimestamp:float\tuser_id:token\trating:float\n"
      "10\t100\tu1\t4\n"
      "20\t90.0\tu2\t\n"
      "10\t80\tu2\t2.5\n")
  write(prefix.with_suffix(".inter"), inter)
  if item is not False:
    write(prefix.with_suffix(".item"), item if item is not None else (
        "class:token_seq\titem_id:token\tmovie_title:token_seq\t"
        "release_year:token\n"
        "Drama Sci-Fi\t10\tThe  Matrix\t1999\n"
        "Comedy\t20\tLes Misérables\tunknown\n"
        "Comedy\t30\tNever Rated\t2001\n"))
  if user:
    write(prefix.with_suffix(".user"), user)
  return str(prefix)


def test_atomic_maps_columns_by_header_name(tmp_path):
  prefix = atomic_files(
      tmp_path, user="age:token\tuser_id:token\n24\tu1\n53\tu2\n")
  raw = atomic.read_atomic(prefix)
  assert raw.name == "toy"
  assert list(raw.users) == ["u1", "u2", "u2"]
  assert list(raw.items) == ["10", "20", "10"]
  np.testing.assert_array_equal(raw.timestamps, [100, 90, 80])
  np.testing.assert_array_equal(raw.ratings, [4, np.nan, 2.5])
  assert raw.item_info["10"] == {"title": "The Matrix", "year": "1999",
                                 "genres": ["Drama", "Sci-Fi"]}
  assert raw.item_info["20"]["title"] == "Les Misérables"
  assert raw.item_info["20"]["year"] is None
  assert set(raw.item_info) == {"10", "20", "30"}
  assert raw.user_info == {"u1": {"age": "24"}, "u2": {"age": "53"}}
  assert ".user" in raw.source


def test_atomic_non_finite_values_outside_ratings_are_kept(tmp_path):
  """Only ratings must be finite: another float column may hold nan (a missing price)."""
  prefix = atomic_files(tmp_path, inter="user_id:token\titem_id:token\tweight:float\n"
                        "a\tx\tnan\nb\ty\t1.5\n", item=False)
  raw = atomic.read_atomic(prefix)
  assert len(raw.users) == 2


def test_atomic_without_timestamp_or_item_file(tmp_path):
  prefix = atomic_files(tmp_path, inter="user_id:token\titem_id:token\n"
                        "a\tx\nb\ty\n", item=False)
  raw = atomic.read_atomic(prefix)
  np.testing.assert_array_equal(raw.timestamps, [0, 0])
  assert np.isnan(raw.ratings).all()
  assert raw.item_info == {} and raw.notes["no_timestamp_column"]


@pytest.mark.parametrize("inter,line,what", [
    ("user_id:token\titem_id:token\trating:double\n", 1,
     "unknown type 'double' of header field 'rating'"),
    ("user:token\titem_id:token\n", 1, r"missing required column\(s\) "
     r"\['user_id'\]"),
    ("user_id:token\titem_id\n", 1, "not 'name:type'"),
    ("user_id:token\titem_id:token\tts:float\na\tb\t1\na\tb\n", 3,
     "expected 3 tab-separated columns"),
    ("user_id:token\titem_id:token\trating:float\na\tb\t1\na\tb\tgood\n", 3,
     "non-numeric rating 'good'"),
    ("user_id:token\titem_id:token\trating:float\na\tb\t1\na\tb\tinf\n", 3,
     "non-finite rating 'inf'"),
    ("user_id:token\titem_id:token\ttimestamp:float\na\tb\t\n", 2,
     "empty timestamp"),
    ("user_id:token\titem_id:token\n\ta\n", 2, "empty user_id"),
])
def test_atomic_inter_errors(tmp_path, inter, line, what):
  prefix = atomic_files(tmp_path, inter=inter, item=False)
  with pytest.raises(DataError, match=what) as e:
    atomic.read_atomic(prefix)
  assert_names(e, prefix + ".inter", line)


def test_atomic_bad_utf8_in_item_file(tmp_path):
  prefix = atomic_files(tmp_path)
  write(tmp_path / "ds" / "toy.item",
        b"item_id:token\tmovie_title:token_seq\n10\tok\n20\tLes Mis\xe9r\n")
  with pytest.raises(DataError, match="cannot decode as utf-8") as e:
    atomic.read_atomic(prefix)
  assert_names(e, prefix + ".item", 3)


def test_atomic_item_file_needs_item_id(tmp_path):
  prefix = atomic_files(tmp_path, item="id:token\ttitle:token_seq\n1\tx\n")
  with pytest.raises(DataError, match="item_id") as e:
    atomic.read_atomic(prefix)
  assert_names(e, prefix + ".item", 1)


def test_atomic_duplicate_metadata_is_counted(tmp_path):
  prefix = atomic_files(tmp_path, item="item_id:token\ttitle:token_seq\n"
                        "10\tFirst\n10\tSecond\n")
  raw = atomic.read_atomic(prefix)
  assert raw.item_info["10"]["title"] == "First"
  assert raw.notes["metadata_duplicate_lines"] == 1


# -------------------------------------------------------------- Amazon --
def review(user, asin, overall, t, **extra):
  return json.dumps({"reviewerID": user, "asin": asin, "overall": overall,
                     "unixReviewTime": t, "reviewText": "fine", **extra})


def test_amazon2014_python_literal_meta(tmp_path):
  d = tmp_path / "amazon2014"
  write(d / "reviews_Beauty_5.json.gz", "\n".join([
      review("A1", "B001", 5.0, 1400000000),
      review("A2", "B002", 3.0, 1300000000),
      review("A1", "B003", 4.0, 1200000000)]) + "\n")
  write(d / "meta_Beauty.json.gz", "\n".join([
      "{'asin': 'B001', 'title': 'Lip &amp; Balm', 'price': 5.5, "
      "'categories': [['Beauty', 'Lips'], ['Beauty', 'Care']], "
      "'salesRank': {'Beauty': 12}}",
      json.dumps({"asin": "B002", "title": "Soap", "brand": "Acme"}),
      "{'asin': 'B999', 'title': \"Nobody's item\"}",
      "{'asin': 'B998'}"]) + "\n")
  raw = amazon.read_amazon(str(tmp_path), "2014", "Beauty")
  assert raw.name == "amazon2014-Beauty"
  assert list(raw.users) == ["A1", "A2", "A1"]
  assert list(raw.items) == ["B001", "B002", "B003"]
  np.testing.assert_array_equal(raw.ratings, [5, 3, 4])
  np.testing.assert_array_equal(raw.timestamps,
                                [1400000000, 1300000000, 1200000000])
  assert raw.item_info["B001"] == {"title": "Lip & Balm", "year": None,
                                   "genres": ["Beauty", "Lips", "Care"],
                                   "price": "5.5"}
  assert raw.item_info["B002"]["brand"] == "Acme"
  assert "B003" not in raw.item_info          # no metadata line
  assert set(raw.item_info) == {"B001", "B002"}
  assert raw.notes["metadata_items_without_interactions"] == 2


@pytest.mark.parametrize("lines,line,what", [
    (["not json at all"], 1, "malformed JSON"),
    (["{'reviewerID': 'A', 'asin': 'B', 'overall': 1, "
      "'unixReviewTime': 1}"], 1, "malformed JSON"),
    (['{"reviewerID": "A", "asin": "B", "unixReviewTime": 1}'], 1,
     "missing field 'overall'"),
    (['{"reviewerID": "A", "asin": "B", "overall": 5, "unixReviewTime": 1}',
      '{"reviewerID": "A", "asin": "C", "overall": "five",'
      ' "unixReviewTime": 2}'], 2, "non-numeric overall"),
    (['[1, 2]'], 1, "expected an object"),
    (['{"reviewerID": "A", "asin": "B", "overall": NaN, "unixReviewTime": 1}'], 1,
     "non-finite overall 'nan'"),
    (['{"reviewerID": "A", "asin": "B", "overall": Infinity, "unixReviewTime": 1}'], 1,
     "non-finite overall 'inf'"),
    (['{"reviewerID": "A", "asin": "B", "overall": 5, "unixReviewTime": 1e30}'], 1,
     "unixReviewTime 1e\\+30 out of the int64 range"),
])
def test_amazon_review_errors(tmp_path, lines, line, what):
  path = write(tmp_path / "Toys_5.json.gz", "\n".join(lines) + "\n")
  with pytest.raises(DataError, match=what) as e:
    amazon.read_amazon(str(tmp_path), "2018", "Toys")
  assert_names(e, path, line)


def test_amazon2014_meta_neither_json_nor_literal(tmp_path):
  write(tmp_path / "reviews_Toys_5.json.gz", review("A", "B", 5, 1) + "\n")
  path = write(tmp_path / "meta_Toys.json.gz",
               "{'asin': 'B'}\n{'asin': 'C', 'title': broken}\n")
  with pytest.raises(DataError, match="neither JSON nor a Python literal") \
      as e:
    amazon.read_amazon(str(tmp_path), "2014", "Toys")
  assert_names(e, path, 2)


def test_amazon2018_reads_json_meta_and_plain_json_files(tmp_path):
  d = tmp_path / "amazon2018"
  write(d / "Toys_5.json", "\n".join([
      review("A1", "B1", 5.0, 1500000000, vote="2"),
      review("A1", "B1", 5.0, 1500000000)]) + "\n")   # duplicate review
  write(d / "meta_Toys.json.gz", json.dumps(
      {"asin": "B1", "title": "  A   Toy ", "category": ["Toys", "Games"],
       "brand": "X"}) + "\n")
  raw = amazon.read_amazon(str(tmp_path), "2018", "Toys")
  assert list(raw.users) == ["A1", "A1"]
  assert raw.item_info["B1"] == {"title": "A Toy", "year": None,
                                 "genres": ["Toys", "Games"], "brand": "X"}


def test_amazon2018_meta_must_be_json(tmp_path):
  write(tmp_path / "Toys_5.json.gz", review("A", "B", 5, 1) + "\n")
  path = write(tmp_path / "meta_Toys.json.gz", "{'asin': 'B'}\n")
  with pytest.raises(DataError, match="malformed JSON") as e:
    amazon.read_amazon(str(tmp_path), "2018", "Toys")
  assert_names(e, path, 1)


def test_amazon_missing_meta_is_allowed_missing_reviews_is_not(tmp_path):
  write(tmp_path / "Toys_5.json.gz", review("A", "B", 5, 1) + "\n")
  raw = amazon.read_amazon(str(tmp_path), "2018", "Toys")
  assert raw.item_info == {} and raw.notes["metadata_file"] is None
  with pytest.raises(DataError, match="downloaded by hand") as e:
    amazon.read_amazon(str(tmp_path), "2014", "Toys")
  assert "reviews_Toys_5.json.gz" in str(e.value)


def test_corrupt_gzip_names_file(tmp_path):
  path = tmp_path / "Toys_5.json.gz"
  path.write_bytes(
      gzip.compress(((review("A", "B", 5, 1) + "\n") * 50).encode())[:-30])
  with pytest.raises(DataError, match="corrupt gzip") as e:
    amazon.read_amazon(str(tmp_path), "2018", "Toys")
  assert_names(e, path)


# ---------------------------------------------------------------- tfds --
def test_tfds_without_tensorflow_is_a_clear_error(monkeypatch):
  real = tfds_source.importlib.util.find_spec
  monkeypatch.setattr(
      tfds_source.importlib.util, "find_spec",
      lambda name, *a: None if name == "tensorflow" else real(name, *a))
  with pytest.raises(ImportError, match="needs TensorFlow"):
    tfds_source.read_tfds("movielens/100k-ratings", download=False)


def test_tfds_not_prepared_is_a_data_error(tmp_path):
  pytest.importorskip("tensorflow")
  with pytest.raises(DataError, match="not prepared"):
    tfds_source.read_tfds("movielens/100k-ratings", data_dir=str(tmp_path),
                          download=False)
