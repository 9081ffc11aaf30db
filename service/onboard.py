"""Onboarding: validate signup answers, store the user, and give them an embedding at once."""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Container
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Connection, Engine, insert, select
from sqlalchemy.exc import IntegrityError

from ..bootstrap.questionnaire import MAX_BUDGET, Questionnaire, is_finite_number, is_number
from ..cf_core.errors import CfbError, InputError, UserExistsError, check_whole, cut, json_shown
from ..db import ratings_io, store
from ..db.engine import writing
from ..db.schema import Answer, Item, User
from .serving import title_hint
from .state import Served, load_served, questionnaire_of


def entry_field(part: str, key) -> str:  # noqa: ANN001
    """An error's field for ``key`` of an entry's ``part`` ("answers", "ratings"): whole up to the longest
    id (the web page finds the control it marks by it), a longer key cut short (no item id is that long, and
    a message need not repeat a page of text)."""
    return f"{part}.{cut(key, store.MAX_ID_LENGTH, store.MAX_ID_LENGTH)}"


@dataclass
class Signup:
    """One validated questionnaire: external user id (None: assign one), attributes, ratings by item db id."""

    user: str | None
    attributes: dict
    ratings: dict[int, float]
    asked: int | None = None  # how many questionnaire items they were shown (None: not said)


class _NonFinite:
    """Stands in for a NaN/Infinity token (or an overflowing number) while an answers file is parsed."""

    def __init__(self, token: str):
        self.token = token


def _short(token: str) -> str:
    return token if len(token) <= 24 else f"{token[:12]}...({len(token)} digits)"


def _parse_float(token: str):
    value = float(token)
    return value if math.isfinite(value) else _NonFinite(_short(token))


def _parse_int(token: str):
    try:
        value = int(token)
        float(value)
    except (ValueError, OverflowError):  # too many digits for an int or a float
        return _NonFinite(_short(token))
    return value


class _Object(dict):
    """A parsed JSON object that remembers a key it was given twice (``{"age": 30, "age": 40}``:
    which value was meant?), so that the entry and field can be named once the document is read."""

    duplicate: str | None = None


def _object(pairs: list[tuple[str, object]]) -> dict:
    out = _Object()
    for key, value in pairs:
        if key in out and out.duplicate is None:
            out.duplicate = key
        out[key] = value
    return out


def load_answers_json(text: str):  # noqa: ANN201
    """JSON as sign-up answers are read (a file, an HTTP body): NaN, Infinity and a number too large for a float
    are kept as placeholders and a key given twice is marked, for ``first_unreadable_value`` to name."""
    return json.loads(text, parse_constant=_NonFinite, parse_float=_parse_float, parse_int=_parse_int,
                      object_pairs_hook=_object)


def is_unicode_text(text: str) -> bool:
    """Whether ``text`` can be written as UTF-8 (JSON's "\\ud800" escape gives a lone surrogate, which cannot);
    True for what is not text (a key given from Python as a number)."""
    if not isinstance(text, str):
        return True
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def first_unreadable_value(value) -> tuple[str, str] | None:
    """(field path, problem) of the first NaN/Infinity (or number too large for a float), key given
    twice, or text that is not valid Unicode (a lone surrogate such as "\\ud800", which no database
    can store) in a parsed entry (``load_answers_json``), else None."""
    stack = [("", value)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, dict) and (bad := next((k for k in v if not is_unicode_text(k)), None)) is not None:
            return path, f"key {bad!r} is not valid Unicode text"
        if isinstance(v, str) and not is_unicode_text(v):
            return path, f"{v!r} is not valid Unicode text"
        if isinstance(v, _NonFinite) and v.token.lstrip("-") in ("NaN", "Infinity"):
            return path, f"{v.token} is not allowed: numbers must be finite"
        if isinstance(v, _NonFinite):  # (1e400, or 400 digits: finite, but beyond what a float holds)
            return path, f"{v.token} is not allowed: the number is too large (beyond a 64-bit float)"
        if isinstance(v, _Object) and v.duplicate is not None:
            return (f"{path}.{v.duplicate}" if path else v.duplicate), f"key {v.duplicate!r} given twice in one object"
        if isinstance(v, dict):
            stack.extend((f"{path}.{k}" if path else str(k), x) for k, x in reversed(list(v.items())))
        elif isinstance(v, list):
            stack.extend((f"{path}[{k}]", x) for k, x in reversed(list(enumerate(v))))
    return None


def json_problem(e: json.JSONDecodeError, line: bool = False) -> str:
    """``invalid JSON (<what> at column C)`` (``line``: at line L column C), with the position that the
    decoder's message leaves for its string form ("Unterminated string starting at": at where?)."""
    at = f"line {e.lineno} column {e.colno}" if line else f"column {e.colno}"
    msg = e.msg[:-3] if e.msg.endswith(" at") else e.msg
    return f"invalid JSON ({msg} at {at})"


def read_answers_file(path: Path) -> list[tuple[str, dict]]:
    """Entries of an answers file (one JSON object, a JSON list, or JSON lines), each with its location.

    Only the file's JSON is checked here; each entry (an object? NaN, Infinity, a number too large for a
    float, a key given twice?) is checked by ``SignupValidator.validate``, naming the entry and field,
    so that ``--skip-invalid`` skips that entry alone."""
    from ..db.textfile import read_text, text_lines

    text = read_text(Path(path)).lstrip("\ufeff")
    if not text.strip():
        raise InputError("empty file", source=str(path), line=1)
    try:
        try:
            doc = load_answers_json(text.rstrip())  # (leading lines kept: an error's line and column are the file's)
            entries = doc if isinstance(doc, list) else [doc]
            located = [(f"{path}: entry {k + 1}", e) for k, e in enumerate(entries)]
        except json.JSONDecodeError as whole:
            lines = [(n, line) for n, line in enumerate(text_lines(text), start=1) if line.strip()]
            first = lines[0][1].strip()
            if len(lines) < 2 or not (first.startswith("{") and first.endswith("}")):
                raise InputError(json_problem(whole), source=str(path), line=whole.lineno) from None
            located = []
            for n, line in lines:  # JSON lines
                try:
                    located.append((f"{path}: line {n}", load_answers_json(line)))
                except json.JSONDecodeError as e:
                    raise InputError(json_problem(e), source=str(path), line=n) from None
    except RecursionError:
        raise InputError("JSON nested too deeply", source=str(path)) from None
    return located  # (each entry is checked by ``SignupValidator.validate``: one that is not an object too)


class SignupValidator:
    """Checks entries against the serving questionnaire (or the one a sign-up page showed), the rating
    scale and the catalogue. ``items``/``known_users`` map external ids to database ids, ``titles``
    titles to the external ids so titled (any mappings: ``for_connection`` reads them whole, the HTTP
    server looks each key up); ``all_titles`` gives what an unknown item's hint picks from."""

    def __init__(self, conn: Connection, served: Served, *, items, titles, all_titles: Callable[[], object],  # noqa: ANN001
                 known_users):  # noqa: ANN001
        self.questionnaire = served.model.questionnaire
        self.version = served.version
        self._questionnaire_of = lambda version: questionnaire_of(conn, version)
        self.scale, self.step = store.rating_scale_and_step(conn)
        self.items, self.titles, self.all_titles, self.known_users = items, titles, all_titles, known_users
        self.batch_users: set[str] = set()
        self._conn = conn
        self._composed_titles_read: dict[str, list[str]] | None = None  # (read on the first miss, then kept)

    @classmethod
    def for_connection(cls, conn: Connection, served: Served) -> "SignupValidator":
        """A validator with the catalogue and the users read whole (for a batch of entries)."""
        titles = store.items_by_title(conn)
        return cls(conn, served, items=store.id_map(conn, Item), titles=titles, all_titles=lambda: titles,
                   known_users=set(store.id_map(conn, User)))

    def validate(self, where: str, entry: dict) -> Signup:
        bad = first_unreadable_value(entry)
        if bad is not None:
            raise InputError(bad[1], source=where, field=bad[0] or None)
        if not isinstance(entry, dict):
            raise InputError("each entry must be a JSON object", source=where)
        unknown_keys = set(entry) - {"user", "answers", "ratings", "asked", "version"}
        if unknown_keys:
            names = [cut(k) for k in sorted(unknown_keys)]
            raise InputError(f"unknown key(s) {', '.join(names)}", source=where, field=names[0])
        user = entry.get("user")
        if user is not None:
            if isinstance(user, (dict, list, bool, float)):
                raise InputError(f"user id must be text, got {json_shown(user)}", source=where, field="user")
            user = str(user).strip()
            if not user:
                raise InputError("empty user id", source=where, field="user")
            store.check_id(user, "user", source=where, field="user")  # before it is looked up
            if user in self.batch_users:
                raise InputError(f"user {user!r} is signed up by an earlier entry", source=where, field="user")
            if user in self.known_users:
                raise UserExistsError(f"user {user!r} already exists", source=where, field="user")
        answers = {} if entry.get("answers") is None else entry["answers"]
        if not isinstance(answers, dict):
            raise InputError("'answers' must be an object", source=where, field="answers")
        attributes = {}
        for name, value in answers.items():
            q = self.questionnaire.question(name)
            if q is None:
                names = ", ".join(x.name for x in self.questionnaire.questions)
                asked = f"questions: {names}" if names else "this model asks no attribute questions: its users have none"
                raise InputError(f"unknown attribute ({asked})", source=where, field=entry_field("answers", name))
            if value is not None and not (isinstance(value, str) and not value.strip()):  # (blank: not said)
                attributes[name] = q.conform(value, where)
        raw = {} if entry.get("ratings") is None else entry["ratings"]
        if not isinstance(raw, dict):
            raise InputError("'ratings' must be an object of item: rating", source=where, field="ratings")
        ratings: dict[int, float] = {}
        named: dict[int, str] = {}  # item -> the key that named it
        for key, value in raw.items():
            field = entry_field("ratings", key)
            name = str(key).strip()  # (surrounding spaces aside, as the readers and `cfb rate` strip them)
            if not name:
                raise InputError("empty item id", source=where, field=field)
            item = self.items.get(name)
            if item is None:
                hits = store.items_titled(name, lambda title: self.titles.get(title, []), self._composed_titles)
                if len(hits) != 1:
                    raise InputError(f"unknown item{title_hint(name, self.all_titles())}" if not hits else
                                     f"ambiguous title (items {', '.join(sorted(hits))}); use the item id",
                                     source=where, field=field)
                item = self.items.get(hits[0])
            if not is_finite_number(value):
                raise InputError(f"rating must be a {'finite ' if is_number(value) else ''}number, got {json_shown(value)}",
                                 source=where, field=field)
            problem = store.rating_problem(value, self.scale, self.step)
            if problem:
                raise InputError(problem, source=where, field=field)
            if item in named:
                raise InputError(f"the same item as {cut(named[item])!r} (an item is rated once)", source=where,
                                 field=field)
            named[item] = str(key)
            ratings[item] = float(store.as_stored(float(value), self.scale, self.step))
        asked = entry.get("asked")
        if asked is not None and (not isinstance(asked, int) or isinstance(asked, bool)
                                  or not 0 <= asked <= MAX_BUDGET):
            raise InputError(f"'asked' must be the number of questionnaire items shown, 0 to {MAX_BUDGET}, "
                             f"got {json_shown(asked)}", source=where, field="asked")
        shown = self._shown_questionnaire(where, entry.get("version"))
        if asked is not None:  # the first `asked` were shown: a later questionnaire item cannot have been
            position = shown.positions()
            for item, key in named.items():
                if position.get(item, -1) >= asked:
                    raise InputError(f"questionnaire item {position[item] + 1}, past the {asked} asked",
                                     source=where, field=entry_field("ratings", key))
            if set(shown.items[:asked]) != set(self.questionnaire.items[:asked]):
                asked = None  # not the serving questionnaire's first `asked`: its Q is inferred from the answers
        if user is not None:
            self.batch_users.add(user)
        return Signup(user, attributes, ratings, asked)

    def _composed_titles(self) -> dict[str, list[str]]:
        """Every title's items by its composed form (``store.items_by_composed_title``), read once."""
        if self._composed_titles_read is None:
            self._composed_titles_read = store.items_by_composed_title(self._conn)
        return self._composed_titles_read

    def _shown_questionnaire(self, where: str, version) -> Questionnaire:  # noqa: ANN001
        """The questionnaire the signup answered: that of ``version`` (the model version whose
        questionnaire a sign-up page showed; a full retrain since may have changed it), else the
        serving one."""
        if version is None:
            return self.questionnaire
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise InputError(f"'version' must be the model version whose questionnaire was shown, got {json_shown(version)}",
                             source=where, field="version")
        if version == self.version:
            return self.questionnaire
        if version > 2**31 - 1:  # (past any stored version id; PostgreSQL would refuse the query)
            raise InputError(f"no model version {version}", source=where, field="version")
        try:
            return self._questionnaire_of(version)
        except CfbError as e:
            raise InputError(str(e), source=where, field="version") from None


def new_user_id(conn: Connection, taken: Container[str]) -> str:
    """``new-N``: the first N from the next user row id on whose id is not ``taken`` (the largest row
    id, one indexed read however many users: a count of them took 50 ms at a million on PostgreSQL,
    under the writers' lock; after a write a crash rolled back, PostgreSQL's row ids skip, as its
    version numbers do)."""
    n = int(conn.scalar(select(User.id).order_by(User.id.desc()).limit(1)) or 0) + 1
    while f"new-{n}" in taken:
        n += 1
    return f"new-{n}"


def store_signup(conn: Connection, served: Served, signup: Signup,
                 reserved: frozenset[str] = frozenset()) -> tuple[str, int]:
    """Write one validated signup: the user, their answers and their ratings. Nothing of the model
    changes: the user's representation is computed from these whenever it is asked for. A signup
    without a user id gets ``new-N``, never one of ``reserved`` (ids later entries of a batch name)."""
    external = signup.user or new_user_id(conn, set(store.id_map(conn, User)) | set(reserved))
    store.check_id(external, "user", field="user")  # (``validate`` checked it: a Signup made otherwise)
    uid = conn.execute(insert(User).values(external_id=external, attributes=signup.attributes)
                       .returning(User.id)).scalar_one()
    items = list(signup.ratings)
    names = store.item_titles(conn, items)
    asked = {}
    if signup.asked is not None:
        store.ensure_answers_asked(conn)
        asked = {"asked": signup.asked}
    conn.execute(insert(Answer).values(user_id=uid, answers=signup.attributes,
                                       ratings={names[i][0]: signup.ratings[i] for i in items},
                                       model_version=served.version, **asked))
    if items:
        now = int(time.time())
        ratings_io.write_ratings(conn, [uid] * len(items), items, list(signup.ratings.values()), [now] * len(items))
    return external, uid


def onboard(engine: Engine, entries: list[tuple[str, dict]], skip_invalid: bool = False) -> dict:
    """Validate then store every entry in one transaction (all or nothing unless ``skip_invalid``)."""
    try:
        return _onboard(engine, entries, skip_invalid)
    except IntegrityError:  # (PostgreSQL) another process signed up a user of these meanwhile: nothing was written
        with engine.connect() as conn:
            known = set(store.id_map(conn, User))
        for where, entry in entries:
            user = entry.get("user") if isinstance(entry, dict) else None
            if isinstance(user, str) and user.strip() in known:
                raise UserExistsError(f"user {user.strip()!r} already exists (signed up meanwhile)", source=where,
                                      field="user") from None
        raise


def _onboard(engine: Engine, entries: list[tuple[str, dict]], skip_invalid: bool) -> dict:
    if not skip_invalid:  # bad input is refused here, before the write waits for the writer's lock (checked
        with engine.connect() as conn:  # again under it: another writer may take an id meanwhile)
            validator = SignupValidator.for_connection(conn, load_served(conn))
            for where, entry in entries:
                validator.validate(where, entry)
    with writing(engine) as conn:
        served = load_served(conn)
        validator = SignupValidator.for_connection(conn, served)
        valid, skipped = [], []
        for where, entry in entries:
            try:
                valid.append(validator.validate(where, entry))
            except InputError as e:
                if not skip_invalid:
                    raise
                skipped.append({"entry": where, "error": str(e)})
        done = []
        named = frozenset(s.user for s in valid if s.user is not None)
        for signup in valid:
            external, _ = store_signup(conn, served, signup, named)
            done.append({"user": external, "ratings": len(signup.ratings)})
    return {"version": served.version, "onboarded": done, "skipped": skipped}


def questionnaire_json(conn: Connection, budget: int = 15) -> dict:
    """The serving questionnaire: attribute questions and the first ``budget`` items to ask about
    (0 to ``MAX_BUDGET``; fewer when the catalogue has fewer)."""
    check_whole(budget, "budget (the items a questionnaire asks about)", 0, MAX_BUDGET)
    served = load_served(conn)
    q = served.model.questionnaire
    asked = q.items[:budget]
    titles = store.item_titles(conn, asked)
    return {"version": served.version,
            "attributes": [{**x.to_json(), **({"accepts": list(r)} if (r := x.accepted_range()) else {})}
                           for x in q.questions],
            "items": [{"item": titles[int(i)][0], "title": titles[int(i)][1]} for i in asked]}
