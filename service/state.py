"""The serving model of a database, loaded once per process, and users as the model sees them."""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
from sqlalchemy import Connection, select

from ..cf_core.model import TrainedModel, UserHistory, UserVector
from ..db import store, versions
from ..db.schema import Answer, Item

_CACHE: dict[tuple[str, int], "Served"] = {}
_CACHE_LOCK = threading.Lock()
CACHED_VERSIONS = 4  # a long-running server keeps the newest few versions it has served


@dataclass
class Served:
    """A stored version in memory: its id, its model, and the last rating its full ancestor learned from."""

    version: int
    model: TrainedModel
    root_seq: int


def load_served(conn: Connection, version: int | None = None) -> Served:
    """The serving (or given) version, cached per database and version (versions never change)."""
    version = version if version is not None else versions.require_serving(conn)
    key = (str(conn.engine.url), version)
    served = _CACHE.get(key)
    if served is None:
        served = Served(version, versions.load_model(conn, version), versions.root_max_seq(conn, version))
        with _CACHE_LOCK:  # server threads share the cache
            _CACHE[key] = served
            while len(_CACHE) > CACHED_VERSIONS:
                _CACHE.pop(next(iter(_CACHE)), None)  # the oldest loaded
    return served


def signup_items(conn: Connection, user_id: int) -> frozenset:
    """Database ids of the items the user rated in their signup questionnaire."""
    answer = conn.scalar(select(Answer.ratings).where(Answer.user_id == user_id))
    if not answer:
        return frozenset()
    ids = conn.scalars(select(Item.id).where(Item.external_id.in_([str(k) for k in answer]))).all()
    return frozenset(int(i) for i in ids)


def user_history(conn: Connection, served: Served, user_id: int) -> UserHistory:
    """Everything the model needs to know of a user: answers, ratings (and which are newer than
    the full retrain), signup items, and their trained row if the full version learned them."""
    items, ratings, seq, prev, prev_seq = store.user_ratings_replaced(conn, user_id)
    ids, factors, bias = versions.trained_rows(conn, served.version, [user_id])
    row = (factors[0], float(bias[0])) if len(ids) else None
    learned = learned_values(seq, prev, prev_seq, served.root_seq) if row else None
    return UserHistory(store.user_attributes_of(conn, user_id), items, ratings, newer=seq > served.root_seq,
                       signup_items=signup_items(conn, user_id), trained_row=row, learned_values=learned)


def learned_values(seq: np.ndarray, prev_rating: np.ndarray, prev_seq: np.ndarray, root_seq: int) -> np.ndarray:
    """Per rating: the value the full retrain (which read every row up to ``root_seq``) learned for
    the pair, where the row is newer and replaced one it read; NaN elsewhere (a new pair, or one
    changed twice since: the retrain's value is no longer recorded)."""
    prev_seq = np.asarray(prev_seq, np.int64)
    keep = (np.asarray(seq) > root_seq) & (prev_seq >= 0) & (prev_seq <= root_seq)
    return np.where(keep, np.asarray(prev_rating, np.float64), np.nan)


def user_vector(conn: Connection, served: Served, user_id: int) -> tuple[UserVector, np.ndarray]:
    """The user's representation now (every stored rating counts at once), and the inner indices of
    the items they rated."""
    history = user_history(conn, served, user_id)
    return served.model.user_vector(history), served.model.item_index(history.items)
