"""The serving model of a database, loaded once per process, and users as the model sees them."""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
from sqlalchemy import Connection, select

from ..bootstrap.questionnaire import Questionnaire
from ..cf_core.errors import CfbError
from ..cf_core.model import TrainedModel, UserHistory, UserVector
from ..db import store, versions
from ..db.schema import Answer, Item, ModelVersion

_CACHE: dict[tuple[str, int, str], "Served"] = {}
_CACHE_LOCK = threading.Lock()
CACHED_VERSIONS = 4  # a long-running server keeps the newest few versions it has served


@dataclass
class Served:
    """A stored version in memory: its id, its model, and the last rating its full ancestor learned from."""

    version: int
    model: TrainedModel
    root_seq: int


def _cache_key(conn: Connection, version: int) -> tuple[str, int, str]:
    """A version's key in the caches: database, version and its creation time (versions never change;
    the time tells a database made again at the same address from the one before)."""
    created = conn.scalar(select(ModelVersion.created_at).where(ModelVersion.id == version))
    if created is None:
        raise CfbError(f"no model version {version}")
    return str(conn.engine.url), version, str(created)


_QUESTIONNAIRES: dict[tuple[str, int, str], Questionnaire] = {}


def questionnaire_of(conn: Connection, version: int) -> Questionnaire:
    """A version's questionnaire (what a sign-up page showed), without making it a served version: an
    older one is read once and only its questionnaire kept."""
    key = _cache_key(conn, version)
    served = _CACHE.get(key)
    if served is not None:
        return served.model.questionnaire
    if key not in _QUESTIONNAIRES:
        with _CACHE_LOCK:
            _QUESTIONNAIRES[key] = versions.load_model(conn, version).questionnaire
    return _QUESTIONNAIRES[key]


def load_served(conn: Connection, version: int | None = None) -> Served:
    """The serving (or given) version, cached per database and version (``_cache_key``)."""
    version = version if version is not None else versions.require_serving(conn)
    key = _cache_key(conn, version)
    served = _CACHE.get(key)
    if served is None:
        served = Served(version, versions.load_model(conn, version), versions.root_max_seq(conn, version))
        with _CACHE_LOCK:  # server threads share the cache
            _CACHE[key] = served
            while len(_CACHE) > CACHED_VERSIONS:
                _CACHE.pop(next(iter(_CACHE)), None)  # the oldest loaded
    return served


def signups_of(conn: Connection, user_ids) -> dict[int, tuple[frozenset, int | None]]:  # noqa: ANN001
    """user id -> (database ids of the items they rated in their signup questionnaire, how many
    questionnaire items it showed them (None: not said)) of each of ``user_ids``."""
    ids = sorted({int(u) for u in user_ids})
    cols = [Answer.user_id, Answer.ratings] + ([Answer.asked] if store.has_answers_asked(conn) else [])
    answers: dict[int, tuple] = {}
    for start in range(0, len(ids), 900):
        for row in conn.execute(select(*cols).where(store.one_of(Answer.user_id, ids[start:start + 900]))):
            answers[int(row[0])] = (row[1] or {}, row[2] if len(row) > 2 else None)
    keys = sorted({str(k) for given, _ in answers.values() for k in given})
    item_of: dict[str, int] = {}
    for start in range(0, len(keys), 900):
        item_of.update(conn.execute(select(Item.external_id, Item.id)
                                    .where(store.one_of(Item.external_id, keys[start:start + 900]))).all())
    out = {}
    for u in ids:
        given, asked = answers.get(u, ({}, None))
        out[u] = frozenset(int(item_of[str(k)]) for k in given if str(k) in item_of), asked
    return out


def user_history(conn: Connection, served: Served, user_id: int) -> UserHistory:
    """Everything the model needs to know of a user: answers, ratings (and which are newer than
    the full retrain), signup items, and their trained row if the full version learned them."""
    return user_histories(conn, served, [user_id])[0]


def user_histories(conn: Connection, served: Served, user_ids) -> list[UserHistory]:  # noqa: ANN001
    """``user_history`` of each of ``user_ids`` (in that order), in a few queries for all of them."""
    ids = [int(u) for u in user_ids]
    rated = store.users_ratings_replaced(conn, ids)
    trained_ids, factors, biases = versions.trained_rows(conn, served.version, ids, served.model.rating.user_dims)
    rows = {int(u): (factors[k], float(biases[k])) for k, u in enumerate(trained_ids)}
    attributes, signups = store.users_attributes_of(conn, ids), signups_of(conn, ids)
    out = []
    for u in ids:
        items, ratings, seq, prev, prev_seq = rated[u]
        row, learned = rows.get(u), None
        if row is not None:
            replaced = store.replaced_ratings_of(conn, u, served.root_seq) \
                if changed_again(seq, prev_seq, served.root_seq).any() else None
            learned = learned_values(items, seq, prev, prev_seq, served.root_seq, replaced)
        signup, asked = signups[u]
        out.append(UserHistory(attributes[u], items, ratings, newer=seq > served.root_seq, signup_items=signup,
                               trained_row=row, learned_values=learned, asked=asked))
    return out


def changed_again(seq: np.ndarray, prev_seq: np.ndarray, root_seq: int) -> np.ndarray:
    """Per rating: whether the pair was changed twice or more since the full retrain (which read every
    row up to ``root_seq``): the row it replaced is newer than that retrain too."""
    return (np.asarray(seq) > root_seq) & (np.asarray(prev_seq, np.int64) > root_seq)


def learned_values(items: np.ndarray, seq: np.ndarray, prev_rating: np.ndarray, prev_seq: np.ndarray,
                   root_seq: int, replaced: tuple | None = None) -> np.ndarray:
    """Per rating: the value the full retrain (which read every row up to ``root_seq``) learned for
    the pair, where the row is newer and the pair was rated by then; NaN elsewhere (a new pair, or one
    changed twice since on a database from before the replaced-rating log).

    ``prev_rating``/``prev_seq`` hold the row each rating replaced; for a pair changed twice or more
    since, the value is the newest of ``replaced`` ((item ids, seq, ratings) of the user's replaced
    rows with seq ≤ ``root_seq``, in seq order: ``store.replaced_ratings_of``) for its item."""
    prev_seq = np.asarray(prev_seq, np.int64)
    newer = np.asarray(seq) > root_seq
    out = np.where(newer & (prev_seq >= 0) & (prev_seq <= root_seq), np.asarray(prev_rating, np.float64), np.nan)
    if replaced is not None and len(replaced[0]):
        at_root = dict(zip(replaced[0].tolist(), replaced[2].tolist()))  # (seq order: the newest wins)
        for k in np.flatnonzero(changed_again(seq, prev_seq, root_seq)):
            out[k] = at_root.get(int(items[k]), np.nan)
    return out


def user_vector(conn: Connection, served: Served, user_id: int) -> tuple[UserVector, np.ndarray]:
    """The user's representation now (every stored rating counts at once), and the items they rated
    (database ids)."""
    history = user_history(conn, served, user_id)
    return served.model.user_vector(history), np.asarray(history.items, np.int64)
