"""Write a validated dataset into the database in one transaction."""
from __future__ import annotations

import numpy as np
from sqlalchemy import Engine

from ..cf_core.errors import CfbError, InputError
from ..db import store
from ..db.engine import writing
from ..db.schema import Item, User
from ..db.sources import Dataset, check_scale


def ingest_dataset(engine: Engine, ds: Dataset, scale: tuple[float, float] | None = None,
                   source: str = "ratings", progress=None) -> dict:  # noqa: ANN001
    """Store users, items and ratings of ``ds`` (all or nothing); returns counts.

    The rating scale is fixed by the first ingest (the dataset's, ``scale``, or the data's range);
    later ratings outside it are refused."""
    store.create_schema(engine)
    with engine.connect() as conn:  # a first large load writes through a rollback journal (see ``writing``)
        first_load = len(ds.ratings) >= store.BULK_ROWS and store.next_seq(conn) == 1
    with writing(engine, first_load=first_load) as conn:
        known = store.rating_scale(conn)
        if known and scale and tuple(scale) != known:
            raise CfbError(f"the database's rating scale is {known[0]:g}..{known[1]:g}, not {scale[0]:g}..{scale[1]:g}")
        if known is None:
            if scale is None:
                scale = ds.scale
            if scale is None and len(ds.ratings):
                scale = (float(ds.ratings["rating"].min()), float(ds.ratings["rating"].max()))
            if scale is not None:
                store.set_setting(conn, "rating_scale", f"{scale[0]:g},{scale[1]:g}")
        scale = known or scale
        if scale is not None and len(ds.ratings):
            check_scale(ds.ratings, scale, source)
        n_users = n_items = 0
        if ds.users is not None and len(ds.users):
            store.ensure_ids(conn, User, ds.users["user"].tolist(),
                             {"attributes": ds.users["attributes"].tolist()}, update_cols=("attributes",))
            n_users = len(ds.users)
        if ds.items is not None and len(ds.items):
            store.ensure_ids(conn, Item, ds.items["item"].tolist(),
                             {"title": ds.items["title"].tolist(), "attributes": ds.items["attributes"].tolist()},
                             update_cols=("title", "attributes"))
            n_items = len(ds.items)
        r, n = ds.ratings, 0
        if len(r):  # write_ratings keeps one row per (user, item), the last one, as the table does
            n = store.write_ratings(conn, database_ids(conn, User, r["user"]), database_ids(conn, Item, r["item"]),
                                    r["rating"].to_numpy(np.float64), r["timestamp"].to_numpy(), progress)
    return {"ratings": n, "users": n_users, "items": n_items, "scale": list(scale) if scale else None}


def database_ids(conn, table, external) -> np.ndarray:  # noqa: ANN001
    """The database id of every external id in ``external`` (a column; categorical from the readers),
    created where new: each distinct id is looked up once, then spread by its category code."""
    import pandas as pd

    if isinstance(external.dtype, pd.CategoricalDtype):
        codes, categories = np.asarray(external.array.codes), external.array.categories
    else:  # in order of first appearance, as the readers' categoricals are
        codes, categories = pd.factorize(external)
    if (codes < 0).any():
        raise InputError(f"row {int(np.argmax(codes < 0)) + 1}: missing {external.name or 'id'}",
                         field=str(external.name or "id"))
    used = np.flatnonzero(np.bincount(codes, minlength=len(categories)))  # (no sort, unlike np.unique)
    names = [str(c) for c in np.asarray(categories, dtype=object)[used].tolist()]
    ids = store.ensure_ids(conn, table, names)
    by_code = np.full(len(categories), -1, np.int64)
    by_code[used] = [ids[x] for x in names]
    return by_code[codes]


def upsert_items(engine: Engine, items) -> dict:  # noqa: ANN001
    """Add or update items (item, title, attributes) in one transaction.

    An empty title keeps the stored one; given attributes replace those of the same name, the others
    are kept. Returns counts."""
    from sqlalchemy import select

    store.create_schema(engine)
    ids = [str(x) for x in items["item"]]
    with writing(engine) as conn:
        existing: dict[str, tuple] = {}
        for start in range(0, len(ids), 900):
            rows = conn.execute(select(Item.external_id, Item.title, Item.attributes)
                                .where(Item.external_id.in_(ids[start:start + 900])))
            existing.update({ext: (title, attrs or {}) for ext, title, attrs in rows})
        titles, attributes = [], []
        for item, title, attrs in zip(ids, items["title"], items["attributes"]):
            old_title, old_attrs = existing.get(item, (None, {}))
            titles.append(title if isinstance(title, str) and title else old_title)
            attributes.append({**old_attrs, **attrs})
        store.ensure_ids(conn, Item, ids, {"title": titles, "attributes": attributes},
                         update_cols=("title", "attributes"))
    return {"items": len(ids), "added": len(ids) - len(existing), "updated": len(existing)}
