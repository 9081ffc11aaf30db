"""Answers from the serving model: recommendations, predictions, similar items, biases."""
from __future__ import annotations

import difflib
import re

import numpy as np
from sqlalchemy import Connection, select

from ..cf_core.errors import CannotAnswerError, CfbError, UnknownIdError, argument_error, check_whole, printable
from ..db import store
from ..db.schema import Item, Rating
from .state import Served, load_served, user_vector


def _items_out(conn: Connection, ids: np.ndarray, scores: np.ndarray) -> list[dict]:
    """Items (database ids) as answers give them: ``{"item", "title", "score"}``."""
    titles = store.item_titles(conn, ids)
    return [{"item": titles[int(i)][0], "title": titles[int(i)][1], "score": round(float(s), 4)}
            for i, s in zip(ids, scores)]


def check_top_n(n: int) -> None:
    """``n`` of a top-N list (`recommend`, `similar`, `biases`): a whole number from 1 to 1000."""
    check_whole(n, "n", 1, 1000)


def recommend(conn: Connection, external_user: str, n: int = 10, by: str = "rank") -> dict:
    """Top ``n`` unrated items for a user, with their predicted ratings as ``score``.

    ``by="rank"`` orders by the version's ranking score (what the user would watch and like);
    ``by="rating"`` by predicted rating alone. Every stored rating and answer counts at once."""
    check_top_n(n)
    if by not in ("rank", "rating"):
        raise argument_error(f"by must be 'rank' or 'rating', got {by!r}", "by")
    served = load_served(conn)
    uid = store.user_id_of(conn, external_user)
    user, rated = user_vector(conn, served, uid)
    top, predicted = served.model.recommend(user, rated, n, by)
    return {"user": str(external_user).strip(), "items": _items_out(conn, top, predicted)}


def user_ratings(conn: Connection, external_user: str, n: int = 20) -> dict:
    """A user's latest ``n`` ratings, newest first: ``{"user", "count" (all their ratings), "ratings": [{"item",
    "title", "rating"}]}`` (from the database: every rating, also one the serving version has not seen)."""
    check_top_n(n)
    uid = store.user_id_of(conn, external_user)
    ratings, count = store.ratings_newest_first(conn, uid, n)
    return {"user": str(external_user).strip(), "count": count, "ratings": ratings}


def predict_pairs(conn: Connection, pairs: list[tuple[str, str]]) -> list[float]:
    """Predicted rating for each (external user, item) pair, the item by id or exact title (as
    ``find_item``); an unknown one is an error whose message names its row ("row K: ..."), with
    ``row`` (K, from 1) and ``detail`` (the message without the row) set on it for a caller that
    names the row its own way (the CLI names the file's line)."""
    return _predicted(conn, pairs)[0]


def predictions_table(conn: Connection, pairs: list[tuple[str, str]]) -> list[dict]:
    """``predict_pairs`` as rows ``{"user", "item", "title", "prediction"}``, the item as stored (its
    id, also where the pair named it by title), as ``recommend`` and ``similar`` give items."""
    predictions, item_ids = _predicted(conn, pairs)
    titles = store.item_titles(conn, set(item_ids))
    return [{"user": str(u).strip(), "item": titles[i][0], "title": titles[i][1], "prediction": p}
            for (u, _), i, p in zip(pairs, item_ids, predictions)]


def _predicted(conn: Connection, pairs: list[tuple[str, str]]) -> tuple[list[float], list[int]]:
    """(the predicted ratings, the items' database ids) of ``predict_pairs``."""
    served = load_served(conn)
    users = store.id_map(conn, store.User)
    items = store.id_map(conn, Item)
    rows: dict[int, list[tuple[int, int]]] = {}  # user -> [(row, inner item)]: one prediction call per user
    item_ids = []
    for k, (u, i) in enumerate(pairs):
        try:
            user, item, inner = _pair_indices(conn, served, users, items, str(u).strip(), str(i).strip())
        except CfbError as e:
            raise _naming_row(e, k + 1) from None
        rows.setdefault(user, []).append((k, inner))
        item_ids.append(item)
    out = [0.0] * len(pairs)
    for user, wanted in rows.items():
        at, inner = zip(*wanted)
        for k, p in zip(at, served.model.predict(user_vector(conn, served, user)[0], np.array(inner)).tolist()):
            out[k] = float(p)
    return out, item_ids


def _pair_indices(conn: Connection, served: Served, users: dict[str, int], items: dict[str, int],
                  u: str, i: str) -> tuple[int, int, int]:
    """The database ids of user ``u`` and item ``i`` (id or exact title), and the item's index in the
    serving model. A title found is added to ``items`` (a file names the same titles row after row)."""
    if u not in users:
        raise UnknownIdError(f"unknown user {u!r}", field="user")
    if i not in items:
        items[i] = find_item(conn, i)
    item = items[i]
    inner = int(served.model.item_index([item])[0])
    if inner < 0:
        raise CannotAnswerError(not_in_model(conn, served, item, i), field="item")
    return users[u], item, inner


def _naming_row(error: CfbError, row: int) -> CfbError:
    """``error`` again, of its type, its message prefixed "row ``row``: ", with ``row`` and ``detail`` set."""
    named = type(error)(f"row {row}: {error}", field=error.field)
    named.row, named.detail = row, str(error)
    return named


NOTHING_LEFT = "every item the serving model holds is rated: none is left to recommend"


def not_in_model(conn: Connection, served: Served, db_id: int, query: str) -> str:
    """Why an item of the catalogue is not in the serving model, and what adds it."""
    why = why_it_needs_a_rating(conn, served, db_id)
    if why is None:
        return f"item {query!r} is not in the serving model yet: it joins at the next retrain (`cfb retrain`)"
    return f"item {query!r} is not in the serving model yet: {why}, so it joins at the first `cfb retrain` after it is rated"


def why_it_needs_a_rating(conn: Connection, served: Served, db_id: int) -> str | None:
    """Why a catalogue item the serving model does not hold needs a rating before a retrain adds it, or
    None when the next retrain adds it (it is rated, or the version starts new items from metadata)."""
    rated = conn.scalar(select(Rating.item_id).where(Rating.item_id == db_id).limit(1)) is not None
    has_metadata = bool(store.item_attributes(conn, [db_id]).get(db_id))
    if rated or (served.model.item_prior is not None and has_metadata):
        return None
    return ("the serving version has no item prior to start it from its metadata" if has_metadata
            else "it has no rating and no metadata to start it from")


def item_not_in_model(conn: Connection, query: str) -> dict | None:
    """The catalogue item ``query`` names when the serving model does not hold it yet: its id, title and
    whether it waits for a rating (``why_it_needs_a_rating``) before a retrain adds it; None when the model holds it."""
    served = load_served(conn)
    db_id = find_item(conn, query)
    if served.model.item_index([db_id])[0] >= 0:
        return None
    ext, title = store.item_titles(conn, [db_id])[db_id]
    return {"item": ext, "title": title, "waits_for_a_rating": why_it_needs_a_rating(conn, served, db_id) is not None}


def _item_by_id_or_title(conn: Connection, query: str) -> int | None:
    """The item whose external id or else whose exact title is ``query`` (composed or decomposed alike:
    ``store.title_forms``), or None. An id no item can have
    (``store.can_exist``: too long, a NUL) is not looked up; a NUL is no title either (PostgreSQL refuses
    it even in a query), so such a query is unknown alike on every backend."""
    hit = conn.scalar(select(Item.id).where(Item.external_id == query)) if store.can_exist(query) else None
    if hit is not None or "\x00" in query:
        return hit
    named = store.items_titled(
        query, lambda title: conn.scalars(select(Item.external_id).where(Item.title == title)).all(),
        lambda: store.items_by_composed_title(conn))
    if len(named) > 1:
        error = argument_error(f"{len(named)} items are titled {query!r} ({', '.join(named)}); use an item id", "item")
        error.suggestions = list(named)  # (what to ask for instead: a page links each item)
        raise error
    return conn.scalar(select(Item.id).where(Item.external_id == named[0])) if named else None


def find_item(conn: Connection, query: str) -> int:
    """An item's database id by external id or exact title (surrounding spaces aside, as the readers
    strip them, and typed composed or decomposed); a near miss suggests close titles."""
    query = str(query).strip()
    if not query:
        raise argument_error("empty item id", "item")
    hit = _item_by_id_or_title(conn, query)
    if hit is None:
        close = close_titles(query, store.item_title_list(conn))
        error = UnknownIdError(f"unknown item {store.shown_id(query)}{hint_of(close)}", field="item")
        error.suggestions = close  # (a web page links them; the API lists them)
        raise error
    return hit


HINT_ALL_TITLES = 5_000  # up to this many titles a hint compares the query with each (beyond: see title_hint)


def title_hint(query: str, titles) -> str:  # noqa: ANN001
    """"; did you mean: …?" with up to five titles close to ``query`` (``close_titles``), or ""."""
    return hint_of(close_titles(query, titles))


def hint_of(close: list[str]) -> str:
    """"; did you mean: …?" naming ``close`` (titles), or "" for none."""
    return f"; did you mean: {'; '.join(printable(t) for t in close)}?" if close else ""  # (a title may hold a line break)


def close_titles(query: str, titles) -> list[str]:  # noqa: ANN001
    """Up to five titles close to ``query`` (else containing it). In a catalogue of more than
    ``HINT_ALL_TITLES`` titles only those sharing a word of three letters or more with ``query`` are
    compared (difflib costs about 10 µs a title: 60,000 took 0.6–2.5 s)."""
    if len(query) > store.MAX_ID_LENGTH:  # (no title is compared with a page of text)
        return []
    titles = list(dict.fromkeys(titles))  # (two items may share a title: one suggestion)
    candidates = titles
    if len(titles) > HINT_ALL_TITLES:
        words = set(re.findall(r"\w{3,}", query.lower()))
        candidates = [t for t in titles if words & set(re.findall(r"\w{3,}", t.lower()))]
    close = difflib.get_close_matches(query, candidates, n=5, cutoff=0.5)
    if not close:
        low = query.lower()
        close = [t for t in titles if low in t.lower()][:5]
    return close


def similar(conn: Connection, query: str, n: int = 10) -> dict:
    """Items closest to ``query`` by cosine similarity of item factors."""
    check_top_n(n)
    served = load_served(conn)
    db_id = find_item(conn, query)
    try:
        top, sims = served.model.similar_items(db_id, n)
    except KeyError:  # (an item of the catalogue the serving version does not hold)
        raise CannotAnswerError(not_in_model(conn, served, db_id, query), field="item") from None
    ext, title = store.item_titles(conn, [db_id])[db_id]
    return {"item": ext, "title": title, "items": _items_out(conn, top, sims)}


def biases(conn: Connection, n: int = 10, min_ratings: int = 1) -> dict:
    """Items with the lowest and highest learned bias (dot model), as in chapter 8, among items with at
    least ``min_ratings`` ratings (1: an item nobody rated has a bias guessed from its metadata, not
    learned; 0 lists those too), each with its number of ratings."""
    check_top_n(n)
    min_ratings = check_whole(min_ratings, "min_ratings", 0)
    served = load_served(conn)
    model = served.model
    if model.kind != "dot":
        raise CannotAnswerError(f"biases are learned by the dot model only (this version is {model.kind!r})")
    b = model.rating.item_bias.astype(np.float64).copy()
    b[model.item_counts < min_ratings] = np.nan
    ok = np.flatnonzero(~np.isnan(b))
    order = ok[np.argsort(b[ok], kind="stable")]

    def out(rows: np.ndarray) -> list[dict]:
        return [dict(r, ratings=int(model.item_counts[k]))
                for r, k in zip(_items_out(conn, model.item_ids[rows], b[rows]), rows)]

    return {"lowest": out(order[:n]), "highest": out(order[::-1][:n])}
