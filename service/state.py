"""The serving model of a database, loaded once per process, and users as the model sees them."""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
from sqlalchemy import Connection, select

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


def load_served(conn: Connection, version: int | None = None) -> Served:
    """The serving (or given) version, cached per database and version (versions never change; the
    version's creation time tells a database made again at the same address from the one before)."""
    version = version if version is not None else versions.require_serving(conn)
    key = (str(conn.engine.url), version, str(conn.scalar(select(ModelVersion.created_at)
                                                          .where(ModelVersion.id == version))))
    served = _CACHE.get(key)
    if served is None:
        served = Served(version, versions.load_model(conn, version), versions.root_max_seq(conn, version))
        with _CACHE_LOCK:  # server threads share the cache
            _CACHE[key] = served
            while len(_CACHE) > CACHED_VERSIONS:
                _CACHE.pop(next(iter(_CACHE)), None)  # the oldest loaded
    return served


def signup_of(conn: Connection, user_id: int) -> tuple[frozenset, int | None]:
    """Database ids of the items the user rated in their signup questionnaire, and how many
    questionnaire items it showed them (None: not said)."""
    cols = [Answer.ratings] + ([Answer.asked] if store.has_answers_asked(conn) else [])
    answer = conn.execute(select(*cols).where(Answer.user_id == user_id)).first()
    if answer is None:
        return frozenset(), None
    asked = answer[1] if len(answer) > 1 else None
    if not answer[0]:
        return frozenset(), asked
    ids = conn.scalars(select(Item.id).where(Item.external_id.in_([str(k) for k in answer[0]]))).all()
    return frozenset(int(i) for i in ids), asked


def user_history(conn: Connection, served: Served, user_id: int) -> UserHistory:
    """Everything the model needs to know of a user: answers, ratings (and which are newer than
    the full retrain), signup items, and their trained row if the full version learned them."""
    items, ratings, seq, prev, prev_seq = store.user_ratings_replaced(conn, user_id)
    ids, factors, bias = versions.trained_rows(conn, served.version, [user_id])
    row = (factors[0], float(bias[0])) if len(ids) else None
    learned = None
    if row:
        replaced = store.replaced_ratings_of(conn, user_id, served.root_seq) \
            if changed_again(seq, prev_seq, served.root_seq).any() else None
        learned = learned_values(items, seq, prev, prev_seq, served.root_seq, replaced)
    signup, asked = signup_of(conn, user_id)
    return UserHistory(store.user_attributes_of(conn, user_id), items, ratings, newer=seq > served.root_seq,
                       signup_items=signup, trained_row=row, learned_values=learned, asked=asked)


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
    """The user's representation now (every stored rating counts at once), and the inner indices of
    the items they rated."""
    history = user_history(conn, served, user_id)
    return served.model.user_vector(history), served.model.item_index(history.items)
