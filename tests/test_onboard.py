"""Onboarding: answers determine taste; bad answer files fail cleanly with nothing stored."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from sqlalchemy import func, select

from cfb.bootstrap.questionnaire import choose_items

from cfb.cf_core.errors import CfbError, InputError
from cfb.db.schema import Answer, Rating, User
from cfb.service.onboard import onboard, questionnaire_json, read_answers_file
from cfb.service.serving import predict_pairs, recommend

from .conftest import write


def counts(engine) -> tuple[int, int, int]:
    with engine.connect() as conn:
        return tuple(conn.scalar(select(func.count()).select_from(t)) for t in (User, Rating, Answer))


def test_questionnaire_asks_the_most_liked_items_first():
    """Item 0 is rated most, item 1 liked most (top quarter of the scale): asked first. On a 1..10
    scale a 5 is not a "liked", and the most-rated item leads again."""
    items = np.array([0] * 5 + [1] * 4 + [2])
    ratings = np.array([2.0] * 5 + [5.0] * 4 + [1.0])
    assert choose_items(items, ratings, 4, 3) == [1, 0, 2]
    assert choose_items(items, ratings, 4, 3, "popularity") == [0, 1, 2]
    assert choose_items(items, ratings, 4, 2, scale=(1.0, 10.0)) == [0, 1]
    with pytest.raises(ValueError, match="unknown questionnaire strategy"):
        choose_items(items, ratings, 4, 2, "newest")
    # items alike in likes and ratings are asked in the order ``tie`` gives (the items' ids as text: the
    # protocol's ties), else by inner index
    tied = np.array([0, 0, 1, 1, 2, 2])
    assert choose_items(tied, np.full(6, 5.0), 3, 3) == [0, 1, 2]
    assert choose_items(tied, np.full(6, 5.0), 3, 3, tie=np.array([2, 0, 1])) == [1, 2, 0]


def test_an_attribute_whose_every_value_is_its_own_is_text_not_a_closed_list():
    """40 users with 40 zip codes: a category of them would refuse every new user's zip code."""
    from cfb.bootstrap.questionnaire import infer_questions

    users = [{"gender": "MF"[k % 2], "zip": f"{k:05d}", "age": 20 + k} for k in range(40)]
    kinds = {q.name: q.type for q in infer_questions(users)}
    assert kinds == {"gender": "category", "zip": "text", "age": "number"}
    assert [q.values for q in infer_questions(users) if q.name == "gender"] == [["F", "M"]]
    assert [q.type for q in infer_questions([{"gender": "M"}, {"gender": "F"}])] == ["category"]  # (a tiny demo)
    assert [q.type for q in infer_questions([{"zip": f"0{k}139"} for k in range(5)])] == ["text"]  # (five users)


def test_a_text_answer_is_at_most_255_characters():
    """A sign-up stored a 60,000-character zip code (only the request's 64 KiB bounded it); a text
    answer is at most as long as an id, and a longer stored one counts as unanswered."""
    from cfb.bootstrap.questionnaire import Question, Questionnaire

    zip_code = Question("zip", "text")
    assert zip_code.conform("x" * 255) == "x" * 255
    with pytest.raises(InputError, match=r"^entry 1, field 'answers.zip': a text answer is at most 255 characters, "
                                         r"got 60,000$"):
        zip_code.conform("x" * 60_000, "entry 1")
    assert Questionnaire([zip_code]).accepted_answers({"zip": "x" * 256}) == {}


def test_questionnaire_lists_attributes_and_items(trained):
    engine, _ = trained
    with engine.connect() as conn:
        q = questionnaire_json(conn, budget=5)
    assert {a["name"]: a["type"] for a in q["attributes"]} == {"age": "number", "gender": "category"}
    assert next(a for a in q["attributes"] if a["name"] == "gender")["values"] == ["F", "M"]
    assert len(q["items"]) == 5 and all(i["title"] for i in q["items"])
    with engine.connect() as conn, pytest.raises(CfbError, match=r"budget \(the items a questionnaire asks about\) must be a whole number from 0 to 30, got 31"):
        questionnaire_json(conn, budget=31)


@pytest.mark.parametrize("gender, group", [("F", "a"), ("M", "b")])
def test_answers_alone_give_the_groups_items(trained, tmp_path, gender, group):
    engine, _ = trained
    path = write(tmp_path / "q.json", json.dumps({"user": "new", "answers": {"gender": gender, "age": 30}}))
    out = onboard(engine, read_answers_file(path))
    assert out["onboarded"] == [{"user": "new", "ratings": 0}]
    with engine.connect() as conn:
        rec = recommend(conn, "new", n=5)
    assert [r["item"][0] for r in rec["items"]] == [group] * 5


def test_a_blank_answer_is_not_said(trained, tmp_path):
    """"gender": "" (a form's empty choice) is no answer, as null is: not refused, not stored as ""."""
    engine, _ = trained
    out = onboard(engine, [("e1", {"user": "blank", "answers": {"gender": " ", "age": 30}}),
                           ("e2", {"user": "null", "answers": {"gender": None, "age": 30}})])
    assert [o["user"] for o in out["onboarded"]] == ["blank", "null"]
    with engine.connect() as conn:
        stored = dict(conn.execute(select(User.external_id, User.attributes)
                                   .where(User.external_id.in_(["blank", "null"]))).all())
        assert stored["blank"] == stored["null"] == {"age": 30}
        assert recommend(conn, "blank", n=5) == {**recommend(conn, "null", n=5), "user": "blank"}


def test_ratings_fold_in_overrides_a_misleading_answer(trained, tmp_path):
    """A user who says M but loves the "a" films gets "a" films: their ratings outweigh the prior."""
    engine, _ = trained
    ratings = {f"Alpha film {i}": 5 for i in range(6)} | {f"Beta film {i}": 1 for i in range(20, 26)}
    path = write(tmp_path / "q.json", json.dumps({"user": "x", "answers": {"gender": "M"}, "ratings": ratings}))
    onboard(engine, read_answers_file(path))
    with engine.connect() as conn:
        rec = recommend(conn, "x", n=5)
        assert [r["item"][0] for r in rec["items"]] == ["a"] * 5
        high, low = predict_pairs(conn, [("x", "a10"), ("x", "b30")])
    assert high > low


@pytest.mark.parametrize("group", ["a", "b"])
def test_each_of_the_first_ratings_moves_an_unknown_user_to_their_group(trained, group):
    """No attributes at signup; then the user's first ratings, one at a time, each counted at once:
    after every one of them the top items are the group's."""
    from cfb.service.ratings import rate_item

    engine, _ = trained
    onboard(engine, [("e", {"user": "fresh", "answers": {}})])
    loved = [f"{group}{i}" for i in ((1, 3, 5) if group == "a" else (21, 23, 25))]
    for k, item in enumerate(loved, start=1):
        rate_item(engine, "fresh", item, 5.0)
        with engine.connect() as conn:
            rec = recommend(conn, "fresh", n=5)
        assert [r["item"][0] for r in rec["items"]] == [group] * 5, f"after {k} rating(s)"


def test_batch_formats_and_generated_ids(trained, tmp_path):
    engine, _ = trained
    lines = "\n".join(json.dumps({"answers": {"gender": g}}) for g in ("F", "M"))
    out = onboard(engine, read_answers_file(write(tmp_path / "q.jsonl", lines)))
    assert [u["user"] for u in out["onboarded"]] == ["new-61", "new-62"]
    listed = json.dumps([{"user": "l1", "answers": {}}, {"user": "l2", "answers": {"age": None}}])
    assert len(onboard(engine, read_answers_file(write(tmp_path / "q.json", listed)))["onboarded"]) == 2


def test_a_batch_reads_every_title_at_most_once_for_its_unknown_keys(trained, monkeypatch):
    """An unknown key is compared with every title composed (one an older cfb stored in neither Unicode
    form): read once for the batch, not once per key under the writers' lock (3.7x slower at 59k items)."""
    from cfb.db import store

    engine, _ = trained
    reads = []
    real = store.items_by_composed_title
    monkeypatch.setattr(store, "items_by_composed_title", lambda conn: reads.append(1) or real(conn))
    entries = [(f"e{k}", {"ratings": {f"Ünknown {k}": 4}}) for k in range(5)]
    out = onboard(engine, entries, skip_invalid=True)
    assert len(out["skipped"]) == 5 and len(reads) <= 2  # (validated before, then again under the lock)


def test_json_lines_break_at_newlines_alone(trained, tmp_path):
    """A JSON string may hold U+2028 or U+0085 as they are (JSON escapes neither): a JSON Lines entry
    holding one stays one entry (str.splitlines broke it in two, refused as invalid JSON)."""
    engine, _ = trained
    lines = json.dumps({"user": "odd\u2028id\u0085x"}, ensure_ascii=False) + "\n" + json.dumps({"user": "plain"})
    entries = read_answers_file(write(tmp_path / "q.jsonl", lines))
    assert [e["user"] for _, e in entries] == ["odd\u2028id\u0085x", "plain"]


@pytest.mark.parametrize("skip_invalid", [False, True])
def test_a_generated_id_never_takes_one_a_later_entry_names(trained, tmp_path, skip_invalid):
    """An entry without a user id gets new-N; a later entry of the same batch naming new-N keeps it."""
    engine, _ = trained
    before = counts(engine)
    path = write(tmp_path / "q.json", json.dumps([{"answers": {"gender": "F"}}, {"user": "new-61", "answers": {}}]))
    out = onboard(engine, read_answers_file(path), skip_invalid=skip_invalid)
    assert [u["user"] for u in out["onboarded"]] == ["new-62", "new-61"]
    assert counts(engine)[0] == before[0] + 2


def test_item_keys_are_stripped_and_a_near_miss_suggests_titles(trained, tmp_path):
    engine, _ = trained
    out = onboard(engine, read_answers_file(write(tmp_path / "q.json", json.dumps({"ratings": {" a1 ": 5}}))))
    with engine.connect() as conn:
        assert predict_pairs(conn, [(out["onboarded"][0]["user"], "a1")])
        assert conn.scalar(select(func.count()).select_from(Rating).join(User).where(
            User.external_id == out["onboarded"][0]["user"])) == 1
    path = write(tmp_path / "typo.json", json.dumps({"ratings": {"Alpha flim 1": 5}}))
    with pytest.raises(InputError, match=r"field 'ratings.Alpha flim 1': unknown item; did you mean: Alpha film 1"):
        onboard(engine, read_answers_file(path))


@pytest.mark.parametrize("entry, message", [
    ({"answers": {"shoe_size": 42}}, r"entry 2, field 'answers.shoe_size': unknown attribute"),
    ({"answers": {"age": "old"}}, r"entry 2, field 'answers.age': expected a number"),
    ({"answers": {"gender": "X"}}, r"entry 2, field 'answers.gender': 'X' is not one of F, M"),
    ({"ratings": {"a1": 9}}, r"entry 2, field 'ratings.a1': rating 9 outside the scale 1..5"),
    ({"ratings": {"No Such Film": 4}}, r"entry 2, field 'ratings.No Such Film': unknown item"),
    ({"ratings": {"a1": "five"}}, r"entry 2, field 'ratings.a1': rating must be a number"),
    ({"user": "a0"}, r"entry 2, field 'user': user 'a0' already exists"),
    ({"user": "first"}, r"entry 2, field 'user': user 'first' is signed up by an earlier entry"),
    ({"answers": []}, r"entry 2, field 'answers': 'answers' must be an object"),
    ({"ratings": []}, r"entry 2, field 'ratings': 'ratings' must be an object"),
    ({"colour": "red"}, r"entry 2, field 'colour': unknown key"),
    ({"asked": -1}, r"entry 2, field 'asked': 'asked' must be the number of questionnaire items shown, 0 to 30, got -1"),
    ({"asked": 31}, r"entry 2, field 'asked': .* got 31$"),
    ({"asked": 1.5}, r"entry 2, field 'asked': .* got 1.5$"),
    ({"asked": "5"}, r"entry 2, field 'asked': .* got '5'$"),
    ({"asked": True}, r"entry 2, field 'asked': .* got true$"),  # (as the JSON wrote it)
    ({"asked": [5]}, r"entry 2, field 'asked': .* got \[5\]$"),
    ({"version": 0}, r"entry 2, field 'version': 'version' must be the model version whose questionnaire was shown, got 0$"),
    ({"version": "1"}, r"entry 2, field 'version': .* got '1'$"),
    ({"version": True}, r"entry 2, field 'version': .* got true$"),
    ({"answers": {"gender": True}}, r"entry 2, field 'answers.gender': true is not one of F, M$"),
    ({"answers": {"age": [30]}}, r"entry 2, field 'answers.age': expected a number, got \[30\]$"),
    ({"ratings": {"a1": False}}, r"entry 2, field 'ratings.a1': rating must be a number, got false$"),
    ({"user": {"id": 1}}, r"entry 2, field 'user': user id must be text, got \{\"id\": 1\}$"),
    ({"version": 1.0}, r"entry 2, field 'version': .* got 1.0$"),
    ({"version": 99}, r"entry 2, field 'version': no model version 99$"),
    ({"version": 2**40}, r"entry 2, field 'version': no model version 1099511627776$"),
])
def test_bad_entries_fail_the_whole_batch(trained, tmp_path, entry, message):
    engine, _ = trained
    before = counts(engine)
    good = {"user": "first", "answers": {"gender": "F"}, "ratings": {"a1": 5}}
    path = write(tmp_path / "q.json", json.dumps([good, entry]))
    with pytest.raises(InputError, match=message):
        onboard(engine, read_answers_file(path))
    assert counts(engine) == before


def test_an_attribute_answer_to_a_model_that_asks_none_says_so(engine, planted, tmp_path):
    """Data whose users have no attributes (MovieLens 10M, the CSV releases, goodbooks): an answer
    naming one is refused saying the model asks none (the message listed an empty set of questions)."""
    from cfb.db.sources import Dataset
    from cfb.service.ingest import ingest_dataset
    from cfb.service.training import retrain_full

    from .conftest import FAST

    ingest_dataset(engine, Dataset(planted.ratings, planted.items, scale=planted.scale))
    retrain_full(engine, progress=False, **FAST)
    path = write(tmp_path / "q.json", json.dumps({"user": "new", "answers": {"age": 30}}))
    with pytest.raises(InputError, match=r"entry 1, field 'answers.age': unknown attribute \(this model asks no "
                                         r"attribute questions: its users have none\)$"):
        onboard(engine, read_answers_file(path))


def test_skip_invalid_stores_the_valid_entries(trained, tmp_path):
    engine, _ = trained
    before = counts(engine)
    path = write(tmp_path / "q.json", json.dumps([{"user": "ok", "ratings": {"a1": 5}}, {"answers": {"gender": "X"}}]))
    out = onboard(engine, read_answers_file(path), skip_invalid=True)
    assert [u["user"] for u in out["onboarded"]] == ["ok"]
    assert len(out["skipped"]) == 1 and "answers.gender" in out["skipped"][0]["error"]
    assert counts(engine) == (before[0] + 1, before[1] + 1, before[2] + 1)


@pytest.mark.parametrize("body, message", [
    ("{not json", r"q.json, line 1: invalid JSON \(Expecting property name enclosed in double quotes at column 2\)$"),
    ('{"user": "a"}\n{"user": \n', r"q.json, line 2: invalid JSON \(Expecting value at column 10\)$"),
    ('{"user": "a', r"q.json, line 1: invalid JSON \(Unterminated string starting at column 10\)$"),
    ('\n\n\n{"user": "x",\n "answers": {"age": 30,}}\n', r"q.json, line 5: invalid JSON \(Expecting property name "
                                                       r"enclosed in double quotes at column 24\)$"),  # (the file's line)
    ("", r"q.json, line 1: empty file"),
])
def test_unreadable_answer_files(tmp_path, body, message):
    with pytest.raises(InputError, match=message):
        read_answers_file(write(tmp_path / "q.json", body))


@pytest.mark.parametrize("body, where", [('[{"user": "k1"}, 5]', "entry 2"), ('{"user": "k1"}\n[1]\n', "line 2"),
                                         ('[{"user": "k1"}, {"user": "bad\\ud800"}]', "entry 2")])
def test_an_entry_that_is_not_an_object_is_one_skip_invalid_skips(trained, tmp_path, body, where):
    """An entry that is not a JSON object (or holds text that is not Unicode) is refused as any invalid
    entry is: the whole file without --skip-invalid, that entry alone with it."""
    engine, _ = trained
    path = write(tmp_path / "q.json", body)
    before = counts(engine)
    with pytest.raises(InputError, match=rf"^{re.escape(str(path))}: {where}"):
        onboard(engine, read_answers_file(path))
    assert counts(engine) == before
    out = onboard(engine, read_answers_file(path), skip_invalid=True)
    assert [u["user"] for u in out["onboarded"]] == ["k1"]
    assert [s["entry"] for s in out["skipped"]] == [f"{path}: {where}"]


def test_a_signup_says_how_many_questionnaire_items_it_showed(trained, tmp_path):
    """``asked``: the questionnaire size the user was shown, stored with their answers; the items they
    left unrated are then "not seen" to the ranker (its view of a user shown 15 who rated none differs
    from one of a user shown nothing). Without it the size is inferred from the answers, as before."""
    from cfb.db import store
    from cfb.db.engine import writing
    from cfb.service.state import load_served, user_history, user_vector

    engine, _ = trained
    with engine.connect() as conn:
        listed = [it["item"] for it in questionnaire_json(conn, 10)["items"]]
    first = listed[0]
    for asked, item in ((5, listed[7]), (0, first)):  # a questionnaire item past those shown: not from it
        with pytest.raises(InputError, match=rf"^e, field 'ratings.{item}': questionnaire item "
                                             rf"{listed.index(item) + 1}, past the {asked} asked$"):
            onboard(engine, [("e", {"answers": {}, "ratings": {item: 4}, "asked": asked})])
    entries = [("e1", {"user": "shown15", "answers": {"gender": "F"}, "asked": 15}),
               ("e2", {"user": "shown0", "answers": {"gender": "F"}}),
               ("e3", {"user": "rated", "answers": {"gender": "F"}, "ratings": {first: 5}, "asked": 15}),
               ("e4", {"user": "rated5", "answers": {"gender": "F"}, "ratings": {first: 5}})]
    onboard(engine, entries)
    with engine.connect() as conn:
        served = load_served(conn)
        uid = {u: store.user_id_of(conn, u) for u in ("shown15", "shown0", "rated", "rated5")}
        h = {u: user_history(conn, served, i) for u, i in uid.items()}
        v = {u: user_vector(conn, served, i)[0] for u, i in uid.items()}
    model = served.model
    assert [h[u].asked for u in uid] == [15, None, 15, None]
    assert [model.budget_of(h[u]) for u in uid] == [15, 0, 15, 5]
    assert not np.allclose(v["shown15"].rank_vec, v["shown0"].rank_vec)
    assert not np.allclose(v["rated"].rank_vec, v["rated5"].rank_vec)
    with engine.connect() as conn:  # the rating model's side is the same: Q only tells the ranker
        assert conn.scalar(select(Answer.asked).where(Answer.user_id == uid["shown15"])) == 15
    assert np.allclose(v["shown15"].vec, v["shown0"].vec)
    # an item the ranker cannot see (added after the full retrain) says nothing of how the sign-up went
    from cfb.service.ratings import rate_item

    rate_item(engine, "shown15", "brand-new-item", 5, create_item=True)
    with engine.connect() as conn:
        after = user_history(conn, load_served(conn), uid["shown15"])
        assert model.budget_of(after) is None and model.budget_of(after, after.items[:0]) == 15
        assert np.allclose(user_vector(conn, load_served(conn), uid["shown15"])[0].rank_vec, v["shown15"].rank_vec)

    # a database from before ``asked``: read as not said; its first signup saying it adds the column
    with writing(engine) as conn:
        conn.exec_driver_sql("ALTER TABLE answers DROP COLUMN asked")
    store._HAVE_ASKED.discard(str(engine.url))
    with engine.connect() as conn:
        assert user_history(conn, load_served(conn), uid["shown15"]).asked is None
    onboard(engine, [("e", {"user": "later", "answers": {}, "asked": 5})])
    with engine.connect() as conn:
        assert user_history(conn, load_served(conn), store.user_id_of(conn, "later")).asked == 5
    with writing(engine) as conn:  # an ingest or retrain (``create_schema``) adds it too, before any sign-up
        conn.exec_driver_sql("ALTER TABLE answers DROP COLUMN asked")
    store._HAVE_ASKED.discard(str(engine.url))
    store.create_schema(engine)
    store._HAVE_ASKED.discard(str(engine.url))
    with engine.connect() as conn:
        assert store.has_answers_asked(conn)


def test_a_signup_is_checked_against_the_questionnaire_it_was_shown(trained, planted):
    """A sign-up page loaded before a full retrain that reordered the questionnaire sends its version:
    its answers are checked against that version's questionnaire (the item the page showed third is
    no longer the serving one's third), and where the items it showed are not the serving
    questionnaire's first ``asked``, the size is inferred as if not said."""
    from cfb.db import store
    from cfb.db.sources import Dataset
    from cfb.service.ingest import ingest_dataset
    from cfb.service.state import load_served, user_history
    from cfb.service.training import retrain_full

    from .conftest import FAST

    engine, report = trained
    with engine.connect() as conn:
        shown = [it["item"] for it in questionnaire_json(conn, 3)["items"]]
    liked = planted.ratings.assign(rating=np.where(planted.ratings.item == shown[2], 5.0, planted.ratings.rating))
    ingest_dataset(engine, Dataset(liked))
    second = retrain_full(engine, progress=False, **FAST)["version"]
    with engine.connect() as conn:
        now = [it["item"] for it in questionnaire_json(conn, 3)["items"]]
    assert now == [shown[2], *shown[:2]]  # the questionnaire changed: the third is asked first
    page = {"answers": {}, "asked": 2, "version": report["version"]}
    with pytest.raises(InputError, match=rf"field 'ratings.{shown[2]}': questionnaire item 3, past the 2 asked$"):
        onboard(engine, [("e", {**page, "ratings": {shown[2]: 5}})])  # past what that page showed
    with pytest.raises(InputError, match=rf"field 'ratings.{shown[1]}': questionnaire item 3, past the 2 asked$"):
        onboard(engine, [("e", {"answers": {}, "asked": 2, "ratings": {shown[1]: 5}})])  # no version: the serving one's
    out = onboard(engine, [("e1", {**page, "user": "stale", "ratings": {shown[1]: 5}}),
                           ("e2", {**page, "user": "same", "version": second, "ratings": {now[1]: 5}})])
    assert out["version"] == second
    with engine.connect() as conn:
        served = load_served(conn)
        stale, same = (user_history(conn, served, store.user_id_of(conn, u)) for u in ("stale", "same"))
    assert stale.asked is None and same.asked == 2  # the first two shown are not the serving ones: not said


def test_a_number_answer_past_the_training_range_says_what_its_end_says():
    """A question accepts answers past its training range (an age of 146 where users were 7 to 73): the
    bootstrap prior's linear term of it was extrapolated 10 standard deviations, pushing a new user's
    predicted ratings to the top of the scale; it is now the range's end, as its bin is."""
    from cfb.bootstrap.features import AnswerEncoder
    from cfb.bootstrap.questionnaire import Questionnaire, infer_questions

    users = [{"age": 7 + k % 67, "gender": "MF"[k % 2]} for k in range(200)]
    enc = AnswerEncoder.fit(Questionnaire(infer_questions(users), []), users, [])
    x = enc.transform([{"age": 146}, {"age": 73}, {"age": 0}, {"age": 7}, {"age": 40}], [{}] * 5)
    assert np.array_equal(x[0], x[1]) and np.array_equal(x[2], x[3]) and not np.array_equal(x[1], x[4])
