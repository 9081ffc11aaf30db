"""The `cfb` command line, through click's runner and a real subprocess."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from cfb.cli.main import cli

from cfb.db.engine import make_engine

from .conftest import FAST, checkpointed_copy, planted_ratings, write


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def run(runner, url, *args):  # noqa: ANN001
    return runner.invoke(cli, ["--db", url, *args])


@pytest.fixture(scope="session")
def cli_template(tmp_path_factory):
    """Ingest and a full retrain through the CLI, once per session."""
    runner, tmp_path, planted = CliRunner(), tmp_path_factory.mktemp("cli"), planted_ratings()
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    planted.ratings.to_csv(tmp_path / "ratings.csv", index=False)
    users = planted.users.assign(gender=[a["gender"] for a in planted.users.attributes],
                                 age=[a["age"] for a in planted.users.attributes])[["user", "gender", "age"]]
    users.to_csv(tmp_path / "users.csv", index=False)
    assert run(runner, url, "ingest", "users", str(tmp_path / "users.csv")).exit_code == 0
    res = run(runner, url, "ingest", "ratings", str(tmp_path / "ratings.csv"), "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["ratings"] == len(planted.ratings)
    args = ["retrain", "--full", "--json", "--factors", "8", "--epochs", str(FAST["epochs"]), "--lr", "0.03",
            "--bs", "256", "--wd", "0.05"]
    res = run(runner, url, *args)
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert {"version", "valid_mse", "valid_rmse", "epoch_s", "fit_s", "load_s", "total_s"} <= report.keys()
    assert len(report["epoch_s"]) == FAST["epochs"]
    return make_engine(url)


@pytest.fixture
def cli_db(cli_template, tmp_path):
    checkpointed_copy(cli_template, tmp_path / "cli.db")
    return f"sqlite:///{tmp_path / 'cli.db'}"


def test_recommend_json(runner, cli_db):
    res = run(runner, cli_db, "recommend", "a0", "b1", "-n", "3", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert [o["user"] for o in out] == ["a0", "b1"]
    assert [r["item"][0] for r in out[0]["items"]] == ["a"] * 3
    assert set(out[0]["items"][0]) == {"item", "title", "score"}


def test_predict_csv(runner, cli_db, tmp_path):
    pairs = write(tmp_path / "pairs.csv", "user,item\na0,a1\nb1,a1\n")
    res = run(runner, cli_db, "predict", "--pairs", str(pairs))
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    assert lines[0] == "user,item,prediction" and len(lines) == 3
    assert float(lines[1].split(",")[2]) > float(lines[2].split(",")[2])


def test_predict_names_an_item_given_by_title_by_its_id(runner, cli_db, tmp_path):
    """A row may name its item by exact title; the output names it as every command does, by its id
    (it echoed the title, so the item column mixed ids and titles), with the title beside it in JSON."""
    items = write(tmp_path / "items.csv", "item,title\na1,Alpha One\n")
    assert run(runner, cli_db, "ingest", "items", str(items)).exit_code == 0
    pairs = write(tmp_path / "pairs.csv", "user,item\na0,Alpha One\nb1,a1\n")
    lines = run(runner, cli_db, "predict", "--pairs", str(pairs)).stdout.strip().splitlines()
    assert [line.rsplit(",", 1)[0] for line in lines] == ["user,item", "a0,a1", "b1,a1"]
    out = json.loads(run(runner, cli_db, "predict", "--pairs", str(pairs), "--json").stdout)
    assert [(o["user"], o["item"], o["title"]) for o in out] == [("a0", "a1", "Alpha One"), ("b1", "a1", "Alpha One")]
    assert float(lines[1].rsplit(",", 1)[1]) == out[0]["prediction"]


def test_predict_looks_each_title_up_once_and_a_file_without_its_header_says_so(runner, cli_db, tmp_path, monkeypatch):
    """A pairs file that names items by title looked every row's title up again (200k rows: 60 s against
    6 s by id); a file without its header whose first row repeats a value was "duplicate column"."""
    import cfb.service.serving as serving

    calls = []
    real = serving.find_item
    monkeypatch.setattr(serving, "find_item", lambda conn, q: calls.append(q) or real(conn, q))
    assert run(runner, cli_db, "ingest", "items", str(write(tmp_path / "i.csv", "item,title\na1,Alpha One\n"))).exit_code == 0
    pairs = write(tmp_path / "t.csv", "user,item\n" + "a0,Alpha One\nb1,Alpha One\n" * 20)
    res = run(runner, cli_db, "predict", "--pairs", str(pairs), "--json")
    out = json.loads(res.stdout)
    assert len(out) == 40 and {o["item"] for o in out} == {"a1"} and calls == ["Alpha One"], res.output
    res = run(runner, cli_db, "predict", "--pairs", str(write(tmp_path / "h.csv", "1,1\n2,2\n")))
    assert res.exit_code == 1 and "missing column(s) user, item; header has 1, 1" in res.output, res.output


def test_similar_and_biases_and_models(runner, cli_db):
    out = json.loads(run(runner, cli_db, "similar", "a3", "-n", "4", "--json").stdout)
    assert out["item"] == "a3" and out["title"] is None and len(out["items"]) == 4
    res = run(runner, cli_db, "inspect", "biases", "-n", "2")
    assert res.exit_code == 0 and "lowest bias" in res.output
    models = json.loads(run(runner, cli_db, "models", "--json").stdout)
    assert len(models) == 1 and models[0]["serving"]


def test_onboard_rate_retrain_rollback(runner, cli_db, tmp_path):
    answers = write(tmp_path / "q.json", json.dumps({"user": "zoe", "answers": {"gender": "M"}}))
    res = run(runner, cli_db, "onboard", "--answers", str(answers))
    assert res.exit_code == 0 and res.output.strip() == "zoe"
    assert run(runner, cli_db, "rate", "zoe", "a1", "5").exit_code == 0
    # options only a full retrain uses are refused by an incremental one, not ignored (nothing written)
    res = run(runner, cli_db, "retrain", "--model", "nn", "--factors", "3")
    assert res.exit_code == 1 and "--model, --factors only apply to a full retrain" in res.output
    res = run(runner, cli_db, "retrain", "--factors", "3")
    assert res.exit_code == 1 and res.output.startswith("Error: --factors only applies to a full retrain, and")
    res = run(runner, cli_db, "retrain", "--full", "--drift-limit", "0.5")  # and the other way round
    assert res.exit_code == 2 and "--drift-limit decides when a retrain without --full goes full" in res.output
    assert len(json.loads(run(runner, cli_db, "models", "--json").stdout)) == 1
    out = json.loads(run(runner, cli_db, "retrain", "--json").stdout)
    assert out["mode"] == "incremental" and out["users_with_new_ratings"] == 1 and out["serving"] is True  # (as its text says)
    assert json.loads(run(runner, cli_db, "rollback", "1", "--json").stdout) == {"serving": 1}
    q = json.loads(run(runner, cli_db, "questionnaire", "--budget", "3", "--json").stdout)
    assert len(q["items"]) == 3 and {a["name"] for a in q["attributes"]} == {"age", "gender"}


def test_questionnaire_names_untitled_items_by_id_and_caps_the_budget(runner, cli_db):
    """The ratings came without a catalogue: an item without a title is shown by its id."""
    res = run(runner, cli_db, "questionnaire", "--budget", "3")
    assert res.exit_code == 0, res.output
    asked = res.output.split("rate the ones you know (seen, read, used; the rest count as not known):")[1].split()
    assert len(asked) == 6 and all(f"{a[:-1]}" == b for a, b in zip(asked[::2], asked[1::2])), res.output
    res = run(runner, cli_db, "questionnaire", "--budget", "31")
    assert res.exit_code == 2 and "0<=x<=30" in res.output


@pytest.mark.parametrize("args, message", [
    (["recommend", "ghost"], "Error: unknown user 'ghost'"),
    (["similar", "a3x"], "Error: unknown item 'a3x'"),
    (["rollback", "99"], "Error: no model version 99"),
    (["rate", "a0", "a1", "9"], "outside the scale"),
])
def test_errors_are_one_line_and_nonzero(runner, cli_db, args, message):
    res = run(runner, cli_db, *args)
    assert res.exit_code == 1
    assert message in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_empty_database_is_a_clear_error(runner, tmp_path):
    (tmp_path / "empty.db").touch()  # an empty file
    res = run(runner, f"sqlite:///{tmp_path / 'empty.db'}", "recommend", "1")
    assert res.exit_code == 1 and "(an empty file): `cfb ingest …` makes one" in res.output
    write(tmp_path / "r.csv", "user,item,rating\n1,a,4\n2,b,5\n")
    assert run(runner, str(tmp_path / "empty.db"), "ingest", "ratings", str(tmp_path / "r.csv")).exit_code == 0
    res = run(runner, f"sqlite:///{tmp_path / 'empty.db'}", "recommend", "1")  # a database with ratings, no model
    assert res.exit_code == 1 and "no trained model yet" in res.output


@pytest.mark.parametrize("args", [("recommend", "1"), ("models",), ("retrain",), ("retrain", "--full"),
                                  ("rate", "1", "2", "3")])
def test_a_database_of_other_tables_is_not_called_empty_nor_written(runner, tmp_path, args):
    """A SQLite file another program made (tables, none of cfb's): the error says it holds no cfb data,
    as a plain state, not a "database error"; and nothing is written into it (an incremental retrain
    made cfb's whole schema there, so the next command took it for a cfb database: a review found it)."""
    import sqlite3

    with sqlite3.connect(tmp_path / "other.db") as conn:
        conn.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY)")
    res = run(runner, f"sqlite:///{tmp_path / 'other.db'}", *args)
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1, res.output
    assert res.output.strip() == "Error: the database holds no cfb data yet: run `cfb ingest …` first"
    with sqlite3.connect(tmp_path / "other.db") as conn:
        assert conn.execute("SELECT name FROM sqlite_master").fetchall() == [("orders",)]


@pytest.mark.parametrize("args", [("recommend", "1"), ("models",), ("similar", "x"), ("questionnaire",),
                                  ("rate", "1", "2", "3"), ("retrain",), ("serve", "--port", "1")])
def test_a_missing_database_file_is_an_error_and_is_not_made(runner, tmp_path, args):
    """Only `cfb ingest` makes a database: anything else on a mistyped path says so and leaves no file."""
    path = tmp_path / "typo.db"
    res = run(runner, f"sqlite:///{path}", *args)
    assert res.exit_code == 1 and f"no database at {path}" in res.output and "Traceback" not in res.output
    assert not path.exists() and not list(tmp_path.iterdir())
    path.touch()  # an empty file: not a database, and left empty (reading it would write a header)
    res = run(runner, f"sqlite:///{path}", *args)
    assert res.exit_code == 1 and f"no database at {path} (an empty file)" in res.output
    assert path.stat().st_size == 0 and [p.name for p in tmp_path.iterdir()] == ["typo.db"]


@pytest.mark.parametrize("url, message", [
    ("no such://x", "invalid database URL"),
    ("postgresql+psycopg://nobody:x@127.0.0.1:9/none", "database"),  # refused, or no driver installed
    ("mysql+nosuchdriver://x/y", "invalid database URL"),
    # the short form some hosts print, and a driver cfb's extra does not install: said how to write them
    ("postgres://u:p@localhost/db", "invalid database URL: postgres:// is written postgresql+psycopg:// here"),
    ("POSTGRES+psycopg://u:p@localhost/db", "is written postgresql+psycopg:// here"),
    ("postgresql+psycopg2://u:p@localhost/db", "(psycopg2); use postgresql+psycopg:// (psycopg 3, what pip"),
])
def test_bad_database_url_is_one_line(runner, url, message):
    import cfb

    res = run(runner, url, "recommend", "1")
    assert res.exit_code == 1 and message in res.output
    assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output
    with pytest.raises(cfb.CfbError, match=re.escape(message)):  # the Python API's error too
        cfb.open(url).recommend("1")


def test_a_url_scheme_in_capitals_and_a_pool_with_no_free_connection(runner, cli_db):
    """SQLITE:/// is sqlite:///; every pooled connection in use past the pool's wait (threads sharing one
    ``cfb.open``) is the busy database's one line, not SQLAlchemy's QueuePool error."""
    from sqlalchemy.exc import TimeoutError as PoolTimeoutError

    from cfb.db.engine import NO_FREE_CONNECTION, database_error

    assert run(runner, cli_db.replace("sqlite://", "SQLite://", 1), "recommend", "a0").exit_code == 0
    res = run(runner, "POSTGRESQL://nobody:x@127.0.0.1:9/none", "recommend", "1")  # (refused, or no driver)
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1
    assert "plugin" not in res.output, res.output  # (it was "Can't load plugin: sqlalchemy.dialects:POSTGRESQL")
    assert str(database_error(PoolTimeoutError("QueuePool limit of size 5 overflow 10 reached"))) == NO_FREE_CONNECTION


def test_a_failed_first_ingest_leaves_no_database_file(runner, tmp_path, monkeypatch):
    """A first ingest is made whole or not at all: a refused file leaves neither the database nor a
    partial one beside it, and the next command still says there is no database."""
    ratings = write(tmp_path / "r.csv", "user,item,rating\n1,a,4\n2,b,4\n")  # no scale to tell
    items = write(tmp_path / "items.csv", f"item,title,year\na,Alpha,2001\n{'L' * 256},Beta,2002\n")  # (too long)
    path = tmp_path / "db" / "new.db"
    path.parent.mkdir()
    for args in (("ingest", "ratings", str(ratings)), ("ingest", "items", str(items))):
        assert run(runner, str(path), *args).exit_code == 1
        assert list(path.parent.iterdir()) == []
    assert "no database at" in run(runner, str(path), "recommend", "1").output
    from cfb.db.engine import _HOST

    killed = path.parent / f".new.db.{_HOST}.999999999.1a2b3c4d.partial"  # a first ingest killed midway
    for end in ("", "-journal"):
        write(killed.with_name(killed.name + end), "half")
    elsewhere, running = (path.parent / f".new.db.{name}.7.1a2b3c4d.partial" for name in ("old-box", "new-box"))
    write(elsewhere, "half")  # another machine's (a container run before), untouched for two days
    os.utime(elsewhere, (time.time() - 2 * 86400,) * 2)
    write(running, "half")  # another machine's, being written: kept
    assert "no database at" in run(runner, str(path), "models").output  # any command that looks for it
    assert sorted(p.name for p in path.parent.iterdir()) == [running.name]
    write(killed, "half")
    write(ratings, "user,item,rating\n1,a,4\n2,b,5\n")
    assert run(runner, str(path), "ingest", "ratings", str(ratings)).exit_code == 0
    assert sorted(p.name for p in path.parent.iterdir()) == [running.name, "new.db"]
    running.unlink()
    write(killed, "half")  # killed just after linking its file into place: found beside the database too
    assert run(runner, str(path), "models").exit_code == 0
    assert not killed.exists()
    # a database another process made meanwhile is written into, never replaced
    from cfb.db import engine as engine_module

    other = tmp_path / "db" / "raced.db"
    real_link = engine_module.os.link

    def made_meanwhile(src, dst):  # noqa: ANN001
        monkeypatch.setattr(engine_module.os, "link", real_link)
        assert run(runner, str(dst), "ingest", "ratings", str(ratings)).exit_code == 0  # (the other process)
        return real_link(src, dst)

    monkeypatch.setattr(engine_module.os, "link", made_meanwhile)
    write(tmp_path / "more.csv", "user,item,rating\n3,c,4\n3,d,5\n")
    assert run(runner, str(other), "ingest", "ratings", str(tmp_path / "more.csv")).exit_code == 0
    monkeypatch.undo()
    from sqlalchemy import create_engine, text

    check = create_engine(f"sqlite:///{other}")
    with check.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM ratings")).scalar() == 4  # both ingests' ratings
    check.dispose()
    assert sorted(p.name for p in path.parent.iterdir()) == ["new.db", "raced.db"]


def test_a_negative_number_is_a_value_not_an_option(runner, cli_db):
    res = run(runner, cli_db, "rate", "a0", "a1", "-1")
    assert res.exit_code == 1 and "rating -1 outside the scale 1..5" in res.output
    res = run(runner, cli_db, "rollback", "-1")
    assert res.exit_code == 2 and "-1 is not in the range" in res.output
    # an unknown option is still refused by its name, not read as an argument
    for args, said in ((("rate", "--jsn", "a0", "a1", "4"), "No such option '--jsn'. Did you mean '--json'?"),
                       (("rate", "--new_item", "a0", "x", "4"), "No such option '--new_item'. Did you mean '--new-item'?"),
                       (("rate", "-x", "a0", "a1", "4"), "No such option '-x' (an argument that starts with '-', "
                                                         "such as an id, goes after '--')"),
                       (("rollback", "--jso", "1"), "No such option '--jso'. Did you mean '--json'?")):
        res = run(runner, cli_db, *args)
        assert res.exit_code == 2 and said in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert run(runner, cli_db, "rate", "a0", "-", "4", "--new-item").exit_code == 0  # ('-' is never an option)
    for args in (("recommend", "-n2", "a0", "--json"), ("similar", "a1", "-n2", "--json")):  # (a short option's value attached)
        res = run(runner, cli_db, *args)
        out = json.loads(res.stdout) if res.exit_code == 0 else res.output
        assert len((out[0] if isinstance(out, list) else out)["items"]) == 2, out
    res = run(runner, cli_db, "rate", "--", "-u3", "a1", "2")  # (read as the user: there is no such user)
    assert res.exit_code == 1 and "unknown user '-u3'" in res.output, res.output


def test_a_path_is_a_sqlite_database(runner, cli_db, tmp_path, monkeypatch):
    """``--db FILE`` (and CFB_DATABASE_URL=FILE), relative or absolute, is that SQLite file."""
    expected = run(runner, cli_db, "recommend", "a0", "--json").stdout
    path = cli_db.removeprefix("sqlite:///")
    monkeypatch.chdir(tmp_path)
    for db in (path, "cli.db", "./cli.db"):
        res = run(runner, db, "recommend", "a0", "--json")
        assert res.exit_code == 0 and res.stdout == expected, res.output
    res = run(runner, "typo.db", "recommend", "a0")
    assert res.exit_code == 1 and f"no database at {tmp_path / 'typo.db'}" in res.output
    monkeypatch.setenv("CFB_DATABASE_URL", "cli.db")
    assert runner.invoke(cli, ["recommend", "a0", "--json"]).stdout == expected


def test_a_file_that_is_not_a_database_is_one_line(runner, tmp_path, cli_db):
    """A picture given as the database, or a database cut short, is one line from the CLI and a
    ``CfbError`` from Python, not the driver's traceback."""
    import cfb

    picture = tmp_path / "map.png"
    picture.write_bytes(bytes(range(256)) * 64)
    cut = tmp_path / "cut.db"
    cut.write_bytes(Path(cli_db.removeprefix("sqlite:///")).read_bytes()[:40_000])
    for path, message in ((picture, "file is not a database"), (cut, "database disk image is malformed")):
        res = run(runner, f"sqlite:///{path}", "recommend", "1")
        assert res.exit_code == 1 and res.output.strip() == f"Error: database error: {message} ({path})", res.output
        with pytest.raises(cfb.CfbError, match=re.escape(f"database error: {message} ({path})") + "$"):
            cfb.open(f"sqlite:///{path}").recommend("1")


@pytest.mark.parametrize("url", ["postgresql+psycopg://cfb:s3cret@localhost:abc/x",
                                 "postgresql+psycopg://cfb:s3cret@[::1/x"])
def test_a_url_whose_port_or_host_does_not_parse_is_one_line_without_its_password(runner, url):
    """SQLAlchemy raises a bare ValueError for these (a traceback from every command)."""
    import cfb

    for args in (["models"], ["recommend", "1"], ["retrain"]):
        res = run(runner, url, *args)
        assert res.exit_code == 1 and res.output.startswith("Error: invalid database URL postgresql+psycopg://cfb:***@")
        assert len(res.output.strip().splitlines()) == 1 and "s3cret" not in res.output, res.output
    with pytest.raises(cfb.CfbError, match=r"^invalid database URL .*cfb:\*\*\*@") as caught:
        cfb.open(url)
    assert "s3cret" not in str(caught.value)


def test_a_title_is_found_typed_composed_or_decomposed(runner, cli_db, tmp_path):
    """"Misérables" pasted from macOS is decomposed (e + a combining accent): it looked the same as the
    stored title in the "did you mean" hint and was unknown. Either way round it is the same title."""
    import unicodedata

    nfc, nfd = "Misérables, Les (1995)", "Crème (1990)"
    items = write(tmp_path / "t.csv", f'item,title\na1,"{nfc}"\na3,"{unicodedata.normalize("NFD", nfd)}"\n')
    assert run(runner, cli_db, "ingest", "items", str(items)).exit_code == 0
    for typed, item in ((unicodedata.normalize("NFD", nfc), "a1"), (nfd, "a3")):
        assert typed != unicodedata.normalize("NFC", typed) or item == "a3"
        res = run(runner, cli_db, "similar", typed, "--json")
        assert res.exit_code == 0 and json.loads(res.stdout)["item"] == item, res.output
        assert run(runner, cli_db, "rate", "a0", typed, "4").exit_code == 0
        answers = write(tmp_path / "q.json", json.dumps({"user": f"u-{item}", "ratings": {typed: 5}}))
        res = run(runner, cli_db, "onboard", "--answers", str(answers))
        assert res.exit_code == 0, res.output
    # a ratings file naming an item by its title, either form, is refused, not made a second item
    for typed in (nfc, unicodedata.normalize("NFD", nfc)):
        res = run(runner, cli_db, "ingest", "ratings", str(write(tmp_path / "r.csv", f'user,item,rating\na0,"{typed}",4\n')))
        assert res.exit_code == 1 and "is the title of item 'a1', not an item id" in res.output, res.output
    # a title in neither form (the angstrom sign, a mix of both) is stored composed, found in any form
    odd = "\u212b ngstro\u0308m, Ame\u0301lie Poul\u00e9n"
    assert run(runner, cli_db, "ingest", "items", str(write(tmp_path / "o.csv", f'item,title\na7,"{odd}"\n'))).exit_code == 0
    for typed in (odd, unicodedata.normalize("NFC", odd), unicodedata.normalize("NFD", odd)):
        res = run(runner, cli_db, "similar", typed, "--json")
        assert res.exit_code == 0 and json.loads(res.stdout)["item"] == "a7", res.output
    # a new item whose id is another item's title in the other form is refused, as in a ratings file
    res = run(runner, cli_db, "ingest", "items",
              str(write(tmp_path / "n.csv", f'item,title\n"{unicodedata.normalize("NFD", nfc)}",Other\n')))
    assert res.exit_code == 1 and "is the title of item 'a1': a new item's id cannot be another item's title" in res.output
    # two items whose titles differ only in form are one title: ambiguous, whichever form is typed
    both = write(tmp_path / "b.csv", f'item,title\na5,"{unicodedata.normalize("NFD", nfc)}"\n')
    assert run(runner, cli_db, "ingest", "items", str(both)).exit_code == 0
    for typed in (nfc, unicodedata.normalize("NFD", nfc)):
        res = run(runner, cli_db, "similar", typed)
        assert res.exit_code == 1 and "2 items are titled" in res.output and "(a1, a5)" in res.output, res.output
        answers = write(tmp_path / "q.json", json.dumps({"ratings": {typed: 5}}))
        res = run(runner, cli_db, "onboard", "--answers", str(answers))
        assert res.exit_code == 1 and "ambiguous title (items a1, a5)" in res.output, res.output


def test_a_batch_of_one_rating_is_refused_for_the_nn_model(runner, cli_db):
    """The nn model's BatchNorm cannot train on a batch of one: refused in one line, before any work."""
    import cfb

    res = run(runner, cli_db, "retrain", "--full", "--model", "nn", "--bs", "1")
    assert res.exit_code == 1 and res.output.strip() == (
        "Error: bs (--bs) must be at least 2 with the nn model: its BatchNorm needs two ratings a batch"), res.output
    with pytest.raises(cfb.InputError, match="at least 2 with the nn model"):
        cfb.open(cli_db).retrain(full=True, kind="nn", bs=1, progress=False)
    assert len(json.loads(run(runner, cli_db, "models", "--json").stdout)) == 1


def test_one_rating_to_train_on_is_refused_for_the_nn_model(runner, tmp_path):
    """With one training rating there is no batch to merge a batch of one into."""
    url = f"sqlite:///{tmp_path / 'one.db'}"
    assert run(runner, url, "ingest", "ratings", str(write(tmp_path / "one.csv", "user,item,rating\n1,2,4\n")),
               "--scale", "1,5").exit_code == 0
    res = run(runner, url, "retrain", "--full", "--model", "nn", "--valid-pct", "0")
    assert res.exit_code == 1 and res.output.strip() == (
        "Error: the nn model needs at least 2 ratings to train on (its BatchNorm), and there is 1"), res.output


def test_one_text_never_names_two_items_and_older_titles_are_found_in_any_form(runner, cli_db, tmp_path):
    """Within one items file as across files: a new id that is another row's title, or a title that is
    another item's id, is refused (both were taken, and which item a rating reached depended on how the
    keyboard encoded the text). A database written before titles were stored composed: its titles in
    any form are found, and ingesting the same titles again updates nothing."""
    import unicodedata

    from sqlalchemy import text

    nfd = unicodedata.normalize("NFD", "Néw Thing")
    for body, said in ((f'item,title\ny1,Néw Thing\n"{nfd}",Other\n', "line 3, field 'item': '" + nfd + "' is the title of item 'y1' in this file"),
                       ('item,title\nz1,Brand New\nBrand New,Other\n', "line 3, field 'item': 'Brand New' is the title of item 'z1'"),
                       ('item,title\ny5,a2\n', "line 2, field 'title': title 'a2' is the id of item 'a2'")):
        res = run(runner, cli_db, "ingest", "items", str(write(tmp_path / "i.csv", body)))
        assert res.exit_code == 1 and said in res.output, res.output
    engine = make_engine(cli_db)
    old = {"a1": "\u212bngstr\u00f6m Story", "a3": "Cre\u0300me br\u00fbl\u00e9e", "a5": unicodedata.normalize("NFD", "Amélie"),
           "a7": "\u212aelvin"}  # (the Kelvin sign: "Kelvin" composed, a query all ASCII)
    with engine.begin() as conn:  # (as an older cfb stored them)
        for ext, title in old.items():
            conn.execute(text("UPDATE items SET title = :t WHERE external_id = :e"), {"t": title, "e": ext})
    engine.dispose()
    for ext, title in old.items():
        for typed in {title, unicodedata.normalize("NFC", title), unicodedata.normalize("NFD", title)}:
            res = run(runner, cli_db, "similar", typed, "--json")
            assert res.exit_code == 0 and json.loads(res.stdout)["item"] == ext, (typed, res.output)
        answers = write(tmp_path / "q.json", json.dumps({"ratings": {unicodedata.normalize("NFC", title): 4}}))
        assert run(runner, cli_db, "onboard", "--answers", str(answers)).exit_code == 0
    again = "item,title\n" + "".join(f'{e},"{unicodedata.normalize("NFD", t)}"\n' for e, t in old.items())
    res = run(runner, cli_db, "ingest", "items", str(write(tmp_path / "again.csv", again)), "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["updated"] == 0, res.output


def test_a_generic_ratings_file_in_a_release_folder_says_what_reads_it(runner, tmp_path):
    """A folder holding only a `user,item,rating,timestamp` ratings.csv is taken for a MovieLens CSV
    release by its name: `cfb ingest movielens` names the command that reads it, `cfb eval` what it measures."""
    folder = tmp_path / "mine"
    folder.mkdir()
    write(folder / "ratings.csv", "user,item,rating,timestamp\n1,2,4,5\n")
    res = run(runner, f"sqlite:///{tmp_path / 'x.db'}", "ingest", "movielens", str(folder))
    assert res.exit_code == 1 and res.output.strip().endswith("(a generic ratings file: `cfb ingest ratings` reads it)")
    res = runner.invoke(cli, ["eval", "cold-start", "--data", str(folder), "--quiet"])
    assert res.exit_code == 1 and "which `cfb eval` does not measure: it measures MovieLens and goodbooks" in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_bad_ingest_file_exits_nonzero(runner, tmp_path):
    bad = write(tmp_path / "bad.csv", "user,item,rating\n1,2,x\n")
    res = run(runner, f"sqlite:///{tmp_path / 'x.db'}", "ingest", "ratings", str(bad))
    assert res.exit_code == 1 and "bad.csv, line 2, field 'rating': not a number" in res.output


def test_real_cfb_subprocess(cli_db, tmp_path):
    """The installed console script, in its own process, answers from the stored arrays."""
    exe = Path(sys.executable).with_name("cfb")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "cfb.cli"]
    env = {**os.environ, "CFB_DATABASE_URL": cli_db}
    res = subprocess.run([*cmd, "recommend", "b1", "-n", "2", "--json"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert [r["item"][0] for r in json.loads(res.stdout)[0]["items"]] == ["b", "b"]
    res = subprocess.run([*cmd, "recommend", "ghost"], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 1 and res.stderr.strip() == "Error: unknown user 'ghost'"
    # an argument that is not UTF-8 (bytes from a file name or another locale), and a usage error: one line
    res = subprocess.run([*cmd, "rate", b"b\xff1", "b2", "4"], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 2 and res.stderr == "Error: argument 2 is not valid UTF-8 text (byte 0xff)\n"
    res = subprocess.run([*cmd, "recommend", "b1", "-n", "0"], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 2 and res.stderr == ("Error: Invalid value for '-n': 0 is not in the range 1<=x<=1000. "
                                                  "(see 'cfb recommend --help')\n")
    for args, message in ((["--bogus"], "Error: No such option '--bogus'. (see 'cfb --help')"),
                          (["data", "download"], "Error: Missing argument '{movielens-100k|")):
        res = subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, timeout=120)
        assert res.returncode == 2 and res.stderr.startswith(message) and res.stderr.count("\n") == 1, res.stderr
    res = subprocess.run([*cmd], capture_output=True, text=True, env=env, timeout=120)  # no command: the help
    shown = res.stdout + res.stderr  # (click >= 8.2 shows it on stderr, with exit status 2)
    assert shown.startswith("Usage: cfb [OPTIONS] COMMAND [ARGS]...") and "Commands:" in shown


def test_an_eval_stopped_by_sigterm_leaves_no_temporary_database(tmp_path):
    """`timeout` and CI end a run with SIGTERM: `cfb eval cold-start` removes its temporary databases
    then, as it does on Ctrl-C, and exits with 128 + 15."""
    import signal

    planted = planted_ratings()
    folder = tmp_path / "ml-latest-small"
    folder.mkdir()
    r = planted.ratings.assign(rating=planted.ratings.rating.round().clip(1, 5), timestamp=range(len(planted.ratings)))
    r.rename(columns={"user": "userId", "item": "movieId"}).to_csv(folder / "ratings.csv", index=False)
    pd.DataFrame({"movieId": sorted(r["item"].unique()), "title": "t", "genres": "Drama"}).to_csv(
        folder / "movies.csv", index=False)
    exe = Path(sys.executable).with_name("cfb")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "cfb.cli"]
    temp = tmp_path / "tmp"
    temp.mkdir()
    proc = subprocess.Popen([*cmd, "eval", "cold-start", "--data", str(folder), "--seeds", "42", "--quiet"],
                            env={**os.environ, "TMPDIR": str(temp)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list(temp.glob("cfb-eval-*/*.db")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and list(temp.iterdir()) == [], err.decode()


def test_training_progress_goes_to_stderr(cli_db):
    """A full retrain in its own process: stdout holds its one result line only (so it can be piped),
    fastai's progress bars and epoch table go to stderr, and --quiet shows nothing."""
    exe = Path(sys.executable).with_name("cfb")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "cfb.cli"]
    env = {**os.environ, "CFB_DATABASE_URL": cli_db}
    res = subprocess.run([*cmd, "retrain", "--full"], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("\n") == 1 and res.stdout.startswith("version ")
    assert "train_loss" in res.stderr and "generator is empty" not in res.stderr
    res = subprocess.run([*cmd, "retrain", "--full", "--quiet", "--valid-pct", "0.2"], capture_output=True, text=True,
                         env=env, timeout=300)
    assert res.returncode == 0 and "train_loss" not in res.stderr + res.stdout
    # protocol §7 reports the epochs trained and the wall time beside the validation error
    assert re.search(r"; validation MSE [\d.]+, RMSE [\d.]+ \(\d+ epochs; retrain [\d.]+ s\)$", res.stdout.strip()), \
        res.stdout


def test_drift_limit_turns_a_retrain_full(runner, cli_db):
    assert run(runner, cli_db, "rate", "a0", "b30", "1").exit_code == 0
    out = json.loads(run(runner, cli_db, "retrain", "--json", "--drift-limit", "0", "--epochs", "2").stdout)
    assert out["mode"] == "full" and "(limit 0%): full retrain" in out["reason"]
    assert not out["reason"].startswith("0%")  # (one rating in 1,440: a share over the limit reads so)


def test_an_item_the_model_lacks_says_what_adds_it(runner, cli_db, tmp_path):
    """A title alone is no metadata to start an item from: it joins after its first rating."""
    assert run(runner, cli_db, "ingest", "items", str(write(tmp_path / "z.csv", "item,title\nzed,Zed\n"))).exit_code == 0
    assert run(runner, cli_db, "retrain", "--json").exit_code == 0
    res = run(runner, cli_db, "similar", "zed")
    assert res.exit_code == 1 and "it has no rating and no metadata to start it from" in res.output
    assert run(runner, cli_db, "rate", "a0", "zed", "4").exit_code == 0
    res = run(runner, cli_db, "similar", "zed")
    assert res.exit_code == 1 and "is not in the serving model yet: it joins at the next retrain (`cfb retrain`)" in res.output
    assert json.loads(run(runner, cli_db, "retrain", "--json").stdout)["items_added"] == 1
    assert run(runner, cli_db, "similar", "zed").exit_code == 0


def test_eval_refuses_a_budget_no_questionnaire_has(runner):
    res = runner.invoke(cli, ["eval", "cold-start", "--budgets", "0,31", "--data", "/nonexistent"])
    assert res.exit_code == 2 and "a questionnaire asks about 0 to 30 items, got '0,31'" in res.output


FAST_ARGS = ["--factors", "8", "--epochs", "2", "--lr", "0.03", "--bs", "256", "--wd", "0.05"]


def test_retrain_json_keeps_progress_on_stderr_and_only_quiet_hides_it(runner, cli_db):
    """--json puts the result on stdout; the epoch table still goes to stderr unless --quiet."""
    res = run(runner, cli_db, "retrain", "--full", "--json", *FAST_ARGS)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["mode"] == "full" and "train_loss" in res.stderr
    res = run(runner, cli_db, "retrain", "--full", "--json", "--quiet", *FAST_ARGS)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["mode"] == "full" and "train_loss" not in res.stderr


def test_training_without_a_validation_set_shows_no_validation_column(runner, cli_db):
    """--valid-pct 0: no valid_loss column of None and no empty [0/0] validation bar; with a
    validation set (the §7 measurement) its column stays."""
    res = run(runner, cli_db, "retrain", "--full", "--valid-pct", "0", *FAST_ARGS, "--seed", "7")
    assert res.exit_code == 0, res.output
    assert "train_loss" in res.stderr
    assert "(dot, full, seed 7) serving" in res.stdout  # the seed, reported
    assert [line for line in run(runner, cli_db, "models").stdout.splitlines() if " seed 7" in line][0][0] == "*"
    assert "valid_loss" not in res.stderr and "None" not in res.stderr and "[0/0]" not in res.stderr
    res = run(runner, cli_db, "retrain", "--full", "--valid-pct", "0.2", *FAST_ARGS)
    assert res.exit_code == 0, res.output
    assert res.stderr.count("valid_loss") == 1 and "None" not in res.stderr  # the measurement's table only


@pytest.mark.parametrize("lr", ["1e6", "5"])
def test_a_diverging_retrain_is_one_line_and_the_previous_version_serves(runner, cli_db, lr):
    res = run(runner, cli_db, "retrain", "--full", "--quiet", "--epochs", "1", "--lr", lr)
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert res.output.startswith("Error: training diverged") and len(res.output.strip().splitlines()) == 1
    assert f"lower the learning rate (--lr, now {float(lr):g})" in res.output
    models = json.loads(run(runner, cli_db, "models", "--json").stdout)
    assert len(models) == 1 and models[0]["serving"]
    assert run(runner, cli_db, "recommend", "a0", "-n", "2").exit_code == 0


@pytest.mark.parametrize("args, message", [
    (["--seeds", ""], "Error: --seeds: give at least one seed"),
    (["--seeds", " , ", "--items"], "Error: --seeds: give at least one seed"),
    (["--budgets", "", "--fold-steps", ""], "Error: --budgets and --fold-steps are both empty"),
    (["--fold-steps", "10,11"], "the fold-in curve reveals 0 to 10 ratings"),  # (n = 11 would measure n = 10)
    (["--seeds", "42,42"], "'42,42' names a value twice"),
    (["--seeds", "42,,43"], "an empty entry in '42,,43'"),
    (["--budgets", "5,5"], "'5,5' names a value twice"),
    (["--items", "--budgets", "5"], "Error: --budgets: new users' settings; --items measures new items"),
    (["--items", "--fold-steps", "1"], "Error: --fold-steps: new users' settings"),
])
def test_eval_refuses_options_that_leave_nothing_to_run(runner, args, message):
    res = runner.invoke(cli, ["eval", "cold-start", *args, "--data", "/nonexistent"])
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output


def test_eval_without_its_data_says_to_pass_data(runner, tmp_path, monkeypatch):
    """The default folder absent and no network: the way out is --data, not `cfb ingest`."""
    from cfb.db import download

    monkeypatch.chdir(tmp_path)  # (the default ../shared/data/ml-100k is not there)
    monkeypatch.setitem(download.SOURCES, "movielens-100k", ("http://127.0.0.1:9/ml-100k.zip", "ml-100k", "u.data"))
    for extra in ([], ["--items"]):
        res = runner.invoke(cli, ["eval", "cold-start", "--quiet", *extra])
        assert res.exit_code == 1, res.output
        assert "could not download movielens-100k" in res.output and "pass `--data PATH`" in res.output
        assert "cfb ingest" not in res.output and len(res.output.strip().splitlines()) == 1
    # the default's text given as --data names a folder, as any other does: not found (it was downloaded)
    res = runner.invoke(cli, ["eval", "cold-start", "--quiet", "--data", "../shared/data/ml-100k/"])
    assert res.exit_code == 1 and res.output == "Error: ../shared/data/ml-100k: folder not found\n", res.output


def test_eval_on_a_folder_of_no_dataset_names_every_layout_it_takes(runner, tmp_path):
    res = runner.invoke(cli, ["eval", "cold-start", "--quiet", "--data", str(tmp_path)])
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1, res.output
    assert res.output.startswith(f"Error: {tmp_path}: not a MovieLens or goodbooks folder: looked for u.data")
    assert "books.csv (goodbooks)" in res.output


def write_planted_ml100k(folder: Path) -> Path:
    """The planted set in MovieLens 100k's layout (numeric ids, as the release has)."""
    ds = planted_ratings()
    user_no = {u: k + 1 for k, u in enumerate(ds.users.user)}
    item_no = {i: k + 1 for k, i in enumerate(ds.items.item)}
    folder.mkdir()
    write(folder / "u.data", "".join(f"{user_no[r.user]}\t{item_no[r.item]}\t{int(r.rating)}\t{r.timestamp}\n"
                                     for r in ds.ratings.itertuples()))
    flags = "|".join(["0"] * 19)
    write(folder / "u.item", "".join(f"{item_no[i]}|{t} (1990)|01-Jan-1990||http://x|{flags}\n"
                                     for i, t in zip(ds.items.item, ds.items.title)), "latin-1")
    write(folder / "u.user", "".join(f"{user_no[u]}|{a['age']}|{a['gender']}|writer|12345\n"
                                     for u, a in zip(ds.users.user, ds.users.attributes)))
    return folder


def test_eval_shows_each_step_on_stderr_unless_quiet(tmp_path):
    """`cfb eval cold-start` tells each step of the protocol on stderr as it starts, and its training's epochs (with
    --json too: stdout holds only the JSON result); --quiet leaves stderr empty."""
    folder = write_planted_ml100k(tmp_path / "ml-100k")
    args = [str(Path(sys.executable).with_name("cfb")), "eval", "cold-start", "--data", str(folder), "--seeds", "42",
            "--budgets", "0,5", "--fold-steps", "", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    shown = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert shown.returncode == 0, shown.stderr
    out = json.loads(shown.stdout)
    assert set(out["mean"]["budgets"]) == {"0", "5"} and out["data"] == str(folder.resolve())  # (what was measured)
    assert "seed 42: training on" in shown.stderr and "seed 42: questionnaire of 5 items" in shown.stderr
    assert "train_loss" in shown.stderr  # (each seed's training shows its epochs, as `cfb retrain` does)
    quiet = subprocess.run([*args, "--quiet"], capture_output=True, text=True, env=env, timeout=300)
    assert quiet.returncode == 0 and quiet.stderr == ""
    again = json.loads(quiet.stdout)["mean"]["budgets"]
    for q in ("0", "5"):  # the same seed gives the same figures
        assert again[q]["cfb"] == out["mean"]["budgets"][q]["cfb"]


def test_serve_on_a_port_in_use_is_one_line(runner, cli_db):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = run(runner, cli_db, "serve", "--port", str(port))
    assert res.exit_code == 1 and f"cannot listen on 127.0.0.1:{port}" in res.output
    assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output


def test_serve_refuses_an_allowed_origin_that_is_not_one(runner, cli_db):
    res = run(runner, cli_db, "serve", "--allow-origin", "shop.example")
    assert res.exit_code == 2 and "'shop.example' is not an origin" in res.output


def test_a_title_hint_in_a_large_catalogue_compares_titles_sharing_a_word():
    """Past ``HINT_ALL_TITLES`` titles only those sharing a word with the query are compared: a
    misspelt title still finds its neighbours."""
    from cfb.service.serving import HINT_ALL_TITLES, title_hint

    titles = [f"Film number {k} ({1900 + k % 100})" for k in range(HINT_ALL_TITLES + 1000)] + ["Star Wars (1977)"]
    assert title_hint("Star Wras (1977)", titles).startswith("; did you mean: Star Wars (1977)")
    assert title_hint("Star Wras (1977)", titles[-3:]) == "; did you mean: Star Wars (1977)?"


def test_every_ingest_takes_quiet(runner, tmp_path):
    """Scripts pass --quiet to every ingest: the items and users files (which show no progress) take it too."""
    db = f"sqlite:///{tmp_path / 'q.db'}"
    users = write(tmp_path / "u.csv", "user,age\nu1,30\n")
    items = write(tmp_path / "i.csv", "item,title\ni1,One\n")
    for args in (["users", str(users)], ["items", str(items)]):
        res = run(runner, db, "ingest", *args, "--quiet", "--json")
        assert res.exit_code == 0 and json.loads(res.stdout), res.output


def test_a_full_retrain_that_drift_forces_keeps_the_replaced_versions_seed(runner, cli_db, tmp_path):
    """`cfb retrain` without --seed: a first model gets 42; a full retrain forced by drift keeps the seed
    of the version it replaces (it used to be 42 again), and --full without --seed is 42. Likewise its
    §7 measurement: a version trained without one is replaced without one (the default 0.2 measured it:
    a second training, minutes at size), one trained with --valid-pct 0.1 with 0.1."""
    args = ["--factors", "8", "--epochs", "3", "--valid-pct", "0", "--json"]
    assert json.loads(run(runner, cli_db, "retrain", "--full", "--seed", "7", *args).stdout)["hyperparams"]["seed"] == 7
    planted = planted_ratings()
    for k, shift in enumerate((6, 7)):
        planted.ratings.assign(rating=(shift - planted.ratings.rating).clip(1, 5)).to_csv(tmp_path / "s.csv", index=False)
        assert run(runner, cli_db, "ingest", "ratings", str(tmp_path / "s.csv")).exit_code == 0
        out = json.loads(run(runner, cli_db, "retrain", "--json").stdout)
        assert out["mode"] == "full" and "full retrain" in out["reason"] and out["hyperparams"]["seed"] == 7
        assert out.get("valid_pct") == (None, 0.1)[k], out.get("valid_pct")
        if k == 0:  # (the next one replaces a version measured on 0.1)
            assert run(runner, cli_db, "retrain", "--full", "--seed", "7", "--factors", "8", "--epochs", "3",
                       "--valid-pct", "0.1").exit_code == 0
    assert json.loads(run(runner, cli_db, "retrain", "--full", *args).stdout)["hyperparams"]["seed"] == 42


def test_text_output_writes_a_titles_control_characters_as_escapes(runner, cli_db, tmp_path):
    """A title may hold a line break or a terminal escape code (`cfb ingest items` takes any text): each
    text listing keeps one line per item and writes them as escapes; --json keeps the title as it is."""
    title = "Two\nLines\x1b[31mRED"
    items = write(tmp_path / "titles.csv", 'item,title\na1,"Two\nLines\x1b[31mRED"\n')
    assert run(runner, cli_db, "ingest", "items", str(items), "--quiet").exit_code == 0
    listed = 0
    for args in (["similar", "a2", "-n", "100"], ["recommend", "b1", "-n", "100"], ["inspect", "biases", "-n", "100"],
                 ["inspect", "pca", "-n", "100"], ["questionnaire", "--budget", "30"]):
        res = run(runner, cli_db, *args)
        assert res.exit_code == 0, res.output
        assert "\x1b" not in res.output and "Lines" not in res.output.replace("Two\\nLines", ""), args
        out = json.loads(run(runner, cli_db, *args, "--json").stdout)
        if json.dumps(title, ensure_ascii=False) in json.dumps(out, ensure_ascii=False):  # (the item is in this listing: b1 may have rated it)
            assert "Two\\nLines\\x1b[31mRED" in res.output, args
            listed += 1
    assert listed >= 4
    answers = write(tmp_path / "a.json", json.dumps({"user": "esc\x1b[31mX", "ratings": {"a2": 5}}))  # (an id may hold one)
    for args in (["onboard", "--answers", str(answers)], ["rate", "esc\x1b[31mX", "a3", "4"],
                 ["recommend", "esc\x1b[31mX", "-n", "3"]):
        res = run(runner, cli_db, *args)
        assert res.exit_code == 0 and "\x1b" not in res.output and "esc\\x1b[31mX" in res.output, res.output


def test_a_title_hint_quoting_a_title_with_a_line_break_stays_one_line(trained, tmp_path):
    """A stored title may hold a line break or an escape code (a CSV's quoted cell): the error's
    "did you mean" writes it escaped, as every other quoted text is, so the error stays one line."""
    from cfb.service.serving import title_hint

    assert title_hint("Evil Title (1999)", ["Evil\nTitle (1999)", "Bad\x1b[31m (1999)"]) == \
        "; did you mean: Evil\\nTitle (1999)?"
    engine, _ = trained
    url = str(engine.url)
    res = CliRunner().invoke(cli, ["--db", url, "ingest", "items", str(write(tmp_path / "i.csv",
                                                                             'item,title\nz4,"Evil\nTitle (1999)"\n'))])
    assert res.exit_code == 0, res.output
    for args in (["similar", "Evil Title (1999)"], ["rate", "a0", "Evil Title (1999)", "3"]):
        res = CliRunner().invoke(cli, ["--db", url, *args])
        assert res.exit_code == 1 and res.stdout == "", res.output
        assert res.stderr.count("\n") == 1 and "did you mean: Evil\\nTitle (1999)" in res.stderr, res.stderr


def test_a_retrain_stopped_by_sigterm_says_so_and_releases_its_lock(cli_db):
    """`docker stop`, systemd and Kubernetes stop a job with SIGTERM: a retrain so stopped exits as on Ctrl-C
    (one line, status 128 + 15) with its lock released, so that a retrain on another host is not refused
    for the lock's stale time (it exited silently, by the signal, its lock left behind); the serving
    version stays."""
    import signal

    from sqlalchemy import create_engine, text

    engine = create_engine(cli_db)
    with engine.connect() as conn:
        serving = conn.execute(text("SELECT value FROM settings WHERE key = 'serving_version'")).scalar()
    exe = Path(sys.executable).with_name("cfb")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "cfb.cli"]
    proc = subprocess.Popen([*cmd, "--db", cli_db, "retrain", "--full", "--epochs", "50", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def lock() -> str | None:
        with engine.connect() as conn:
            return conn.execute(text("SELECT value FROM settings WHERE key = 'retrain_lock'")).scalar()

    deadline = time.monotonic() + 120
    while lock() is None and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    time.sleep(1.0)  # (into its training)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err.decode()
    assert err.decode().splitlines()[-1:] == ["Aborted! (SIGTERM)"] and out == b""
    assert lock() is None
    with engine.connect() as conn:
        assert conn.execute(text("SELECT value FROM settings WHERE key = 'serving_version'")).scalar() == serving
    engine.dispose()


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_command_waiting_for_another_writer_stops_on_a_signal_at_once(cli_db, sig):
    """A `cfb rate` queued behind another SQLite writer (up to the 30 s busy timeout) ends on SIGTERM or
    Ctrl-C while it waits, not when the other writer lets go (SQLite's wait ran in C, where Python's
    signal handlers cannot run); nothing is written."""
    import signal
    import sqlite3

    holder = sqlite3.connect(cli_db.removeprefix("sqlite:///"), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another writer, holding the database for the whole test
    try:
        count = holder.execute("SELECT count(*) FROM ratings").fetchone()[0]
        exe = Path(sys.executable).with_name("cfb")
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "cfb.cli"]
        proc = subprocess.Popen([*cmd, "--db", cli_db, "rate", "a0", "a1", "3"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        time.sleep(4.0)  # (its imports, then into its wait)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(getattr(signal, sig))
        try:
            _, err = proc.communicate(timeout=10)  # (well inside the 30 s the other writer still holds)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError(f"{sig} was not handled while the command waited for the database") from None
        assert proc.returncode == (128 + signal.SIGTERM if sig == "SIGTERM" else 1), err.decode()
        assert err.decode().splitlines()[-1].startswith("Aborted!")
        assert holder.execute("SELECT count(*) FROM ratings").fetchone()[0] == count
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_output_piped_into_a_reader_that_stops_early_ends_quietly(cli_db, tmp_path):
    """`cfb predict … | head -1`: a closed pipe ends the command without an error line (one-line errors for
    any OSError made it "Error: Broken pipe")."""
    pairs = write(tmp_path / "pairs.csv", "user,item\n" + "a0,a1\n" * 20000)
    exe = Path(sys.executable).with_name("cfb")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "cfb.cli"]
    proc = subprocess.Popen([*cmd, "--db", cli_db, "predict", "--pairs", str(pairs)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()  # (what `head -1` does)
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert "Error" not in err and "Traceback" not in err, err


def test_eval_orders_budgets_and_refuses_too_few_users_before_any_note(runner, tmp_path):
    """Budget columns came in the order given (the fold-in's steps were sorted); data of four users got a
    note on its cold users' histories before the error that none can be cold."""
    folder = write_planted_ml100k(tmp_path / "ml-100k")
    res = runner.invoke(cli, ["eval", "cold-start", "--data", str(folder), "--seeds", "42", "--budgets", "5,0",
                              "--fold-steps", "", "--json"])
    assert res.exit_code == 0, res.output
    assert list(json.loads(res.stdout)["per_seed"][0]["budgets"]) == ["0", "5"]
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    write(tiny / "u.data", "".join(f"{u}\t{i}\t4\t{u * 10 + i}\n" for u in range(1, 5) for i in range(1, 4)))
    write(tiny / "u.item", "".join(f"{i}|Film {i} (1990)|01-Jan-1990||http://x|{'|'.join(['0'] * 19)}\n"
                                   for i in range(1, 4)), "latin-1")
    res = runner.invoke(cli, ["eval", "cold-start", "--data", str(tiny), "--seeds", "42"])
    lines = res.stderr.splitlines()
    assert res.exit_code == 1 and res.stdout == "" and len(lines) == 2 and lines[0].startswith("running the protocol")
    assert lines[1] == "Error: the protocol makes a fifth of the users new (§1): the data's 4 users make none (it " \
                       "needs at least 5)"


def test_ratings_are_listed_by_when_they_were_given_not_by_the_files_order(runner, cli_db, tmp_path):
    """A release's ratings are written in its file's order, not in time order: "newest first" is by their
    timestamps (the order written breaks ties; a rating without a time counts as older than any with one),
    and a rating given now comes first."""
    body = "user,item,rating,timestamp\nt1,a1,4,300\nt1,a2,3,100\nt1,a3,5,200\nt1,a4,2,\nt1,a5,1,200\n"
    assert run(runner, cli_db, "ingest", "ratings", str(write(tmp_path / "r.csv", body))).exit_code == 0
    listed = lambda: [r["item"] for r in json.loads(run(runner, cli_db, "ratings", "t1", "--json").stdout)["ratings"]]  # noqa: E731
    assert listed() == ["a1", "a5", "a3", "a2", "a4"]
    assert run(runner, cli_db, "rate", "t1", "a2", "5").exit_code == 0
    assert listed() == ["a2", "a1", "a5", "a3", "a4"]


def test_ratings_lists_a_users_latest_ratings_newest_first(runner, cli_db):
    """`cfb ratings USER`: what a user has rated, newest first (a rating changed moves to the top), with the
    count; the same from Python and over HTTP."""
    import cfb

    everything = json.loads(run(runner, cli_db, "ratings", "a0", "-n", "1000", "--json").stdout)
    assert everything["user"] == "a0" and everything["count"] == len(everything["ratings"]) == 24
    oldest = everything["ratings"][-1]
    assert set(oldest) == {"item", "title", "rating"}
    changed = 1 if oldest["rating"] != 1 else 5
    assert run(runner, cli_db, "rate", "a0", oldest["item"], str(changed)).exit_code == 0
    res = run(runner, cli_db, "ratings", "a0", "-n", "2")
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()  # (these items have no titles: their ids stand in)
    assert lines[0] == "user a0 (rating, title, the latest 2 of 24 (-n for more)):"
    assert lines[1] == f"  {changed}  {oldest['item']}" and len(lines) == 3
    assert lines[2] == f"  {everything['ratings'][0]['rating']:g}  {everything['ratings'][0]['item']}"
    res = run(runner, cli_db, "ratings", "nobody")
    assert res.exit_code == 1 and res.output == "Error: unknown user 'nobody'\n"
    with cfb.open(cli_db) as db:
        frame = db.ratings("a0", n=2)
        assert list(frame.columns) == ["item", "title", "rating"] and frame["item"].tolist()[0] == oldest["item"]
        assert frame["rating"].tolist()[0] == changed


@pytest.mark.parametrize("url", ["postgresql+psycopg:/cfb:s3cret@localhost/x", "postgresql+psycopg:cfb:s3cret@localhost",
                                 "POSTGRESQL:cfb:s3cret@localhost/x", "sqlite:/tmp/x.db", "postgresql//cfb:s3cret@h/x",
                                 "postgresql:cfb:p@s3cret@h/x", "postgresql:/h/x?password=s3cret"])
def test_a_url_missing_its_slashes_is_refused_not_a_file_named_by_it(runner, url, tmp_path, monkeypatch):
    """A known backend's name and a colon, without ``//``: a mistyped URL, not a SQLite file's path (an
    ingest made a file named "postgresql+psycopg:cfb:s3cret@localhost" in the working directory, and
    errors echoed the password)."""
    import cfb

    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.csv").write_text("user,item,rating\nu1,i1,4\nu2,i1,3\n")
    for args in (["recommend", "1"], ["ingest", "ratings", "r.csv"]):
        res = run(runner, url, *args)
        assert res.exit_code == 1 and res.output.startswith("Error: invalid database URL "), res.output
        assert "expected backend://" in res.output and "s3cret" not in res.output, res.output
    with pytest.raises(cfb.CfbError, match=r"^invalid database URL "):
        cfb.open(url)
    assert [p.name for p in tmp_path.iterdir()] == ["r.csv"]
