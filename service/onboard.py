"""Onboarding: validate signup answers, store the user, and give them an embedding at once."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy import Connection, Engine, insert, select

from ..cf_core.errors import CfbError, InputError
from ..db import store
from ..db.schema import Answer, Item, User, UserFactors
from .state import ServingState, cold_factors, load_state


@dataclass
class Signup:
    """One validated questionnaire: external user id (None: assign one), attributes, ratings by item db id."""

    user: str | None
    attributes: dict
    ratings: dict[int, float]
    raw_ratings: dict


def read_answers_file(path: Path) -> list[tuple[str, dict]]:
    """Entries of an answers file (one JSON object, a JSON list, or JSON lines), each with its location."""
    from ..db.textfile import read_text

    text = read_text(Path(path))
    stripped = text.strip()
    if not stripped:
        raise InputError("empty file", source=str(path), line=1)
    try:
        doc = json.loads(stripped)
        entries = doc if isinstance(doc, list) else [doc]
        located = [(f"{path}: entry {k + 1}", e) for k, e in enumerate(entries)]
    except json.JSONDecodeError as whole:
        lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
        first = lines[0][1].strip()
        if len(lines) < 2 or not (first.startswith("{") and first.endswith("}")):
            raise InputError(f"invalid JSON ({whole.msg})", source=str(path), line=whole.lineno) from None
        located = []
        for n, line in lines:  # JSON lines
            try:
                located.append((f"{path}: line {n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise InputError(f"invalid JSON ({e.msg})", source=str(path), line=n) from None
    for where, e in located:
        if not isinstance(e, dict):
            raise InputError("each entry must be a JSON object", source=where)
    return located


class SignupValidator:
    """Checks entries against the serving questionnaire, the rating scale and the catalogue."""

    def __init__(self, conn: Connection, state: ServingState):
        if state.bootstrap is None:
            raise CfbError("the serving model has no questionnaire; run `cfb retrain --full`")
        self.questionnaire = state.bootstrap.encoder.questionnaire
        self.scale = store.rating_scale(conn)
        self.items = store.id_map(conn, Item)
        titles: dict[str, list[int]] = {}
        for i, t in conn.execute(select(Item.id, Item.title).where(Item.title.is_not(None))):
            titles.setdefault(t, []).append(i)
        self.titles = titles
        self.known_users = set(store.id_map(conn, User))
        self.batch_users: set[str] = set()

    def validate(self, where: str, entry: dict) -> Signup:
        unknown_keys = set(entry) - {"user", "answers", "ratings"}
        if unknown_keys:
            raise InputError(f"unknown key(s) {', '.join(sorted(unknown_keys))}", source=where, field=sorted(unknown_keys)[0])
        user = entry.get("user")
        if user is not None:
            user = str(user).strip()
            if not user:
                raise InputError("empty user id", source=where, field="user")
            if user in self.known_users or user in self.batch_users:
                raise InputError(f"user {user!r} already exists", source=where, field="user")
        answers = entry.get("answers") or {}
        if not isinstance(answers, dict):
            raise InputError("'answers' must be an object", source=where, field="answers")
        attributes = {}
        for name, value in answers.items():
            q = self.questionnaire.question(name)
            if q is None:
                names = ", ".join(x.name for x in self.questionnaire.questions)
                raise InputError(f"unknown attribute (questions: {names})", source=where, field=f"answers.{name}")
            if value is None:
                continue
            if q.type == "number":
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise InputError(f"expected a number, got {value!r}", source=where, field=f"answers.{name}")
            elif q.type == "category":
                if isinstance(value, (dict, list, bool)) or str(value) not in (q.values or []):
                    raise InputError(f"{value!r} is not one of {', '.join(q.values or [])}", source=where,
                                     field=f"answers.{name}")
                value = str(value)
            else:
                if isinstance(value, (dict, list, bool)):
                    raise InputError(f"expected text, got {value!r}", source=where, field=f"answers.{name}")
                value = str(value)
            attributes[name] = value
        raw = entry.get("ratings") or {}
        if not isinstance(raw, dict):
            raise InputError("'ratings' must be an object of item: rating", source=where, field="ratings")
        ratings: dict[int, float] = {}
        for key, value in raw.items():
            field = f"ratings.{key}"
            item = self.items.get(str(key))
            if item is None:
                hits = self.titles.get(str(key), [])
                if len(hits) != 1:
                    raise InputError("unknown item" if not hits else "ambiguous title; use the item id",
                                     source=where, field=field)
                item = hits[0]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
                raise InputError(f"rating must be a number, got {value!r}", source=where, field=field)
            if self.scale and not self.scale[0] <= value <= self.scale[1]:
                raise InputError(f"rating {value:g} outside the scale {self.scale[0]:g}..{self.scale[1]:g}",
                                 source=where, field=field)
            ratings[item] = float(value)
        if user is not None:
            self.batch_users.add(user)
        return Signup(user, attributes, ratings, raw)


def _new_external_id(conn: Connection) -> str:
    n = int(conn.scalar(select(User.id).order_by(User.id.desc()).limit(1)) or 0) + 1
    existing = set(store.id_map(conn, User))
    while f"new-{n}" in existing:
        n += 1
    return f"new-{n}"


def store_signup(conn: Connection, state: ServingState, signup: Signup) -> tuple[str, int]:
    """Write one validated signup and the user's initial factors (bootstrap prior + fold-in). Returns ids."""
    external = signup.user or _new_external_id(conn)
    uid = conn.execute(insert(User).values(external_id=external, attributes=signup.attributes)
                       .returning(User.id)).scalar_one()
    conn.execute(insert(Answer).values(user_id=uid, answers=signup.attributes, ratings=signup.raw_ratings,
                                       model_version=state.version))
    items = np.array(list(signup.ratings), dtype=np.int64)
    values = np.array(list(signup.ratings.values()), dtype=np.float32)
    if len(items):
        now = int(time.time())
        store.write_ratings(conn, [uid] * len(items), items.tolist(), values.tolist(), [now] * len(items))
    vec, bias = cold_factors(state, signup.attributes, state.item_index(items), values)
    # The row joins the serving version: a new user changes no other row, so no new version is needed.
    conn.execute(insert(UserFactors).values(version_id=state.version, user_id=uid, bias=float(bias),
                                            factors=np.ascontiguousarray(vec, "<f4").tobytes()))
    return external, uid


def onboard(engine: Engine, entries: list[tuple[str, dict]], skip_invalid: bool = False) -> dict:
    """Validate then store every entry in one transaction (all or nothing unless ``skip_invalid``)."""
    with engine.begin() as conn:
        state = load_state(conn)
        validator = SignupValidator(conn, state)
        valid, skipped = [], []
        for where, entry in entries:
            try:
                valid.append(validator.validate(where, entry))
            except InputError as e:
                if not skip_invalid:
                    raise
                skipped.append({"entry": where, "error": str(e)})
        done = []
        for signup in valid:
            external, _ = store_signup(conn, state, signup)
            done.append({"user": external, "ratings": len(signup.ratings)})
    return {"version": state.version, "onboarded": done, "skipped": skipped}


def questionnaire_json(conn: Connection, budget: int = 15) -> dict:
    """The serving questionnaire: attribute questions and the first ``budget`` items to ask about."""
    state = load_state(conn)
    if state.bootstrap is None:
        raise CfbError("the serving model has no questionnaire; run `cfb retrain --full`")
    q = state.bootstrap.encoder.questionnaire
    asked = state.item_ids[np.array(q.items[:budget], dtype=np.int64)]
    titles = store.item_titles(conn, asked)
    return {"version": state.version,
            "attributes": [x.to_json() for x in q.questions],
            "items": [{"item": titles[int(i)][0], "title": titles[int(i)][1]} for i in asked]}
