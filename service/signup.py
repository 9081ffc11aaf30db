"""One sign-up (``POST /users``) without reading the whole catalogue: ``onboard``'s checks and rows,
with items, titles and users looked up per key."""
from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Connection, Engine

from ..db import store
from ..db.engine import writing
from .state import Served, load_served


class _Lookup:
    """A read-only mapping answered by one query per key (``get``, ``in``), for ``SignupValidator``; a key
    that ``possible`` refuses (an id no row can have) is missing without a query. ``prefetch`` answers
    many keys in one query where the lookup has a ``batch`` statement (``keys``: a list parameter)."""

    PREFETCH_MAX = 500  # keys a prefetch asks for in one statement (the rest are looked up one by one)

    def __init__(self, conn, stmt, many: bool = False, possible: Callable[[str], bool] = store.can_exist,
                 batch=None):  # noqa: ANN001
        self.conn, self.stmt, self.many, self.possible, self.batch, self.seen = conn, stmt, many, possible, batch, {}

    def prefetch(self, keys) -> None:  # noqa: ANN001
        """Look up ``keys`` (those not seen yet, up to PREFETCH_MAX) in one query (one-to-one lookups)."""
        wanted = list(dict.fromkeys(k for k in map(str, keys) if k not in self.seen and self.possible(k)))
        wanted = wanted[:self.PREFETCH_MAX]
        if self.batch is None or self.many or not wanted:
            return
        found = dict(self.conn.execute(self.batch, {"keys": wanted}).all())
        self.seen.update({k: found.get(k) for k in wanted})

    def get(self, key, default=None):
        key = str(key)
        if key not in self.seen:
            rows = self.conn.execute(self.stmt, {"key": key}).scalars().all() if self.possible(key) else []
            self.seen[key] = rows if self.many else (rows[0] if rows else None)
        value = self.seen[key]
        return default if value is None or value == [] else value

    def __contains__(self, key) -> bool:
        return self.get(key) is not None


def signup_one(engine: Engine, entry: dict, where: str = "request body") -> dict:
    """``onboard(engine, [(where, entry)])`` for one entry: the same checks (``SignupValidator.validate``)
    and the same rows (``store_signup``), with the catalogue and the users looked up per key instead of
    read whole (a signup costs the same with 1,000 or 1,000,000 users)."""
    from sqlalchemy import bindparam, select

    from ..db.schema import Item, User
    from .onboard import SignupValidator, new_user_id, store_signup

    # an item's external id and database id never change (items are never deleted or renumbered): the
    # entry's items are looked up once, in one query, and the ids found reused under the write lock (a
    # miss is asked again there: another writer may have added that id meanwhile)
    items = _Lookup(None, select(Item.id).where(Item.external_id == bindparam("key")),
                    batch=select(Item.external_id, Item.id).where(Item.external_id.in_(bindparam("keys", expanding=True))))

    def validator_on(conn: Connection, served: Served) -> SignupValidator:
        items.conn = conn
        return SignupValidator(
            conn, served, items=items,
            titles=_Lookup(conn, select(Item.external_id).where(Item.title == bindparam("key")), many=True,
                           possible=lambda title: "\x00" not in title),  # (as ``serving.find_item``)
            all_titles=lambda: store.item_title_list(conn),  # (read on an unknown item only)
            known_users=_Lookup(conn, select(User.id).where(User.external_id == bindparam("key"))))

    with engine.connect() as conn:  # bad input is found here, outside the write lock (an unknown item's
        validator = validator_on(conn, load_served(conn))  # hint reads every title)
        if isinstance(entry.get("ratings"), dict):
            items.prefetch(str(key).strip() for key in entry["ratings"])
        validator.validate(where, entry)
    items.seen = {key: found for key, found in items.seen.items() if found is not None}
    with writing(engine) as conn:
        served = load_served(conn)
        validator = validator_on(conn, served)
        signup = validator.validate(where, entry)
        if signup.user is None:  # onboard's `new-N`, without reading every user
            signup.user = new_user_id(conn, validator.known_users)
        external, _ = store_signup(conn, served, signup)
    return {"version": served.version, "onboarded": [{"user": external, "ratings": len(signup.ratings)}],
            "skipped": []}
