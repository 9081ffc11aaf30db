"""Write a validated dataset into the database in one transaction."""
from __future__ import annotations

from sqlalchemy import Engine

from ..cf_core.errors import CfbError
from ..db import store
from ..db.schema import Item, User
from ..db.sources import Dataset, check_scale


def ingest_dataset(engine: Engine, ds: Dataset, scale: tuple[float, float] | None = None,
                   source: str = "ratings", progress=None) -> dict:  # noqa: ANN001
    """Store users, items and ratings of ``ds`` (all or nothing); returns counts.

    The rating scale is fixed by the first ingest (the dataset's, ``scale``, or the data's range);
    later ratings outside it are refused."""
    store.create_schema(engine)
    with engine.begin() as conn:
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
        # one row per (user, item), the last one winning, as the table keeps it
        r = ds.ratings.drop_duplicates(["user", "item"], keep="last")
        n = 0
        if len(r):
            umap = store.ensure_ids(conn, User, r["user"].unique().tolist())
            imap = store.ensure_ids(conn, Item, r["item"].unique().tolist())
            n = store.write_ratings(conn, r["user"].map(umap).tolist(), r["item"].map(imap).tolist(),
                                    r["rating"].tolist(), r["timestamp"].tolist(), progress)
    return {"ratings": n, "users": n_users, "items": n_items, "scale": list(scale) if scale else None}
