"""Write a validated dataset into the database in one transaction."""
from __future__ import annotations

import re

import numpy as np
from sqlalchemy import Engine, select

from ..cf_core.errors import CfbError, InputError
from ..db import ratings_io, store
from ..db.engine import writing
from ..db.schema import Item, Rating, User
from ..db.sources import Dataset, RowLines, check_scale, not_a_number_said, number_in_text, row_line


def ingest_dataset(engine: Engine, ds: Dataset, scale: tuple[float, float] | None = None,
                   source: str = "ratings", progress=None) -> dict:  # noqa: ANN001
    """Store users, items and ratings of ``ds`` (all or nothing); returns counts: ratings given (one
    per user and item), how many of them are new or change a stored value (``new_ratings``), users
    and items given (with attributes or ratings), and how many of them are new.

    The rating scale is fixed by the first ingest (the dataset's, ``scale``, or the data's range, which
    must not be a single value); later ratings outside it are refused. Given attributes are merged over
    the stored ones and typed as the database holds them (``conform_attributes``)."""
    fresh = store.schema_for_first_write(engine)  # (True: the tables are made in the write's transaction)
    first_load, checked = len(ds.ratings) >= ratings_io.BULK_ROWS, None
    if not fresh:  # (a database without tables holds nothing to check against)
        with engine.connect() as conn:  # a first large load writes through a rollback journal (see ``writing``)
            first_load = first_load and store.next_seq(conn) == 1
            # before waiting for another writer, what the database holds refuses bad input at once (not "busy"):
            claim_catalogue(conn, ds, note=False)  # its catalogue, its scale, its users' release and the attributes'
            checked = _check_stored_scale(conn, ds, scale, source)  # types, in the order the write checks them
            claim_users(conn, ds, note=False)
            check_attribute_types(conn, User, ds.users, ds.users_source or source)
            check_attribute_types(conn, Item, ds.items, ds.items_source or source)
    with writing(engine, first_load=first_load) as conn:
        if fresh:
            store.create_tables(conn)
        claim_catalogue(conn, ds)
        known = checked or _check_stored_scale(conn, ds, scale, source)  # (a first ingest may have set it since)
        if known is None:
            if scale is None:
                scale = ds.scale
            if scale is None and len(ds.ratings):
                r = ds.ratings["rating"]  # (as typed: a float32 0.3 is the 0.3 of the file)
                scale = (float(store.as_typed(r.min())), float(store.as_typed(r.max())))
                if scale[0] == scale[1]:
                    raise InputError(f"every rating is {scale[0]:g}, so the rating scale cannot be told from "
                                     "them: give the scale (`--scale LO,HI`; `scale=(lo, hi)` in Python)", source=source)
            if scale is not None and (problem := store.scale_problem(scale)):
                raise InputError(problem + ("" if ds.scale is not None else " (the scale is the ratings' range: "
                                            "give one with `--scale LO,HI`; `scale=(lo, hi)` in Python)"), source=source)
            if scale is not None:
                store.set_setting(conn, "rating_scale", f"{float(scale[0])!r},{float(scale[1])!r}")
                if ds.step is not None and tuple(scale) == tuple(ds.scale or ()):
                    store.set_setting(conn, "rating_step", f"{ds.step:g}")
            if scale is not None and len(ds.ratings):  # lines and field as the reader names them
                check_scale(ds.ratings, scale, source, ds.first_line, ds.columns.get("rating", "rating"),
                            step=store.rating_step(conn))
        scale = known or scale
        claim_users(conn, ds)
        before = {t: store.count_rows(conn, t) for t in (User, Item)}
        given: dict = {User: set(), Item: set()}
        if ds.users is not None and len(ds.users):
            write_users(conn, ds.users, ds.users_source or source)
            given[User].update(str(x) for x in ds.users["user"])
        if ds.items is not None and len(ds.items):
            write_items(conn, ds.items, ds.items_source or source)
            given[Item].update(str(x) for x in ds.items["item"])
        r, n, changed = ds.ratings, 0, 0
        if len(r):  # write_ratings keeps one row per (user, item), the last one, as the table does
            if before[Item]:
                refuse_titles_as_ids(conn, r["item"], given[Item], source, ds.first_line,
                                     ds.columns.get("item", "item"))
            at = {"source": source, "first_line": ds.first_line}
            users = database_ids(conn, User, r["user"], given[User], **at, field=ds.columns.get("user", "user"))
            items = database_ids(conn, Item, r["item"], given[Item], **at, field=ds.columns.get("item", "item"))
            store.lock_writers(conn)  # (re-entrant) so that the rows from seq0 on are this ingest's
            seq0 = store.next_seq(conn)
            n = ratings_io.write_ratings(conn, users, items, r["rating"].to_numpy(np.float64),
                                         r["timestamp"].to_numpy(), progress)
            # a stored rating given again with the same value keeps its seq; every other row got one from seq0 on
            changed = n if seq0 == 1 else store.count_ratings(conn, since_seq=seq0 - 1)
        new = {t: store.count_rows(conn, t) - before[t] for t in (User, Item)}
    return {"ratings": n, "new_ratings": changed, "users": len(given[User]), "items": len(given[Item]),
            "new_users": new[User], "new_items": new[Item], "scale": list(scale) if scale else None}


def _check_stored_scale(conn, ds: Dataset, scale: tuple[float, float] | None,  # noqa: ANN001
                        source: str) -> tuple[float, float] | None:
    """The database's rating scale (None before its first ingest), once ``ds`` is found to fit it: the
    scale asked for, the release's own and every rating (lines and field as the reader names them)."""
    known = store.rating_scale(conn)
    if known is None:
        return None
    if scale and tuple(scale) != known:
        raise InputError(f"the database's rating scale is {known[0]:g}..{known[1]:g}, not {scale[0]:g}..{scale[1]:g}")
    if ds.scale and not known[0] <= ds.scale[0] <= ds.scale[1] <= known[1]:
        # (a release whose own scale reaches beyond the database's: 10M's half stars after 1M's whole ones)
        raise InputError(f"the release's ratings are on {ds.scale[0]:g}..{ds.scale[1]:g}, beyond the database's "
                         f"{known[0]:g}..{known[1]:g} (from its first ingest): ingest it into a database of its own",
                         source=source)
    if len(ds.ratings):
        check_scale(ds.ratings, known, source, ds.first_line, ds.columns.get("rating", "rating"),
                    step=store.rating_step(conn))
    return known


def claim_catalogue(conn, ds: Dataset, note: bool = True) -> None:  # noqa: ANN001
    """Refuse a public release whose item ids name other items than the database's, else note whose
    they are: a release of another catalogue (MovieLens 100k numbers its movies its own way, the other
    MovieLens releases share the site's movieId, goodbooks numbers books), or the first release into a
    database whose own items (`cfb ingest items`) the release titles otherwise: more than
    ``TITLES_MAY_DIFFER`` of the titles under the ids both have differ, spaces and case aside (a
    database of the same release made before the catalogue was noted, or with a title corrected here
    and there, takes it). ``note=False``: the refusals alone (read-only: before the writer's lock)."""
    if ds.catalogue is not None:
        held = store.get_setting(conn, "catalogue")
        if held is not None and held != ds.catalogue:
            raise CfbError(f"this database holds {held}'s items, and {ds.catalogue}'s ids name other items "
                           f"(its item 1 is not {held}'s item 1): ingest it into another database (--db)")
        if held is None and ds.items is not None and len(ds.items):
            titles = {ext: _title_key(t) for ext, t in zip(ds.items["item"].astype(str), ds.items["title"])
                      if isinstance(t, str)}
            both = [(ext, title) for ext, title in conn.execute(select(Item.external_id, Item.title)
                                                                .where(Item.title.is_not(None))) if ext in titles]
            differ = [(ext, title) for ext, title in both if _title_key(title) != titles[ext]]
            if len(differ) > TITLES_MAY_DIFFER * len(both):
                ext, title = differ[0]
                theirs = ds.items["title"][ds.items["item"].astype(str) == ext].iloc[0]
                raise CfbError(f"this database's item {store.shown_id(ext)} is {store.shown_id(title)}, and "
                               f"{ds.catalogue}'s is {store.shown_id(theirs)} ({len(differ)} of the {len(both)} "
                               "titled items they share ids with differ): the database holds another catalogue; "
                               "ingest the release into another database (--db)")
        if held is None and note:
            store.set_setting(conn, "catalogue", ds.catalogue)


TITLES_MAY_DIFFER = 0.05  # the share of shared ids whose titles may differ (corrected ones) in a release's catalogue


def _title_key(title: str) -> str:
    return " ".join(store.composed(title).split()).casefold()


def claim_users(conn, ds: Dataset, note: bool = True) -> None:  # noqa: ANN001
    """Refuse a public release whose user ids name other people than the database's, else note whose
    they are: each release numbers its users anew (MovieLens 1M's user 1 is not 10M's user 1), so a
    database holds one release's users. Where the database does not say whose users it holds (made
    before this was noted, or holding users of your own), the release is refused if most of the
    stored ratings of the users it shares ids with (up to ``USERS_COMPARED`` of them) are not its own.
    ``note=False``: the refusals alone (read-only: before the writer's lock)."""
    if ds.population is not None and (len(ds.ratings) or (ds.users is not None and len(ds.users))):
        held = store.get_setting(conn, "users_of")
        if held is not None and held != ds.population:
            raise CfbError(f"this database holds the users of {held}, and those of {ds.population} are other "
                           "people under the same ids (each release numbers its users anew): ingest it into "
                           "another database (--db)")
        if held is None:
            _refuse_other_people(conn, ds)
            if note:
                store.set_setting(conn, "users_of", ds.population)


USERS_COMPARED = 1_000  # users a release shares ids with whose stored ratings ``claim_users`` compares (one query)


def _refuse_other_people(conn, ds: Dataset) -> None:  # noqa: ANN001
    stored = {ext for (ext,) in conn.execute(select(User.external_id))}
    if not stored:  # (a first ingest: nothing to compare)
        return
    users = ds.ratings["user"].astype(str)
    shared = sorted(set(users.unique()) & stored)[:USERS_COMPARED]
    if not shared:
        return
    mine = users.isin(shared).to_numpy()
    theirs = set(zip(users[mine], ds.ratings["item"].astype(str)[mine]))
    ours = conn.execute(select(User.external_id, Item.external_id).join(Rating, Rating.user_id == User.id)
                        .join(Item, Item.id == Rating.item_id).where(User.external_id.in_(shared))).all()
    if ours and sum(pair in theirs for pair in ours) < len(ours) / 2:
        raise CfbError(f"this database holds other users under {ds.name}'s user ids: of the {len(ours)} stored "
                       f"ratings of the users they share ids with (user {store.shown_id(shared[0])} …), most are "
                       "not the release's (each release numbers its users anew): ingest it into another "
                       "database (--db)")


def _lines(frame) -> list[int | None]:  # noqa: ANN001
    """Each row's line in its file (the readers of a CSV give a ``line`` column), else None."""
    if "line" not in frame:
        return [None] * len(frame)
    return [None if line is None or line != line else int(line) for line in frame["line"]]  # (NaN: none)


def _kind(value) -> str:  # noqa: ANN001
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "number"
    return "text"


# a code of digits (a zip "02139" or "02139-4307"), not a number: its leading zero says so
DIGIT_CODE = re.compile(r"0[0-9]+([ -][0-9]+)*")


def conform_attributes(table, ids: list[str], records: list[dict], lines: list[int | None],  # noqa: ANN001
                       stored: dict[str, dict], source: str | None = None) -> list[dict]:
    """Each record merged over the stored attributes of its id (``stored``: external id -> attributes;
    given names replace, the others are kept), its values typed as the stored values that stay (those
    it replaces do not count, so a corrected file can change a type):
    - held as numbers: a text that reads as a finite number ("41", "1e5") becomes that number; any other
      text ("unknown", "N/A", "30s", "25-34", "c.1991", a code with a leading zero such as "07" or the zip
      "02139"), an infinite or undefined number ("inf", "1e400") or a list is refused, naming file, line
      and field, so that one cell cannot turn a number question into free text (or a category) at the
      next retrain; a file giving the column again for every id that holds it can change its type;
    - held as text: a number is stored as its text; held as lists: a single text or number becomes a
      list of one."""
    given = {ext: set(attrs or {}) for ext, attrs in zip(ids, records)}
    kinds: dict[str, set] = {}
    for ext, attrs in stored.items():
        replaced = given.get(ext, ())
        for name, value in (attrs or {}).items():
            if value is not None and name not in replaced:
                kinds.setdefault(name, set()).add(_kind(value))
    out = []
    for ext, attrs, line in zip(ids, records, lines):
        attrs = dict(attrs or {})
        for name, value in attrs.items():
            held, kind = kinds.get(name), _kind(value)
            if held == {"number"} and kind != "number":
                number = number_in_text(value) if kind == "text" else None
                if number is not None:
                    attrs[name] = number
                else:
                    what = table.__tablename__
                    code = kind == "text" and DIGIT_CODE.fullmatch(str(value).strip())
                    said = ("a code with a leading zero, not a number" if code else not_a_number_said(value))
                    raise InputError(f"{store.shown_id(value)} is {said}, and the stored {what} hold {name} as numbers"
                                     + ("" if line is not None else f" ({what[:-1]} {ext!r})")
                                     + (f" (to hold {name} as text, give it again for every {what[:-1]} that has it)"
                                        if code else ""),
                                     source=source, line=line, field=name)
            elif held == {"text"} and kind == "number":
                attrs[name] = str(value)
            elif held == {"list"} and kind in ("text", "number"):
                attrs[name] = [value]
        out.append({**(stored.get(ext) or {}), **attrs})
    return out


def check_ids(ids: list[str], lines: list[int | None], what: str, source: str | None = None) -> None:
    """Refuse the first of ``ids`` that cannot be a ``what`` ("user", "item") id (``store.id_problem``),
    naming ``source``, its line (``lines``: each id's, or None) and the field ``what``."""
    bad = store.first_bad_id(ids)
    if bad is not None:
        store.check_id(ids[bad], what, source=source, line=lines[bad], field=what)


def refuse_nul_text(values, lines: list[int | None], field: str, source: str | None = None) -> None:  # noqa: ANN001
    """Refuse the first text among ``values`` that holds a NUL character (PostgreSQL stores none),
    naming ``source``, its line and ``field``: the same on every backend."""
    values = list(values)
    bad = next((k for k, v in enumerate(values) if isinstance(v, str) and "\x00" in v), None)
    if bad is not None:
        raise InputError(f"{field} {store.shown_id(values[bad])} contains a NUL character", source=source,
                         line=lines[bad], field=field)


def check_attribute_types(conn, table, rows, source: str | None = None) -> None:  # noqa: ANN001
    """The refusals of ``conform_attributes`` for ``rows`` (users or items, with ``attributes``; None:
    nothing), read-only: run before the writer's lock, and again by the write."""
    if rows is None or not len(rows) or "attributes" not in rows:
        return
    key = "user" if table is User else "item"
    stored = dict(conn.execute(select(table.external_id, table.attributes)).all())
    conform_attributes(table, [str(x) for x in rows[key]], list(rows["attributes"]), _lines(rows), stored, source)


def write_users(conn, users, source: str | None = None) -> None:  # noqa: ANN001
    """Add or update users (user, attributes; optional line): attributes as ``conform_attributes``."""
    ids = [str(x) for x in users["user"]]
    check_ids(ids, _lines(users), "user", source)
    stored = dict(conn.execute(select(User.external_id, User.attributes)).all())
    attrs = conform_attributes(User, ids, list(users["attributes"]), _lines(users), stored, source)
    store.ensure_ids(conn, User, ids, {"attributes": attrs}, update_cols=("attributes",))


def write_items(conn, items, source: str | None = None) -> tuple[int, int]:  # noqa: ANN001
    """Add or update items (item, title, attributes; optional line): an empty title keeps the stored one,
    attributes as ``conform_attributes``. Returns how many already existed, and how many of those
    this changes (title or attributes)."""
    ids = [str(x) for x in items["item"]]
    lines = _lines(items)
    check_ids(ids, lines, "item", source)
    refuse_nul_text(items["title"], lines, "title", source)
    stored = {ext: (title, a) for ext, title, a in conn.execute(select(Item.external_id, Item.title, Item.attributes))}
    # a title is stored composed (NFC: it looks the same), so that a lookup in any form finds it
    new_titles = [store.composed(t) if isinstance(t, str) and t else stored.get(e, (None,))[0]
                  for e, t in zip(ids, items["title"])]
    refuse_titles_that_name_two_items(conn, ids, new_titles, set(stored), lines, source)
    attrs = conform_attributes(Item, ids, list(items["attributes"]), lines,
                               {ext: a for ext, (_, a) in stored.items()}, source)
    store.ensure_ids(conn, Item, ids, {"title": new_titles, "attributes": attrs}, update_cols=("title", "attributes"))
    given = dict(zip(ids, zip(new_titles, attrs)))  # (an id given twice: its last row, as written)
    existed = [e for e in given if e in stored]
    # (a title stored before titles were stored composed is rewritten so, but not changed: not "updated")
    was = {e: (store.composed(t) if isinstance(t, str) else t, a) for e, (t, a) in stored.items()}
    return len(existed), sum(1 for e in existed if given[e] != was[e])


def refuse_titles_that_name_two_items(conn, ids: list[str], titles: list, stored: set[str], lines: list,  # noqa: ANN001
                                      source: str | None) -> None:
    """A new id that is a stored item's title or another row's title, or a title that is another item's
    id (stored or new), would let one text name two items (lookups take the id first), as a ratings file
    naming an item by its title would: refused, naming its line, whichever Unicode form either is in.
    Texts of digits alone are ids and titles both (a book may be titled "1984")."""
    new = [k for k, ext in enumerate(ids) if ext not in stored and not ext.isdigit()]
    titled = store.items_by_composed_title(conn) if new and stored else {}  # (only where a new id could be a title)
    for k in new:
        ext = ids[k]
        if store.composed(ext) in titled:
            raise InputError(f"{ext!r} is the title of {_items_named(titled[store.composed(ext)])}: a new item's id "
                             "cannot be another item's title", source=source, line=lines[k], field="item")
    by_title: dict[str, str] = {}
    for ext, title in zip(ids, titles):
        if isinstance(title, str) and title:
            by_title.setdefault(store.composed(title), ext)
    for k in new:
        other = by_title.get(store.composed(ids[k]))
        if other is not None and other != ids[k]:
            raise InputError(f"{ids[k]!r} is the title of item {other!r} in this file: a new item's id cannot be "
                             "another item's title", source=source, line=lines[k], field="item")
    every_id = {store.composed(e): e for e in list(stored) + ids}
    for k, (ext, title) in enumerate(zip(ids, titles)):
        if isinstance(title, str) and title and not title.isdigit():
            owner = every_id.get(store.composed(title))
            if owner is not None and owner != ext:
                raise InputError(f"title {title!r} is the id of item {owner!r}: lookups by that text would find "
                                 "that item, never this one", source=source, line=lines[k], field="title")


def distinct_ids(external) -> tuple[np.ndarray, np.ndarray, list[str]]:  # noqa: ANN001
    """(codes, used, names) of an id column (categorical from the readers, else factorized in order of
    first appearance): each row's code, the codes some row uses, and their ids as text."""
    import pandas as pd

    if isinstance(external.dtype, pd.CategoricalDtype):
        codes, categories = np.asarray(external.array.codes), external.array.categories
    else:
        codes, categories = pd.factorize(external)
    if (codes < 0).any():
        raise InputError(f"row {int(np.argmax(codes < 0)) + 1}: missing {external.name or 'id'}",
                         field=str(external.name or "id"))
    used = np.flatnonzero(np.bincount(codes, minlength=len(categories)))  # (no sort, unlike np.unique)
    return codes, used, [str(c) for c in np.asarray(categories, dtype=object)[used].tolist()]


def refuse_titles_as_ids(conn, items, given: set, source: str, first_line: RowLines = 2,  # noqa: ANN001
                         field: str = "item") -> None:
    """Ratings name items by id: a new id that is the title of a stored item (``Star Wars (1977)`` for
    item 50) is refused, naming its first line (``first_line``: the first row's; None: rows are not the
    file's lines) and ``field``, rather than made into a second, untitled item. An id of digits alone is
    taken as an id (a book may be titled "1984")."""
    codes, used, names = distinct_ids(items)
    new = {x for x in names if not x.isdigit()} - given
    if new:
        new -= set(store.id_map(conn, Item))
    if not new:
        return
    wanted = {store.composed(x) for x in new}  # (a title typed composed or decomposed is the same title)
    titled = {t: ids for t, ids in store.items_by_composed_title(conn).items() if t in wanted}
    if titled:
        hit = next(k for k, x in enumerate(names) if x in new and store.composed(x) in titled)
        pos, name = int(np.argmax(codes == used[hit])), names[hit]
        raise InputError(f"{name!r} is the title of {_items_named(titled[store.composed(name)])}, not an item id "
                         "(ratings name items by id)", source=source,
                         line=row_line(first_line, pos), field=field)


def _items_named(ids: list[str]) -> str:
    """"item 'x'", or "items 'x', 'y'" (sorted ids, as ``store.items_by_title`` gives them)."""
    return f"item{'s' if len(ids) > 1 else ''} {', '.join(repr(e) for e in ids)}"


def database_ids(conn, table, external, seen: set | None = None, *, source: str | None = None,  # noqa: ANN001
                 first_line: RowLines = None, field: str | None = None) -> np.ndarray:
    """The database id of every external id in ``external`` (a column; categorical from the readers),
    created where new: each distinct id is looked up once, then spread by its category code. The
    distinct ids are added to ``seen`` when given. An id that cannot be one (``store.id_problem``) is
    an ``InputError`` naming ``source``, its first row's line (``first_line``: the first row's; None:
    rows are not the file's lines) and ``field``."""
    codes, used, names = distinct_ids(external)
    bad = store.first_bad_id(names)
    if bad is not None:
        pos = int(np.argmax(codes == used[bad]))
        store.check_id(names[bad], table.__tablename__[:-1], source=source,
                       line=row_line(first_line, pos), field=field)
    ids = store.ensure_ids(conn, table, names)
    if seen is not None:
        seen.update(names)
    by_code = np.full(int(used.max()) + 1 if len(used) else 0, -1, np.int64)
    by_code[used] = [ids[x] for x in names]
    return by_code[codes]


def upsert_items_at(url: str, items, source: str | None = None) -> dict:  # noqa: ANN001
    """``upsert_items`` into the database at ``url`` (`cfb ingest items`): a first ingest makes the
    database whole or not at all."""
    from ..db.engine import made_whole, make_engine

    def write(at: str) -> dict:
        engine = make_engine(at)
        try:
            return upsert_items(engine, items, source)
        finally:
            engine.dispose()

    return made_whole(url, write)


def upsert_items(engine: Engine, items, source: str | None = None) -> dict:  # noqa: ANN001
    """Add or update items (item, title, attributes) in one transaction (see ``write_items``).
    Returns counts: items given, added, updated (a stored item whose title or attributes change) and
    unchanged; and ``shared_titles``: each title given that more than one item now has (in any Unicode
    form), with those items' ids: a lookup by that title then asks for an id."""
    fresh = store.schema_for_first_write(engine)  # (True: the tables are made in the write's transaction)
    if not fresh:
        with engine.connect() as conn:  # (refused at once, not after waiting for another writer)
            check_attribute_types(conn, Item, items, source)
    with writing(engine) as conn:
        if fresh:
            store.create_tables(conn)
        existed, changed = write_items(conn, items, source)
        given = {store.composed(t) for t in items["title"] if isinstance(t, str) and t} if "title" in items else set()
        shared = [{"title": t, "items": ids} for t, ids in store.items_by_composed_title(conn).items()
                  if t in given and len(ids) > 1] if given else []
    n = len(set(map(str, items["item"])))
    return {"items": n, "added": n - existed, "updated": changed, "unchanged": existed - changed,
            "shared_titles": shared}
