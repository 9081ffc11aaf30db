"""Model versions: a trained model's arrays, its trained users' rows, the serving pointer, and the retrain lock.

A *full* version stores the whole ``TrainedModel`` as one .npz of plain arrays plus one row per
trained user; an *incremental* version stores only a delta (the items it added or re-solved, and the
item statistics) and points at its parent; loading replays the chain from the full version. Every version is
written in one transaction, serving pointer included: a crash leaves the previous version serving
and no partial rows. Item rows are kept by database id; inner indices never leave the model."""
from __future__ import annotations

import json
import math
import os
import socket
import threading
import uuid
import zipfile
from datetime import datetime, timezone

import numpy as np
from sqlalchemy import Connection, Engine, delete, insert, select, text, update

from ..cf_core.errors import CfbError, NotReadyError, UnknownIdError
from ..cf_core.model import TrainedModel
from ..cf_core.scoring import from_npz, to_npz
from .array_cache import stored_arrays
from .engine import process_alive
from .schema import ModelArrays, ModelVersion, UserFactors
from .store import CHUNK, get_setting, one_of, prune_replaced_ratings, set_setting

MODEL_BLOB = "model.npz"  # a full version's TrainedModel.to_arrays() (and an incremental one's checkpoint)
# an incremental version also stores its whole model (a checkpoint) where loading it would otherwise
# apply this many deltas in a row: loading stays one blob and fewer deltas than this, however many
# incremental retrains run between full ones
CHECKPOINT_EVERY = 16
DELTA_BLOB = "delta.npz"  # an incremental version's changes
NO_MODEL = "no trained model yet: run `cfb retrain --full` first"
SERVING_CHOICES = "serving_choices"  # setting: how many times a version was made serving by choice


def serving_state(conn: Connection) -> tuple[int | None, int]:
    """(the serving version, how many times a serving version was chosen): what a retrain notes when it
    starts, so that a rollback meanwhile, even to the version already serving, is never overridden."""
    return serving_version(conn), _serving_choices(conn)


def _serving_choices(conn: Connection) -> int:
    return int(get_setting(conn, SERVING_CHOICES) or 0)


def _check_serving(conn: Connection, expected: int | None | tuple[int | None, int]) -> int | None:
    """The serving version now if it is not ``expected`` (what it was when the retrain started; with
    ``serving_state``'s count, also when it was chosen again meanwhile), else None. The pointer's row
    stays locked until the transaction ends (PostgreSQL: FOR UPDATE; SQLite: the write transaction's
    BEGIN IMMEDIATE), so no rollback lands between check and write."""
    from .schema import Setting

    raw = conn.scalar(select(Setting.value).where(Setting.key == "serving_version").with_for_update())
    now = int(raw) if raw else None
    if isinstance(expected, tuple):
        return now if (now, _serving_choices(conn)) != expected else None
    return now if now != expected else None


def save_full(conn: Connection, model: TrainedModel, *, metrics: dict, max_seq: int,
              expected_serving: tuple[int | None, int], lock: dict | None = None) -> tuple[int, bool]:
    """Write a full version (model arrays, trained users' rows) and drop the replaced rating rows no
    version needs (``store.prune_replaced_ratings``). It becomes serving unless the serving
    version changed since the retrain started, or was chosen again (``serving_state``; a rollback):
    then it is stored but not served. ``lock``: the retrain lock taken for it, which must still be
    held (``check_lock_held``). Returns (version, serving). Call inside a write transaction."""
    if lock is not None:
        check_lock_held(conn, lock)
    version = conn.execute(insert(ModelVersion).values(
        kind=model.kind, mode="full", parent_id=None, hyperparams=model.settings, metrics=metrics,
        max_seq=int(max_seq)).returning(ModelVersion.id)).scalar_one()
    f = np.ascontiguousarray(model.user_factors, dtype="<f4")
    rows = [{"version_id": version, "user_id": int(u), "bias": float(b), "factors": f[n].tobytes()}
            for n, (u, b) in enumerate(zip(model.user_ids, model.user_bias))]
    for start in range(0, len(rows), CHUNK):
        conn.execute(insert(UserFactors), rows[start:start + CHUNK])
    conn.execute(insert(ModelArrays).values(version_id=version, name=MODEL_BLOB, data=to_npz(model.to_arrays())))
    prune_replaced_ratings(conn)
    serve = _check_serving(conn, expected_serving) is None
    if serve:
        set_setting(conn, "serving_version", str(version))
    return version, serve


def save_incremental(conn: Connection, started: tuple[int, int], delta: dict[str, np.ndarray], *, kind: str,
                     settings: dict, metrics: dict, max_seq: int, model: TrainedModel | None = None,
                     lock: dict | None = None) -> int:
    """Write an incremental version on the parent ``started[0]`` holding ``delta`` (see ``apply_delta``)
    and serve it, unless the serving version changed since the retrain started, or was chosen again
    (``started``: ``serving_state`` then; a rollback meanwhile, even to the parent): then nothing is
    written. ``model`` (the version's whole model) is stored beside the delta as a checkpoint where
    loading the version would otherwise apply ``CHECKPOINT_EVERY`` deltas in a row. ``lock`` as in
    ``save_full``."""
    parent = started[0]
    if lock is not None:
        check_lock_held(conn, lock)
    moved = _check_serving(conn, started)
    if moved == parent:
        raise CfbError(f"version {parent} was chosen as the serving one during the retrain (`cfb rollback "
                       f"{parent}`); nothing was saved, so that choice stays: run `cfb retrain` again")
    if moved is not None:
        raise CfbError(f"the serving version changed from {parent} to {moved} during the retrain "
                       "(a rollback?); nothing was saved: run `cfb retrain` again")
    version = conn.execute(insert(ModelVersion).values(
        kind=kind, mode="incremental", parent_id=parent, hyperparams=settings, metrics=metrics,
        max_seq=int(max_seq)).returning(ModelVersion.id)).scalar_one()
    conn.execute(insert(ModelArrays).values(version_id=version, name=DELTA_BLOB, data=to_npz(delta)))
    if model is not None and len(_deltas_to_apply(conn, chain(conn, parent))) + 1 >= CHECKPOINT_EVERY:
        conn.execute(insert(ModelArrays).values(version_id=version, name=MODEL_BLOB, data=to_npz(model.to_arrays())))
    set_serving(conn, version)
    return version


def _deltas_to_apply(conn: Connection, versions: list[int]) -> list[int]:
    """Of a chain (``chain``), the versions after the last one that stores a whole model: the deltas
    that loading the chain's last version applies."""
    whole = set(conn.scalars(select(ModelArrays.version_id).where(ModelArrays.name == MODEL_BLOB)))
    start = max((k for k, v in enumerate(versions) if v in whole), default=0)
    return versions[start + 1:]


def make_delta(added_item_ids: np.ndarray, added_rows: dict[str, np.ndarray], model: TrainedModel,
               ranker_rows: dict[str, np.ndarray] | None = None, replaced_item_ids: np.ndarray | None = None,
               replaced_rows: dict[str, np.ndarray] | None = None, totals_item_ids: np.ndarray | None = None,
               replaced_ranker_rows: dict[str, np.ndarray] | None = None) -> dict:
    """What an incremental version stores: the items it added (database ids, rating-model rows and,
    when given, the ranker's output rows), the items whose rows it re-solved (rating rows, and
    ranker rows where given), and the
    statistics after it of the items whose ratings changed (``totals_item_ids``, database ids; None:
    of every item). A delta's size follows what changed, not the catalogue."""
    if totals_item_ids is None:
        totals = {"item_counts": model.item_counts, "item_sums": model.item_sums}
    else:
        at = model.item_index(totals_item_ids)
        totals = {"totals/item_ids": np.asarray(totals_item_ids, np.int64)[at >= 0],
                  "totals/counts": model.item_counts[at[at >= 0]], "totals/sums": model.item_sums[at[at >= 0]]}
    return {"added/item_ids": np.asarray(added_item_ids, np.int64),
            **{f"added/{k}": v for k, v in added_rows.items()},
            **{f"added_ranker/{k}": v for k, v in (ranker_rows or {}).items()},
            "replaced/item_ids": np.asarray(replaced_item_ids if replaced_item_ids is not None else [], np.int64),
            **{f"replaced/{k}": v for k, v in (replaced_rows or {}).items()},
            **{f"replaced_ranker/{k}": v for k, v in (replaced_ranker_rows or {}).items()}, **totals}


def apply_delta(model: TrainedModel, delta: dict[str, np.ndarray]) -> TrainedModel:
    """The model after an incremental version's changes."""
    from dataclasses import replace

    ids = delta["added/item_ids"]
    if len(ids):
        rows = {k[len("added/"):]: v for k, v in delta.items() if k.startswith("added/") and k != "added/item_ids"}
        ranker_rows = {k[len("added_ranker/"):]: v for k, v in delta.items() if k.startswith("added_ranker/")}
        model = model.add_items(ids, rows, ranker_rows or None)
    replaced = delta.get("replaced/item_ids", np.zeros(0, np.int64))
    if len(replaced):
        rows = {k[len("replaced/"):]: v for k, v in delta.items()
                if k.startswith("replaced/") and k != "replaced/item_ids"}
        ranker_rows = {k[len("replaced_ranker/"):]: v for k, v in delta.items() if k.startswith("replaced_ranker/")}
        model = model.with_item_rows(model.item_index(replaced), rows, ranker_rows or None)
    if "totals/item_ids" in delta:
        return model.with_item_totals(model.item_index(delta["totals/item_ids"]), delta["totals/counts"],
                                      delta["totals/sums"])
    return replace(model, item_counts=delta["item_counts"], item_sums=delta["item_sums"])  # every item's


# what decoding arrays that are not what cfb stored raises (a blob changed or cut short in the database)
UNREADABLE = (ValueError, KeyError, TypeError, OSError, EOFError, zipfile.BadZipFile)


def _damaged(version: int, e: BaseException) -> CfbError:
    """The error for a version whose arrays do not decode (HTTP 503, as a database with no model)."""
    reason = (str(e).splitlines() or [type(e).__name__])[0]
    return NotReadyError(f"model version {version} is damaged: its stored arrays cannot be read ({type(e).__name__}: "
                         f"{reason[:120]}); `cfb rollback` to an earlier version, or `cfb retrain --full`")


def load_model(conn: Connection, version: int) -> TrainedModel:
    """The version's ``TrainedModel`` (without trained users' rows: see ``trained_row``)."""
    versions = chain(conn, version)
    deltas = _deltas_to_apply(conn, versions)
    start = versions[len(versions) - len(deltas) - 1]  # the full version, or the latest checkpoint
    try:
        arrays = stored_arrays(conn, start, MODEL_BLOB)
    except LookupError:
        raise CfbError(f"model version {start} was written by an older cfb: run `cfb retrain --full`") from None
    except UNREADABLE as e:
        raise _damaged(start, e) from None
    try:
        model = TrainedModel.from_arrays(arrays)
    except UNREADABLE as e:
        raise _damaged(start, e) from None
    for v in deltas:
        try:
            model = apply_delta(model, from_npz(conn.scalar(select(ModelArrays.data).where(
                ModelArrays.version_id == v, ModelArrays.name == DELTA_BLOB))))
        except UNREADABLE as e:
            raise _damaged(v, e) from None
    return model


def trained_rows(conn: Connection, version: int, user_ids=None,
                 n_factors: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user ids, factors, biases) of the users trained in the version's full ancestor (all, or ``user_ids``);
    a row that is not ``n_factors`` 32-bit floats (when given; else as many as the first row's) is damage."""
    root = chain(conn, version)[0]
    stmt = select(UserFactors.user_id, UserFactors.bias, UserFactors.factors).where(UserFactors.version_id == root)
    if user_ids is None:
        rows = conn.execute(stmt.order_by(UserFactors.user_id)).all()
    else:  # a query per 900 users (a database's limit on a statement's parameters)
        ids = sorted({int(u) for u in user_ids})
        rows = [row for start in range(0, len(ids), 900) for row in conn.execute(
            stmt.where(one_of(UserFactors.user_id, ids[start:start + 900])).order_by(UserFactors.user_id))]
    if not rows:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32), np.zeros(0, np.float32)
    n_factors = len(rows[0][2]) // 4 if n_factors is None else n_factors
    for user, _, blob in rows:
        check_user_row(blob, n_factors, root, user)
    factors = np.frombuffer(b"".join(r[2] for r in rows), dtype="<f4").reshape(len(rows), -1).astype(np.float32)
    return np.array([r[0] for r in rows], np.int64), factors, np.array([r[1] for r in rows], np.float32)


def check_user_row(blob: bytes, n_factors: int, version: int, user_id: int) -> None:
    """A trained user's stored row that does not hold ``n_factors`` 32-bit floats is the damage of the
    ``version`` it belongs to."""
    if len(blob) != 4 * n_factors:
        raise _damaged(version, ValueError(f"the trained row of user {user_id} holds {len(blob)} bytes, "
                                           f"not {4 * n_factors}"))


def serving_version(conn: Connection) -> int | None:
    v = get_setting(conn, "serving_version")
    return int(v) if v else None


def require_serving(conn: Connection) -> int:
    v = serving_version(conn)
    if v is None:
        raise NotReadyError(NO_MODEL)
    return v


def get_version(conn: Connection, version: int) -> dict:
    """The version's row as a mapping (id, kind, mode, parent_id, hyperparams, metrics, max_seq, created_at)."""
    table = ModelVersion.__table__
    row = conn.execute(select(table).where(table.c.id == version)).mappings().first()
    if row is None:
        raise UnknownIdError(f"no model version {version}", field="version")
    return row


def chain(conn: Connection, version: int) -> list[int]:
    """The version and its ancestors, oldest (the full version) first: every version's parent read in one
    query (one query per ancestor made loading slower with every incremental retrain)."""
    parent = dict(conn.execute(select(ModelVersion.id, ModelVersion.parent_id)).all())
    out, seen = [], set()
    v: int | None = version
    while v is not None and v not in seen:
        out.append(v)
        seen.add(v)
        v = parent.get(v)
    return out[::-1]


def root_max_seq(conn: Connection, version: int) -> int:
    """The last rating sequence number the version's full ancestor was trained on."""
    return int(get_version(conn, chain(conn, version)[0])["max_seq"])


def _utc(moment: datetime) -> datetime:
    """A stored time in UTC with its offset said (SQLite hands back naive UTC, PostgreSQL an aware time)."""
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


def list_versions(conn: Connection) -> list[dict]:
    serving = serving_version(conn)
    out = []
    table = ModelVersion.__table__
    for v in conn.execute(select(table).order_by(table.c.id)).mappings():
        out.append({"version": v["id"], "kind": v["kind"], "mode": v["mode"], "parent": v["parent_id"],
                    "created": _utc(v["created_at"]).isoformat(timespec="seconds") if v["created_at"] else None,
                    "metrics": v["metrics"], "hyperparams": v["hyperparams"], "serving": v["id"] == serving})
    return out


def set_serving(conn: Connection, version: int) -> None:
    """Serve ``version`` by choice (a rollback, an incremental retrain): counted in ``serving_state``."""
    get_version(conn, version)
    set_setting(conn, "serving_version", str(version))
    set_setting(conn, SERVING_CHOICES, str(_serving_choices(conn) + 1))


# --- the retrain lock -----------------------------------------------------------------------
# A row in ``settings`` holding {"pid", "host", "token", "heartbeat"}. The holder's daemon thread
# refreshes "heartbeat" (database clock, epoch seconds) every HEARTBEAT_S; a lock whose heartbeat is
# older than the stale limit is taken over whatever the host, and one held by a dead process on
# this host at once.
LOCK_KEY = "retrain_lock"
HEARTBEAT_S = 5.0
DEFAULT_STALE_S = 120.0
CLOCK_STEP_S = 86400.0  # how far this host's clock may have stepped back under a live holder's heartbeat
_heartbeats: dict[str, tuple[threading.Thread, threading.Event]] = {}


def lock_stale_s() -> float:
    """Seconds without a heartbeat after which a retrain lock is taken over (``$CFB_LOCK_STALE_S``): a
    finite number of at least two heartbeats (a shorter limit, zero, a negative or NaN one would take
    over a running retrain between its beats)."""
    raw = os.environ.get("CFB_LOCK_STALE_S") or str(DEFAULT_STALE_S)
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (2 * HEARTBEAT_S <= value < math.inf):
        raise CfbError(f"CFB_LOCK_STALE_S must be a number of seconds from {2 * HEARTBEAT_S:g} (two heartbeats), "
                       f"not {raw!r}")
    return value


def db_now(conn: Connection) -> float:
    """The database server's clock in epoch seconds (one clock for every host)."""
    if conn.dialect.name == "postgresql":
        return float(conn.scalar(text("SELECT extract(epoch FROM clock_timestamp())")))
    return float(conn.scalar(text("SELECT (julianday('now') - 2440587.5) * 86400.0")))


def _lock_holder(raw: str | None) -> dict | None:
    """The lock row's holder, or None where the row is not one this code writes (an empty, truncated or
    hand-edited row has no live holder to wait for: it is taken over)."""
    try:
        holder = json.loads(raw) if raw else None
        if not isinstance(holder, dict):
            return None
        holder["pid"], holder["heartbeat"] = int(holder["pid"]), float(holder.get("heartbeat") or 0)
        return holder if isinstance(holder.get("host"), str) and math.isfinite(holder["heartbeat"]) else None
    except (ValueError, TypeError, KeyError, OverflowError):  # (OverflowError: a pid of Infinity)
        return None


def _holder_alive(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        return True  # cannot check another machine's process: its heartbeat tells
    return process_alive(int(holder["pid"]))


def _same_holder(holder: dict | None, me: dict) -> bool:
    if not holder:
        return False
    return all(holder.get(k) == me.get(k) for k in ("pid", "host", "token") if k in me)


def check_lock_held(conn: Connection, me: dict) -> None:
    """Refuse to save for a retrain whose lock is no longer ``me``'s: another process took it over
    after its heartbeat had stopped for longer than ``lock_stale_s()`` (a paused process, a lost
    connection), and may be saving a version of its own."""
    holder = _lock_holder(get_setting(conn, LOCK_KEY))
    if not _same_holder(holder, me):
        now = f"pid {holder['pid']} on {holder['host']} holds it now" if holder else "no retrain holds it now"
        raise CfbError(f"this retrain's lock was taken over while it ran (no heartbeat for over {lock_stale_s():g} s; "
                       f"{now}): nothing was saved; run `cfb retrain` again")


def _heartbeat_loop(engine: Engine, me: dict, stop: threading.Event) -> None:
    from .engine import writing
    from .schema import Setting

    while not stop.wait(HEARTBEAT_S):
        try:
            with writing(engine) as conn:
                raw = get_setting(conn, LOCK_KEY)
                if not _same_holder(_lock_holder(raw), me):
                    return  # released, or taken over: nothing left to keep alive
                conn.execute(update(Setting).where(Setting.key == LOCK_KEY, Setting.value == raw)
                             .values(value=json.dumps({**me, "heartbeat": db_now(conn)})))
        except Exception:  # noqa: BLE001 - a transient error (busy, connection lost): try again next beat
            continue


def acquire_retrain_lock(engine: Engine) -> dict:
    """Take the retrain lock, or fail clearly if a live retrain holds it; start its heartbeat.

    A lock whose heartbeat is older than ``lock_stale_s()`` is taken over, as is one whose holder
    is a dead process on this host. The lock is a row whose insert is the transaction's first
    statement, so two retrains racing for it are ordered by the database itself."""
    from sqlalchemy.exc import IntegrityError

    from .engine import writing
    from .schema import Setting

    stale = lock_stale_s()  # (a bad setting is refused whether or not a lock is held)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "token": uuid.uuid4().hex}
    for _ in range(3):
        try:
            with writing(engine) as conn:
                conn.execute(insert(Setting).values(key=LOCK_KEY, value=json.dumps({**me, "heartbeat": db_now(conn)})))
            break
        except IntegrityError:
            with writing(engine) as conn:
                raw = get_setting(conn, LOCK_KEY)
                holder = _lock_holder(raw)
                if holder:
                    age = db_now(conn) - holder["heartbeat"]
                    # a heartbeat further ahead of the database's clock than that is no live holder's,
                    # but for a live process of this host up to ``CLOCK_STEP_S`` ahead: the clock stepped
                    # back since it beat (on SQLite the clock is this host's), and its next beat says so
                    stepped_back = holder["host"] == socket.gethostname() and -CLOCK_STEP_S <= age < -stale
                    if _holder_alive(holder) and (abs(age) <= stale or stepped_back):
                        when = f"{age:.0f} s ago" if age >= 0 else f"{-age:.0f} s ahead of this clock"
                        raise CfbError(f"another retrain is running (pid {holder['pid']} on {holder['host']}, "
                                       f"last heartbeat {when}); try again when it has finished") from None
                conn.execute(delete(Setting).where(Setting.key == LOCK_KEY, Setting.value == raw))
    else:
        raise CfbError("could not take the retrain lock; try again")
    stop = threading.Event()
    thread = threading.Thread(target=_heartbeat_loop, args=(engine, me, stop), name="cfb-retrain-lock-heartbeat",
                              daemon=True)
    _heartbeats[me["token"]] = (thread, stop)
    thread.start()
    return me


def release_retrain_lock(engine: Engine, me: dict) -> None:
    """Stop the lock's heartbeat and delete the lock if it is still ``me``'s."""
    from .engine import writing
    from .schema import Setting

    thread, stop = _heartbeats.pop(me.get("token"), (None, None))
    if stop is not None:
        stop.set()
        thread.join(timeout=60)
    with writing(engine) as conn:
        raw = get_setting(conn, LOCK_KEY)
        if _same_holder(_lock_holder(raw), me):
            conn.execute(delete(Setting).where(Setting.key == LOCK_KEY, Setting.value == raw))
