"""The public datasets' exact file layouts (made-up rows), through `cfb ingest`, into the database.

Each layout follows its official README (MovieLens 100k/1M/10M/CSV releases, goodbooks-10k v1 and v2);
each has a malformed variant that must fail with one line naming file, line and field, writing nothing."""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import urllib.error
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import inspect, select

from cfb.cli.main import DATASETS, cli
from cfb.db.engine import make_engine
from cfb.db.schema import Item, Rating, User

from .conftest import write


def run(db_url: str, *args: str):
    return CliRunner().invoke(cli, ["--db", db_url, *args])


def dump(db_url: str) -> dict:
    """Everything an ingest writes: users, items, ratings and the scale ({} tables when none exist)."""
    engine = make_engine(db_url)
    try:
        if not inspect(engine).has_table("ratings"):
            return {"users": {}, "items": {}, "ratings": {}, "scale": None}
        with engine.connect() as conn:
            users = dict(conn.execute(select(User.external_id, User.attributes)).all())
            items = {e: (t, a) for e, t, a in conn.execute(select(Item.external_id, Item.title, Item.attributes))}
            uid = {v: k for k, v in conn.execute(select(User.external_id, User.id)).all()}
            iid = {v: k for k, v in conn.execute(select(Item.external_id, Item.id)).all()}
            ratings = {(uid[u], iid[i]): (r, t) for u, i, r, t in
                       conn.execute(select(Rating.user_id, Rating.item_id, Rating.rating, Rating.timestamp))}
            from cfb.db.store import rating_scale

            scale = rating_scale(conn)
    finally:
        engine.dispose()
    return {"users": users, "items": items, "ratings": ratings, "scale": scale}


def ok(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def fails(result, pattern: str) -> None:
    """Exit 1 with a single error line matching ``pattern`` and no traceback."""
    import re

    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert re.search(pattern, lines[0]), lines[0]


def assert_nothing_written(db_url: str) -> None:
    d = dump(db_url)
    assert d["users"] == {} and d["items"] == {} and d["ratings"] == {} and d["scale"] is None


# --- MovieLens 100k ---------------------------------------------------------------------------------------
def ml100k(folder: Path, bad: bool = False) -> Path:
    folder.mkdir()
    write(folder / "u.data", "196\t242\t3\t881250949\n186\t302\t3\t891717742\n" +
          ("22\t377\tone\t878887116\n" if bad else "22\t377\t1\t878887116\n"))
    flags = ["0"] * 19
    tale = flags.copy()
    tale[5] = tale[8] = "1"  # Comedy, Drama
    write(folder / "u.item",
          "242|Kolya (1996)|24-Jan-1997||http://x|" + "|".join(tale) + "\n"
          "302|L.A. Confidential (1997)|01-Jan-1997||http://x|" + "|".join(flags[:10] + ["1"] + flags[11:]) + "\n"
          "377|Heavyweights (1994)|01-Jan-1994||http://x|" + "|".join(flags[:5] + ["1"] + flags[6:]) + "\n",
          "latin-1")
    write(folder / "u.user", "196|49|M|writer|55105\n186|39|F|executive|00000\n22|25|M|writer|\n")
    return folder


def test_movielens_100k(tmp_path, db_url):
    out = ok(run(db_url, "ingest", "movielens", str(ml100k(tmp_path / "ml-100k")), "--json"))
    assert out == {"ratings": 3, "new_ratings": 3, "users": 3, "items": 3, "new_users": 3, "new_items": 3, "scale": [1.0, 5.0]}
    d = dump(db_url)
    assert d["users"]["186"] == {"age": 39, "gender": "F", "occupation": "executive", "zip": "00000"}
    assert d["users"]["22"] == {"age": 25, "gender": "M", "occupation": "writer"}  # (an empty zip: no answer, as in 1M)
    assert d["items"]["242"] == ("Kolya (1996)", {"genres": ["Comedy", "Drama"], "year": 1996,
                                                  "release_date": "24-Jan-1997"})
    assert d["items"]["302"][1]["genres"] == ["Film-Noir"]
    assert d["ratings"][("22", "377")] == (1.0, 878887116)
    assert d["scale"] == (1.0, 5.0)


def test_the_python_api_ingests_a_release_whole_or_not_at_all(tmp_path):
    import cfb

    path = tmp_path / "db" / "api.db"
    path.parent.mkdir()
    bad = ml100k(tmp_path / "bad")
    write(bad / "u.data", (bad / "u.data").read_text() + f"{'L' * 256}\t242\t3\t881250949\n")  # found writing
    with cfb.open(str(path)) as db, pytest.raises(cfb.CfbError, match=r"u\.data, line 4, field 'user'"):
        db.ingest_movielens(bad)
    assert list(path.parent.iterdir()) == []
    with cfb.open(str(path)) as db:
        assert db.ingest_movielens(ml100k(tmp_path / "good"))["new_ratings"] == 3
        assert db.ingest_movielens(tmp_path / "good")["new_ratings"] == 0
    assert dump(f"sqlite:///{path}")["ratings"][("22", "377")] == (1.0, 878887116)


def test_movielens_100k_malformed(tmp_path, db_url):
    fails(run(db_url, "ingest", "movielens", str(ml100k(tmp_path / "ml-100k", bad=True))),
          r"u\.data, line 3, field 'rating': not a number: 'one'")
    assert_nothing_written(db_url)
    folder = tmp_path / "ml-100k"
    for users_file in (True, False):  # (with u.user, as an id it does not list; without, it was stored as '')
        if not users_file:
            (folder / "u.user").unlink()
        for line, field in (("\t242\t3\t881250949", "user"), (" \t242\t3\t881250949", "user"),
                            ("196\t \t3\t881250949", "item")):
            write(folder / "u.data", f"186\t302\t3\t891717742\n{line}\n")
            fails(run(db_url, "ingest", "movielens", str(folder)), rf"u\.data, line 2, field '{field}': empty id$")
    assert_nothing_written(db_url)


# --- MovieLens 1M -----------------------------------------------------------------------------------------
def ml1m(folder: Path, bad_users: bool = False) -> Path:
    folder.mkdir()
    write(folder / "ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n"
                                  "3::3408::1::978297039\n")
    write(folder / "movies.dat", "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
                                 "661::James and the Giant Peach (1996)::Animation|Children's|Musical\n"
                                 "3408::Misérables, Les (1995)::Drama|War\n", "latin-1")
    write(folder / "users.dat", "1::F::1::10::48067\n2::M::56::16::70072\n" +
          ("3::M::30::15::55117\n" if bad_users else "3::M::25::15::55117\n"))
    return folder


def test_movielens_1m(tmp_path, db_url):
    out = ok(run(db_url, "ingest", "movielens", str(ml1m(tmp_path / "ml-1m")), "--json"))
    assert out == {"ratings": 4, "new_ratings": 4, "users": 3, "items": 3, "new_users": 3, "new_items": 3, "scale": [1.0, 5.0]}
    d = dump(db_url)
    # age: the band's lower bound, "Under 18" (code 1) as 15; occupation decoded from the README's codes
    assert d["users"] == {"1": {"age": 15, "gender": "F", "occupation": "K-12 student", "zip": "48067"},
                          "2": {"age": 56, "gender": "M", "occupation": "self-employed", "zip": "70072"},
                          "3": {"age": 25, "gender": "M", "occupation": "scientist", "zip": "55117"}}
    assert d["items"]["3408"] == ("Misérables, Les (1995)", {"genres": ["Drama", "War"], "year": 1995})
    assert d["items"]["661"][1] == {"genres": ["Animation", "Children's", "Musical"], "year": 1996}
    assert d["ratings"] == {("1", "1193"): (5.0, 978300760), ("1", "661"): (3.0, 978302109),
                            ("2", "1193"): (4.0, 978298413), ("3", "3408"): (1.0, 978297039)}
    assert d["scale"] == (1.0, 5.0)


def test_movielens_1m_malformed(tmp_path, db_url):
    fails(run(db_url, "ingest", "movielens", str(ml1m(tmp_path / "ml-1m", bad_users=True))),
          r"users\.dat, line 3, field 'Age': unknown age code '30'")
    assert_nothing_written(db_url)
    folder = tmp_path / "ml-1m"
    for code in ("²", "١"):  # digits to str.isdigit: '²' was a traceback, '١' read as 1 ("academic/educator")
        write(folder / "users.dat", f"1::F::1::{code}::48067\n2::M::56::16::70072\n3::M::25::15::55117\n")
        fails(run(db_url, "ingest", "movielens", str(folder)),
              rf"users\.dat, line 1, field 'Occupation': unknown occupation code '{code}'")
    write(folder / "users.dat", "1::F::1::10::48067\n2::M::56::16::70072\n3::M::25::15::55117\n")
    write(folder / "ratings.dat", "1::1193::5::978300760\n1::661::3\n")
    fails(run(db_url, "ingest", "movielens", str(folder)),
          r"ratings\.dat, line 2: expected 4 fields \('::'-separated\), found 3")
    write(folder / "ratings.dat", "1::1193::5::978300760\n1::661::4.5::978302109\n1::662::6::978302109\n")
    fails(run(db_url, "ingest", "movielens", str(folder)),
          r"ratings\.dat, line 3, field 'Rating': rating 6 outside the scale 1\.\.5")
    for big in (2**53, 2**63):
        write(folder / "ratings.dat", f"1::1193::5::978300760\n1::661::4::{big}\n")
        fails(run(db_url, "ingest", "movielens", str(folder)),
              rf"ratings\.dat, line 2, field 'Timestamp': not a whole number under 2\*\*53: '{big}'")
    assert_nothing_written(db_url)


# --- MovieLens 10M ----------------------------------------------------------------------------------------
def ml10m(folder: Path, bad: bool = False) -> Path:
    folder.mkdir()
    write(folder / "ratings.dat", "1::122::5::838985046\n1::185::4.5::838983525\n2::122::0.5::868245777\n" +
          ("2::185::x::868244562\n" if bad else "2::185::3.5::868244562\n"))
    write(folder / "movies.dat", "122::Boomerang (1992)::Comedy|Romance\n185::Net, The (1995)::Action|Crime|Thriller\n")
    write(folder / "tags.dat", "15::185::hacker::1215184630\n20::185::Sandra Bullock::1188263867\n"
                               "21::185::hacker::1188263868\n22::122::Eddie Murphy::1188263869\n")
    return folder


def test_movielens_10m(tmp_path, db_url):
    out = ok(run(db_url, "ingest", "movielens", str(ml10m(tmp_path / "ml-10M100K")), "--json"))
    assert out == {"ratings": 4, "new_ratings": 4, "users": 2, "items": 2, "new_users": 2, "new_items": 2, "scale": [0.5, 5.0]}
    d = dump(db_url)
    assert d["items"]["185"] == ("Net, The (1995)", {"genres": ["Action", "Crime", "Thriller"], "year": 1995,
                                                     "tags": ["hacker", "sandra bullock"]})
    assert d["items"]["122"][1]["tags"] == ["eddie murphy"]
    assert d["ratings"][("1", "185")] == (4.5, 838983525) and d["ratings"][("2", "122")] == (0.5, 868245777)
    assert d["users"] == {"1": {}, "2": {}}
    assert d["scale"] == (0.5, 5.0)


def test_movielens_10m_malformed(tmp_path, db_url):
    fails(run(db_url, "ingest", "movielens", str(ml10m(tmp_path / "ml-10M100K", bad=True))),
          r"ratings\.dat, line 4, field 'Rating': not a number: 'x'")
    assert_nothing_written(db_url)


# --- MovieLens CSV releases (20M/25M/32M/latest/latest-small) ----------------------------------------------
def ml_csv(folder: Path, bad: bool = False) -> Path:
    folder.mkdir()
    write(folder / "ratings.csv", "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,3,0.5,964981247\n"
                                  "2,1,5.0,964982224\n" + ("2,6,3.5,\n" if bad else "2,6,3.5,964982400\n"))
    write(folder / "movies.csv", 'movieId,title,genres\n1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy\n'
                                 '3,"American President, The (1995)",Comedy|Drama|Romance\n'
                                 '6,"Misérables, Les (2012) ",Drama|Musical\n'
                                 '7,Black Mirror,(no genres listed)\n')
    write(folder / "tags.csv", 'userId,movieId,tag,timestamp\n2,1,pixar,1445714994\n3,1,Pixar,1445714996\n'
                               '2,1,fun,1445715000\n4,3,"politics, romance",1445715001\n')
    write(folder / "links.csv", "movieId,imdbId,tmdbId\n1,0114709,862\n")
    return folder


def test_movielens_csv_release(tmp_path, db_url):
    out = ok(run(db_url, "ingest", "movielens", str(ml_csv(tmp_path / "ml-latest-small")), "--json"))
    assert out == {"ratings": 4, "new_ratings": 4, "users": 2, "items": 4, "new_users": 2, "new_items": 4, "scale": [0.5, 5.0]}
    d = dump(db_url)
    assert d["items"]["1"] == ("Toy Story (1995)", {"genres": ["Adventure", "Animation", "Children", "Comedy",
                                                               "Fantasy"], "year": 1995, "tags": ["pixar", "fun"]})
    assert d["items"]["3"] == ("American President, The (1995)", {"genres": ["Comedy", "Drama", "Romance"],
                                                                   "year": 1995, "tags": ["politics, romance"]})
    assert d["items"]["6"] == ("Misérables, Les (2012)", {"genres": ["Drama", "Musical"], "year": 2012})
    assert d["items"]["7"] == ("Black Mirror", {"genres": []})  # no year in the title, no genres
    assert d["ratings"] == {("1", "1"): (4.0, 964982703), ("1", "3"): (0.5, 964981247),
                            ("2", "1"): (5.0, 964982224), ("2", "6"): (3.5, 964982400)}
    assert d["scale"] == (0.5, 5.0)


@pytest.mark.parametrize("header", ["userId,movieId,rating,timestamp ", "userId ,movieId, rating,timestamp"])
def test_a_csv_releases_header_names_are_read_without_surrounding_spaces(tmp_path, db_url, header):
    """As the check for missing columns reads them (it once passed, and the reader then failed)."""
    folder = tmp_path / "ml-latest-small"
    folder.mkdir()
    write(folder / "ratings.csv", f"{header}\n1,1,4.0,964982703\n2,1,3.5,964982704\n")
    write(folder / "movies.csv", "movieId,title,genres\n1,Toy Story (1995),Animation|Children\n")
    assert run(db_url, "ingest", "movielens", str(folder)).exit_code == 0
    with make_engine(db_url).connect() as conn:
        assert conn.execute(select(Rating.rating).order_by(Rating.rating)).scalars().all() == [3.5, 4.0]


def test_movielens_csv_malformed(tmp_path, db_url):
    fails(run(db_url, "ingest", "movielens", str(ml_csv(tmp_path / "ml-32m", bad=True))),
          r"ratings\.csv, line 5, field 'timestamp': not a whole number under 2\*\*53: ''")
    assert_nothing_written(db_url)
    folder = tmp_path / "ml-32m"
    write(folder / "ratings.csv", "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n")
    write(folder / "movies.csv", 'movieId,title,genres\n1,"Toy Story (1995)\n')
    fails(run(db_url, "ingest", "movielens", str(folder)), r"movies\.csv, line 2: malformed CSV in the record that starts here \(unexpected end of data\)")  # a quote left open
    write(folder / "movies.csv", "movieId,title,genres\n1,Toy Story (1995),Comedy\n1,Jumanji (1995),Fantasy\n")
    fails(run(db_url, "ingest", "movielens", str(folder)),
          r"movies\.csv, line 3, field 'movieId': duplicate id '1' \(first on line 2\)")
    write(folder / "ratings.csv", "userId,movieId,rating\n1,1,4.0\n")
    fails(run(db_url, "ingest", "movielens", str(folder)),
          r"ratings\.csv, line 1, field 'timestamp': missing column\(s\) timestamp")
    write(folder / "movies.csv", "movieId,title,genres\n1,Toy Story (1995),Comedy\n")
    for big in (2**53, 2**63, "²", "--5"):  # one rule for times in every reader: whole seconds under 2**53
        write(folder / "ratings.csv", f"userId,movieId,rating,timestamp\n1,1,4.0,1\n2,1,3.0,{big}\n")
        fails(run(db_url, "ingest", "movielens", str(folder)),
              rf"ratings\.csv, line 3, field 'timestamp': not a whole number under 2\*\*53: '{big}'")
    assert_nothing_written(db_url)


def test_not_a_movielens_folder(tmp_path, db_url):
    (tmp_path / "empty").mkdir()
    fails(run(db_url, "ingest", "movielens", str(tmp_path / "empty")),
          r"empty: not a MovieLens folder: looked for u\.data \(100k\), ratings\.dat \(1M/10M\), "
          r"ratings\.csv \(20M/25M/32M/latest\)")
    for kind in ("movielens", "goodbooks"):  # a missing folder, or a file: a usage error, as for a missing file
        res = run(db_url, "ingest", kind, str(tmp_path / "nowhere"))
        assert res.exit_code == 2 and res.stderr.strip().splitlines() == [
            f"Error: Invalid value for 'FOLDER': Directory '{tmp_path / 'nowhere'}' does not exist. "
            f"(see 'cli ingest {kind} --help')"], res.stderr  # (CliRunner names the program 'cli')
    res = run(db_url, "ingest", "movielens", str(write(tmp_path / "u.data", "1\t1\t5\t1\n")))
    assert res.exit_code == 2 and "is a file" in res.stderr
    assert_nothing_written(db_url)


# --- goodbooks-10k ----------------------------------------------------------------------------------------
BOOKS_V2 = ("book_id,goodreads_book_id,best_book_id,work_id,books_count,isbn,isbn13,authors,original_publication_year,"
            "original_title,title,language_code,average_rating,ratings_count,work_ratings_count,"
            "work_text_reviews_count,ratings_1,ratings_2,ratings_3,ratings_4,ratings_5,image_url,small_image_url\n"
            '1,2767052,2767052,2792775,272,439023483,9.78043902348e+12,Ann Writer,2008.0,The Games,'
            '"The Games (The Games, #1)",eng,4.34,10,10,1,1,1,1,1,1,https://x/1.jpg,https://x/1s.jpg\n'
            '2,3,3,4640799,491,439554934,9.78043955493e+12,"J.K. Author, Mary Drawer",1997.0,The Stone,'
            '"The Stone (Series, #1)",eng,4.44,10,10,1,1,1,1,1,1,https://x/2.jpg,https://x/2s.jpg\n'
            '3,41865,41865,3212258,226,316015849,9.78031601584e+12,Old Poet,-750.0,The Epic,The Epic,,3.57,10,10,'
            '1,1,1,1,1,1,https://x/3.jpg,https://x/3s.jpg\n')
BOOK_TAGS = ("goodreads_book_id,tag_id,count\n2767052,30574,167697\n2767052,11305,37174\n2767052,11557,34173\n"
             "3,30574,50000\n3,8717,12986\n41865,11557,900\n")
TAGS = "tag_id,tag_name\n8717,magic\n11305,dystopia\n11557,fiction\n30574,to-read\n"


def test_goodbooks_v2(tmp_path, db_url):
    folder = tmp_path / "gb2"
    folder.mkdir()
    write(folder / "ratings.csv", "user_id,book_id,rating\n1,3,5\n2,1,4\n2,2,5\n")
    write(folder / "books.csv", BOOKS_V2)
    write(folder / "book_tags.csv", BOOK_TAGS)
    write(folder / "tags.csv", TAGS)
    write(folder / "to_read.csv", "user_id,book_id\n9,8\n")
    out = ok(run(db_url, "ingest", "goodbooks", str(folder), "--json"))
    assert out == {"ratings": 3, "new_ratings": 3, "users": 2, "items": 3, "new_users": 2, "new_items": 3, "scale": [1.0, 5.0]}
    d = dump(db_url)
    assert d["items"]["1"] == ("The Games (The Games, #1)", {"authors": ["Ann Writer"],
                               "original_publication_year": 2008, "language_code": "eng",
                               "tags": ["dystopia", "fiction"]})  # "to-read" is a default shelf
    assert d["items"]["2"][1]["authors"] == ["J.K. Author", "Mary Drawer"]
    assert d["items"]["2"][1]["tags"] == ["magic"]
    assert d["items"]["3"] == ("The Epic", {"authors": ["Old Poet"], "original_publication_year": -750,
                                            "tags": ["fiction"]})
    assert d["ratings"] == {("1", "3"): (5.0, None), ("2", "1"): (4.0, None), ("2", "2"): (5.0, None)}


def test_goodbooks_v1_keys_books_by_id(tmp_path, db_url):
    """v1: ratings are book_id,user_id,rating with duplicate pairs (last kept); books.csv's ``id`` is the key
    and its ``book_id`` the Goodreads id (here book 2's Goodreads id 3 would wrongly match book 3)."""
    folder = tmp_path / "gb1"
    folder.mkdir()
    write(folder / "ratings.csv", "book_id,user_id,rating\n1,314,5\n1,439,3\n3,314,2\n1,314,4\n2,588,5\n")
    write(folder / "books.csv", BOOKS_V2.replace("book_id,goodreads_book_id,", "id,book_id,", 1))
    write(folder / "book_tags.csv", BOOK_TAGS)
    write(folder / "tags.csv", TAGS)
    out = ok(run(db_url, "ingest", "goodbooks", str(folder), "--json"))
    assert out == {"ratings": 4, "new_ratings": 4, "users": 3, "items": 3, "new_users": 3, "new_items": 3, "scale": [1.0, 5.0]}
    d = dump(db_url)
    assert d["items"]["1"][0] == "The Games (The Games, #1)"
    assert d["items"]["2"][0] == "The Stone (Series, #1)" and d["items"]["2"][1]["tags"] == ["magic"]
    assert d["items"]["3"][0] == "The Epic"
    assert d["ratings"] == {("314", "1"): (4.0, None), ("439", "1"): (3.0, None), ("314", "3"): (2.0, None),
                            ("588", "2"): (5.0, None)}


def test_goodbooks_tags_are_read_or_their_missing_half_is_named(tmp_path, db_url):
    """A v1 books.csv naming the Goodreads id goodreads_book_id still gets its tags; book_tags.csv
    without tags.csv (or the reverse), or books without a Goodreads id, is an error, not tags left out."""
    folder = goodbooks(tmp_path / "gb1", v1=True)
    books = BOOKS_V2.replace("book_id,goodreads_book_id,", "id,goodreads_book_id,", 1)
    write(folder / "books.csv", books)
    ok(run(db_url, "ingest", "goodbooks", str(folder), "--json"))
    assert dump(db_url)["items"]["2"][1]["tags"] == ["magic"]
    other = f"sqlite:///{tmp_path / 'other.db'}"
    (folder / "tags.csv").unlink()
    fails(run(other, "ingest", "goodbooks", str(folder)), r"tags\.csv: book_tags\.csv needs tags\.csv beside it")
    write(folder / "tags.csv", TAGS)
    write(folder / "books.csv", books.replace("id,goodreads_book_id,", "id,gr_id,", 1))
    fails(run(other, "ingest", "goodbooks", str(folder)),
          r"books\.csv, line 1, field 'goodreads_book_id': book_tags\.csv keys books by their Goodreads id")
    assert_nothing_written(other)


def test_goodbooks_v1_header_layout(tmp_path):
    """The v1 books.csv header as released: id first, then the Goodreads book_id."""
    from cfb.db.layouts import read_goodbooks

    folder = tmp_path / "gb1"
    folder.mkdir()
    write(folder / "ratings.csv", "book_id,user_id,rating\n2,1,5\n")
    write(folder / "books.csv", "id,book_id,best_book_id,work_id,books_count,isbn,isbn13,authors,"
                                "original_publication_year,original_title,title,language_code\n"
                                "1,2767052,2767052,2792775,272,439023483,9.78e+12,Ann Writer,2008.0,G,The Games,eng\n"
                                "2,3,3,4640799,491,439554934,9.78e+12,Bo Writer,1997.0,S,The Stone,eng\n")
    ds = read_goodbooks(folder)
    assert ds.name == "goodbooks-v1"
    assert dict(zip(ds.items["item"], ds.items["title"])) == {"1": "The Games", "2": "The Stone"}


def test_goodbooks_malformed(tmp_path, db_url):
    folder = tmp_path / "gb"
    folder.mkdir()
    write(folder / "ratings.csv", "user_id,book_id,rating\n1,3,5\n2,1,4\n2,2,five\n")
    write(folder / "books.csv", BOOKS_V2)
    fails(run(db_url, "ingest", "goodbooks", str(folder)), r"ratings\.csv, line 4, field 'rating': not a number: 'five'")
    write(folder / "ratings.csv", "book_id,user_id,rating\n1,3,5\n2,,4\n")
    fails(run(db_url, "ingest", "goodbooks", str(folder)), r"ratings\.csv, line 3, field 'user_id': empty id")
    write(folder / "ratings.csv", "user_id,book_id,rating\n1,3,5\n")
    write(folder / "books.csv", BOOKS_V2.replace(",2008.0,", ",around 2008,"))
    fails(run(db_url, "ingest", "goodbooks", str(folder)),
          r"books\.csv, line 2, field 'original_publication_year': not a year: 'around 2008'")
    for year in ("1_999", "1e300", "２００８"):  # (float() reads them: 1999, and a 301-digit year)
        write(folder / "books.csv", BOOKS_V2.replace(",2008.0,", f",{year},"))
        fails(run(db_url, "ingest", "goodbooks", str(folder)),
              rf"books\.csv, line 2, field 'original_publication_year': not a year: '{year}'")
    write(folder / "books.csv", BOOKS_V2.replace(",2008.0,The Games,", ',around 2008,"The\nGames",'))
    fails(run(db_url, "ingest", "goodbooks", str(folder)),  # (the line its record starts on, not where it ends)
          r"books\.csv, line 2, field 'original_publication_year': not a year: 'around 2008'")
    write(folder / "books.csv", BOOKS_V2.replace('"The Games (The Games, #1)"', '" "'))  # (asked about as "1")
    fails(run(db_url, "ingest", "goodbooks", str(folder)), r"books\.csv, line 2, field 'title': empty title$")
    write(folder / "ratings.csv", "user,book,stars\n1,3,5\n")
    fails(run(db_url, "ingest", "goodbooks", str(folder)), r"ratings\.csv, line 1: expected the header")
    write(folder / "ratings.csv", "user_id,book_id,rating\n1,3,5\n")
    write(folder / "books.csv", BOOKS_V2)
    write(folder / "tags.csv", TAGS)
    for count, said in (("inf", "not a finite number"), ("nan", "not a finite number"), ("1_0", "not a number")):
        write(folder / "book_tags.csv", BOOK_TAGS + f"3,11305,{count}\n")  # (an infinite count ranked its tag first)
        fails(run(db_url, "ingest", "goodbooks", str(folder)), rf"book_tags\.csv, line 8, field 'count': {said}: '{count}'$")
    write(folder / "book_tags.csv", BOOK_TAGS)
    write(folder / "tags.csv", TAGS + "8717,horror\n")  # (the last name won: every "magic" book became horror)
    fails(run(db_url, "ingest", "goodbooks", str(folder)),
          r"tags\.csv, line 6, field 'tag_id': duplicate id '8717' \(first on line 2\)$")
    write(folder / "tags.csv", TAGS)
    lines = BOOKS_V2.splitlines(keepends=True)  # two books with one Goodreads id: the tags went to the second
    write(folder / "books.csv", "".join(lines[:2]) + lines[2].replace("2,3,3,", "2,2767052,3,", 1) + lines[3])
    fails(run(db_url, "ingest", "goodbooks", str(folder)),
          r"books\.csv, line 3, field 'goodreads_book_id': Goodreads id '2767052' is given twice \(first on line 2\)$")
    write(folder / "books.csv", BOOKS_V2.replace("book_id,goodreads_book_id,", "id,book_id,", 1))
    write(folder / "ratings.csv", "book_id,user_id,rating\n1,1,5\n1,1,4\n2," + "u" * 300 + ",3\n")  # (v1: pairs twice)
    fails(run(db_url, "ingest", "goodbooks", str(folder)), r"ratings\.csv, line 4, field 'user_id': user id 'u+.*' is "
                                                           r"300 characters long")
    assert_nothing_written(db_url)


def test_a_goodbooks_tag_without_a_name_is_no_tag_and_a_negative_count_counts_as_none(tmp_path, db_url):
    """A blank tag_name (as MovieLens' readers skip a blank tag): the book keeps its other tags, none of them "".
    A count of -1 (the real book_tags.csv has a few; its author reads them as 0) is taken as 0, not refused."""
    folder = goodbooks(tmp_path / "gb")
    write(folder / "tags.csv", TAGS.replace("8717,magic", "8717, "))
    write(folder / "book_tags.csv", BOOK_TAGS + "41865,11305,-1\n")
    ok(run(db_url, "ingest", "goodbooks", str(folder), "--json"))
    d = dump(db_url)
    assert "tags" not in d["items"]["2"][1] and d["items"]["1"][1]["tags"] == ["dystopia", "fiction"]
    assert d["items"]["3"][1]["tags"] == ["fiction", "dystopia"]  # (900 shelvings, then none)


# --- checks every release reader makes -----------------------------------------------------------------
def goodbooks(folder: Path, v1: bool = False) -> Path:
    """A goodbooks-10k folder: v2, or v1 (ratings book_id,user_id,rating; books.csv keyed by ``id``)."""
    folder.mkdir()
    write(folder / "ratings.csv", "book_id,user_id,rating\n1,314,5\n3,314,2\n2,588,5\n" if v1 else
          "user_id,book_id,rating\n1,3,5\n2,1,4\n2,2,5\n")
    write(folder / "books.csv", BOOKS_V2.replace("book_id,goodreads_book_id,", "id,book_id,", 1) if v1 else BOOKS_V2)
    write(folder / "book_tags.csv", BOOK_TAGS)
    write(folder / "tags.csv", TAGS)
    return folder


RELEASES = {"100k": (ml100k, "movielens"), "1m": (ml1m, "movielens"), "10m": (ml10m, "movielens"),
            "csv": (ml_csv, "movielens"), "goodbooks-v1": (lambda f: goodbooks(f, v1=True), "goodbooks"),
            "goodbooks-v2": (goodbooks, "goodbooks")}


@pytest.mark.parametrize("release", RELEASES)
def test_a_release_given_to_the_other_ingest_command_is_named(tmp_path, db_url, release):
    """`cfb ingest movielens` on a goodbooks folder said its ratings.csv lacked userId, and `cfb ingest
    goodbooks` on a MovieLens folder that ratings.csv was not found (or its header was wrong): each
    now says which release it is and which command reads it; nothing is written."""
    make, command = RELEASES[release]
    folder = make(tmp_path / release)
    other = "goodbooks" if command == "movielens" else "movielens"
    said = ("a MovieLens release, not goodbooks-10k: use `cfb ingest movielens`" if command == "movielens" else
            "a goodbooks-10k folder, not a MovieLens release: use `cfb ingest goodbooks`")
    fails(run(db_url, "ingest", other, str(folder)), rf"^Error: {re.escape(str(folder))}: {re.escape(said)}$")
    assert_nothing_written(db_url)


def test_a_stray_file_of_the_other_release_does_not_decide_which_it_is(tmp_path, db_url):
    """A MovieLens CSV release with a books.csv beside it (a user's own file) is MovieLens, as its
    ratings.csv's header says (it was refused as "a goodbooks-10k folder"); a goodbooks folder with a
    MovieLens ratings file beside it is refused by `cfb ingest goodbooks` (it was taken, the stray left)."""
    folder = ml_csv(tmp_path / "ml")
    write(folder / "books.csv", BOOKS_V2)
    assert ok(run(db_url, "ingest", "movielens", str(folder), "--json"))["ratings"] == 4
    other = f"sqlite:///{tmp_path / 'other.db'}"
    fails(run(other, "ingest", "goodbooks", str(folder)),
          rf"^Error: {re.escape(str(folder))}: a MovieLens release, not goodbooks-10k: use `cfb ingest movielens`$")
    ml = ml100k(tmp_path / "ml-100k")  # (no ratings.csv to say which: u.data does)
    write(ml / "books.csv", BOOKS_V2)
    fails(run(other, "ingest", "goodbooks", str(ml)),
          rf"^Error: {re.escape(str(ml))}: a MovieLens release, not goodbooks-10k: use `cfb ingest movielens`$")
    gb = goodbooks(tmp_path / "gb")
    write(gb / "u.data", "196\t242\t3\t881250949\n")
    fails(run(other, "ingest", "goodbooks", str(gb)), r"holds .*u\.data.*: keep one release a folder")
    assert_nothing_written(other)


def test_titles_and_tags_are_read_as_written(tmp_path, db_url):
    """A 100k title with a space after it (three in the real u.item) is stored without it, so that it can
    be named (a lookup strips the query); a 10M title or tag that ends in ':' keeps it."""
    from cfb.db.layouts import read_ml100k, read_ml10m

    folder = ml100k(tmp_path / "ml-100k")
    item = (folder / "u.item").read_text("latin-1").replace("Kolya (1996)|", "Kolya (1996) |")
    write(folder / "u.item", item, "latin-1")
    assert read_ml100k(folder).items.set_index("item").loc["242", "title"] == "Kolya (1996)"
    ok(run(db_url, "ingest", "movielens", str(folder), "--json"))
    assert ok(run(db_url, "rate", "22", "Kolya (1996)", "4", "--json"))["item"] == "242"
    folder = ml10m(tmp_path / "ml-10M100K")
    write(folder / "movies.dat", "122::Boomerang:::Comedy|Romance\n185::Net, The (1995)::Action\n")
    write(folder / "tags.dat", "15::185::Oscar winner:::1215184630\n16::185:::odd::1215184631\n")
    items = read_ml10m(folder).items.set_index("item")
    assert items.loc["122", "title"] == "Boomerang:" and items.loc["122", "attributes"]["genres"] == ["Comedy", "Romance"]
    assert items.loc["185", "attributes"]["tags"] == ["oscar winner:", ":odd"]


@pytest.mark.parametrize("mark", ["\x85", "\x0c", "\x1e", "\u2028"])
def test_a_title_holding_a_character_str_splitlines_breaks_at_stays_one_line(tmp_path, mark):
    """The formats break lines at "\n" alone: a title holding U+0085 (a Windows "…" byte read as
    ISO-8859-1), a form feed or U+2028 is stored as written, not refused as a line of too few fields."""
    encoding = "utf-8" if mark == "\u2028" else "latin-1"
    folder = ml100k(tmp_path / "ml-100k")
    item = (folder / "u.item").read_text("latin-1").replace("Kolya (1996)|", f"Kolya{mark} again (1996)|")
    (folder / "u.item").write_bytes(item.encode(encoding))
    assert dump_of(tmp_path / "db100k", folder)["items"]["242"][0] == f"Kolya{mark} again (1996)"
    folder = ml1m(tmp_path / "ml-1m")
    movies = (folder / "movies.dat").read_text("latin-1").replace("James and", f"James{mark} and")
    (folder / "movies.dat").write_bytes(movies.encode(encoding))
    assert dump_of(tmp_path / "db1m", folder)["items"]["661"][0] == f"James{mark} and the Giant Peach (1996)"


@pytest.mark.parametrize("release, file", [("100k", "u.item"), ("100k", "u.user"), ("1m", "movies.dat"),
                                           ("1m", "users.dat"), ("10m", "movies.dat"), ("10m", "tags.dat")])
@pytest.mark.parametrize("text", ["", "\n", " \n\n"])
def test_an_empty_item_user_or_tag_file_is_named_as_empty(tmp_path, db_url, release, file, text):
    """An empty users.dat is a damaged release, not one without demographics; an empty movies.dat is
    named, not blamed on the ratings that name its movies."""
    make, kind = RELEASES[release]
    folder = make(tmp_path / release)
    write(folder / file, text)
    fails(run(db_url, "ingest", kind, str(folder)), rf"{re.escape(file)}, line 1: empty file$")
    assert_nothing_written(db_url)


@pytest.mark.parametrize("release, file, header", [
    ("csv", "ratings.csv", "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n"),
    ("csv", "movies.csv", "movieId,title,genres\n1,Toy Story (1995),Comedy\n"),
    ("goodbooks-v2", "ratings.csv", "user_id,book_id,rating\n1,1,5\n"),
    ("goodbooks-v2", "books.csv", BOOKS_V2)])
def test_a_blank_line_before_a_csv_header_is_named(tmp_path, db_url, release, file, header):
    make, kind = RELEASES[release]
    folder = make(tmp_path / release)
    write(folder / file, "\n" + header)
    fails(run(db_url, "ingest", kind, str(folder)),
          rf"{re.escape(file)}, line 1: blank line where the header should be \(the header is the file's first line\)$")
    assert_nothing_written(db_url)


@pytest.mark.parametrize("release, file, header", [("csv", "movies.csv", "movieId,title,genres\n"),
                                                   ("goodbooks-v2", "books.csv", BOOKS_V2.splitlines()[0] + "\n"),
                                                   ("goodbooks-v1", "books.csv", "id,book_id,title\n")])
def test_an_item_file_with_a_header_alone_is_named(tmp_path, db_url, release, file, header):
    make, kind = RELEASES[release]
    folder = make(tmp_path / release)
    write(folder / file, header)
    fails(run(db_url, "ingest", kind, str(folder)), rf"{re.escape(file)}, line 2: no items after the header$")
    assert_nothing_written(db_url)


def test_a_duplicate_column_in_a_ratings_header_is_named(tmp_path, db_url):
    folder = ml_csv(tmp_path / "ml-latest-small")
    write(folder / "ratings.csv", "userId,movieId,rating,timestamp,rating\n1,1,4.0,964982703,4.0\n")
    fails(run(db_url, "ingest", "movielens", str(folder)), r"ratings\.csv, line 1, field 'rating': duplicate column$")
    write(folder / "ratings.csv", "userId,movieId,rating,timestamp,,\n1,1,4.0,964982703,,\n")
    fails(run(db_url, "ingest", "movielens", str(folder)), r"ratings\.csv, line 1: columns 5 and 6 have no name$")
    assert_nothing_written(db_url)


def test_a_release_on_another_scale_than_the_database_is_refused_saying_so(tmp_path, db_url):
    """A release ingested into a database whose scale is another (MovieLens 10M's half stars after 1M's
    whole ones): refused for that reason, naming both scales, before any rating is read against the
    database's; a ratings file without a scale of its own has its first rating off the scale named at
    its line (ratings.dat and u.data have no header: their first row is line 1) and by its field."""
    ok(run(db_url, "ingest", "movielens", str(ml1m(tmp_path / "ml-1m")), "--json"))  # (the same catalogue)
    before = dump(db_url)
    fails(run(db_url, "ingest", "movielens", str(ml10m(tmp_path / "ml-10M100K"))),
          r"ml-10M100K/ratings\.dat: the release's ratings are on 0\.5\.\.5, beyond the database's 1\.\.5 \(from its "
          r"first ingest\): ingest it into a database of its own$")
    assert dump(db_url) == before
    halves = f"sqlite:///{tmp_path / 'halves.db'}"  # the other way round: whole stars are on a half-star scale
    ok(run(halves, "ingest", "movielens", str(tmp_path / "ml-10M100K"), "--json"))
    whole = write(tmp_path / "whole.csv", "user,item,rating\n1,1193,4\n")
    assert ok(run(halves, "ingest", "ratings", str(whole), "--json"))["scale"] == [0.5, 5.0]
    other = f"sqlite:///{tmp_path / 'other.db'}"
    ok(run(other, "ingest", "ratings", str(write(tmp_path / "r.csv", "user,item,rating\nu,i,4\n")), "--scale", "2,5",
           "--json"))
    fails(run(other, "ingest", "movielens", str(ml100k(tmp_path / "ml-100k"))), r"on 1\.\.5, beyond the database's")
    fails(run(other, "ingest", "ratings", str(write(tmp_path / "r2.csv", "user,item,rating\nu,i,4\nv,i,1\n"))),
          r"r2\.csv, line 3, field 'rating': rating 1 outside the scale 2\.\.5$")


def test_a_release_of_other_users_under_the_same_ids_is_refused(tmp_path, db_url):
    """Each release numbers its users anew (1M's user 1 is not 10M's): a database holds one release's
    users, whatever the scales; the same release ingested again is fine, and so is another CSV release
    only if it is the same one (told by its first user's ratings)."""
    ok(run(db_url, "ingest", "movielens", str(ml10m(tmp_path / "ml-10M100K")), "--json"))
    before = dump(db_url)
    fails(run(db_url, "ingest", "movielens", str(ml1m(tmp_path / "ml-1m"))),
          r"^Error: this database holds the users of movielens-10m, and those of movielens-1m are other people under "
          r"the same ids \(each release numbers its users anew\): ingest it into another database \(--db\)$")
    assert dump(db_url) == before
    assert ok(run(db_url, "ingest", "movielens", str(tmp_path / "ml-10M100K"), "--json"))["new_ratings"] == 0
    small = f"sqlite:///{tmp_path / 'small.db'}"
    ok(run(small, "ingest", "movielens", str(ml_csv(tmp_path / "ml-latest-small")), "--json"))
    assert ok(run(small, "ingest", "movielens", str(tmp_path / "ml-latest-small"), "--json"))["new_ratings"] == 0
    other = ml_csv(tmp_path / "ml-25m")
    write(other / "ratings.csv", "userId,movieId,rating,timestamp\n1,3,2.0,1147880044\n2,1,5.0,964982224\n")
    before = dump(small)
    fails(run(small, "ingest", "movielens", str(other)),
          r"holds the users of the MovieLens CSV release whose first user, 1, rated 2 movies, first movie 1 at time "
          r"964982703, and those of the MovieLens CSV release whose first user, 1, rated 1 movies, first movie 3 at")
    assert dump(small) == before


def test_a_release_is_refused_where_the_database_titles_its_own_items_otherwise(tmp_path, db_url):
    """Your own catalogue (`cfb ingest items`, numbered 1, 2, ...) is not written over by a release
    whose item 1 is another item; a catalogue whose titles agree (or that has none) takes the release."""
    mine = write(tmp_path / "items.csv", "item,title,genres\n1,My Own Widget,Gadgets\n3,\"American President, The (1995)\",\n")
    ok(run(db_url, "ingest", "items", str(mine), "--json"))
    before = dump(db_url)
    for kind, folder, theirs in (("movielens", ml_csv(tmp_path / "ml-latest-small"), "Toy Story (1995)"),
                                 ("goodbooks", goodbooks(tmp_path / "goodbooks"), None)):
        res = run(db_url, "ingest", kind, str(folder))
        fails(res, r"^Error: this database's item '1' is 'My Own Widget', and .+'s is '[^']+' \(\d of the \d titled "
                   r"items they share ids with differ\): the database holds another catalogue; ingest the release into "
                   r"another database \(--db\)$")
        assert theirs is None or theirs in res.stderr
        assert dump(db_url) == before
    agree = f"sqlite:///{tmp_path / 'agree.db'}"  # (spaces and case aside)
    same = "item,title\n1,toy story  (1995) \n3,\"American President, The (1995)\"\n7,\n"
    ok(run(agree, "ingest", "items", str(write(tmp_path / "same.csv", same)), "--json"))
    assert ok(run(agree, "ingest", "movielens", str(tmp_path / "ml-latest-small"), "--json"))["new_ratings"] == 4


def test_a_database_that_does_not_say_whose_users_it_holds_takes_only_its_own_release_again(tmp_path, db_url):
    """A database made before the release's users were noted (or holding users of your own): the same
    release again is fine; another release whose users share ids with the stored ones is refused when
    most of their stored ratings are not its own."""
    from cfb.db.schema import Setting
    from sqlalchemy import delete

    def forget() -> None:  # (as a database of an earlier cfb has it)
        engine = make_engine(db_url)
        with engine.begin() as conn:
            conn.execute(delete(Setting).where(Setting.key == "users_of"))
        engine.dispose()

    ok(run(db_url, "ingest", "movielens", str(ml10m(tmp_path / "ml-10M100K")), "--json"))
    forget()
    assert ok(run(db_url, "ingest", "movielens", str(tmp_path / "ml-10M100K"), "--json"))["new_ratings"] == 0
    forget()
    before = dump(db_url)
    fails(run(db_url, "ingest", "movielens", str(ml1m(tmp_path / "ml-1m"))),
          r"^Error: this database holds other users under movielens-1m's user ids: of the \d+ stored ratings of the "
          r"users they share ids with \(user '1' …\), most are not the release's")
    assert dump(db_url) == before
    mine = f"sqlite:///{tmp_path / 'mine.db'}"
    ok(run(mine, "ingest", "ratings", str(write(tmp_path / "mine.csv", "user,item,rating\n1,my-a,4\n2,my-b,2\n")),
           "--scale", "1,5", "--json"))
    fails(run(mine, "ingest", "movielens", str(tmp_path / "ml-1m")), r"holds other users under movielens-1m's user ids")


def test_a_release_names_its_users_file_for_a_users_attribute_it_cannot_store(tmp_path, db_url):
    """A release's user or item row that the stored attributes refuse is named by its own file and line
    (u.user, users.dat, movies.csv), not the ratings file."""
    ok(run(db_url, "ingest", "users", str(write(tmp_path / "u.csv", "user,zip\nweb1,55455\n")), "--json"))
    fails(run(db_url, "ingest", "movielens", str(ml100k(tmp_path / "ml-100k"))),
          r"ml-100k/u\.user, line 2, field 'zip': '00000' is a code with a leading zero, not a number")
    folder = ml1m(tmp_path / "ml-1m")
    write(folder / "users.dat", (folder / "users.dat").read_text().replace("70072", "02139"))
    fails(run(db_url, "ingest", "movielens", str(folder)), r"ml-1m/users\.dat, line 2, field 'zip': '02139' is a code")
    items = f"sqlite:///{tmp_path / 'items.db'}"
    ok(run(items, "ingest", "items", str(write(tmp_path / "i.csv", "item,title,genres\n9999,Mine,7\n")), "--json"))
    fails(run(items, "ingest", "movielens", str(ml_csv(tmp_path / "ml-latest-small"))),
          r"ml-latest-small/movies\.csv, line 2, field 'genres': .* the stored items hold genres as numbers")


def test_a_number_given_for_a_list_attribute_is_a_list_of_one(tmp_path, db_url):
    ok(run(db_url, "ingest", "items", str(write(tmp_path / "a.csv", "item,title,genres\n1,One,Drama|War\n")), "--json"))
    ok(run(db_url, "ingest", "items", str(write(tmp_path / "b.csv", "item,genres\n2,5\n")), "--json"))
    ok(run(db_url, "ingest", "items", str(write(tmp_path / "c.csv", "item,genres\n3,Noir\n")), "--json"))
    items = dump(db_url)["items"]
    assert (items["2"][1]["genres"], items["3"][1]["genres"]) == ([5], ["Noir"])  # (was 5: a list column held a number)


@pytest.mark.parametrize("release", RELEASES)
@pytest.mark.parametrize("blanks", ["\n", "\n \n\t\n"])
def test_trailing_blank_lines_are_accepted(tmp_path, release, blanks):
    """Downloaded files sometimes end with a blank line: every file of every release may."""
    make, kind = RELEASES[release]
    got = []
    for name, extra in (("as-released", ""), ("with-blanks", blanks)):
        folder, url = make(tmp_path / name), f"sqlite:///{tmp_path / name}.db"
        for path in folder.iterdir():
            path.write_bytes(path.read_bytes() + extra.encode())
        got.append((ok(run(url, "ingest", kind, str(folder), "--json")), dump(url)))
    assert got[1] == got[0] and got[0][0]["ratings"] > 0


@pytest.mark.parametrize("release", RELEASES)
@pytest.mark.parametrize("end", ["\r", "\r\n"])
def test_every_file_of_a_release_may_end_its_lines_in_cr_or_crlf_and_blank_lines(tmp_path, release, end):
    """Lines ended by a lone CR (old Mac files) or CRLF, with blank lines at the end: every rating is read
    (a lone CR's lines were counted as one, and the ratings after it dropped with exit 0; a ratings.csv of
    CR alone was a traceback)."""
    make, kind = RELEASES[release]
    got = []
    for name, line_end in (("as-released", "\n"), ("other-ends", end)):
        folder, url = make(tmp_path / name), f"sqlite:///{tmp_path / name}.db"
        for path in folder.iterdir():
            text = path.read_bytes().replace(b"\n", line_end.encode())
            path.write_bytes(text + (line_end * 2).encode() * (name == "other-ends"))
        got.append((ok(run(url, "ingest", kind, str(folder), "--json")), dump(url)))
    assert got[1] == got[0] and got[0][0]["ratings"] > 0


def test_a_lone_cr_inside_a_ratings_file_with_a_blank_tail_loses_no_rating(tmp_path, db_url):
    folder = ml1m(tmp_path / "ml-1m")
    write(folder / "ratings.dat", "1::1193::5::978300760\n2::1193::4::978298413\r3::3408::1::978297039\n\n")
    assert ok(run(db_url, "ingest", "movielens", str(folder), "--json"))["ratings"] == 3
    folder = ml_csv(tmp_path / "ml-latest")
    write(folder / "ratings.csv", "userId,movieId,rating,timestamp\n1,1,4.0,964982703\r2,3,0.5,964981247\r\r\r")
    assert ok(run(f"sqlite:///{tmp_path / 'csv.db'}", "ingest", "movielens", str(folder), "--json"))["ratings"] == 2


@pytest.mark.parametrize("release, file", [("100k", "u.item"), ("100k", "u.user"), ("1m", "ratings.dat"),
                                           ("1m", "movies.dat"), ("1m", "users.dat"), ("csv", "ratings.csv"),
                                           ("goodbooks-v2", "ratings.csv"), ("goodbooks-v2", "books.csv")])
def test_a_file_that_cannot_be_read_is_named(tmp_path, db_url, release, file):
    """A read error (EIO on a bad disk; here EINVAL, which reading /proc/self/clear_refs gives root) names the
    file: it was 'Error: Invalid argument', with no file, from pandas' parser and the encoding's guess."""
    trap = Path("/proc/self/clear_refs")
    try:
        with open(trap, "rb") as f:
            f.read(1)
        pytest.skip("reading /proc/self/clear_refs gives no error here")
    except OSError as e:
        if e.errno != errno.EINVAL:
            pytest.skip(f"opening /proc/self/clear_refs: {e}")
    make, kind = RELEASES[release]
    folder = make(tmp_path / "release")
    (folder / file).unlink()
    (folder / file).symlink_to(trap)
    fails(run(db_url, "ingest", kind, str(folder)), rf"{re.escape(file)}: cannot read \(Invalid argument\)$")
    assert_nothing_written(db_url)


def test_a_file_system_that_cannot_map_files_is_read_by_the_careful_reader(tmp_path, monkeypatch):
    """The whole-number fast path maps the file; where that fails (some FUSE mounts: ENODEV) the file is
    still read, not refused as unreadable."""
    from cfb.db import layouts

    path = write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n1,10,4.0,5\n2,10,3.5,6\n")
    expected = layouts.read_csv_ratings(path, "userId", "movieId", "rating", "timestamp")

    def no_map(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise OSError(errno.ENODEV, "No such device")

    monkeypatch.setattr(layouts.np, "memmap", no_map)
    got = layouts.read_csv_ratings(path, "userId", "movieId", "rating", "timestamp")
    assert got.astype({"user": str, "item": str}).equals(expected.astype({"user": str, "item": str}))


def test_a_header_longer_than_a_read_block_is_read_whole_and_one_past_the_csv_limit_is_named(tmp_path, db_url):
    folder = ml_csv(tmp_path / "ml-latest")
    long_name = "x" * (3 << 16)  # (the first line is read in 64 KiB blocks)
    write(folder / "ratings.csv", f"userId,movieId,rating,timestamp,{long_name}\r1,1,4.0,964982703,a\r")
    fails(run(db_url, "ingest", "movielens", str(folder)),  # (a csv traceback: 'field larger than field limit')
          r"ratings\.csv, line 1: malformed CSV header \(field larger than field limit \(131072\)\)$")
    write(folder / "ratings.csv", f"userId,movieId,rating,timestamp,{long_name[:100_000]}\r1,1,4.0,964982703,a\r")
    assert ok(run(db_url, "ingest", "movielens", str(folder), "--json"))["ratings"] == 1  # (under the limit: read)
    big = write(tmp_path / "big.csv", f"user,item,rating,{long_name}\n1,2,4,a\n")  # (a ratings file of your own)
    fails(run(f"sqlite:///{tmp_path / 'own.db'}", "ingest", "ratings", str(big)),
          r"big\.csv, line 1: malformed CSV header \(field larger than field limit \(131072\)\)$")


def test_a_pipe_or_a_device_is_refused_as_no_file(tmp_path, db_url):
    """A pipe is read once (the line of a bad row was lost on the second read) and /dev/zero never ends
    (an ingest of it ran out of memory): both refused, naming them; a file given as stdin is read."""
    fifo = tmp_path / "ratings.fifo"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero")):
        fails(run(db_url, "ingest", "ratings", str(path)), rf"{re.escape(str(path))}: is not a regular file \(a pipe or a device\)")
    folder = ml1m(tmp_path / "ml-1m")
    (folder / "ratings.dat").unlink()
    os.mkfifo(folder / "ratings.dat")
    fails(run(db_url, "ingest", "movielens", str(folder)), r"ratings\.dat: is not a regular file")
    assert_nothing_written(db_url)


def test_trailing_blank_lines_on_the_careful_paths_and_blank_lines_inside(tmp_path, db_url):
    """Quoted ids (read as text, not as numbers) and a file ending in CRLF blank lines; a blank line
    between ratings stays refused, at its line."""
    folder = ml_csv(tmp_path / "ml-latest")
    write(folder / "ratings.csv", 'userId,movieId,rating,timestamp\r\n"1",1,4.0,964982703\r\n2,3,0.5,964981247\r\n\r\n')
    assert ok(run(db_url, "ingest", "movielens", str(folder), "--json"))["ratings"] == 2
    other = f"sqlite:///{tmp_path / 'other.db'}"
    write(folder / "ratings.csv", "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n\n2,3,0.5,964981247\n")
    fails(run(other, "ingest", "movielens", str(folder)),
          r"ratings\.csv, line 3: expected 4 fields \(comma-separated\), found 0$")
    folder = ml1m(tmp_path / "ml-1m")
    write(folder / "ratings.dat", "1::1193::5::978300760\n\n2::1193::4::978298413\n")
    fails(run(other, "ingest", "movielens", str(folder)),
          r"ratings\.dat, line 2: expected 4 fields \('::'-separated\), found 1$")
    assert_nothing_written(other)


@pytest.mark.parametrize("release, file, text, message", [
    # half stars on whole-star releases; off the half-star steps on the others
    pytest.param("100k", "u.data", "196\t242\t3\t881250949\n186\t302\t3.5\t891717742\n",
        r"u\.data, line 2, field 'rating': rating 3\.5 not on the scale 1\.\.5 in steps of 1$", id="100k-half-star"),
    pytest.param("1m", "ratings.dat", "1::1193::5::978300760\n1::661::4.5::978302109\n",
        r"ratings\.dat, line 2, field 'Rating': rating 4\.5 not on the scale 1\.\.5 in steps of 1 \(read as MovieLens "
        r"1M, whose ratings are whole stars, since the folder has users\.dat\)$", id="1m-half-star"),
    pytest.param("goodbooks-v2", "ratings.csv", "user_id,book_id,rating\n1,3,5\n2,1,3.5\n",
        r"ratings\.csv, line 3, field 'rating': rating 3\.5 not on the scale 1\.\.5 in steps of 1$",
        id="goodbooks-v2-half-star"),
    pytest.param("goodbooks-v1", "ratings.csv", "book_id,user_id,rating\n1,314,4.5\n",
        r"ratings\.csv, line 2, field 'rating': rating 4\.5 not on the scale 1\.\.5 in steps of 1$",
        id="goodbooks-v1-half-star"),
    pytest.param("10m", "ratings.dat", "1::122::5::838985046\n1::185::3.25::838983525\n",
        r"ratings\.dat, line 2, field 'Rating': rating 3\.25 not on the scale 0\.5\.\.5 in steps of 0\.5$",
        id="10m-quarter-star"),
    pytest.param("csv", "ratings.csv", "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,3,2.75,964981247\n",
        r"ratings\.csv, line 3, field 'rating': rating 2\.75 not on the scale 0\.5\.\.5 in steps of 0\.5$",
        id="csv-quarter-star"),
    # negative times, on every release with times
    pytest.param("100k", "u.data", "196\t242\t3\t881250949\n186\t302\t3\t-5\n",
        r"u\.data, line 2, field 'timestamp': negative time '-5' \(seconds since 1970 expected\)$",
        id="100k-negative-time"),
    pytest.param("1m", "ratings.dat", "1::1193::5::-978300760\n",
        r"ratings\.dat, line 1, field 'Timestamp': negative time '-978300760'", id="1m-negative-time"),
    pytest.param("10m", "ratings.dat", "1::122::5::838985046\n1::185::4.5::838983525\n2::122::0.5::-1\n",
        r"ratings\.dat, line 3, field 'Timestamp': negative time '-1'", id="10m-negative-time"),
    pytest.param("csv", "ratings.csv", "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,3,0.5,-964981247\n",
        r"ratings\.csv, line 3, field 'timestamp': negative time '-964981247'", id="csv-negative-time"),
    # items missing from the release's item list
    pytest.param("100k", "u.data", "196\t242\t3\t881250949\n186\t302\t3\t891717742\n22\t999\t1\t878887116\n",
        r"u\.data, line 3, field 'item': item '999' is not in u\.item$", id="100k-unknown-item"),
    pytest.param("1m", "ratings.dat", "1::1193::5::978300760\n1::1194::3::978302109\n",
        r"ratings\.dat, line 2, field 'MovieID': item '1194' is not in movies\.dat$", id="1m-unknown-item"),
    pytest.param("10m", "ratings.dat", "1::122::5::838985046\n1::186::4.5::838983525\n",
        r"ratings\.dat, line 2, field 'MovieID': item '186' is not in movies\.dat$", id="10m-unknown-item"),
    pytest.param("csv", "ratings.csv", "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,2,0.5,964981247\n",
        r"ratings\.csv, line 3, field 'movieId': item '2' is not in movies\.csv$", id="csv-unknown-item"),
    pytest.param("goodbooks-v2", "ratings.csv", "user_id,book_id,rating\n1,3,5\n2,4,3\n",
        r"ratings\.csv, line 3, field 'book_id': item '4' is not in books\.csv \(its book_id column\)$",
        id="goodbooks-v2-unknown-book"),
    # v1: ratings' book_id is books.csv's id; 2767052 is only a Goodreads id there (its book_id column)
    pytest.param("goodbooks-v1", "ratings.csv", "book_id,user_id,rating\n1,314,5\n2767052,439,3\n",
        r"ratings\.csv, line 3, field 'book_id': item '2767052' is not in books\.csv \(its id column\)$",
        id="goodbooks-v1-unknown-book"),
    # lines pandas refuses but a field-by-field check once passed: each named, not "malformed ratings file"
    pytest.param("1m", "ratings.dat", "1::1193::5::978300760\n7:7::1193::3::5\n",
        r"ratings\.dat, line 2, field 'UserID': a single ':' in '7:7': fields are '::'-separated$", id="1m-single-colon"),
    pytest.param("1m", "ratings.dat", "1::1193::5::978300760\n7::1193::1_0::5\n",
        r"ratings\.dat, line 2, field 'Rating': not a number: '1_0'$", id="1m-underscore-rating"),
    # ids no user or item can have (too long, a NUL), named by the file that holds them and its own field names
    pytest.param("10m", "ratings.dat", "1::122::5::838985046\n" + "7" * 300 + "::185::4.5::838983525\n",
        r"ratings\.dat, line 2, field 'UserID': user id '7{20}\.\.\.' is 300 characters long", id="10m-long-user-id"),
    pytest.param("goodbooks-v2", "ratings.csv", "user_id,book_id,rating\n1,3,5\n" + "8" * 300 + ",3,3\n",
        r"ratings\.csv, line 3, field 'user_id': user id '8{20}\.\.\.' is 300 characters long",
        id="goodbooks-v2-long-user-id"),
    pytest.param("csv", "movies.csv", "movieId,title,genres\n1,Toy Story (1995),Comedy\n3,A (1995),Drama\n"
                 "6,B (2012),Drama\n" + "9" * 300 + ",C (2000),Drama\n",
        r"movies\.csv, line 5, field 'movieId': item id '9{20}\.\.\.' is 300 characters long", id="csv-long-item-id"),
    pytest.param("csv", "movies.csv", "movieId,title,genres\n1,Toy Story (1995),Comedy\n3,A\x00B (1995),Drama\n"
                 "6,B (2012),Drama\n",
        r"movies\.csv, line 3, field 'title': title 'A\\x00B \(1995\)' contains a NUL character$", id="csv-nul-title"),
])
def test_release_ratings_refused(tmp_path, db_url, release, file, text, message):
    """Ratings off the release's scale or steps, at a negative time, or of an item the release does not
    list, and ids or titles no user or item can have: one line naming file, line and field; nothing written."""
    make, kind = RELEASES[release]
    folder = make(tmp_path / release)
    write(folder / file, text)
    fails(run(db_url, "ingest", kind, str(folder)), message)
    assert_nothing_written(db_url)


ITEM_FILES = {"100k": ("u.item", "u.data", ""), "1m": ("movies.dat", "ratings.dat", ""),
              "10m": ("movies.dat", "ratings.dat", ""), "csv": ("movies.csv", "ratings.csv", "userId,movieId,rating,timestamp\n"),
              "goodbooks-v1": ("books.csv", "ratings.csv", "book_id,user_id,rating\n"),
              "goodbooks-v2": ("books.csv", "ratings.csv", "user_id,book_id,rating\n")}


@pytest.mark.parametrize("release", RELEASES)
def test_a_release_without_its_item_file_or_its_ratings_is_refused(tmp_path, db_url, release):
    """Every release lists its items (titles: what the questionnaire asks about) and has ratings: a folder
    without the item file, or with an empty ratings file, is one line naming the file; nothing written."""
    make, kind = RELEASES[release]
    item_file, ratings_file, header = ITEM_FILES[release]
    folder = make(tmp_path / release)
    (folder / item_file).unlink()
    fails(run(db_url, "ingest", kind, str(folder)), rf"{re.escape(item_file)}: file not found: the release lists "
          r"its items there \(for ratings alone: `cfb ingest ratings`\)$")
    # `cfb eval cold-start --data` cannot use ratings alone: no `cfb ingest ratings` hint (and goodbooks' ratings.csv
    # is told from a MovieLens one by its header: it was read as MovieLens, "missing column(s) userId, ...")
    fails(run(db_url, "eval", "cold-start", "--data", str(folder), "--quiet"),
          rf"{re.escape(item_file)}: file not found: the release lists its items there$")
    folder = make(tmp_path / f"{release}-empty")
    write(folder / ratings_file, header)
    fails(run(db_url, "ingest", kind, str(folder)), rf"{re.escape(ratings_file)}(, line \d)?: no ratings")
    assert_nothing_written(db_url)


def test_eval_on_ratings_without_time_and_no_budget_is_refused_before_training(tmp_path, db_url):
    """goodbooks has no rating times, so no fold-in curve (§5): with --budgets empty there is nothing to
    measure, said before training (it trained, then printed no table and exited 0)."""
    folder = RELEASES["goodbooks-v2"][0](tmp_path / "goodbooks")
    res = run(db_url, "eval", "cold-start", "--data", str(folder), "--budgets", "", "--quiet")
    assert res.exit_code == 2 and "no fold-in curve (§5) to measure either" in res.output, res.output
    assert "its ratings have no time" in res.output
    # timed ratings, but nobody with more than ten: §5 has nothing to score either
    folder = RELEASES["csv"][0](tmp_path / "ml-csv")
    res = run(db_url, "eval", "cold-start", "--data", str(folder), "--budgets", "", "--quiet")
    assert res.exit_code == 2 and "no cold user of seeds 42, 43, 44 has more than 10 ratings" in res.output, res.output


@pytest.mark.parametrize("text, message", [
    ("1|24|M|technician|85711\n1|40|F|artist|11111\n", r"u\.user, line 2, field 'id': duplicate id '1' \(first on line 1\)$"),
    ("1|abc|M|technician|85711\n", r"u\.user, line 1, field 'age': expected a whole number of years, found 'abc'$"),
    ("1|\u00b2|M|technician|85711\n", r"u\.user, line 1, field 'age': expected a whole number of years, found '\u00b2'$"),
    ("1|24|M|technician\n", r"u\.user, line 1: expected id\|age\|gender\|occupation\|zip, found 4 '\|'-separated fields$"),
])
def test_a_100k_user_file_names_the_line_and_field_at_fault(tmp_path, db_url, text, message):
    folder = ml100k(tmp_path / "ml-100k")
    (folder / "u.user").write_bytes(text.encode("latin-1"))  # (the release's encoding)
    fails(run(db_url, "ingest", "movielens", str(folder)), message)
    assert_nothing_written(db_url)


@pytest.mark.parametrize("text, message", [
    ("1|24|X|technician|85711\n", r"u\.user, line 1, field 'gender': expected M or F, found 'X'$"),
    ("1|24|M|astronaut|85711\n", r"u\.user, line 1, field 'occupation': occupation 'astronaut' is not in u\.occupation$"),
])
def test_a_100k_user_file_is_checked_as_1ms_is(tmp_path, db_url, text, message):
    folder = ml100k(tmp_path / "ml-100k")
    write(folder / "u.occupation", "executive\ntechnician\nwriter\n")
    (folder / "u.user").write_bytes(("196|49|M|writer|55105\n186|39|F|executive|00000\n22|25|M|writer|40206\n"
                                     + text).encode("latin-1"))
    fails(run(db_url, "ingest", "movielens", str(folder)), message.replace("line 1", "line 4"))
    assert_nothing_written(db_url)


def test_a_100k_genre_flag_other_than_0_or_1_is_named(tmp_path, db_url):
    folder = ml100k(tmp_path / "ml-100k")
    text = (folder / "u.item").read_bytes().decode("latin-1").splitlines()
    fields = text[2].split("|")
    fields[6] = "2"  # Action
    write(folder / "u.item", "\n".join([*text[:2], "|".join(fields)]) + "\n", "latin-1")
    fails(run(db_url, "ingest", "movielens", str(folder)), r"u\.item, line 3, field 'Action': expected a genre flag 0 or 1, found '2'$")
    assert_nothing_written(db_url)


@pytest.mark.parametrize("line, message", [
    ("242|Dup (1995)|01-Jan-1995||http://x|", r"line 4, field 'id': duplicate id '242' \(first on line 1\)$"),
    ("|X (1995)|01-Jan-1995||http://x|", r"line 4, field 'id': empty id$"),
    ("1683||01-Jan-1995||http://x|", r"line 4, field 'title': empty title$"),
])
def test_a_100k_item_file_is_checked_as_1ms_is(tmp_path, db_url, line, message):
    """A repeated id once replaced an item's title silently; an empty id or title was stored."""
    folder = ml100k(tmp_path / "ml-100k")
    with open(folder / "u.item", "a", encoding="latin-1") as f:
        f.write(line + "|".join(["0"] * 19) + "\n")
    fails(run(db_url, "ingest", "movielens", str(folder)), r"u\.item, " + message)
    assert_nothing_written(db_url)


BOM = "\ufeff"


@pytest.mark.parametrize("release, file", [("100k", "u.data"), ("100k", "u.user"), ("100k", "u.item"),
                                           ("1m", "ratings.dat"), ("1m", "users.dat"), ("1m", "movies.dat")])
def test_a_byte_order_mark_is_not_part_of_the_first_id(tmp_path, release, file):
    """A release file saved again by an editor that starts it with the UTF-8 byte order mark reads as
    the file without it (its first id was an id of its own, with the mark in it)."""
    make = RELEASES[release][0]
    plain = dump_of(tmp_path / "plain", make(tmp_path / "a"))
    folder = make(tmp_path / "b")
    (folder / file).write_bytes(BOM.encode() + (folder / file).read_bytes().decode("latin-1").encode())
    assert dump_of(tmp_path / "marked", folder) == plain


def test_a_1m_movie_file_saved_as_utf8_is_read_as_utf8(tmp_path):
    folder = ml1m(tmp_path / "ml-1m")
    (folder / "movies.dat").write_bytes((folder / "movies.dat").read_bytes().decode("latin-1").encode())
    assert dump_of(tmp_path / "db", folder)["items"]["3408"][0] == "Misérables, Les (1995)"


def dump_of(where: Path, folder: Path) -> dict:
    where.mkdir()
    url = f"sqlite:///{where / 'cfb.db'}"
    ok(run(url, "ingest", "movielens", str(folder), "--json"))
    return dump(url)


def test_a_1m_folder_without_users_is_whole_stars_and_two_layouts_are_refused(tmp_path, db_url):
    """ratings.dat without users.dat is 10M's layout, but whole stars and no tags.dat are 1M's files:
    its scale is 1..5 (10M's half stars would let a 0.5 in). Two releases in a folder: refused."""
    folder = ml1m(tmp_path / "ml-1m")
    (folder / "users.dat").unlink()
    assert ok(run(db_url, "ingest", "movielens", str(folder), "--json"))["scale"] == [1.0, 5.0]
    assert dump(db_url)["users"] == {"1": {}, "2": {}, "3": {}}
    tenm = ml10m(tmp_path / "ml-10m")
    (tenm / "tags.dat").unlink()  # half stars alone say 10M
    other = tmp_path / "other.db"
    assert ok(run(f"sqlite:///{other}", "ingest", "movielens", str(tenm), "--json"))["scale"] == [0.5, 5.0]
    write(folder / "ratings.csv", "userId,movieId,rating,timestamp\n1,1193,4.0,964982703\n")
    fails(run(db_url, "ingest", "movielens", str(folder)),
          r"ml-1m: holds the ratings of two MovieLens layouts \(ratings\.dat and ratings\.csv\)")


@pytest.mark.parametrize("file, text, message", [
    ("ratings.csv", "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n41,\"2\"2,4.0,978300000\n",
     r"ratings\.csv, line 3: malformed CSV"),
    ("movies.csv", 'movieId,title,genres\n1,Toy Story (1995),Comedy\n3,"Quote "Bad" Movie (2000)",Drama\n'
     '6,Heat (1995),Action\n', r"movies\.csv, line 3: malformed CSV"),
    ("tags.csv", 'userId,movieId,tag,timestamp\n1,1,"funny"x,978300000\n', r"tags\.csv, line 2: malformed CSV"),
])
def test_a_stray_quote_in_a_csv_release_is_malformed_not_read_into_the_value(tmp_path, db_url, file, text, message):
    folder = ml_csv(tmp_path / "ml-32m")
    write(folder / file, text)
    fails(run(db_url, "ingest", "movielens", str(folder)), message)
    assert_nothing_written(db_url)


def test_half_stars_stay_accepted_where_the_release_has_them(tmp_path):
    from cfb.db.layouts import read_goodbooks, read_movielens

    assert set(read_movielens(ml10m(tmp_path / "10m")).ratings["rating"]) == {5, 4.5, 0.5, 3.5}
    assert set(read_movielens(ml_csv(tmp_path / "csv")).ratings["rating"]) == {4, 0.5, 5, 3.5}
    assert set(read_goodbooks(goodbooks(tmp_path / "gb")).ratings["rating"]) == {5, 4}


# --- your own catalogue: cfb ingest items -------------------------------------------------------------
def test_ingest_items_adds_and_updates(tmp_path, db_url):
    folder = ml1m(tmp_path / "ml-1m")
    ok(run(db_url, "ingest", "movielens", str(folder), "--json"))
    items = write(tmp_path / "items.csv", 'item,title,director,runtime,genres\n'
                                          '1193,,Milos Forman,133,Drama\n'
                                          'new1,"Brand New, The (2030)",Ann Director,95,Sci-Fi|Drama\n')
    out = ok(run(db_url, "ingest", "items", str(items), "--json"))
    assert out == {"items": 2, "added": 1, "updated": 1, "unchanged": 0, "shared_titles": []}
    assert ok(run(db_url, "ingest", "items", str(items), "--json")) == {"items": 2, "added": 0, "updated": 0,
                                                                         "unchanged": 2, "shared_titles": []}
    d = dump(db_url)
    # the empty title keeps the stored one; given attributes replace theirs, the rest stay
    assert d["items"]["1193"] == ("One Flew Over the Cuckoo's Nest (1975)",
                                  {"genres": ["Drama"], "year": 1975, "director": "Milos Forman", "runtime": 133})
    assert d["items"]["new1"] == ("Brand New, The (2030)",
                                  {"director": "Ann Director", "runtime": 95, "genres": ["Sci-Fi", "Drama"]})
    assert len(d["ratings"]) == 4
    write(items, "item,title,genres\nnew2,Nothing Listed,|\nnew3,Listed,Drama|\n")  # ("|" alone: no value)
    ok(run(db_url, "ingest", "items", str(items), "--json"))
    d = dump(db_url)
    assert d["items"]["new2"] == ("Nothing Listed", {}) and d["items"]["new3"][1] == {"genres": ["Drama"]}


def test_ingest_items_errors_write_nothing(tmp_path, db_url):
    bad = write(tmp_path / "items.csv", "item,title,year\na,Alpha,2001\n,Beta,2002\n")
    fails(run(db_url, "ingest", "items", str(bad)), r"items\.csv, line 3, field 'item': empty id")
    write(bad, "item,title,year\na,Alpha,2001\nb,Beta\n")
    fails(run(db_url, "ingest", "items", str(bad)), r"items\.csv, line 3: expected 3 fields, found 2")
    write(bad, "item,title,year\na,Alpha,2001\na,Beta,2002\n")
    fails(run(db_url, "ingest", "items", str(bad)), r"items\.csv, line 3, field 'item': duplicate item 'a'")
    write(bad, "id,title\na,Alpha\n")
    fails(run(db_url, "ingest", "items", str(bad)), r"items\.csv, line 1, field 'item': missing column")
    assert_nothing_written(db_url)
    # a new id that is a stored item's title: lookups by id or title would then find it, not that item
    assert run(db_url, "ingest", "items", str(write(bad, "item,title\na,Alpha film 1\n"))).exit_code == 0
    fails(run(db_url, "ingest", "items", str(write(bad, "item,genres\nb,Drama\nAlpha film 1,Drama\n"))),
          r"items\.csv, line 3, field 'item': 'Alpha film 1' is the title of item 'a': a new item's id cannot be")
    assert run(db_url, "ingest", "items", str(write(bad, "item,title\na,Alpha film 1\n1984,1984\n"))).exit_code == 0


# --- cfb data download: verify, unpack, rename into place -------------------------------------------------
def make_zip(path: Path, inner: str = "ml-test", marker: str = "ratings.csv") -> Path:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(f"{inner}/{marker}", "userId,movieId,rating,timestamp\n1,1,4.0,1\n")
        z.writestr(f"{inner}/movies.csv", "movieId,title,genres\n1,Toy Story (1995),Comedy\n")
    path.write_bytes(buf.getvalue())
    return path


@pytest.fixture
def fake_source(tmp_path, monkeypatch):
    from cfb.db import download

    archive = make_zip(tmp_path / "ml-test.zip")
    monkeypatch.setitem(download.SOURCES, "movielens-test", (archive.as_uri(), "ml-test", "ratings.csv"))
    monkeypatch.setitem(download.INGEST, "movielens-test", "movielens")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    monkeypatch.setitem(download.CHECKSUMS, "movielens-test", f"md5:{md5}")
    return download, archive


def leftovers(cache: Path) -> list[str]:
    """What the cache folder holds besides the datasets' lock files (kept: removing a lock file while
    another process waits on it would let a third take a new one beside it)."""
    return sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) if cache.exists() else []


def assert_archive_refused(fake_source, monkeypatch, bad: Path, pattern: str, cache: Path) -> None:
    """``bad`` served in place of the test dataset's archive: one line of error matching ``pattern`` and
    nothing left in ``cache``; then the good archive is served again."""
    from cfb.cf_core.errors import CfbError

    download, archive = fake_source
    monkeypatch.setitem(download.SOURCES, "movielens-test", (bad.as_uri(), "ml-test", "ratings.csv"))
    with pytest.raises(CfbError, match=pattern) as e:
        download.download("movielens-test", cache=cache)
    assert "\n" not in str(e.value) and leftovers(cache) == []
    monkeypatch.setitem(download.SOURCES, "movielens-test", (archive.as_uri(), "ml-test", "ratings.csv"))


def test_download_verifies_unpacks_and_renames(tmp_path, fake_source, monkeypatch):
    download, archive = fake_source
    cache = tmp_path / "cache"
    updates = []

    class Bar:
        def __init__(self, total):
            updates.append(("total", total))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            updates.append(n)

    folder = download.download("movielens-test", cache=cache, progress=Bar)
    assert folder == cache / "movielens-test" / "ml-test"
    assert leftovers(cache) == ["movielens-test"]  # no .part, no temporary folder
    stamp = json.loads((folder / download.STAMP).read_text())
    assert stamp["sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()
    assert stamp["verified_by"] == "md5 = the pinned MD5"
    assert updates[0] == ("total", archive.stat().st_size) and sum(updates[1:]) == archive.stat().st_size
    # cached: no second fetch
    monkeypatch.setattr(download.urllib.request, "urlopen", lambda *a, **k: pytest.fail("fetched again"))
    assert download.download("movielens-test", cache=cache) == folder
    from cfb.db.sources import read_movielens

    assert len(read_movielens(folder).ratings) == 1


def test_download_checksum_mismatch_leaves_nothing(tmp_path, fake_source, monkeypatch):
    from cfb.cf_core.errors import CfbError

    download, _ = fake_source
    cache = tmp_path / "cache"
    monkeypatch.setitem(download.CHECKSUMS, "movielens-test", "md5:" + "0" * 32)
    with pytest.raises(CfbError, match=r"movielens-test: checksum mismatch \(md5 [0-9a-f]{32}, expected 0{32}"):
        download.download("movielens-test", cache=cache)
    assert leftovers(cache) == []
    monkeypatch.setitem(download.CHECKSUMS, "movielens-test", None)
    with pytest.raises(CfbError, match="checksum mismatch"):
        download.download("movielens-test", cache=cache, sha256="f" * 64)
    assert leftovers(cache) == []
    for bad in ("xyz", "f" * 63, "g" * 64):  # refused before anything is fetched
        with pytest.raises(CfbError, match=rf"^--sha256 '{bad}' is not a SHA-256 \(64 hexadecimal digits\)$"):
            download.download("movielens-test", cache=cache, sha256=bad)


def test_download_published_md5_beside_the_archive(tmp_path, fake_source, monkeypatch):
    download, archive = fake_source
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    sums = write(tmp_path / "ml-test.zip.md5", f"MD5 (ml-test.zip) = {md5}\n")
    monkeypatch.setitem(download.CHECKSUMS, "movielens-test", f"url:{sums.as_uri()}")
    folder = download.download("movielens-test", cache=tmp_path / "cache")
    assert json.loads((folder / download.STAMP).read_text())["verified_by"] == f"md5 = {sums.as_uri()}"


def test_interrupted_download_leaves_no_complete_looking_folder(tmp_path, fake_source, monkeypatch):
    from cfb.cf_core.errors import CfbError

    download, archive = fake_source
    cache = tmp_path / "cache"
    data = archive.read_bytes()

    class Dropped(io.BytesIO):
        headers = {"Content-Length": str(len(data))}

        def read(self, n=-1):
            chunk = super().read(min(n, 10))
            if self.tell() > len(data) // 2:
                raise urllib.error.URLError("connection reset")
            return chunk

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(download.urllib.request, "urlopen", lambda *a, **k: Dropped(data))
    with pytest.raises(CfbError, match=r"could not download movielens-test .*connection reset"):
        download.download("movielens-test", cache=cache)
    assert leftovers(cache) == []

    class Short(Dropped):  # the server closes early without an error
        def read(self, n=-1):
            return io.BytesIO.read(self, n) if self.tell() < len(data) // 2 else b""

    monkeypatch.setattr(download.urllib.request, "urlopen", lambda *a, **k: Short(data[: len(data) // 2 + 1]))
    with pytest.raises(CfbError, match=r"stopped after \d+ of \d+ bytes"):
        download.download("movielens-test", cache=cache)
    assert leftovers(cache) == []


def test_download_after_kill_clears_leftovers(tmp_path, fake_source):
    download, _ = fake_source
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "movielens-test.zip.part").write_bytes(b"junk")
    (cache / ".movielens-test.abc.tmp").mkdir()
    (cache / ".movielens-test.abc.tmp" / "ratings.csv").write_text("half")
    folder = download.download("movielens-test", cache=cache)
    assert leftovers(cache) == ["movielens-test"] and (folder / "movies.csv").exists()


def test_download_cli_names_match_sources(tmp_path, db_url, monkeypatch):
    from cfb.db import download

    assert DATASETS == list(download.SOURCES)
    assert set(download.CHECKSUMS) == set(download.SOURCES)
    closed_port = "http://127.0.0.1:9/ml-1m.zip"  # nothing listens there: like no network
    monkeypatch.setitem(download.SOURCES, "movielens-1m", (closed_port, "ml-1m", "ratings.dat"))
    fails(run(db_url, "data", "download", "movielens-1m", "--quiet"),
          r"could not download movielens-1m .*use `cfb ingest movielens PATH`")


def test_download_never_deletes_a_folder_it_did_not_complete(tmp_path, fake_source):
    from cfb.cf_core.errors import CfbError

    download, _ = fake_source
    cache = tmp_path / "cache"
    mine = cache / "movielens-test"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("important")
    with pytest.raises(CfbError, match=r"movielens-test exists and does not hold movielens-test: move it away"):
        download.download("movielens-test", cache=cache)
    assert (mine / "notes.txt").read_text() == "important"
    mine.joinpath("notes.txt").unlink()  # an empty folder is taken over
    assert download.download("movielens-test", cache=cache) == mine / "ml-test"


def test_download_does_not_vouch_for_a_copy_it_did_not_make(tmp_path, fake_source):
    """The release's files put there by hand (an unzip, maybe cut short at a line's end) were taken as a
    finished download: exit 0, nothing said."""
    from cfb.cf_core.errors import CfbError

    download, _ = fake_source
    cache = tmp_path / "cache"
    by_hand = cache / "movielens-test" / "ml-test"
    by_hand.mkdir(parents=True)
    (by_hand / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,4.0,1\n")
    with pytest.raises(CfbError, match=r"movielens-test holds movielens-test's files but no record of a download by "
                                       r"cfb \(\.cfb-download\.json\): ingest them with `cfb ingest movielens "):
        download.download("movielens-test", cache=cache)
    assert (by_hand / "ratings.csv").read_text().endswith("1,1,4.0,1\n")  # (never deleted)


def test_download_into_a_home_that_is_a_file_is_one_line(tmp_path, monkeypatch):
    a_file = tmp_path / "afile"
    a_file.write_text("")
    monkeypatch.setenv("CFB_HOME", str(a_file))
    res = CliRunner().invoke(cli, ["data", "download", "movielens-100k"])
    assert res.exit_code == 1 and res.output.startswith("Error: cannot create the data folder")
    assert len(res.output.strip().splitlines()) == 1


def test_two_downloads_at_once_leave_one_complete_copy(tmp_path, fake_source, monkeypatch, capfd):
    """A second download of the dataset (another `cfb data download`, or `cfb eval`, which downloads
    MovieLens 100k itself) started while the first unpacks waits for it and then finds its copy. (It used
    to clear the first one's temporary folder, so the first renamed a folder holding only the marker
    into place, which every later run took for a complete copy; a helper's review found it.)"""
    import contextlib
    import threading

    download, _ = fake_source
    cache = tmp_path / "cache"
    unpacking, go_on = threading.Event(), threading.Event()
    extract = zipfile.ZipFile.extractall

    def slow_for_the_first(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        if threading.current_thread().name == "first":
            unpacking.set()
            go_on.wait(10)
        return extract(self, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "extractall", slow_for_the_first)
    found, errors = {}, []

    def run(name: str) -> None:
        try:
            found[name] = download.download("movielens-test", cache=cache,
                                            progress=lambda total: contextlib.nullcontext(None))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    first = threading.Thread(target=run, args=("first",), name="first")
    first.start()
    assert unpacking.wait(10)
    second = threading.Thread(target=run, args=("second",), name="second")
    second.start()
    second.join(0.5)
    assert second.is_alive()  # waiting for the first
    go_on.set()
    first.join(10)
    second.join(10)
    assert errors == [] and found["first"] == found["second"] == cache / "movielens-test" / "ml-test"
    assert sorted(p.name for p in found["first"].iterdir()) == [".cfb-download.json", "movies.csv", "ratings.csv"]
    assert leftovers(cache) == ["movielens-test"]
    assert capfd.readouterr().err.count("waiting for another download of movielens-test to finish") == 1


def test_a_stalled_or_reset_download_is_a_network_error(tmp_path, fake_source, monkeypatch):
    """A server that stops sending (the read times out) or resets the connection mid-answer is a network
    problem, said as one: it was reported as a full disk (a review found it; urllib wraps only errors
    before the answer, so these came as bare OSErrors)."""
    import http.server
    import threading
    import time

    from cfb.cf_core.errors import CfbError

    download, _ = fake_source
    cache = tmp_path / "cache"

    class Stalls(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"x" * 50)
            self.wfile.flush()
            time.sleep(2)

        def log_message(self, *args):  # noqa: ANN002
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stalls)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/ml-test.zip"
        monkeypatch.setitem(download.SOURCES, "movielens-test", (url, "ml-test", "ratings.csv"))
        with pytest.raises(CfbError, match=r"^could not download movielens-test from .* \(timed out\); if you have"):
            download.download("movielens-test", cache=cache, timeout=0.3)
    finally:
        server.shutdown()
        server.server_close()
    assert leftovers(cache) == []

    class Reset(io.BytesIO):
        headers = {"Content-Length": "1000"}

        def read(self, n=-1):
            raise ConnectionResetError(104, "Connection reset by peer")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(download.urllib.request, "urlopen", lambda *a, **k: Reset())
    with pytest.raises(CfbError, match=r"^could not download movielens-test .*Connection reset by peer"):
        download.download("movielens-test", cache=cache)
    assert leftovers(cache) == []


def test_download_problems_are_one_line_errors_that_leave_nothing(tmp_path, fake_source, monkeypatch):
    """A damaged archive (goodbooks has no checksum to catch it), a full disk while unpacking or while
    writing the download, a connection cut in a chunked transfer, a redirect loop, and a file where the
    folder goes (refused before fetching): each a one-line error, nothing left behind. (They escaped as
    tracebacks; a helper's review found them.)"""
    import errno
    import http.client

    from cfb.cf_core.errors import CfbError

    download, archive = fake_source
    cache = tmp_path / "cache"
    monkeypatch.setitem(download.CHECKSUMS, "movielens-test", None)
    damaged = tmp_path / "damaged.zip"
    with zipfile.ZipFile(damaged, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("ml-test/ratings.csv", "userId,movieId,rating,timestamp\n" + "1,1,4.0,1\n" * 500)
    raw = bytearray(damaged.read_bytes())
    start = raw.index(b"ratings.csv") + len("ratings.csv") + 10
    raw[start:start + 20] = bytes(b ^ 0xA5 for b in raw[start:start + 20])
    damaged.write_bytes(bytes(raw))
    assert_archive_refused(fake_source, monkeypatch, damaged, r"damaged\.zip is not a valid zip archive \(", cache)

    def full(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(zipfile.ZipFile, "extractall", full)
        with pytest.raises(CfbError, match=r"^cannot unpack movielens-test into .*\(No space left on device\): free some space"):
            download.download("movielens-test", cache=cache)
    assert leftovers(cache) == []

    class Written(io.BytesIO):
        headers: dict = {}

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    for failure, said in ((http.client.IncompleteRead(b"half"), r"could not download movielens-test .*IncompleteRead"),
                          (urllib.error.HTTPError("u", 302, "The HTTP server returned a redirect error that would "
                                                  "lead to an infinite loop.\nThe last 30x error message was:\n"
                                                  "Found", {}, None), r"infinite loop\. The last 30x")):
        def cut(self, n=-1, failure=failure):  # noqa: ANN001, ANN202
            raise failure

        monkeypatch.setattr(Written, "read", cut)
        monkeypatch.setattr(download.urllib.request, "urlopen", lambda *a, **k: Written())
        with pytest.raises(CfbError, match=said) as e:
            download.download("movielens-test", cache=cache)
        assert "\n" not in str(e.value) and leftovers(cache) == []
    monkeypatch.setattr(Written, "read", io.BytesIO.read)
    monkeypatch.setattr(download.urllib.request, "urlopen", lambda *a, **k: Written(b"some bytes"))
    real_open = open

    def no_space(path, mode="r", *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        f = real_open(path, mode, *args, **kwargs)
        if str(path).endswith(".part"):
            def write(chunk):  # noqa: ANN001, ANN202
                raise OSError(errno.ENOSPC, "No space left on device")
            f.write = write
        return f

    with monkeypatch.context() as m:
        m.setattr(download, "open", no_space, raising=False)
        with pytest.raises(CfbError, match=r"^cannot write the download of movielens-test into .*cache \(No space"):
            download.download("movielens-test", cache=cache)
    assert leftovers(cache) == []
    (cache / "movielens-test").write_text("mine")
    monkeypatch.setattr(download.urllib.request, "urlopen", lambda *a, **k: pytest.fail("fetched"))
    with pytest.raises(CfbError, match=r"movielens-test exists and is not a folder: move it away"):
        download.download("movielens-test", cache=cache)
    assert (cache / "movielens-test").read_text() == "mine"


def test_download_reviewed_edges(tmp_path, fake_source, monkeypatch):
    """A download review's five findings: a published checksum that cannot be fetched costs no download
    (the archive came whole, then was thrown away); an encrypted member is one line (a traceback); a
    file where the archive needs a folder is a malformed archive and a read-only folder wants another
    CFB_HOME (both said "free some space"); a link to an empty folder is named (a bare "Not a
    directory"); `--quiet` says nothing while it waits for another download."""
    import errno

    from cfb.cf_core.errors import CfbError
    from cfb.cli.main import download_bar

    download, archive = fake_source
    cache = tmp_path / "cache"
    fetched = []
    real_urlopen = download.urllib.request.urlopen
    monkeypatch.setattr(download.urllib.request, "urlopen", lambda url, **k: fetched.append(url) or real_urlopen(url, **k))
    monkeypatch.setitem(download.CHECKSUMS, "movielens-test", f"url:{(tmp_path / 'no.md5').as_uri()}")
    with pytest.raises(CfbError, match=r"could not fetch the checksum .*; pass the archive's SHA-256 \(--sha256\)"):
        download.download("movielens-test", cache=cache)
    assert fetched == [(tmp_path / "no.md5").as_uri()] and leftovers(cache) == []  # (the archive never asked for)
    monkeypatch.setitem(download.CHECKSUMS, "movielens-test", None)

    locked = tmp_path / "locked.zip"
    raw = bytearray(archive.read_bytes())  # the "encrypted" flag set on every member, local and central
    for sig, at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        for m in re.finditer(re.escape(sig), bytes(raw)):
            raw[m.start() + at] |= 1
    locked.write_bytes(bytes(raw))
    assert_archive_refused(fake_source, monkeypatch, locked, r"locked\.zip is not a valid zip archive \(.*encrypted", cache)

    for code, said in ((errno.ENOTDIR, r"the archive.s entries cannot be laid out as files \(a malformed archive\)"),
                       (errno.EROFS, "set CFB_HOME to a folder you can write"), (errno.ENOSPC, "free some space")):
        def fails(*args, code=code, **kwargs):  # noqa: ANN002, ANN003, ANN202
            raise OSError(code, os.strerror(code))

        with monkeypatch.context() as m:
            m.setattr(zipfile.ZipFile, "extractall", fails)
            with pytest.raises(CfbError, match=rf"^cannot unpack movielens-test into .*: {said}"):
                download.download("movielens-test", cache=cache)
        assert leftovers(cache) == []

    elsewhere = tmp_path / "other-disk"
    elsewhere.mkdir()
    (cache / "movielens-test").symlink_to(elsewhere)
    with pytest.raises(CfbError, match=r"movielens-test is a link to an empty folder .*other-disk.*: remove the link"):
        download.download("movielens-test", cache=cache)
    assert download_bar("movielens-test", quiet=True) is None and callable(download_bar("movielens-test", quiet=False))


def test_download_in_a_folder_it_cannot_write(tmp_path, fake_source, monkeypatch):
    """A copy already there is used without writing (a read-only data folder served it before the
    download lock, then crashed with a traceback); with none there, and where the lock file, the
    unpacking folder or the download record cannot be written, one line and nothing left; a filesystem
    without locks downloads without one (a helper's review)."""
    import errno
    import fcntl
    from pathlib import Path as RealPath

    from cfb.cf_core.errors import CfbError

    download, _ = fake_source
    cache = tmp_path / "cache"
    folder = download.download("movielens-test", cache=cache)
    real_open, real_mkdir, real_write = download.os.open, RealPath.mkdir, RealPath.write_text

    def read_only(path, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if str(path).endswith(".lock"):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(path, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(download.os, "open", read_only)
        assert download.download("movielens-test", cache=cache) == folder
        with pytest.raises(CfbError, match=r"^cannot download movielens-test into .*other \(Read-only file system\)"):
            download.download("movielens-test", cache=tmp_path / "other")
    def no_space_for(real, hits):  # noqa: ANN001, ANN202
        def method(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            if hits(self):
                raise OSError(errno.ENOSPC, "No space left")
            return real(self, *args, **kwargs)
        return method

    for name, patch in (("mkdir", no_space_for(real_mkdir, lambda p: p.name.endswith(".tmp"))),
                        ("write_text", no_space_for(real_write, lambda p: p.name == download.STAMP))):
        with monkeypatch.context() as m:
            m.setattr(RealPath, name, patch)
            with pytest.raises(CfbError, match=r"^cannot unpack movielens-test into .*third \(No space left\): free"):
                download.download("movielens-test", cache=tmp_path / "third")
        assert leftovers(tmp_path / "third") == [], name

    def no_locks(fd, op):  # noqa: ANN001, ANN202
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    assert download.download("movielens-test", cache=tmp_path / "nfs").name == "ml-test"


def test_download_sha256_checks_what_it_says(tmp_path, fake_source, monkeypatch):
    """--sha256 verifies the archive where the published MD5 cannot be fetched (as the error advises),
    and a copy already there whose recorded SHA-256 differs is refused, not returned (it was ignored);
    the copy's folder is readable as the umask allows (mkdtemp made it 0700)."""
    import os

    from cfb.cf_core.errors import CfbError

    download, archive = fake_source
    monkeypatch.setitem(download.CHECKSUMS, "movielens-test", "url:" + (tmp_path / "missing.md5").as_uri())
    with pytest.raises(CfbError, match=r"could not fetch the checksum .*pass the archive's SHA-256 \(--sha256\)"):
        download.download("movielens-test", cache=tmp_path / "c")
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    (tmp_path / "login.md5").write_text("<html>proxy login</html>")
    monkeypatch.setitem(download.CHECKSUMS, "movielens-test", "url:" + (tmp_path / "login.md5").as_uri())
    with pytest.raises(CfbError, match=r"no MD5 in the checksum file .*pass the archive's SHA-256 \(--sha256\)"):
        download.download("movielens-test", cache=tmp_path / "c")
    folder = download.download("movielens-test", cache=tmp_path / "c", sha256=sha)
    assert json.loads((folder / download.STAMP).read_text())["verified_by"] == "sha256 = the given SHA-256"
    assert download.download("movielens-test", cache=tmp_path / "c", sha256=sha.upper()) == folder
    with pytest.raises(CfbError, match=rf"holds a copy of movielens-test, but its recorded SHA-256 is {sha}, not "
                                       rf"the given {'f' * 64}: move it away"):
        download.download("movielens-test", cache=tmp_path / "c", sha256="f" * 64)
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "c" / "movielens-test").stat().st_mode & 0o777 == 0o777 & ~umask


def test_the_layouts_step_holds_for_every_later_rating(tmp_path, db_url):
    """A layout's step between ratings (MovieLens 100k: whole stars) is the database's: `cfb rate`, a
    later CSV ingest and a sign-up refuse 4.5 or 3.3 as its reader does; half-star releases take 4.5."""
    ok(run(db_url, "ingest", "movielens", str(ml100k(tmp_path / "ml-100k")), "--json"))
    fails(run(db_url, "rate", "196", "302", "4.5"), r"^Error: rating 4\.5 not on the scale 1\.\.5 in steps of 1$")
    fails(run(db_url, "ingest", "ratings", str(write(tmp_path / "r.csv", "user,item,rating\n196,302,4\n22,242,3.3\n"))),
          r"r\.csv, line 3, field 'rating': rating 3\.3 not on the scale 1\.\.5 in steps of 1$")
    assert ok(run(db_url, "rate", "196", "302", "4", "--json"))["rating"] == 4.0
    assert dump(db_url)["ratings"][("196", "302")][0] == 4.0 and ("22", "242") not in dump(db_url)["ratings"]
    # a hair off a step (as typed decimals are, or as a float32 reads them: the CSV readers) is the step,
    # stored as such; a little more is named as given
    for hair in ("3.9999999999", "3.9999999"):
        assert ok(run(db_url, "rate", "196", "302", hair, "--json"))["rating"] == 4.0
    assert dump(db_url)["ratings"][("196", "302")][0] == 4.0
    fails(run(db_url, "rate", "196", "302", "3.9999"),
          r"^Error: rating 3\.9999 not on the scale 1\.\.5 in steps of 1$")
    from cfb.db.engine import make_engine
    from cfb.db.store import rating_step

    half = f"sqlite:///{tmp_path / 'half.db'}"
    ok(run(half, "ingest", "movielens", str(ml10m(tmp_path / "ml-10M100K")), "--json"))
    assert ok(run(half, "rate", "1", "122", "4.5", "--json"))["rating"] == 4.5
    fails(run(half, "rate", "1", "122", "4.25"), r"rating 4\.25 not on the scale 0\.5\.\.5 in steps of 0\.5$")
    with make_engine(half).connect() as conn:
        assert rating_step(conn) == 0.5


def test_a_release_of_another_catalogue_is_refused(tmp_path, db_url):
    """Goodbooks' book 1 is not MovieLens 100k's movie 1: ingested into one database, the books once
    took over the movies' titles under their ratings. Releases of one catalogue (1M, its users left
    out, and 1M again) go on."""
    assert run(db_url, "ingest", "movielens", str(ml100k(tmp_path / "ml-100k"))).exit_code == 0
    before = dump(db_url)
    for other in (goodbooks(tmp_path / "gb"), ml1m(tmp_path / "ml-1m")):
        fails(run(db_url, "ingest", "goodbooks" if other.name == "gb" else "movielens", str(other)),
              r"^Error: this database holds MovieLens 100k's items, and (goodbooks-10k|MovieLens \(movieId\))'s ids name "
              r"other items .*: ingest it into another database \(--db\)$")
        assert dump(db_url) == before
    other_db = db_url.replace("cfb.db", "other.db")
    assert run(other_db, "ingest", "movielens", str(tmp_path / "ml-1m")).exit_code == 0
    (tmp_path / "ml-1m" / "users.dat").unlink()
    assert run(other_db, "ingest", "movielens", str(tmp_path / "ml-1m")).exit_code == 0


@pytest.mark.parametrize("release", RELEASES)
def test_a_folder_where_a_release_has_a_file_is_named_in_one_line(tmp_path, db_url, release):
    """Each of a release's files made a directory (u.user, ratings.dat, ... once gave IsADirectoryError and a
    traceback): one line naming it, nothing written; from Python, a ``cfb.InputError``."""
    import cfb

    make, kind = RELEASES[release]
    names = sorted(p.name for p in make(tmp_path / "names").iterdir() if p.name != "links.csv")  # (not read)
    for name in names:
        folder = make(tmp_path / f"{release}-{name}")
        (folder / name).unlink()
        (folder / name).mkdir()
        fails(run(db_url, "ingest", kind, str(folder)), rf"{re.escape(name)}: is a directory, expected a file$")
        with cfb.open(str(tmp_path / "api.db")) as db, pytest.raises(cfb.InputError, match="is a directory"):
            getattr(db, f"ingest_{kind}")(folder)
    assert_nothing_written(db_url)


@pytest.mark.parametrize("release, file, line, message", [
    ("100k", "u.data", "abc\t242\t3\t881250949\n", r"u\.data, line 4, field 'user': user 'abc' is not in u\.user$"),
    ("1m", "ratings.dat", "99::1193::3::978300000\n",
     r"ratings\.dat, line 5, field 'UserID': user '99' is not in users\.dat$"),
])
def test_a_rating_by_a_user_the_release_does_not_list_is_refused(tmp_path, db_url, release, file, line, message):
    """100k and 1M list every user who rated (with demographics, their READMEs say): a rating by another id is
    damage, refused as a rating of an unlisted item is (it was stored as a user without attributes)."""
    make, kind = RELEASES[release]
    folder = make(tmp_path / release)
    write(folder / file, (folder / file).read_text() + line)
    fails(run(db_url, "ingest", kind, str(folder)), message)
    assert_nothing_written(db_url)


def test_a_100k_item_line_with_more_fields_than_the_release_is_refused(tmp_path, db_url):
    folder = ml100k(tmp_path / "ml-100k")
    with open(folder / "u.item", "a", encoding="latin-1") as f:
        f.write("1683|X (1995)|01-Jan-1995||http://x|" + "|".join(["0"] * 20) + "\n")
    fails(run(db_url, "ingest", "movielens", str(folder)), r"u\.item, line 4: expected 24 '\|'-separated fields, found 25$")
    assert_nothing_written(db_url)


def test_half_stars_beside_a_users_file_say_the_folder_was_read_as_1m(tmp_path, db_url):
    folder = ml10m(tmp_path / "ml-10m")
    write(folder / "users.dat", "1::F::1::10::48067\n")
    fails(run(db_url, "ingest", "movielens", str(folder)), r"ratings\.dat, line \d+, field 'Rating': rating [\d.]+ "
          r"(outside|not on) the scale 1\.\.5.* \(read as MovieLens 1M, whose ratings are whole stars, since the "
          r"folder has users\.dat\)$")
    assert_nothing_written(db_url)


def test_a_download_that_no_checksum_verifies_says_so(tmp_path, fake_source, monkeypatch):
    """goodbooks-10k publishes no checksum: its archive is verified only with --sha256, and the download
    says so (on stderr; ``verified_by`` in --json), where it said nothing."""
    download, archive = fake_source
    monkeypatch.setenv("CFB_HOME", str(tmp_path / "home"))
    monkeypatch.setitem(download.SOURCES, "goodbooks-10k", (archive.as_uri(), "ml-test", "ratings.csv"))
    monkeypatch.setitem(download.CHECKSUMS, "goodbooks-10k", None)
    res = CliRunner().invoke(cli, ["data", "download", "goodbooks-10k", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["verified_by"].startswith("none")
    assert res.stderr.splitlines()[-1] == "note: goodbooks-10k publishes no checksum, so its archive was not " \
                                          "verified (--sha256 pins one)"
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    monkeypatch.setenv("CFB_HOME", str(tmp_path / "home2"))
    res = CliRunner().invoke(cli, ["data", "download", "goodbooks-10k", "--json", "--sha256", sha])
    assert res.exit_code == 0 and "note:" not in res.stderr
    assert json.loads(res.stdout)["verified_by"] == "sha256 = the given SHA-256"
    monkeypatch.setenv("CFB_HOME", str(tmp_path / "home"))  # (the copy cached unverified: now checked against it)
    res = CliRunner().invoke(cli, ["data", "download", "goodbooks-10k", "--json", "--sha256", sha])
    assert res.exit_code == 0 and "note:" not in res.stderr, res.stderr
    assert json.loads(res.stdout)["verified_by"] == "sha256 = the given SHA-256"


def test_a_release_the_database_refuses_is_refused_before_waiting_for_another_writer(tmp_path, monkeypatch):
    """Another writer holds the database (a long ingest): a release of another catalogue, or of other users
    under the same ids, or an attribute of a type the stored users or items do not hold, is refused at
    once for that reason (it waited out the busy timeout and was told "busy"), as an off-scale rating is."""
    import sqlite3

    from cfb.db import engine as engine_module

    url = f"sqlite:///{tmp_path / 'held.db'}"
    ok(run(url, "ingest", "movielens", str(ml100k(tmp_path / "ml-100k")), "--json"))
    ok(run(url, "ingest", "ratings", str(write(tmp_path / "r.csv", "user,item,rating\n1,1,4\n")), "--json"))
    monkeypatch.setattr(engine_module, "BUSY_TIMEOUT_MS", 300)
    writer = sqlite3.connect(tmp_path / "held.db", timeout=0)
    writer.execute("BEGIN IMMEDIATE")
    try:
        fails(run(url, "ingest", "movielens", str(ml1m(tmp_path / "ml-1m"))), r"holds MovieLens 100k's items")
        fails(run(url, "ingest", "ratings", str(write(tmp_path / "bad.csv", "user,item,rating\n1,1,9\n"))),
              r"outside the scale")
        fails(run(url, "ingest", "users", str(write(tmp_path / "u.csv", "user,age\n1,abc\n"))),
              r"u\.csv, line 2, field 'age': 'abc' is .*the stored users hold age as numbers")
        fails(run(url, "ingest", "items", str(write(tmp_path / "i.csv", "item,year\n242,c.1991\n"))),
              r"i\.csv, line 2, field 'year': 'c\.1991' is .*the stored items hold year as numbers")
    finally:
        writer.rollback()
        writer.close()


def test_a_release_of_another_catalogue_on_another_scale_is_refused_for_its_catalogue(tmp_path, db_url):
    """MovieLens 10M into a MovieLens 100k database: both its catalogue and its scale are other; the
    catalogue is named (its item 1 is another item), as before the checks ran ahead of the writer's lock."""
    ok(run(db_url, "ingest", "movielens", str(ml100k(tmp_path / "ml-100k")), "--json"))
    fails(run(db_url, "ingest", "movielens", str(ml10m(tmp_path / "ml-10M100K"))), r"holds MovieLens 100k's items")


@pytest.mark.parametrize("title, year", [
    ("Toy Story (1995)", 1995), ("(500) Days of Summer (2009)", 2009), ("Black Mirror", None),
    ("Heidi Fleiss: Hollywood Madam (1995) ", 1995), ("Fawlty Towers (1975-1979)", 1975),
    # MovieLens 100k's video release: the year before the "(V)" (it had none)
    ("Land Before Time III: The Time of the Great Giving (1995) (V)", 1995), ("Something (1999) (TV)", 1999),
    ("Brazil (V)", None), ("Year (1995) and more", None),
])
def test_a_titles_year(title, year):
    from cfb.db.layouts import title_year

    assert title_year(title) == year
