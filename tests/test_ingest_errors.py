"""Malformed input: one clear line naming file, line and field; nothing written."""
from __future__ import annotations

import pandas as pd
import pytest
from sqlalchemy import func, select

from cfb.cf_core.errors import CfbError, InputError
from cfb.db.engine import make_engine, writing
from cfb.db.schema import Rating, User
from cfb.db.sources import Dataset, read_items_csv, read_movielens, read_ratings_csv, read_users_csv
from cfb.service.ingest import ingest_dataset, upsert_items

from .conftest import write


@pytest.mark.parametrize("body, message", [
    ("user,item\n1,2\n", r"ratings.csv, line 1, field 'rating': missing column\(s\) rating"),
    ("user,item,rating\n1,2,4\n1,3,four\n", r"ratings.csv, line 3, field 'rating': not a number: 'four'"),
    ("user,item,rating\n1,2,4\n,3,5\n", r"ratings.csv, line 3, field 'user': empty id"),
    ("user,item,rating,timestamp\n1,2,4,12.5\n", r"line 2, field 'timestamp': not a whole number"),
    ("user,item,rating,timestamp\n1,2,4,9\n1,3,4,1e20\n", r"line 3, field 'timestamp': not a whole number under 2\*\*53: '1e20'"),
    ("user,item,rating,timestamp\n1,2,4,-3\n", r"line 2, field 'timestamp': negative time '-3'"),
    # one field too many: pandas alone would take the first column as an index and shift the rest
    ("user,item,rating\nnewbie,50,1,2\n", r"ratings.csv, line 2: expected 3 fields, found 4"),
    ("user,item,rating\nu1,i1,4\nnewbie,50\n", r"ratings.csv, line 3: expected 3 fields, found 2"),
    # one field short where the last column may be empty: not a rating without a time
    ("user,item,rating,timestamp\na,b,3,5\nc,d,4\ne,f,2,7\n", r"ratings.csv, line 3: expected 4 fields, found 3$"),
    ("user,item,rating,note\na,b,3,x\nc,d,4\n", r"ratings.csv, line 3: expected 4 fields, found 3$"),
    ("\nuser,item,rating,timestamp\na,b,3,5\nc,d,4\n", r"ratings.csv, line 4: expected 4 fields, found 3$"),
    ("", r"ratings.csv, line 1: empty file"),
    ("user,user,rating\n1,2,4\n", r"ratings.csv, line 1, field 'user': duplicate column$"),
    ("\nuser,item,rating,rating\n1,2,4,5\n", r"ratings.csv, line 2, field 'rating': duplicate column$"),  # (the header's line)
    ("user,item,rating,,\n1,2,4,,\n", r"ratings.csv, line 1: columns 4 and 5 have no name$"),
    # rows that do not follow the lines one to one: a blank line (skipped), a quoted line break
    ("user,item,rating\n1,a,3\n\n \n2,a,4\n3,a,x\n", r"ratings.csv, line 6, field 'rating': not a number: 'x'$"),
    ("\nuser,item,rating\n1,a,3\n3,,4\n", r"ratings.csv, line 4, field 'item': empty id$"),
    (" \nuser,item,rating\n1,a,3\n2,a,x\n", r"ratings.csv, line 4, field 'rating': not a number: 'x'$"),
    ("user,item,rating\r1,a,3\r\r2,a,x\r", r"ratings.csv, line 4, field 'rating': not a number: 'x'$"),
    ("user,item,rating,note\n1,a,3,\"two\nlines\"\n2,a,x,y\n", r"ratings.csv, line 4, field 'rating': not a number"),
    ("user,item,rating,timestamp\r\n1,a,3,5\r\n\r\n2,a,4,-3\r\n", r"line 4, field 'timestamp': negative time '-3' \("),
    ("user,item,rating\n1,50,1e39\n", r"ratings.csv, line 2, field 'rating': not a number under 3.4e38 \(a 32-bit float\): '1e39'$"),
    # a quote inside a field: pandas alone would store user "abcd"
    ("user,item,rating\nu1,i1,4\n\"ab\"cd,50,4\n", r"ratings.csv, line 3: malformed CSV .*',' expected after '\"'"),
])
def test_bad_ratings_csv(tmp_path, body, message):
    with pytest.raises(InputError, match=message):
        read_ratings_csv(write(tmp_path / "ratings.csv", body))


@pytest.mark.parametrize("reader, body, message", [
    (read_users_csv, "user,age\na,25\nb,nan\nc,40\n", r"u.csv, line 3, field 'age': 'nan' is not a finite number"),
    (read_items_csv, "item,title,year\na,A,1999\nb,B,inf\n", r"u.csv, line 3, field 'year': 'inf' is not a finite number"),
    # a number too large for arithmetic (it once broke every retrain after the ingest), cut short in the message
    (read_users_csv, "user,age\na,25\nb,1" + "0" * 400 + "\n", r"u.csv, line 3, field 'age': '10000000000000000000\.\.\.' "
                                                            r"is larger than a 32-bit float holds \(3.4e38\), and the"),
    (read_items_csv, "item,title,year\na,A,1999\nb,B,1.7e308\n", r"line 3, field 'year': '1.7e308' is larger than a 32-bit float"),
    (read_items_csv, "item,title\n50,\"Star \"Wars\" (1977)\"\n", r"u.csv, line 2: malformed CSV in the record that "
                                                                r"starts here \(',' expected after '\"'\)"),
    (read_users_csv, "user,age\n\"x\"y,3\n", r"u.csv, line 2: malformed CSV"),
    # a record is named by the line it starts on (it used to be the line the reader stopped at: the last)
    (read_users_csv, "user,age,gender\nx1,30,M\n\"x2,31,F\nx3,32,M\n", r"u.csv, line 3: malformed CSV in the record that "
                                                                  r"starts here \(unexpected end of data\)$"),
    (read_items_csv, "item,title,year\na,\"Two\nlines\",1999,extra\nb,B,2000\n", r"u.csv, line 2: expected 3 fields, found 4$"),
])
def test_bad_users_and_items_csv(tmp_path, reader, body, message):
    """One infinite or undefined value would turn a column of numbers into text (an age of "25"), and a
    quote inside a field would be read into the value: both are refused, naming line and field."""
    with pytest.raises(InputError, match=message):
        reader(write(tmp_path / "u.csv", body))
    words = reader(write(tmp_path / "u.csv", "user,item,name,band\na,a,Nan,Blur\nb,b,Bob,311\nc,c,1984,Oasis\n"))
    assert [a["band"] for a in words["attributes"]] == ["Blur", "311", "Oasis"]  # a number among words: text
    assert [a["name"] for a in words["attributes"]] == ["Nan", "Bob", "1984"]


def test_a_quote_anywhere_does_not_make_a_ratings_file_stricter(tmp_path):
    """The quote check finds quotes only: a file pandas reads (a blank line at the end, an empty last
    field) reads the same with a quoted field in it; a short row is refused with or without one."""
    body = 'user,item,rating,note\nu1,i1,4,"a, b"\nu2,i1,3,\n \n'
    assert len(read_ratings_csv(write(tmp_path / "r.csv", body))) == 2
    for note in ('"a, b"', "ab"):
        with pytest.raises(InputError, match=r"r.csv, line 3: expected 4 fields, found 3$"):
            read_ratings_csv(write(tmp_path / "r.csv", f"user,item,rating,note\nu1,i1,4,{note}\nu2,i1,3\n"))


@pytest.mark.parametrize("columns, message", [
    ({"user_col": "user", "item_col": "user"}, r"r.csv: column 'user' is given as both the user and the item column"),
    ({"rating_col": "item"}, r"r.csv: column 'item' is given as both the item and the rating column"),
    ({"time_col": "ts"}, r"r.csv, line 1, field 'ts': missing column\(s\) ts; header has user, item, rating"),
    ({"user_col": "timestamp"}, r"r.csv, line 1, field 'timestamp': missing column\(s\) timestamp"),
])
def test_column_options_must_name_distinct_columns_that_are_there(tmp_path, columns, message):
    path = write(tmp_path / "r.csv", "user,item,rating\nu1,i1,5\nu2,i1,3\n")
    with pytest.raises(InputError, match=message):
        read_ratings_csv(path, **columns)
    assert read_ratings_csv(path)["timestamp"].isna().all()  # the default: a timestamp column if there is one


def test_bad_encoding_names_the_line(tmp_path):
    path = tmp_path / "ratings.csv"
    path.write_bytes(b"user,item,rating\n1,2,4\n1,caf\xe9,5\n")
    with pytest.raises(InputError, match=r"ratings.csv, line 3, field 'item': not valid utf-8"):
        read_ratings_csv(path)


@pytest.mark.parametrize("reader, body, field", [
    (read_items_csv, b"item,title,genres\na1,Caf\xe9 Society,Drama\n", "title"),
    (read_items_csv, b"\nitem,title,genres\na1,\"Caf\xe9, Society\",Drama\n", "title"),  # (a comma quoted before it)
    (read_items_csv, b"item,title,genres\na1,Cafe,Dr\xe9ma\n", "genres"),
    (read_users_csv, b"user,city\nn1,caf\xe9\n", "city"),
])
def test_a_bad_byte_in_a_csv_names_its_column(tmp_path, reader, body, field):
    path = tmp_path / "u.csv"
    path.write_bytes(body)
    with pytest.raises(InputError, match=rf"u.csv, line \d, field '{field}': not valid utf-8 text \(byte 0xe9\)$"):
        reader(path)
    path.write_bytes(b'item,title,genres\na1,"First line\nsecond caf\xe9",Drama\n')  # inside a quoted field over lines
    with pytest.raises(InputError, match=r"u.csv, line 3: not valid utf-8"):  # (its column unknown: not guessed)
        reader(path)
    path.write_bytes(b"item,ti\xe9tle\na1,A\n")  # in the header: the line alone
    with pytest.raises(InputError, match=r"u.csv, line 1: not valid utf-8"):
        reader(path)


def test_out_of_scale_rating_writes_nothing(engine, tmp_path, planted):
    ingest_dataset(engine, planted)
    with engine.connect() as conn:
        before = conn.scalar(select(func.count()).select_from(Rating))
    bad = read_ratings_csv(write(tmp_path / "r.csv", "user,item,rating\nnew-user,a1,4\nnew-user,a2,7\n"))
    with pytest.raises(InputError, match=r"r.csv, line 3, field 'rating': rating 7 outside the scale 1..5"):
        ingest_dataset(engine, Dataset(bad), source=str(tmp_path / "r.csv"))
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(Rating)) == before
        assert conn.scalar(select(User.id).where(User.external_id == "new-user")) is None


def test_custom_column_names_and_users_file(engine, tmp_path):
    r = read_ratings_csv(write(tmp_path / "r.csv", "who,what,stars,when\nu1,i1,4.5,100\nu2,i1,2,101\n"),
                         "who", "what", "stars", "when")
    assert r["rating"].tolist() == [4.5, 2.0] and r["timestamp"].tolist() == [100, 101]
    users = read_users_csv(write(tmp_path / "u.csv", "user,age,city\nu1,30,Paris\nu2,,Rome\n"))
    assert users["attributes"].tolist() == [{"age": 30, "city": "Paris"}, {"city": "Rome"}]
    out = ingest_dataset(engine, Dataset(r, users=users), scale=(0.5, 5))
    # users and items given or rated, and how many of them are new (i1 comes from the ratings alone)
    assert out == {"ratings": 2, "new_ratings": 2, "users": 2, "items": 1, "new_users": 2, "new_items": 1, "scale": [0.5, 5.0]}


def test_movielens_layout_errors(tmp_path):
    folder = tmp_path / "ml"
    folder.mkdir()
    write(folder / "u.data", "1\t2\t5\t881250949\n1\t3\t5\n")
    with pytest.raises(InputError, match=r"u.data, line 2: expected 4 tab-separated fields, found 3"):
        read_movielens(folder)
    write(folder / "u.data", "1\t2\t5\t881250949\n1\t3\t9\t881250950\n")
    with pytest.raises(InputError, match=r"u.data, line 2, field 'rating': rating 9 outside the scale"):
        read_movielens(folder)
    with pytest.raises(InputError, match="nowhere: folder not found"):
        read_movielens(tmp_path / "nowhere")


def test_goodbooks_layout(engine, tmp_path):
    from cfb.db.sources import read_goodbooks

    folder = tmp_path / "gb"
    folder.mkdir()
    write(folder / "ratings.csv", "user_id,book_id,rating\n1,10,5\n2,10,3\n2,11,4\n")
    write(folder / "books.csv", "book_id,title,authors\n10,The Hunger Games,Suzanne Collins\n11,Twilight,Stephenie Meyer\n")
    out = ingest_dataset(engine, read_goodbooks(folder))
    assert out == {"ratings": 3, "new_ratings": 3, "users": 2, "items": 2, "new_users": 2, "new_items": 2, "scale": [1.0, 5.0]}
    write(folder / "ratings.csv", "user_id,book_id,rating\n1,10,6\n")
    with pytest.raises(InputError, match=r"ratings.csv, line 2, field 'rating': rating 6 outside the scale"):
        read_goodbooks(folder)


def test_download_offline_points_at_ingest(tmp_path, monkeypatch):
    from cfb.cf_core.errors import CfbError
    from cfb.db import download

    closed_port = "http://127.0.0.1:9/ml-100k.zip"  # nothing listens there: behaves like no network
    monkeypatch.setitem(download.SOURCES, "movielens-100k", (closed_port, "ml-100k", "u.data"))
    with pytest.raises(CfbError, match=r"could not download movielens-100k .*use `cfb ingest movielens PATH`"):
        download.download("movielens-100k", cache=tmp_path)
    assert not list(tmp_path.rglob("*.part"))  # nothing half-written


def titles_read_in_item_order_after_an_update(engine, tmp_path) -> None:  # noqa: ANN001
    """Two items titled "Dup" and items titled "Dup film N"; one item updated (PostgreSQL then returns
    its row last). A title given as an id names both items, and a hint lists titles in item order, the
    same on every backend (the last row read won, and hints followed the table's order)."""
    from cfb.db import store
    from cfb.service.ingest import write_items
    from cfb.service.serving import find_item

    items = pd.DataFrame({"item": ["Item", "item"] + [f"x{k}" for k in range(8)],
                          "title": ["Dup", "Dup"] + [f"Dup film {k}" for k in range(8)], "attributes": [{}] * 10})
    ingest_dataset(engine, Dataset(pd.DataFrame(columns=["user", "item", "rating", "timestamp"]), items,
                                   scale=(1.0, 5.0)))
    with writing(engine) as conn:
        write_items(conn, pd.DataFrame({"item": ["Item", "x0"], "title": ["Dup", "Dup film 0 (restored)"],
                                        "attributes": [{"year": 1}, {}]}))
    path = write(tmp_path / "dup.csv", "user,item,rating\nfan,Dup,4\n")
    with pytest.raises(InputError, match=r"'Dup' is the title of items 'Item', 'item', not an item id"):
        ingest_dataset(engine, Dataset(read_ratings_csv(path)), source=str(path))
    with engine.connect() as conn:
        assert store.item_title_list(conn) == ["Dup", "Dup", "Dup film 0 (restored)"] + [f"Dup film {k}" for k in range(1, 8)]
        with pytest.raises(CfbError, match=r"did you mean: Dup film 0 \(restored\); Dup film 1; Dup film 2; "
                                           r"Dup film 3; Dup film 4\?$"):
            find_item(conn, "ilm")  # (no title close enough: the first five holding it, in item order)


def test_titles_are_read_in_item_order_after_an_update(engine, tmp_path):
    titles_read_in_item_order_after_an_update(engine, tmp_path)


def test_a_title_given_as_an_item_id_is_refused(engine, tmp_path, planted):
    """Ratings name items by id: a new id that is a stored item's title would make a second, untitled
    item that hides the real one wherever the title is looked up."""
    ingest_dataset(engine, planted)
    path = write(tmp_path / "r.csv", "user,item,rating\nfan,a1,4\nfan,Beta film 22,5\n")
    with pytest.raises(InputError, match=r"r.csv, line 3, field 'item': 'Beta film 22' is the title of item 'b22', "
                                         r"not an item id"):
        ingest_dataset(engine, Dataset(read_ratings_csv(path)), source=str(path))
    with engine.connect() as conn:
        assert conn.scalar(select(User.id).where(User.external_id == "fan")) is None
    out = ingest_dataset(engine, Dataset(read_ratings_csv(write(tmp_path / "ok.csv", "user,item,rating\nfan,new1,5\n"))))
    assert (out["new_users"], out["new_items"]) == (1, 1)
    # an id of digits alone is an id, even when a book is titled so
    upsert_items(engine, read_items_csv(write(tmp_path / "books.csv", "item,title\nbook7,1984\n")))
    out = ingest_dataset(engine, Dataset(read_ratings_csv(write(tmp_path / "n.csv", "user,item,rating\nfan,1984,5\n"))))
    assert out["new_items"] == 1


def test_trailing_blank_lines_are_found_from_the_tail(tmp_path):
    """Blank lines at a file's end are left out (the last line keeps its break), others kept; a long
    blank tail spans several of the blocks read from the end."""
    from cfb.db.textfile import TAIL_BLOCK, lines_before_trailing_blanks, without_trailing_blank_lines

    assert without_trailing_blank_lines("a\nb  \n \n\t\r\n") == "a\nb  \n"
    assert without_trailing_blank_lines("a\n\nb\n") == "a\n\nb\n"
    for text, lines in [("a\nb\n", None), ("a\nb", None), ("a\nb\n\n", 2), ("h\r\na\r\n\r\n  ", 2), ("\n\n", None),
                        ("x\n" * 5000 + "\n" * (3 * TAIL_BLOCK), 5000), ("\n\na\n \n", 3),
                        ("a\rb\r\r", 2), ("h\r\na\rb\n\n", 3),  # (a lone CR ends a line, as pandas reads it)
                        ("x" * (64 * TAIL_BLOCK - 1) + "\r\ny\n\n", 2)]:  # (a CRLF split between two blocks)
        assert lines_before_trailing_blanks(write(tmp_path / "f.txt", text)) == lines, text[:20]


def test_generic_ratings_csv_negative_time_names_the_text(tmp_path):
    with pytest.raises(InputError, match=r"r.csv, line 3, field 'when': negative time '-7' \(seconds since 1970"):
        read_ratings_csv(write(tmp_path / "r.csv", "who,what,stars,when\nu1,i1,4,1\nu2,i1,2,-7\n"),
                         "who", "what", "stars", "when")


def test_a_scale_and_ratings_that_a_float32_does_not_hold_exactly(engine, tmp_path):
    """0.3 read as a float32 is 0.30000001: the scale told from the data is 0.1..0.3 as typed, the same
    file ingests again, --scale 0.1,0.3 takes it, and a rating a float32 reads onto a step (4.0000001)
    is on it from `cfb rate` too."""
    from cfb.db import ratings_io, store
    from cfb.service.ingest import ingest_dataset
    from cfb.service.ratings import rate_item

    path = write(tmp_path / "s.csv", "user,item,rating\n1,a,0.1\n2,b,0.3\n")
    assert ingest_dataset(engine, Dataset(read_ratings_csv(path)))["scale"] == [0.1, 0.3]
    assert ingest_dataset(engine, Dataset(read_ratings_csv(path)))["new_ratings"] == 0
    with engine.connect() as conn:
        assert store.rating_scale(conn) == (0.1, 0.3)
        assert max(ratings_io.load_ratings(conn).rating) <= 0.3
    other = make_engine(f"sqlite:///{tmp_path / 'given.db'}")
    assert ingest_dataset(other, Dataset(read_ratings_csv(path)), scale=(0.1, 0.3))["ratings"] == 2
    whole = make_engine(f"sqlite:///{tmp_path / 'whole.db'}")
    stars = write(tmp_path / "w.csv", "user,item,rating\n1,a,1\n2,b,5\n3,a,4.0000001\n")
    ingest_dataset(whole, Dataset(read_ratings_csv(stars)), scale=(1.0, 5.0))
    with writing(whole) as conn:
        store.set_setting(conn, "rating_step", "1")
    assert rate_item(whole, "1", "b", 4.0000001)["rating"] == 4.0
    with pytest.raises(CfbError, match=r"^rating 4.1 not on the scale 1..5 in steps of 1$"):
        rate_item(whole, "1", "b", 4.1)


def test_a_scale_too_wide_to_train_on_is_refused_before_anything_is_stored(engine, tmp_path):
    """The first ingest fixes the scale for good: taken from ratings 3e38 apart (each a 32-bit float),
    every retrain once diverged with advice to lower the learning rate."""
    path = write(tmp_path / "ratings.csv", "user,item,rating\nu1,a,-3e38\nu2,a,3e38\nu3,b,1\n")
    with pytest.raises(InputError, match=r"ratings.csv: a rating scale -3e\+38..3e\+38 is not taken: its ends and "
                                         r"width must be within 1,000,000 .*give one with `--scale LO,HI`; `scale=\(lo, hi\)` in Python\)$"):
        ingest_dataset(engine, Dataset(read_ratings_csv(path)), source=str(path))
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(Rating)) == 0


def check_other_programs_tables_are_refused(engine) -> None:  # noqa: ANN001
    """A database holding another program's tables named as cfb's (users, ratings, settings): the first
    ingest refuses it in one line naming them, and leaves every table and row as it found them (cfb made
    its missing tables and wrote its settings into the other program's table). ``engine``: an empty
    database (shared with ``tests/test_postgres.py``)."""
    from sqlalchemy import inspect, text

    planted = Dataset(pd.DataFrame({"user": ["u1", "u2"], "item": ["i1", "i2"], "rating": [3.0, 4.0]}))
    shapes = [["CREATE TABLE settings (key VARCHAR(64) PRIMARY KEY, value TEXT)",
               "INSERT INTO settings VALUES ('theme', 'dark')"],
              ["CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT NOT NULL)",
               "CREATE TABLE ratings (stars INTEGER, comment TEXT)"]]
    for statements, named in zip(shapes, (r"\(settings\)", r"ratings .*no column")):
        with engine.begin() as conn:
            for name in inspect(conn).get_table_names():
                conn.execute(text(f"DROP TABLE {name}"))
            for statement in statements:
                conn.execute(text(statement))
        before = sorted(inspect(engine).get_table_names())
        with pytest.raises(CfbError, match=rf"^this database holds .*{named}.*: give cfb a database"):
            ingest_dataset(engine, planted)
        assert sorted(inspect(engine).get_table_names()) == before
        if "settings" in before:
            with engine.connect() as conn:
                assert conn.execute(text("SELECT key, value FROM settings")).all() == [("theme", "dark")]


def test_another_programs_tables_are_refused_on_sqlite(tmp_path):
    check_other_programs_tables_are_refused(make_engine(f"sqlite:///{tmp_path / 'shop.db'}"))
