"""Defect 6: every bad input gets one clear error line, a non-zero exit status, and nothing written.

Explicit cases first, then property-based tests (hypothesis) that throw malformed answers files,
malformed CSV files and out-of-range numbers at every input path of the CLI."""
from __future__ import annotations

import itertools
import json
import math

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from cfb.cf_core.errors import InputError
from cfb.cli.main import cli
from cfb.db.engine import make_engine
from cfb.db.schema import Base, User
from cfb.db.sources import read_users_csv

from .conftest import checkpointed_copy, write

PROPS = settings(max_examples=30, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
_names = itertools.count()


@pytest.fixture(scope="module")
def trained_db(tmp_path_factory, trained_template):
    """One database per module: a copy of the session's trained planted database."""
    folder = tmp_path_factory.mktemp("bad_input")
    checkpointed_copy(trained_template[0], folder / "cfb.db")
    return f"sqlite:///{folder / 'cfb.db'}", folder


def counts(url: str) -> dict[str, int]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return {t.name: conn.scalar(select(func.count()).select_from(t)) for t in Base.metadata.sorted_tables}
    finally:
        engine.dispose()


def fresh(folder, suffix: str, text: str | bytes):
    """A new file in ``folder`` (unique name) holding ``text``."""
    path = folder / f"in{next(_names)}{suffix}"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def check_rejected(url: str, args: list[str], *expected: str) -> str:
    """Run `cfb --db URL ARGS`: non-zero exit, one error line naming the problem, no traceback, nothing written.

    Returns the error line."""
    before = counts(url)
    res = CliRunner().invoke(cli, ["--db", url, *args])
    out = res.output
    assert res.exit_code != 0, f"{args} was accepted:\n{out}"
    assert isinstance(res.exception, SystemExit), f"{args} raised {res.exception!r}:\n{out}"
    assert "Traceback" not in out, out
    errors = [line for line in out.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, out
    assert len(out.strip().splitlines()) == 1, out  # (a usage error too: ``cli.main.CfbGroup``)
    for part in expected:
        assert part in errors[0], f"{part!r} not in {errors[0]!r}"
    assert counts(url) == before, f"{args} wrote to the database"
    return errors[0]


# --- explicit cases ------------------------------------------------------------------------------

@pytest.mark.parametrize("body, expected", [
    ('{"answers": {"gender": "F", "age": NaN}, "ratings": {"a1": 5}}', ["entry 1", "answers.age", "NaN"]),
    ('[{"ratings": {"a1": 5}}, {"ratings": {"a2": Infinity}}]', ["entry 2", "ratings.a2", "Infinity"]),
    ('{"ratings": {"a1": 5}}\n{"answers": {"age": -Infinity}}\n', ["line 2", "answers.age", "-Infinity"]),
    ('{"answers": {"age": 1e999}}', ["entry 1", "answers.age", "1e999"]),
    ('{"ratings": {"a1": 1e999}}', ["entry 1", "ratings.a1"]),
    ('{"answers": {"age": 1' + "0" * 400 + "}}", ["entry 1", "answers.age", "too large"]),
    ('{"ratings": {"a1": 1' + "0" * 5000 + "}}", ["entry 1", "ratings.a1", "too large"]),
    ('{"ratings": {"a1": 7}}', ["ratings.a1", "outside the scale"]),
    ('{"user": {"x": 1}}', ["field 'user'"]),
    ("[" * 100_000 + "]" * 100_000, ["nested too deeply"]),
    ("", ["empty file"]),
    ("[]", ["no entries (an empty list): nobody to onboard"]),  # refused, like a pairs file with no rows
    (" [ ]\n", ["no entries"]),
])
def test_onboard_rejects_bad_answers(trained_db, body, expected):
    url, folder = trained_db
    path = fresh(folder, ".json", body)
    check_rejected(url, ["onboard", "--answers", str(path)], str(path), *expected)


@pytest.mark.parametrize("body, field", [
    ('{"answers": {"a\\nb": 1}}', r"field 'answers.a\nb'"),
    ('{"ratings": {"Fargo\\u0000 (1996)": 4}}', r"field 'ratings.Fargo\x00 (1996)'"),
])
def test_a_field_named_by_the_input_stays_on_the_errors_one_line(trained_db, body, field):
    """A JSON key (or a column) holding a line break or a NUL is escaped in the message, as values are."""
    url, folder = trained_db
    line = check_rejected(url, ["onboard", "--answers", str(fresh(folder, ".json", body))], field)
    assert "\x00" not in line


def test_onboard_rejects_a_directory_and_a_missing_file(trained_db):
    url, folder = trained_db
    check_rejected(url, ["onboard", "--answers", str(folder)], "is a directory")
    check_rejected(url, ["onboard", "--answers", str(folder / "nope.json")], "does not exist")


def test_users_csv_values_stay_text_unless_the_column_is_plain_numbers(tmp_path):
    path = write(tmp_path / "u.csv", "user,zip,score,age,note\n"
                                     "u1,02139,a1,30,NA\nu2,10001,1.5,41,null\nu3,,2,,\n")
    users = read_users_csv(path)
    assert users["attributes"].tolist() == [
        {"zip": "02139", "score": "a1", "age": 30, "note": "NA"},
        {"zip": "10001", "score": "1.5", "age": 41, "note": "null"},
        {"score": "2"}]
    for cell, message in (("nan", "'nan' is not a finite number"), ("NA", "'NA' is not a number")):
        with pytest.raises(InputError, match=rf"u.csv, line 2, field 'score': {message}, and the column's other "
                                             r"values are numbers \(leave a cell empty for no value\)$"):
            read_users_csv(write(tmp_path / "u.csv", f"user,score\nu1,{cell}\nu2,1.5\n"))
    for a in users["attributes"]:
        assert all(not isinstance(v, float) or math.isfinite(v) for v in a.values())
    numbers = read_users_csv(write(tmp_path / "n.csv", "user,x\nu1,-1.25\nu2,0\nu3,7\n"))
    assert numbers["attributes"].tolist() == [{"x": -1.25}, {"x": 0}, {"x": 7}]
    # digits of other scripts (full-width, Arabic-Indic) are text, as everywhere else a number is read:
    # float() reads them, and "０２１３９" lost its zero as 2139
    for body in ("user,x\nu1,inf\n", "user,x\nu1,007\n", "user,x\nu1,1_000\n", "user,x\nu1,1e400\n",
                 "user,x\nu1,\uff10\uff12\uff11\uff13\uff19\n", "user,x\nu1,\u0663\u0660\n", "user,x\nu1,1\u0660\n"):
        (value,) = read_users_csv(write(tmp_path / "t.csv", body))["attributes"].tolist()
        assert isinstance(value["x"], str)
    # another notation of a finite number reads as that number, in a first file as in a later one
    other = read_users_csv(write(tmp_path / "o.csv", "user,x\nu1,1e3\nu2,+4\nu3,41\nu4,2.5e-1\n"))
    assert other["attributes"].tolist() == [{"x": 1000}, {"x": 4}, {"x": 41}, {"x": 0.25}]


def test_ingest_users_keeps_zip_codes_and_nan_as_text(db_url, tmp_path):
    path = write(tmp_path / "u.csv", "user,zip,city\nu1,02139,nan\nu2,10001,Paris\n")
    res = CliRunner().invoke(cli, ["--db", db_url, "ingest", "users", str(path)])
    assert res.exit_code == 0, res.output
    engine = make_engine(db_url)
    with engine.connect() as conn:
        attrs = dict(conn.execute(select(User.external_id, User.attributes)).all())
    engine.dispose()
    assert attrs == {"u1": {"zip": "02139", "city": "nan"}, "u2": {"zip": "10001", "city": "Paris"}}


def test_blank_lines_before_a_header_are_skipped_and_errors_name_the_headers_line(tmp_path):
    """As in a ratings file (pandas skips them): a users or items file with blank lines before its header
    is read, and a problem with its header names the line it is on (a users file used to be refused
    as "header has nothing" on line 1)."""
    from cfb.db.sources import read_items_csv, read_ratings_csv

    users = read_users_csv(write(tmp_path / "u.csv", "\n\nuser,age\nu1,30\n"))
    assert users["user"].tolist() == ["u1"] and users["attributes"].tolist() == [{"age": 30}]
    items = read_items_csv(write(tmp_path / "i.csv", "\n \nitem,title\ni1,One\n"))
    assert items["item"].tolist() == ["i1"]
    for read, body, field in ((read_users_csv, "\n\nwho,age\nu1,30\n", "user"),
                              (read_items_csv, "\n\nitem,title,year,year\ni1,One,1,2\n", "year"),
                              (read_ratings_csv, "\n\nuser,item\nu1,i1\n", "rating")):
        with pytest.raises(InputError, match=rf"line 3, field '{field}'"):
            read(write(tmp_path / "bad.csv", body))


@pytest.mark.parametrize("body, expected", [
    ("user,age\nu1,30,extra\n", ["line 2", "expected 2 fields, found 3"]),
    ("user,age\nu1\n", ["line 2", "expected 2 fields, found 1"]),
    ("user,age\nn1,30\nn1,31\n", ["line 3", "duplicate user"]),
    ("user,age\n,30\n", ["line 2", "field 'user'", "empty id"]),
    ("who,age\nn1,30\n", ["line 1", "field 'user'", "missing column"]),
    ("user,age,age\nn1,30,31\n", ["line 1", "duplicate column"]),
    ("user,age\n", ["no users"]),
    ("", ["line 1", "empty file"]),
    (b"user,city\nn1,caf\xe9\n", ["line 2", "field 'city'", "not valid utf-8"]),
])
def test_ingest_users_rejects(trained_db, body, expected):
    url, folder = trained_db
    path = fresh(folder, ".csv", body)
    check_rejected(url, ["ingest", "users", str(path)], str(path), *expected)


def test_ingest_rejects_directories_and_bad_scale(trained_db):
    url, folder = trained_db
    check_rejected(url, ["ingest", "users", str(folder)], "is a directory")
    check_rejected(url, ["ingest", "ratings", str(folder)], "is a directory")
    good = fresh(folder, ".csv", "user,item,rating\nn1,a1,4\n")
    check_rejected(url, ["ingest", "ratings", str(good), "--scale", "nan,5"], "--scale")
    check_rejected(url, ["ingest", "ratings", str(good), "--scale", "5,1"], "--scale")
    for plain_only in ("1,1_0", "\uff11,\uff15"):  # (float() reads them as 1,10 and 1,5)
        check_rejected(url, ["ingest", "ratings", str(good), "--scale", plain_only], "--scale")
    for wide in ("-1e308,1e308", "0,1e39", "0,3e38", "-2e6,0"):  # (stored for good; every retrain then diverged)
        check_rejected(url, ["ingest", "ratings", str(good), "--scale", wide], "--scale", "32-bit float")
    check_rejected(url, ["ingest", "ratings", str(fresh(folder, ".csv", "user,item,rating\nn1,a1,nan\n"))],
                   "line 2", "rating")
    check_rejected(url, ["ingest", "ratings", str(fresh(folder, ".csv", "user,item,rating\n"))],
                   "line 2", "no ratings after the header")


@pytest.mark.parametrize("args, expected", [
    (["recommend", "a0", "-n", "-5"], "-n"),
    (["recommend", "a0", "-n", "0"], "-n"),
    (["recommend", "a0", "-n", "1001"], "-n"),
    (["similar", "a1", "-n", "-1"], "-n"),
    (["inspect", "biases", "-n", "0"], "-n"),
    (["inspect", "biases", "--min-ratings", "-1"], "--min-ratings"),
    (["retrain", "--full", "--quiet", "--epochs", "-3"], "--epochs"),
    (["retrain", "--full", "--quiet", "--epochs", "0"], "--epochs"),
    (["retrain", "--full", "--quiet", "--factors", "0"], "--factors"),
    (["retrain", "--full", "--quiet", "--epochs", "1_0"], "--epochs"),  # (int() reads it as 10)
    (["retrain", "--full", "--quiet", "--epochs", "\uff11"], "--epochs"),  # a full-width 1
    (["recommend", "a0", "-n", "\uff15"], "-n"),
    (["retrain", "--full", "--quiet", "--bs", "0"], "--bs"),
    (["retrain", "--full", "--quiet", "--lr", "nan"], "--lr"),
    (["retrain", "--full", "--quiet", "--lr", "inf"], "--lr"),
    (["retrain", "--full", "--quiet", "--lr", "0"], "--lr"),
    (["retrain", "--full", "--quiet", "--lr", "-0.1"], "--lr"),
    (["retrain", "--quiet", "--wd", "-1"], "--wd"),
    (["retrain", "--quiet", "--wd", "nan"], "--wd"),
    (["retrain", "--quiet", "--seed", "-1"], "--seed"),
    (["retrain", "--quiet", "--valid-pct", "1"], "--valid-pct"),
    (["retrain", "--quiet", "--valid-pct", "-0.1"], "--valid-pct"),
    (["retrain", "--quiet", "--valid-pct", "nan"], "--valid-pct"),
    (["retrain", "--quiet", "--drift-limit", "1.5"], "--drift-limit"),
    (["questionnaire", "--budget", "-1"], "--budget"),
    (["rate", "a0", "a1", "nan"], "RATING"),
    (["rate", "a0", "a1", "\uff14"], "RATING"),  # a full-width 4: not a number in a file either
    (["rate", "a0", "a1", "5_0"], "RATING"),
    (["rate", "a0", "a1", "--", "-inf"], "RATING"),
    (["rate", "a0", "a1", "7"], "outside"),
    (["rollback", "0"], "VERSION"),
    (["rollback", "--", "-1"], "VERSION"),
    (["eval", "cold-start", "--seeds", "-1"], "--seeds"),
    (["eval", "cold-start", "--seeds", "42,18446744073709551616", "--data", "/nonexistent"],
     "a seed is a whole number from 0 to 4294967295, got 18446744073709551616"),
    (["eval", "cold-start", "--budgets", "5,x"], "--budgets"),
    (["eval", "cold-start", "--seeds", "4_2", "--data", "/nonexistent"], "--seeds"),  # (int() reads it as 42)
    (["eval", "cold-start", "--budgets", "5,\uff11"], "--budgets"),  # a full-width 1
    (["eval", "cold-start", "--fold-steps", "1,-3"], "--fold-steps"),
    (["eval", "cold-start", "--seeds", "", "--data", "/nonexistent"], "--seeds: give at least one seed"),
    (["eval", "cold-start", "--seeds", "", "--items", "--data", "/nonexistent"], "--seeds: give at least one seed"),
    (["eval", "cold-start", "--budgets", "", "--fold-steps", "", "--data", "/nonexistent"],
     "--budgets and --fold-steps are both empty"),
])
def test_numeric_arguments_are_range_checked(trained_db, args, expected):
    url, _ = trained_db
    check_rejected(url, args, expected)


@pytest.mark.parametrize("body, expected", [
    ("who,what\na0,a1\n", ["line 1", "field 'user'", "missing column"]),
    ("user,what\na0,a1\n", ["line 1", "field 'item'", "missing column"]),
    ("", ["line 1", "empty file"]),
    ("\n\n", ["line 1", "empty file"]),
    ("user,item\n", ["no user,item rows"]),
    ("\nuser,item\nx0,a1\n", ["line 3", "unknown user"]),  # (a blank line before the header, as every reader skips)
    ("user,item\na0\n", ["line 2", "expected 2 fields"]),
    ("user,item\na0,a1\n,a2\n", ["line 3", "field 'user'", "empty id"]),
    ("user,item\na0,a1\nghost,a2\n", ["line 3", "unknown user"]),
    ("user,item\na0,zzz\n", ["line 2", "unknown item"]),
    (b"user,item\na0,\xff\n", ["line 2", "field 'item'", "not valid utf-8"]),
    ('user,item\na0,"a"1\n', ["line 2", "malformed CSV"]),  # (it was read as item a1)
    ('user,item\na0,a1\n"two\nlines",a2\n', ["line 3", "unknown user 'two\\nlines'"]),  # (where it starts)
    ("user,item,user\na0,a1,b1\n", ["line 1", "field 'user'", "duplicate column"]),  # (it took the first)
])
def test_predict_rejects(trained_db, body, expected):
    url, folder = trained_db
    path = fresh(folder, ".csv", body)
    check_rejected(url, ["predict", "--pairs", str(path)], str(path), *expected)


def test_predict_rejects_a_directory_and_a_missing_file(trained_db):
    url, folder = trained_db
    check_rejected(url, ["predict", "--pairs", str(folder)], "is a directory")
    check_rejected(url, ["predict", "--pairs", str(folder / "nope.csv")], "does not exist")


def test_predict_still_works(trained_db):
    url, folder = trained_db
    path = fresh(folder, ".csv", "\ufeffuser, item\na0,a1\n\nb1,a1\n")
    res = CliRunner().invoke(cli, ["--db", url, "predict", "--pairs", str(path)])
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[0] == "user,item,prediction" and len(res.output.splitlines()) == 3


LONG_ID = "L" * 256  # users.external_id and items.external_id hold at most 255 characters


@pytest.mark.parametrize("kind, body, args, expected", [
    ("onboard", json.dumps({"user": LONG_ID, "answers": {}}), [],
     ["entry 1", "field 'user'", "user id 'LLLLLLLLLLLLLLLLLLLL...' is 256 characters long (at most 255)"]),
    ("onboard", json.dumps([{"answers": {}}, {"user": "a\u0000b"}]), [],
     ["entry 2", "field 'user'", "user id 'a\\x00b' contains a NUL character"]),
    ("ratings", f"user,item,rating\nn1,a1,4\n{LONG_ID},a2,3\n", [], ["line 3", "field 'user'", "at most 255"]),
    ("ratings", "user,item,rating\nn1,a1,4\nn1,x\0y,3\n", [], ["line 3", "field 'item'", "NUL character"]),
    ("ratings", 'user,item,rating\nn1,a1,4\n"n\n2",a2,3\n', [], ["line 3", "field 'user'", "line break"]),
    ("ratings", f"who,what,stars\nn1,{LONG_ID},4\n", ["--user-col", "who", "--item-col", "what",
                                                      "--rating-col", "stars"], ["line 2", "field 'item'", "item id"]),
    ("users", f"user,age\nn1,30\n{LONG_ID},31\n", [], ["line 3", "field 'user'", "at most 255"]),
    ("users", "user,age\nn\0,30\n", [], ["line 2", "field 'user'", "NUL character"]),
    ("ratings", "user,item,rating\nn1,a1,4\n.,a2,3\n", [], ["line 3", "field 'user'", "a URL cannot name (/users/./"]),
    ("ratings", "user,item,rating\nn1,a1,4\nn1,..,3\n", [], ["line 3", "field 'item'", "a URL cannot name (/items/../"]),
    ("items", f"item,title\nnew1,Fine\n{LONG_ID},Too long\n", [], ["line 3", "field 'item'", "at most 255"]),
    ("items", "item,title\nnew1,Fine\nnew2,Nul\0title\n", [], ["line 3", "field 'title'", "NUL character"]),
])
def test_ids_that_no_backend_can_store_are_refused_naming_line_and_field(trained_db, kind, body, args, expected):
    """At most 255 characters and no NUL (PostgreSQL's VARCHAR(255) refuses the others: SQLite refuses
    them alike, tests/test_postgres.py checks PostgreSQL), one error line, nothing written."""
    url, folder = trained_db
    path = fresh(folder, ".json" if kind == "onboard" else ".csv", body)
    command = ["onboard", "--answers"] if kind == "onboard" else ["ingest", kind]
    check_rejected(url, [*command, str(path), *args], str(path), *expected)


def test_ids_that_cannot_exist_are_refused_or_unknown_on_the_command_line(trained_db):
    url, folder = trained_db
    check_rejected(url, ["rate", "a0", LONG_ID, "3", "--new-item"], "item id 'LLLL", "256 characters long")
    check_rejected(url, ["recommend", LONG_ID], "unknown user")
    check_rejected(url, ["similar", LONG_ID], "unknown item")
    check_rejected(url, ["rate", LONG_ID, "a1", "3"], "unknown user")
    for args in (["rate", " ", "a1", "3"], ["recommend", ""]):  # said as `cfb onboard` and an item say it
        check_rejected(url, args, "empty user id")
    pairs = fresh(folder, ".csv", "user,item\na0,a1\na0,x\0y\n")
    check_rejected(url, ["predict", "--pairs", str(pairs)], str(pairs), "line 3", "field 'item'", "unknown item")
    pairs = fresh(folder, ".csv", "user,item\na0,a1\nnobody,a1\n")
    check_rejected(url, ["predict", "--pairs", str(pairs)], str(pairs), "line 3", "field 'user'", "unknown user")


def test_a_command_line_that_would_lose_or_expose_data_is_refused(trained_db, tmp_path):
    """An id such as -1 is an id for `recommend` and `similar` too (it read as an unknown option); an
    in-memory database (its ingest reported ratings that were then gone) and an empty --host (it
    listened on every interface) are refused; `eval --data` of no folder is one line."""
    url, folder = trained_db
    check_rejected(url, ["recommend", "-1"], "unknown user '-1'")
    check_rejected(url, ["similar", "-1", "-n", "3"], "unknown item '-1'")
    ratings = fresh(folder, ".csv", "user,item,rating\nu,i,4\nv,i,2\n")
    for memory in ("sqlite://", "SQLITE://", "Sqlite:///:memory:", "sqlite:///:memory:",  # (a scheme in capitals too)
                   "sqlite:///:memory:?cache=shared", "sqlite:///file::memory:?uri=true",
                   "sqlite:///file:x?mode=memory&uri=true", "sqlite:///file:?uri=true",
                   "sqlite:///file:m.db?vfs=memdb&uri=true"):
        res = CliRunner().invoke(cli, ["--db", memory, "ingest", "ratings", str(ratings)])
        assert res.exit_code == 2 and "in-memory SQLite database keeps nothing" in res.output, res.output
    check_rejected(url, ["serve", "--host", " "], "--host", "give an address")
    check_rejected(url, ["serve", "--token", ""], "--token", "leave --token out")  # (`--token "$TOKEN"`, TOKEN unset)
    res = CliRunner().invoke(cli, ["--db", url, "serve"], env={"CFB_API_TOKEN": ""})  # (`CFB_API_TOKEN=$TOKEN`, likewise)
    assert res.exit_code == 2 and "leave --token out" in res.output, res.output
    check_rejected(url, ["recommend", "-nobody"], "No such option '-nobody'", "goes after '--'")  # (not -n obody)
    for real in ("mode=memory.db", "my:memory:notes.db"):  # files, not in-memory databases
        res = CliRunner().invoke(cli, ["--db", f"sqlite:///{tmp_path / real}", "ingest", "ratings", str(ratings)])
        assert res.exit_code == 0 and (tmp_path / real).exists(), res.output
    from cfb.db.engine import in_memory_sqlite

    for other in ("sqlite:///file::memory:", "sqlite:///file:y.db?mode=memory", "sqlite:///file:z.db#a?mode=memory&uri=true",
                "sqlite:///memory.db", "postgresql+psycopg://u@h/memory"):  # (without uri=true a file: name is a file)
        assert not in_memory_sqlite(other), other
    check_rejected(url, ["eval", "cold-start", "--data", str(tmp_path / "nowhere")], "nowhere: folder not found")


def test_a_ratings_header_is_read_without_spaces_around_its_names(trained_db, tmp_path):
    """"timestamp " is the timestamp column (its times were dropped), "rating " the rating."""
    from cfb.db.sources import read_ratings_csv

    path = fresh(trained_db[1], ".csv", "user , item,rating ,timestamp \nfresh1,a1,3,881250949\n")
    assert read_ratings_csv(path).iloc[0].to_dict() == {"user": "fresh1", "item": "a1", "rating": 3.0,
                                                        "timestamp": 881250949}
    check_rejected(trained_db[0], ["ingest", "ratings", str(fresh(trained_db[1], ".csv", "user,item,rating,rating \n"
                                                                  "a0,a1,3,4\n"))], "line 1", "duplicate column")


def test_an_id_of_255_characters_is_fine(trained, db_url, tmp_path):
    """The longest id a user or an item may have (255 characters, not bytes) works everywhere (here
    SQLite; PostgreSQL in tests/test_postgres.py)."""
    longest = "é" * 255
    entry = write(tmp_path / "a.json", json.dumps({"user": longest, "answers": {"gender": "F"}}))
    for args in (["onboard", "--answers", str(entry)], ["rate", longest, longest, "4", "--new-item"],
                 ["recommend", longest]):
        res = CliRunner().invoke(cli, ["--db", db_url, *args])
        assert res.exit_code == 0, res.output


# --- property-based ------------------------------------------------------------------------------

NON_FINITE = ["NaN", "Infinity", "-Infinity", "1e999", "-1e400"]
json_scalars = st.one_of(st.none(), st.booleans(), st.text(max_size=5), st.integers(-10, 10),
                         st.floats(allow_nan=False, allow_infinity=False))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    max_leaves=6)


def _valid_entry(draw) -> dict:
    entry: dict = {}
    answers = {}
    if draw(st.booleans()):
        answers["gender"] = draw(st.sampled_from(["F", "M"]))
    if draw(st.booleans()):
        answers["age"] = draw(st.integers(18, 70))
    if answers:
        entry["answers"] = answers
    items = draw(st.lists(st.sampled_from([f"a{i}" for i in range(20)] + [f"b{i}" for i in range(20, 40)]),
                          max_size=4, unique=True))
    if items:
        entry["ratings"] = {i: draw(st.sampled_from([1, 2, 3, 4, 5, 2.5])) for i in items}
    return entry


@st.composite
def bad_answers_files(draw) -> bytes:
    """An answers file with valid entries and exactly one defect somewhere."""
    entries = [_valid_entry(draw) for _ in range(draw(st.integers(1, 3)))]
    k = draw(st.integers(0, len(entries) - 1))
    kind = draw(st.sampled_from(["non_finite_answer", "non_finite_rating", "rating_out_of_scale", "rating_type",
                                 "age_type", "gender_value", "unknown_attribute", "unknown_item", "unknown_key",
                                 "existing_user", "empty_user", "user_type", "not_an_object", "answers_type",
                                 "ratings_type", "truncated", "bad_bytes"]))
    e = entries[k]
    token = None
    if kind == "non_finite_answer":
        e.setdefault("answers", {})["age"] = "@TOKEN@"
        token = draw(st.sampled_from(NON_FINITE))
    elif kind == "non_finite_rating":
        e.setdefault("ratings", {})[draw(st.sampled_from(["a1", "b30", "Alpha film 3"]))] = "@TOKEN@"
        token = draw(st.sampled_from(NON_FINITE))
    elif kind == "rating_out_of_scale":
        e.setdefault("ratings", {})["a2"] = draw(st.one_of(st.floats(max_value=0.999, allow_nan=False,
                                                                     allow_infinity=False),
                                                           st.floats(min_value=5.001, allow_nan=False,
                                                                     allow_infinity=False)))
    elif kind == "rating_type":
        e.setdefault("ratings", {})["a2"] = draw(st.one_of(st.booleans(), st.text(max_size=3),
                                                           st.lists(st.integers(1, 5), max_size=2),
                                                           st.dictionaries(st.text(max_size=2), st.integers(),
                                                                           max_size=2)))
    elif kind == "age_type":
        e.setdefault("answers", {})["age"] = draw(st.one_of(st.booleans(), st.text(max_size=3),
                                                            st.lists(st.integers(), max_size=2)))
    elif kind == "gender_value":
        e.setdefault("answers", {})["gender"] = draw(json_values.filter(lambda v: v not in ("F", "M", None)))
    elif kind == "unknown_attribute":
        e.setdefault("answers", {})[draw(st.text(min_size=1, max_size=6).filter(
            lambda s: s not in ("gender", "age")))] = draw(json_values)
    elif kind == "unknown_item":
        e.setdefault("ratings", {})[draw(st.text(min_size=1, max_size=6).filter(
            lambda s: not (s[:1] in "ab" and s[1:].isdigit()) and not s.startswith(("Alpha film", "Beta film"))))] = 3
    elif kind == "unknown_key":
        e[draw(st.text(min_size=1, max_size=6).filter(lambda s: s not in ("user", "answers", "ratings")))] = \
            draw(json_values)
    elif kind == "existing_user":
        e["user"] = draw(st.sampled_from(["a0", "b1", "a58"]))
    elif kind == "empty_user":
        e["user"] = draw(st.sampled_from(["", " ", "\t"]))
    elif kind == "user_type":
        e["user"] = draw(st.one_of(st.booleans(), st.lists(st.integers(), max_size=2),
                                   st.dictionaries(st.text(max_size=2), st.integers(), max_size=1)))
    elif kind == "not_an_object":
        entries[k] = draw(st.one_of(json_scalars, st.lists(json_scalars, max_size=2)))
    elif kind == "answers_type":
        e["answers"] = draw(st.one_of(st.text(min_size=1, max_size=3), st.lists(st.integers(), min_size=1,
                                                                                  max_size=2),
                                      st.integers(1, 9), st.just(True)))
    elif kind == "ratings_type":
        e["ratings"] = draw(st.one_of(st.text(min_size=1, max_size=3), st.lists(st.integers(), min_size=1,
                                                                                  max_size=2),
                                      st.integers(1, 9), st.just(True)))
    layout = draw(st.sampled_from(["object", "list", "lines"] if len(entries) == 1 else ["list", "lines"]))
    if kind == "not_an_object" and layout == "lines":
        layout = "list"  # a scalar line does not look like JSON lines
    dumps = lambda x: json.dumps(x, ensure_ascii=draw(st.booleans()))  # noqa: E731
    if layout == "object":
        text = dumps(entries[0])
    elif layout == "list":
        text = dumps(entries)
    else:
        text = "\n".join(dumps(x) for x in entries) + "\n"
    if token is not None:
        text = text.replace('"@TOKEN@"', token)
    if kind == "truncated":
        text = dumps(entries)[: draw(st.integers(0, len(dumps(entries)) - 1))]
    data = text.encode("utf-8")
    if kind == "bad_bytes":
        pos = draw(st.integers(0, len(data)))
        data = data[:pos] + draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xe9"])) + data[pos:]
    return data


@PROPS
@given(body=bad_answers_files(), skip=st.booleans())
def test_property_onboard_rejects_malformed_answers(trained_db, body, skip):
    url, folder = trained_db
    path = fresh(folder, ".json", body)
    args = ["onboard", "--answers", str(path)]
    before = counts(url)
    if skip:  # --skip-invalid stores the valid entries: only the exit status and the one-line report are checked
        res = CliRunner().invoke(cli, ["--db", url, *args, "--skip-invalid"])
        assert res.exit_code != 0 and "Traceback" not in res.output and isinstance(res.exception, SystemExit)
        engine = make_engine(url)  # undo: this module's database must stay as trained
        with engine.begin() as conn:
            after = counts(url)
            if after != before:
                from cfb.db.schema import Answer, Rating, UserFactors

                new = select(User.id).where(User.external_id.like("new-%"))
                for table in (Rating, Answer, UserFactors):
                    conn.execute(table.__table__.delete().where(table.user_id.in_(new)))
                conn.execute(User.__table__.delete().where(User.external_id.like("new-%")))
        engine.dispose()
        assert counts(url) == before
    else:
        check_rejected(url, args, str(path))


def _csv(rows: list[list[str]]) -> str:
    return "".join(",".join(r) + "\n" for r in rows)


def _encoded(draw, kind: str, header: list[str], rows: list[list[str]]) -> bytes:  # noqa: ANN001
    """The CSV's bytes, with the encoding-level defects applied (a byte that is not UTF-8, an empty file)."""
    data = _csv([header] + rows).encode("utf-8")
    if kind == "bad_bytes":
        pos = draw(st.integers(0, len(data)))
        data = data[:pos] + b"\xff" + data[pos:]
    elif kind == "empty_file":
        data = draw(st.sampled_from([b"", b"\n", b"  \n\n"]))
    return data


@st.composite
def bad_ratings_files(draw) -> bytes:
    """A ratings CSV (user,item,rating[,timestamp]) of new users with exactly one defect."""
    with_time = draw(st.booleans())
    header = ["user", "item", "rating"] + (["timestamp"] if with_time else [])
    n = draw(st.integers(1, 4))
    rows = [[f"h{k}", draw(st.sampled_from(["a1", "a2", "b30", "new-item"])),
             draw(st.sampled_from(["1", "2.5", "5"]))] + (["1000"] if with_time else []) for k in range(n)]
    k = draw(st.integers(0, n - 1))
    kind = draw(st.sampled_from(["rating_token", "rating_out_of_scale", "empty_user", "empty_item", "missing_column",
                                 "time_token", "bad_bytes", "empty_file"]))
    if kind == "rating_token":
        rows[k][2] = draw(st.sampled_from(["nan", "NaN", "inf", "-inf", "Infinity", "four", "", "1,5", "null",
                                           "1e999"]))
        if rows[k][2] == "1,5":
            rows[k][2] = '"1,5"'
    elif kind == "rating_out_of_scale":
        rows[k][2] = repr(draw(st.one_of(st.floats(-1e6, 0.99), st.floats(5.01, 1e6))))
    elif kind == "empty_user":
        rows[k][0] = draw(st.sampled_from(["", " ", '""']))
    elif kind == "empty_item":
        rows[k][1] = draw(st.sampled_from(["", " ", '""']))
    elif kind == "missing_column":
        drop = draw(st.integers(0, 2))
        header = [h for j, h in enumerate(header) if j != drop]
        rows = [[v for j, v in enumerate(r) if j != drop] for r in rows]
    elif kind == "time_token":
        if not with_time:
            header.append("timestamp")
            rows = [r + ["1000"] for r in rows]
        rows[k][3] = draw(st.sampled_from(["nan", "12.5", "inf", "soon", "1e999"]))
    return _encoded(draw, kind, header, rows)


@PROPS
@given(body=bad_ratings_files())
def test_property_ingest_ratings_rejects_malformed_csv(trained_db, body):
    url, folder = trained_db
    path = fresh(folder, ".csv", body)
    check_rejected(url, ["ingest", "ratings", str(path)], str(path))


@st.composite
def bad_users_files(draw) -> bytes:
    """A users CSV (user, attribute columns) of new users with exactly one defect."""
    header = ["user", "age", "zip"]
    n = draw(st.integers(1, 4))
    rows = [[f"h{k}", draw(st.sampled_from(["30", "nan", "", "NA"])), draw(st.sampled_from(["02139", "10001", ""]))]
            for k in range(n)]
    k = draw(st.integers(0, n - 1))
    kind = draw(st.sampled_from(["extra_field", "missing_field", "duplicate_user", "empty_user", "missing_user_column",
                                 "duplicate_column", "header_only", "bad_bytes", "empty_file"]))
    if kind == "extra_field":
        rows[k] = rows[k] + draw(st.lists(st.sampled_from(["x", "", "1"]), min_size=1, max_size=3))
    elif kind == "missing_field":
        rows[k] = rows[k][: draw(st.integers(1, 2))]
    elif kind == "duplicate_user":
        rows.append([rows[k][0], "40", "10001"])
    elif kind == "empty_user":
        rows[k][0] = draw(st.sampled_from(["", " ", '""']))
    elif kind == "missing_user_column":
        header[0] = draw(st.sampled_from(["users", "id", "User", ""]))
    elif kind == "duplicate_column":
        header[2] = "age"
    elif kind == "header_only":
        rows = []
    return _encoded(draw, kind, header, rows)


@PROPS
@given(body=bad_users_files())
def test_property_ingest_users_rejects_malformed_csv(trained_db, body):
    url, folder = trained_db
    path = fresh(folder, ".csv", body)
    check_rejected(url, ["ingest", "users", str(path)], str(path))


@st.composite
def bad_pairs_files(draw) -> bytes:
    """A pairs CSV (user,item) with exactly one defect."""
    header = ["user", "item"]
    n = draw(st.integers(1, 4))
    rows = [[draw(st.sampled_from(["a0", "b1", "a2"])), draw(st.sampled_from(["a1", "b30", "a5"]))] for _ in range(n)]
    k = draw(st.integers(0, n - 1))
    kind = draw(st.sampled_from(["missing_column", "renamed_column", "unknown_user", "unknown_item", "empty_id",
                                 "field_count", "header_only", "bad_bytes", "empty_file"]))
    if kind == "missing_column":
        drop = draw(st.integers(0, 1))
        header = [header[1 - drop]]
        rows = [[r[1 - drop]] for r in rows]
    elif kind == "renamed_column":
        header[draw(st.integers(0, 1))] = draw(st.sampled_from(["", "User", "users", "id", "Item"]))
    elif kind == "unknown_user":
        rows[k][0] = draw(st.text(st.characters(min_codepoint=48, max_codepoint=122), min_size=1, max_size=6)
                          .filter(lambda s: s not in [f"{'a' if u % 2 == 0 else 'b'}{u}" for u in range(60)]))
    elif kind == "unknown_item":
        rows[k][1] = draw(st.sampled_from(["zzz", "a99", "Alpha film 99", "c1"]))  # (an exact title is an item)
    elif kind == "empty_id":
        rows[k][draw(st.integers(0, 1))] = draw(st.sampled_from(["", " ", '""']))
    elif kind == "field_count":
        rows[k] = rows[k][:1] if draw(st.booleans()) else rows[k] + ["x"]
    elif kind == "header_only":
        rows = []
    return _encoded(draw, kind, header, rows)


@PROPS
@given(body=bad_pairs_files())
def test_property_predict_rejects_malformed_pairs(trained_db, body):
    url, folder = trained_db
    path = fresh(folder, ".csv", body)
    check_rejected(url, ["predict", "--pairs", str(path)], str(path))


def _number_text(values) -> st.SearchStrategy[str]:
    return st.one_of(values.map(str), st.sampled_from(["nan", "NaN", "inf", "-inf", "Infinity", "1e999", "x", ""]))


bad_ints = lambda lo, hi=None: _number_text(  # noqa: E731
    st.integers(max_value=lo - 1) if hi is None else st.one_of(st.integers(max_value=lo - 1),
                                                               st.integers(min_value=hi + 1)))
bad_arguments = st.one_of(
    bad_ints(1, 1000).map(lambda v: ["recommend", "a0", "-n", v]),
    bad_ints(1, 1000).map(lambda v: ["similar", "a1", "-n", v]),
    bad_ints(1, 1000).map(lambda v: ["inspect", "biases", "-n", v]),
    bad_ints(0).map(lambda v: ["inspect", "biases", "--min-ratings", v]),
    bad_ints(0).map(lambda v: ["questionnaire", "--budget", v]),
    bad_ints(1, 1000).map(lambda v: ["retrain", "--full", "--quiet", "--epochs", v]),
    bad_ints(1, 1024).map(lambda v: ["retrain", "--full", "--quiet", "--factors", v]),
    bad_ints(1).map(lambda v: ["retrain", "--full", "--quiet", "--bs", v]),
    bad_ints(0).map(lambda v: ["retrain", "--quiet", "--seed", v]),
    bad_ints(1).map(lambda v: ["rollback", v]),
    _number_text(st.floats(max_value=0)).map(lambda v: ["retrain", "--full", "--quiet", "--lr", v]),
    _number_text(st.floats(max_value=-1e-9)).map(lambda v: ["retrain", "--quiet", "--wd", v]),
    _number_text(st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=1))).map(
        lambda v: ["retrain", "--quiet", "--valid-pct", v]),
    _number_text(st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=1 + 1e-9))).map(
        lambda v: ["retrain", "--quiet", "--drift-limit", v]),
    _number_text(st.one_of(st.floats(max_value=0.999), st.floats(min_value=5.001))).map(
        lambda v: ["rate", "a0", _item_for(v), v]),
    st.lists(st.integers(max_value=-1), min_size=1, max_size=3).map(
        lambda v: ["eval", "cold-start", "--seeds", ",".join(map(str, v))]),
    st.sampled_from(["x", "1,y", "1.5", "nan"]).map(lambda v: ["eval", "cold-start", "--budgets", v]),
)


def _item_for(value: str) -> str:
    return "a1" if len(value) % 2 else "b30"


@PROPS
@given(args=bad_arguments)
def test_property_out_of_range_arguments(trained_db, args):
    url, _ = trained_db
    if args[0] in ("rate", "rollback"):  # positional: "--" keeps a negative number from reading as an option
        args = [*args[:-1], "--", args[-1]]
    check_rejected(url, args)
