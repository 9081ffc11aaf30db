"""Single ratings from `cfb rate`."""
from __future__ import annotations

import math
import time

from sqlalchemy import Connection, Engine, insert

from ..cf_core.errors import UnknownIdError, argument_error
from ..db import ratings_io, store
from ..db.engine import writing
from ..db.textfile import plain_float
from ..db.schema import Item
from .serving import find_item


def rate_item(engine: Engine, user: str, item: str, rating: float, create_item: bool = False) -> dict:
    """Store one rating (the latest wins); the item is found by id or exact title, or created."""
    try:
        value = plain_float(rating) if isinstance(rating, str) else float(rating)
    except (TypeError, ValueError, OverflowError):
        raise argument_error(f"rating {rating!r} is not a number", "rating") from None
    if not math.isfinite(value):
        raise argument_error(f"rating {rating!r} is not a finite number", "rating")
    rating = value
    if not str(item).strip():
        raise argument_error("empty item id", "item")
    with engine.connect() as conn:  # bad input is refused here, before the write waits for the writer's lock
        _check_rating(conn, rating)  # (checked again under it: another writer may change what they depend on)
        store.user_id_of(conn, user)
        if not create_item:  # (an unknown item's hint reads every title)
            find_item(conn, item)
    with writing(engine) as conn:
        rating = _check_rating(conn, rating)
        uid = store.user_id_of(conn, user)
        try:
            iid = find_item(conn, item)
        except UnknownIdError:  # (an ambiguous title is no new item's id)
            if not create_item:
                raise
            store.check_id(str(item).strip(), "item")
            iid = conn.execute(insert(Item).values(external_id=str(item).strip(), title=None, attributes={})
                               .returning(Item.id)).scalar_one()
        ratings_io.write_ratings(conn, [uid], [iid], [rating], [int(time.time())])
        ext, title = store.item_titles(conn, [iid])[iid]
    # (the id as stored; the rating as stored, in the digits it was typed with: 3.7, not 3.700000047683716)
    return {"user": str(user).strip(), "item": ext, "title": title, "rating": float(store.as_typed(rating))}


def _check_rating(conn: Connection, rating: float) -> float:
    """``rating`` as stored on the database's scale and step; off them, a ``CfbError`` naming it."""
    scale, step = store.rating_scale_and_step(conn)
    problem = store.rating_problem(rating, scale, step)
    if problem:
        raise argument_error(problem, "rating")
    return float(store.as_stored(rating, scale, step))
