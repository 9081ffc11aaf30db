"""What is stored stays consistent with what the model knows: attribute types and merges on ingest, a
rating scale that can be told, number answers in a range the model can use, lookups that read ids as
the readers do, and catalogue items from metadata in every kind of version."""
from __future__ import annotations

import json

import pandas as pd
import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from cfb.cf_core.errors import CfbError, InputError
from cfb.cli.main import cli
from cfb.db.schema import Item, Rating, User
from cfb.db.sources import Dataset, read_items_csv, read_ratings_csv, read_users_csv
from cfb.service.incremental import retrain_incremental
from cfb.service.ingest import ingest_dataset, upsert_items
from cfb.service.onboard import onboard, questionnaire_json
from cfb.service.serving import predict_pairs, recommend
from cfb.service.training import retrain_full

from .conftest import FAST, write


def stored_attributes(engine, user: str) -> dict:
    with engine.connect() as conn:
        return conn.scalar(select(User.attributes).where(User.external_id == user))


def users_file(engine, tmp_path, body: str, name: str = "u.csv") -> dict:
    path = write(tmp_path / name, body)
    return ingest_dataset(engine, Dataset(pd.DataFrame(columns=["user", "item", "rating", "timestamp"]),
                                          users=read_users_csv(path)), source=str(path))


def test_a_text_cell_cannot_turn_a_number_attribute_into_text(trained, tmp_path):
    """The planted users hold age as numbers: a file whose age column has one word in it is refused
    (file, line, field) with nothing written; a number given as text is stored as a number."""
    engine, _ = trained
    with pytest.raises(InputError, match=r"u.csv, line 3, field 'age': 'abc' is not a number"):
        users_file(engine, tmp_path, "user,age,gender\nnu5,31,F\nnu6,abc,F\n")
    assert stored_attributes(engine, "nu5") is None
    for cell in ("30s", "c.1991"):  # (digits in it once let it through as text: age became a category)
        with pytest.raises(InputError, match=rf"u.csv, line 2, field 'age': '{cell}' is not a number, and the "
                                             r"stored users hold age as numbers"):
            users_file(engine, tmp_path, f"user,age\nnu5,{cell}\n")
    users = pd.DataFrame({"user": ["nu5"], "attributes": [{"age": "31"}]})  # (the CSV reader makes it 31 itself)
    ingest_dataset(engine, Dataset(pd.DataFrame(columns=["user", "item", "rating", "timestamp"]), users=users))
    assert stored_attributes(engine, "nu5") == {"age": 31}
    with pytest.raises(InputError, match=r"field 'age': \['x'\] is not a number, .*\(user 'nu6'\)"):
        ingest_dataset(engine, Dataset(pd.DataFrame(columns=["user", "item", "rating", "timestamp"]),
                                       users=pd.DataFrame({"user": ["nu6"], "attributes": [{"age": ["x"]}]})))
    # another notation of a finite number is that number; an infinite or undefined one is refused
    users_file(engine, tmp_path, "user,age\nnu7,1e2\nnu8,+4\n", "e.csv")
    assert (stored_attributes(engine, "nu7"), stored_attributes(engine, "nu8")) == ({"age": 100}, {"age": 4})
    for bad, said in (("inf", "not a finite number"), ("1e400", "larger than a 32-bit float holds"),
                      ("NaN", "not a finite number")):
        with pytest.raises(InputError, match=rf"line 2, field 'age': '{bad}' is {said}"):
            users_file(engine, tmp_path, f"user,age\nnu9,{bad}\n", "bad.csv")
    assert stored_attributes(engine, "nu9") is None


def test_codes_stay_text_and_a_corrected_file_can_change_a_type(engine, tmp_path):
    """A code with a leading zero in a column stored as numbers is refused, as any text is there (an age
    "07" turned the age question into free text at the next retrain); a file giving the column again for
    every user stores it as text. Ages first stored as text (a code with digits kept the column text)
    become numbers when every stored age is corrected. A word in a first file's column of numbers is
    refused, as it would be in a later file's."""
    with pytest.raises(InputError, match=r"line 3, field 'age': 'unknown' is not a number, and the column's other"):
        users_file(engine, tmp_path, "user,zip,age\nu1,55105,31\nu2,40206,unknown\n")
    users_file(engine, tmp_path, "user,zip,age\nu1,55105,31\nu2,40206,40s\n")
    assert stored_attributes(engine, "u2") == {"zip": 40206, "age": "40s"}
    for code in ("02139", "07", "02139-4307"):
        with pytest.raises(InputError, match=rf"zip.csv, line 2, field 'zip': '{code}' is a code with a leading zero, "
                                             r"not a number, and the stored users hold zip as numbers \(to hold zip "
                                             r"as text, give it again for every user that has it\)"):
            users_file(engine, tmp_path, f"user,zip\nu3,{code}\n", "zip.csv")
    assert stored_attributes(engine, "u3") is None
    users_file(engine, tmp_path, "user,zip\nu1,55105\nu2,40206\nu3,02139\n", "zips.csv")
    assert [stored_attributes(engine, u)["zip"] for u in ("u1", "u2", "u3")] == ["55105", "40206", "02139"]
    users_file(engine, tmp_path, "user,age\nu1,31\nu2,45\n", "fixed.csv")
    assert stored_attributes(engine, "u2") == {"zip": "40206", "age": 45}
    assert stored_attributes(engine, "u1") == {"zip": "55105", "age": 31}
    for band in ("25-34", "18 24"):  # (no leading zero: not a code; as text it made age a category)
        with pytest.raises(InputError, match=rf"band.csv, line 2, field 'age': '{band}' is not a number"):
            users_file(engine, tmp_path, f"user,age\nu1,{band}\n", "band.csv")
    assert stored_attributes(engine, "u1") == {"zip": "55105", "age": 31}


def test_ingested_attributes_merge_over_the_stored_ones(trained, tmp_path):
    engine, _ = trained
    before = stored_attributes(engine, "a0")
    out = users_file(engine, tmp_path, "user,zip\na0,02139\n")
    assert stored_attributes(engine, "a0") == {**before, "zip": "02139"}
    assert (out["users"], out["new_users"]) == (1, 0)
    # text attributes stay text: a later all-digit zip is stored as its text, not as a number
    users_file(engine, tmp_path, "user,zip\na2,55105\n", "zip2.csv")
    assert stored_attributes(engine, "a2")["zip"] == "55105"


def test_item_metadata_is_typed_and_merged_as_user_attributes_are(engine, tmp_path):
    ingest_dataset(engine, Dataset(pd.DataFrame([{"user": "u", "item": "i1", "rating": 4.0, "timestamp": 1},
                                                 {"user": "u", "item": "i2", "rating": 2.0, "timestamp": 2}]),
                                   scale=(1.0, 5.0)))
    upsert_items(engine, read_items_csv(write(tmp_path / "a.csv", "item,title,year,genres\ni1,One,1990,A|B\n")))
    upsert_items(engine, read_items_csv(write(tmp_path / "one.csv", "item,genres\ni2,Drama\n")))  # no '|': one genre
    with pytest.raises(InputError, match=r"b.csv, line 2, field 'year': 'soon' is not a number"):
        path = write(tmp_path / "b.csv", "item,year\ni2,soon\n")
        upsert_items(engine, read_items_csv(path), source=str(path))
    with pytest.raises(InputError, match=r"z.csv, line 2, field 'year': '02001' is a code with a leading zero"):
        path = write(tmp_path / "z.csv", "item,year\ni2,02001\n")
        upsert_items(engine, read_items_csv(path), source=str(path))
    out = upsert_items(engine, read_items_csv(write(tmp_path / "c.csv", "item,year\ni1,1991\n")))
    assert out == {"items": 1, "added": 0, "updated": 1, "unchanged": 0, "shared_titles": []}
    from cfb.db import store

    with engine.connect() as conn:
        ids = store.id_map(conn, store.Item)
        assert store.item_attributes(conn, [ids["i1"]])[ids["i1"]] == {"year": 1991, "genres": ["A", "B"]}
        assert store.item_attributes(conn, [ids["i2"]])[ids["i2"]] == {"genres": ["Drama"]}
        assert store.item_titles(conn, [ids["i1"]])[ids["i1"]] == ("i1", "One")


def test_a_scale_cannot_be_told_from_ratings_that_are_all_the_same(engine, tmp_path):
    path = write(tmp_path / "same.csv", "user,item,rating\nu1,i1,4\nu2,i1,4\n")
    with pytest.raises(InputError, match=r"same.csv: every rating is 4, so the rating scale cannot be told"):
        ingest_dataset(engine, Dataset(read_ratings_csv(path)), source=str(path))
    out = ingest_dataset(engine, Dataset(read_ratings_csv(path)), scale=(1, 5), source=str(path))
    assert out["scale"] == [1.0, 5.0]


@pytest.mark.parametrize("age, message", [(1e308, r"1e\+308 is out of range: this model takes 0\.\.\d+"),
                                          (-5, r"-5 is out of range"), (10_000, "10000 is out of range")])
def test_number_answers_outside_what_the_model_can_use_are_refused(trained, age, message):
    engine, _ = trained
    with engine.connect() as conn:
        (q,) = [a for a in questionnaire_json(conn)["attributes"] if a["name"] == "age"]
    lo, hi = q["range"]
    assert 18 <= lo < hi < 60 and q["accepts"][0] == 0 and q["accepts"][1] > hi
    with pytest.raises(InputError, match=rf"entry 1, field 'answers.age': {message}"):
        onboard(engine, [("entry 1", {"user": "old", "answers": {"age": age}})])
    onboard(engine, [("entry 1", {"user": "old", "answers": {"age": q["accepts"][1]}})])  # the bound itself
    with engine.connect() as conn:
        assert len(recommend(conn, "old", n=5)["items"]) == 5


def test_lookups_read_ids_as_the_readers_store_them(trained):
    engine, _ = trained
    onboard(engine, [("entry 1", {"user": "  spaced  ", "answers": {"gender": "F"}})])
    with engine.connect() as conn:
        assert recommend(conn, "  spaced  ", n=3)["items"] == recommend(conn, "spaced", n=3)["items"]
        by_title = predict_pairs(conn, [("a0", "Alpha film 1")])
        assert by_title == predict_pairs(conn, [("a0", "a1")])
        for n in (0, -3, 1001, 2.5, True):
            with pytest.raises(CfbError, match="n must be a whole number from 1 to 1000"):
                recommend(conn, "a0", n=n)
        with pytest.raises(CfbError, match="by must be 'rank' or 'rating'"):
            recommend(conn, "a0", by="title")


def test_an_ambiguous_title_names_its_items(trained):
    engine, _ = trained
    upsert_items(engine, pd.DataFrame({"item": ["twin"], "title": ["Alpha film 1"], "attributes": [{}]}))
    with engine.connect() as conn:
        with pytest.raises(CfbError, match=r"row 1: 2 items are titled 'Alpha film 1' \(a1, twin\); use an item id"):
            predict_pairs(conn, [("a0", "Alpha film 1")])
    with pytest.raises(InputError, match=r"ambiguous title \(items a1, twin\); use the item id"):
        onboard(engine, [("entry 1", {"ratings": {"Alpha film 1": 4}})])
    from cfb.service.ratings import rate_item

    with engine.connect() as conn:  # `cfb rate --new-item` with the title: no third item named by the title
        items = conn.scalar(select(func.count()).select_from(Item))
    with pytest.raises(CfbError, match=r"2 items are titled 'Alpha film 1' \(a1, twin\); use an item id"):
        rate_item(engine, "a0", "Alpha film 1", 4, create_item=True)
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(Item)) == items


def test_a_rating_written_again_with_the_same_value_is_not_new(trained):
    engine, _ = trained
    first = {"user": "a0", "item": "a1", "rating": 2.0, "timestamp": 1}  # (new or changed: a-users like a-items)
    assert ingest_dataset(engine, Dataset(pd.DataFrame([first])))["new_ratings"] == 1
    assert retrain_incremental(engine)["new_ratings"] == 1
    with engine.connect() as conn:
        seq = conn.scalar(select(Rating.seq).order_by(Rating.seq.desc()).limit(1))
    again = {**first, "timestamp": 99}  # as `cfb rate` writes it again, beside one changed rating
    changed = {"user": "a0", "item": "a-new", "rating": 1.0, "timestamp": 99}
    out = ingest_dataset(engine, Dataset(pd.DataFrame([again])))
    assert (out["ratings"], out["new_ratings"]) == (1, 0)
    assert retrain_incremental(engine)["mode"] == "none"
    with engine.connect() as conn:
        assert conn.scalar(select(Rating.seq).order_by(Rating.seq.desc()).limit(1)) == seq
    out = ingest_dataset(engine, Dataset(pd.DataFrame([again, changed])))
    assert (out["ratings"], out["new_ratings"]) == (2, 1)
    # stored without a time, then given again with one: the time is filled in, the rating is not new
    untimed = {"user": "a0", "item": "a-untimed", "rating": 3.0, "timestamp": None}
    ingest_dataset(engine, Dataset(pd.DataFrame([untimed])))
    retrain_incremental(engine)
    with engine.connect() as conn:
        before = conn.execute(select(Rating.seq, Rating.timestamp, Rating.prev_rating).order_by(Rating.seq.desc())
                              .limit(1)).one()
    assert before.timestamp is None
    assert ingest_dataset(engine, Dataset(pd.DataFrame([{**untimed, "timestamp": 7}])))["new_ratings"] == 0
    assert retrain_incremental(engine)["mode"] == "none"
    with engine.connect() as conn:
        after = conn.execute(select(Rating.seq, Rating.timestamp, Rating.prev_rating).order_by(Rating.seq.desc())
                             .limit(1)).one()
    assert (after.seq, after.timestamp, after.prev_rating) == (before.seq, 7, before.prev_rating)


def test_a_rating_rated_as_it_was_ingested_is_not_new(engine, tmp_path):
    """An ingest reads ratings as 32-bit floats (3.7 is 3.700000047683716) and `cfb rate` takes a
    float: both store the same value, so rating a pair as it was ingested, or ingesting the file again
    after, changes nothing (no new seq, nothing in the replaced log), and the rating is shown as typed."""
    from cfb.db.schema import ReplacedRating
    from cfb.service.ratings import rate_item

    path = write(tmp_path / "r.csv", "user,item,rating\na,x,3.7\na,y,2\nb,x,4\nb,y,1.3\n")
    ingest_dataset(engine, Dataset(read_ratings_csv(path)), scale=(1.0, 5.0))

    def rows():  # noqa: ANN202
        with engine.connect() as conn:
            return (conn.execute(select(Rating.rating, Rating.seq, Rating.prev_rating).order_by(Rating.seq)).all(),
                    conn.execute(select(ReplacedRating)).all())

    before = rows()
    assert rate_item(engine, "a", "x", 3.7)["rating"] == 3.7 and rate_item(engine, "b", "y", 1.3)["rating"] == 1.3
    assert rows() == before
    assert ingest_dataset(engine, Dataset(read_ratings_csv(path)))["new_ratings"] == 0 and rows() == before
    assert rate_item(engine, "a", "x", 3.8)["rating"] == 3.8 and rows() != before


def test_a_rating_no_32_bit_float_holds_is_refused_before_any_scale(engine, tmp_path):
    """A database of users only has no scale yet: a rating of 1e39 is refused (it was stored as Infinity,
    and the HTTP endpoint answered 500 after writing it), one of 1e38 is a rating."""
    from cfb.service.ratings import rate_item

    users_file(engine, tmp_path, "user,zip\nu1,55105\n")
    with pytest.raises(CfbError, match=r"^rating 1e\+39 is larger than a 32-bit float holds \(3.4e38\)$"):
        rate_item(engine, "u1", "x", 1e39, create_item=True)
    assert rate_item(engine, "u1", "x", 1e38, create_item=True)["rating"] == 1e38


def test_a_text_category_is_metadata_a_new_item_starts_from(engine, planted):
    """A catalogue whose only metadata is one text category per item (a genre, a language code): an
    item with it and no rating is added from it and ranked for the users its category suits. Free
    text (more than the questionnaire's 40 values, MovieLens 100k's release dates) is left out."""
    from cfb.cf_core.fit import metadata_names

    genre = {i: ("Alpha" if i.startswith("a") else "Beta") for i in planted.items.item}
    items = planted.items.assign(attributes=[{"genre": genre[i], "code": f"c{k}"}
                                             for k, i in enumerate(planted.items.item)])
    assert metadata_names(list(items.attributes)) == ("code", "genre")  # (40 codes: still a category)
    assert metadata_names(list(items.attributes) + [{"code": "c40"}]) == ("genre",)  # (41: free text)
    items = items.assign(attributes=[{"genre": a["genre"]} for a in items.attributes])
    unrated = pd.DataFrame({"item": ["newA", "newB"], "title": ["New Alpha", "New Beta"],
                            "attributes": [{"genre": "Alpha"}, {"genre": "Beta"}]})
    ingest_dataset(engine, Dataset(planted.ratings, pd.concat([items, unrated]), planted.users, planted.scale))
    report = retrain_full(engine, progress=False, **FAST)
    assert report["items_from_metadata"] == 2
    with engine.connect() as conn:
        for user, liked, other in (("a0", "newA", "newB"), ("b1", "newB", "newA")):
            ranked = [r["item"] for r in recommend(conn, user, n=42)["items"]]
            assert ranked.index(liked) < ranked.index(other), (user, ranked)


@pytest.mark.parametrize("kind", ["dot", "nn"])
def test_catalogue_items_with_metadata_are_served_after_any_retrain(engine, planted, kind):
    """An item with metadata and no rating is in the version a full retrain makes (dot or nn), and in
    the next incremental one when it comes later."""
    genre = {i: ("A" if i.startswith("a") else "B") for i in planted.items.item}
    items = planted.items.assign(attributes=[{"genres": [genre[i]], "year": 1990} for i in planted.items.item])
    unrated = pd.DataFrame({"item": ["newA"], "title": ["New Alpha"], "attributes": [{"genres": ["A"], "year": 1991}]})
    ingest_dataset(engine, Dataset(planted.ratings, pd.concat([items, unrated]), planted.users, planted.scale))
    report = retrain_full(engine, kind=kind, progress=False, **FAST)
    assert report["items_from_metadata"] == 1
    with engine.connect() as conn:
        assert "newA" in {r["item"] for r in recommend(conn, "a0", n=41)["items"]}
    upsert_items(engine, pd.DataFrame({"item": ["newB"], "title": ["New Beta"],
                                       "attributes": [{"genres": ["B"], "year": 1991}]}))
    assert retrain_incremental(engine)["items_from_metadata"] == 1
    with engine.connect() as conn:
        assert "newB" in {r["item"] for r in recommend(conn, "b1", n=42)["items"]}
        (pred,) = predict_pairs(conn, [("b1", "newB")])
    assert 1.0 <= pred <= 5.0


def test_an_unusable_home_folder_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CFB_HOME", str(write(tmp_path / "a-file", "")))
    ratings = write(tmp_path / "r.csv", "user,item,rating\nu1,i1,4\n")
    res = CliRunner().invoke(cli, ["ingest", "ratings", str(ratings)])
    assert res.exit_code == 1 and res.output.startswith("Error: cannot create cfb's folder")
    assert len(res.output.strip().splitlines()) == 1
    res = CliRunner().invoke(cli, ["models"])
    assert res.exit_code == 1 and res.output.startswith("Error: no database at")


def test_a_command_that_only_reads_makes_no_home_folder(tmp_path, monkeypatch):
    """Only a command that writes the default database makes $CFB_HOME: a mistyped `cfb recommend` on
    a fresh machine leaves nothing behind."""
    home = tmp_path / "fresh" / "home"
    monkeypatch.setenv("CFB_HOME", str(home))
    for args in (["recommend", "1"], ["models"], ["similar", "1"]):
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 1 and "no database at" in res.output
    assert not (tmp_path / "fresh").exists()
    ratings = write(tmp_path / "r.csv", "user,item,rating\nu1,i1,4\n")
    assert CliRunner().invoke(cli, ["ingest", "ratings", str(ratings), "--scale", "1,5"]).exit_code == 0
    assert (home / "cfb.db").is_file()


@pytest.mark.parametrize("body, line, message", [
    ("user,item,rating\nu1,i1,4\nu2,i2,3,9,9\n", 3, "expected 3 fields, found 5"),
    ('user,item,rating\nu1,i1,4\n"u2,i2,3\nu3,i3,4\n', 3, "malformed CSV in the record that starts here"),
])
def test_malformed_rating_files_name_their_line(tmp_path, body, line, message):
    with pytest.raises(InputError, match=rf"r.csv, line {line}: {message}"):
        read_ratings_csv(write(tmp_path / "r.csv", body))


def test_skipped_entries_are_reported_once(tmp_path, trained):
    engine, _ = trained
    path = write(tmp_path / "mixed.json", json.dumps([{"user": "ok1", "answers": {"gender": "F"}},
                                                      {"user": "bad", "answers": {"age": "old"}}]))
    res = CliRunner().invoke(cli, ["--db", str(engine.url), "onboard", "--answers", str(path), "--skip-invalid"])
    assert res.exit_code == 1  # stdout: the new ids alone (a script reads them); stderr: what was skipped
    assert res.stdout.splitlines() == ["ok1"]
    assert res.stderr.splitlines() == [f"skipped: {path}: entry 2, field 'answers.age': expected a number, got 'old'"]
    both_bad = write(tmp_path / "bad.json", json.dumps([{"user": "bad", "answers": {"age": "old"}}]))
    res = CliRunner().invoke(cli, ["--db", str(engine.url), "onboard", "--answers", str(both_bad), "--skip-invalid"])
    assert res.exit_code == 1 and res.stdout == "" and res.stderr.startswith("skipped: ")


@pytest.mark.parametrize("body, where", [
    ('{"user": "d", "answers": {"age": 30, "age": 40}}\n', "entry 1, field 'answers.age'"),
    ('{"user": "d1"}\n{"user": "d2", "user": "d3"}\n', "line 2, field 'user'"),
    (json.dumps([{"user": "d1"}, {"user": "d2", "ratings": {"a1": 4}}], indent=2).replace('"a1": 4', '"a1": 4, "a1": 5'),
     r"entry 2, field 'ratings\.a1'"),
])
def test_a_key_given_twice_is_refused_naming_entry_and_field(trained, tmp_path, body, where):
    from cfb.service.onboard import onboard, read_answers_file

    engine, _ = trained
    with pytest.raises(InputError, match=rf"q.json: {where}: key '\w+' given twice in one object"):
        onboard(engine, read_answers_file(write(tmp_path / "q.json", body)))


def test_an_items_file_giving_a_title_another_item_holds_says_so(trained, db_url, tmp_path):
    """A new item titled as a stored one (or as another in the file, in another Unicode form) is allowed,
    as two books may share a title, but was added in silence, and lookups by that title then failed."""
    path = write(tmp_path / "items.csv", "item,title\nsw2,Alpha film 1\nc1,Caf\u00e9 Noir\nc2,Cafe\u0301 Noir\nc3,Unique\n")
    res = CliRunner().invoke(cli, ["--db", db_url, "ingest", "items", str(path)])
    assert res.exit_code == 0, res.output
    assert res.stdout == "4 items added, 0 updated, 0 unchanged\n"
    assert res.stderr.splitlines() == [
        "note: title 'Alpha film 1' is now held by 2 items (a1, sw2): look them up by id",
        "note: title 'Caf\u00e9 Noir' is now held by 2 items (c1, c2): look them up by id"]
    out = json.loads(CliRunner().invoke(
        cli, ["--db", db_url, "ingest", "items", str(write(tmp_path / "more.csv", "item,title\nc4,Unique 2\n")),
              "--json"]).stdout)
    assert out["shared_titles"] == [] and out["added"] == 1
