"""Model versions: their factor rows, named array blobs, the serving pointer, and the retrain lock.

A full version stores every user and item row; an incremental version stores only the rows it
changed and points at its parent, so its cost grows with what changed, not with the catalogue.
Every version is written in one transaction, serving pointer included: a crash leaves the
previous version serving and no partial rows."""
from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass

import numpy as np
from sqlalchemy import Connection, Engine, delete, insert, select

from ..cf_core.errors import CfbError
from .schema import ItemFactors, ModelArrays, ModelVersion, UserFactors
from .store import CHUNK, get_setting, set_setting


@dataclass
class FactorRows:
    """Database ids with their bias and float32 factor vectors."""

    ids: np.ndarray
    bias: np.ndarray
    factors: np.ndarray

    @classmethod
    def empty(cls, k: int = 0) -> "FactorRows":
        return cls(np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros((0, k), np.float32))


def _rows(version: int, key: str, rows: FactorRows) -> list[dict]:
    f = np.ascontiguousarray(rows.factors, dtype="<f4")
    return [{"version_id": version, key: int(i), "bias": float(b), "factors": f[n].tobytes()}
            for n, (i, b) in enumerate(zip(rows.ids, rows.bias))]


def save_version(conn: Connection, *, kind: str, mode: str, parent_id: int | None, hyperparams: dict,
                 metrics: dict, max_seq: int, users: FactorRows, items: FactorRows,
                 arrays: dict[str, bytes] | None = None, serve: bool = True) -> int:
    """Write a version, its rows and blobs; make it serving. Call inside ``engine.begin()``."""
    version = conn.execute(insert(ModelVersion).values(
        kind=kind, mode=mode, parent_id=parent_id, hyperparams=hyperparams, metrics=metrics,
        max_seq=int(max_seq)).returning(ModelVersion.id)).scalar_one()
    for table, key, rows in ((UserFactors, "user_id", users), (ItemFactors, "item_id", items)):
        data = _rows(version, key, rows)
        for start in range(0, len(data), CHUNK):
            conn.execute(insert(table), data[start:start + CHUNK])
    for name, blob in (arrays or {}).items():
        conn.execute(insert(ModelArrays).values(version_id=version, name=name, data=blob))
    if serve:
        set_setting(conn, "serving_version", str(version))
    return version


def serving_version(conn: Connection) -> int | None:
    v = get_setting(conn, "serving_version")
    return int(v) if v else None


def require_serving(conn: Connection) -> int:
    v = serving_version(conn)
    if v is None:
        raise CfbError("no trained model yet: run `cfb retrain --full` first")
    return v


def get_version(conn: Connection, version: int) -> dict:
    """The version's row as a mapping (id, kind, mode, parent_id, hyperparams, metrics, max_seq, created_at)."""
    table = ModelVersion.__table__
    row = conn.execute(select(table).where(table.c.id == version)).mappings().first()
    if row is None:
        raise CfbError(f"no model version {version}")
    return row


def chain(conn: Connection, version: int) -> list[int]:
    """The version and its ancestors, oldest (the full version) first."""
    out = []
    v: int | None = version
    while v is not None:
        out.append(v)
        v = conn.scalar(select(ModelVersion.parent_id).where(ModelVersion.id == v))
    return out[::-1]


def _load_rows(conn: Connection, table, key: str, versions: list[int], ids=None) -> FactorRows:
    col = getattr(table, key)
    stmt = select(col, table.bias, table.factors).where(table.version_id.in_(versions))
    if ids is not None:
        stmt = stmt.where(col.in_([int(i) for i in ids]))
    rows = conn.execute(stmt.order_by(table.version_id)).all()
    latest: dict[int, tuple[float, bytes]] = {}
    for i, b, f in rows:  # later versions override earlier ones
        latest[i] = (b, f)
    if not latest:
        return FactorRows.empty()
    ordered = sorted(latest)
    blobs = b"".join(latest[i][1] for i in ordered)
    factors = np.frombuffer(blobs, dtype="<f4").reshape(len(ordered), -1).astype(np.float32)
    return FactorRows(np.array(ordered, np.int64), np.array([latest[i][0] for i in ordered], np.float32), factors)


def load_items(conn: Connection, version: int) -> FactorRows:
    """Every item row of ``version`` (resolved through its chain), sorted by item id."""
    return _load_rows(conn, ItemFactors, "item_id", chain(conn, version))


def load_users(conn: Connection, version: int, user_ids=None) -> FactorRows:
    """User rows of ``version`` (all, or only ``user_ids``), sorted by user id."""
    return _load_rows(conn, UserFactors, "user_id", chain(conn, version), user_ids)


def load_array(conn: Connection, version: int, name: str) -> bytes | None:
    """The newest blob called ``name`` along the version's chain."""
    for v in reversed(chain(conn, version)):
        blob = conn.scalar(select(ModelArrays.data).where(ModelArrays.version_id == v, ModelArrays.name == name))
        if blob is not None:
            return blob
    return None


def list_versions(conn: Connection) -> list[dict]:
    serving = serving_version(conn)
    out = []
    table = ModelVersion.__table__
    for v in conn.execute(select(table).order_by(table.c.id)).mappings():
        out.append({"version": v["id"], "kind": v["kind"], "mode": v["mode"], "parent": v["parent_id"],
                    "created": v["created_at"].isoformat(timespec="seconds") if v["created_at"] else None,
                    "metrics": v["metrics"], "hyperparams": v["hyperparams"], "serving": v["id"] == serving})
    return out


def set_serving(conn: Connection, version: int) -> None:
    get_version(conn, version)
    set_setting(conn, "serving_version", str(version))


# --- the retrain lock -----------------------------------------------------------------------
LOCK_KEY = "retrain_lock"


def _holder_alive(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        return True  # cannot check another machine's process: assume it runs
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire_retrain_lock(engine: Engine) -> dict:
    """Take the retrain lock, or fail clearly if a live retrain holds it (a dead holder's lock is taken over).

    The lock is a row whose insert is the transaction's first statement, so two retrains racing
    for it are ordered by the database itself."""
    from sqlalchemy.exc import IntegrityError

    from .schema import Setting

    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(2):
        try:
            with engine.begin() as conn:
                conn.execute(insert(Setting).values(key=LOCK_KEY, value=json.dumps(me)))
            return me
        except IntegrityError:
            with engine.begin() as conn:
                raw = get_setting(conn, LOCK_KEY)
                holder = json.loads(raw) if raw else None
                if holder and _holder_alive(holder):
                    raise CfbError(f"another retrain is running (pid {holder['pid']} on {holder['host']}); "
                                   "try again when it has finished") from None
                conn.execute(delete(Setting).where(Setting.key == LOCK_KEY, Setting.value == raw))
    raise CfbError("could not take the retrain lock; try again")


def release_retrain_lock(engine: Engine, me: dict) -> None:
    with engine.begin() as conn:
        raw = get_setting(conn, LOCK_KEY)
        if raw and json.loads(raw) == me:
            from .schema import Setting

            conn.execute(delete(Setting).where(Setting.key == LOCK_KEY))
