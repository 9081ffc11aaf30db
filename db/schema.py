"""SQLAlchemy 2 tables: users, items, ratings, questionnaire answers, model versions and their arrays."""
from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (
    DDL,
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    event,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    external_id: Mapped[str] = mapped_column(String(255), unique=True, nullable=False)
    attributes: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Item(Base):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    external_id: Mapped[str] = mapped_column(String(255), unique=True, nullable=False)
    title: Mapped[str | None] = mapped_column(Text)
    attributes: Mapped[dict] = mapped_column(JSON, default=dict)


class Rating(Base):
    """One row per user and item; the latest write wins.

    ``seq`` is the write order (file order within an ingest): it tells which ratings are newer
    than a model version and gives the protocol's "source file order". On SQLite the table is
    ``WITHOUT ROWID``: rows live in the primary key's b-tree, with no rowid b-tree beside it (about a
    quarter smaller; databases made before keep their rowid table and work alike).

    ``prev_rating``/``prev_seq``: when a write replaces a pair's rating, the row it replaced (NULL for
    a pair's first rating, and for rows written before these columns: see ``store.HISTORY_FROM_KEY``).
    An incremental retrain updates item statistics from the rows newer than its version alone,
    without reading every rating of a touched item (``store.totals_since``)."""

    __tablename__ = "ratings"
    __table_args__ = {"sqlite_with_rowid": False}
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"), primary_key=True, index=True)
    rating: Mapped[float] = mapped_column(Float, nullable=False)
    timestamp: Mapped[int | None] = mapped_column(BigInteger)
    seq: Mapped[int] = mapped_column(BigInteger, index=True)
    prev_rating: Mapped[float | None] = mapped_column(Float)
    prev_seq: Mapped[int | None] = mapped_column(BigInteger)


class ReplacedRating(Base):
    """A rating row that a later write replaced (its value and seq), kept by a trigger on ``ratings``
    (``store.ensure_rating_history``): what a pair held at any seq, e.g. the value a full retrain
    learned for a pair rated again twice or more since (``prev_rating`` holds only the latest). Each
    full version drops the rows no version learned (``store.prune_replaced_ratings``)."""

    __tablename__ = "replaced_ratings"
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), primary_key=True)
    item_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    rating: Mapped[float] = mapped_column(Float, nullable=False)


# Every rating row a later write replaces (a changed value gets a new seq) is copied into
# ``replaced_ratings`` by a trigger, so that no writer can forget it. Made with the ratings table, and
# given to a database from before it by ``store.ensure_rating_history``.
REPLACED_RATING_TRIGGER = {
    "sqlite": ["CREATE TRIGGER ratings_keep_replaced AFTER UPDATE OF seq ON ratings "
               "FOR EACH ROW WHEN NEW.seq IS NOT OLD.seq BEGIN "
               "INSERT INTO replaced_ratings (user_id, item_id, seq, rating) "
               "VALUES (OLD.user_id, OLD.item_id, OLD.seq, OLD.rating); END"],
    "postgresql": ["CREATE OR REPLACE FUNCTION cfb_keep_replaced_rating() RETURNS trigger LANGUAGE plpgsql AS $$ "
                   "BEGIN INSERT INTO replaced_ratings (user_id, item_id, seq, rating) "
                   "VALUES (OLD.user_id, OLD.item_id, OLD.seq, OLD.rating); RETURN NULL; END $$",
                   "CREATE TRIGGER ratings_keep_replaced AFTER UPDATE ON ratings FOR EACH ROW "
                   "WHEN (NEW.seq IS DISTINCT FROM OLD.seq) EXECUTE FUNCTION cfb_keep_replaced_rating()"],
}
for _dialect, _statements in REPLACED_RATING_TRIGGER.items():
    for _statement in _statements:
        event.listen(Rating.__table__, "after_create", DDL(_statement).execute_if(dialect=_dialect))


class Answer(Base):
    """A user's signup questionnaire, as given (attribute answers and item ratings), and ``asked``: how
    many of the questionnaire's items they were shown, when the sign-up says so (the first ``asked``
    of `cfb questionnaire`'s list; the ones they did not rate are "not seen")."""

    __tablename__ = "answers"
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), primary_key=True)
    answers: Mapped[dict] = mapped_column(JSON, default=dict)
    ratings: Mapped[dict] = mapped_column(JSON, default=dict)
    model_version: Mapped[int | None] = mapped_column(Integer)
    asked: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ModelVersion(Base):
    """A trained model. Incremental versions hold the rows they changed (and, every ``CHECKPOINT_EVERY``
    of them, a checkpoint of the whole model); ``parent_id`` chains them."""

    __tablename__ = "model_versions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # "dot" | "nn"
    mode: Mapped[str] = mapped_column(String(16))  # "full" | "incremental"
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    hyperparams: Mapped[dict] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    max_seq: Mapped[int] = mapped_column(BigInteger, default=0)  # ratings seen
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class UserFactors(Base):
    """A trained user's row in a full version (embedding as float32 little-endian, and bias)."""

    __tablename__ = "user_factors"
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), primary_key=True, index=True)
    bias: Mapped[float] = mapped_column(Float)
    factors: Mapped[bytes] = mapped_column(LargeBinary)  # float32 little-endian


class ModelArrays(Base):
    """Named .npz blobs of a version: ``model.npz`` (a full version's arrays, or an incremental one's
    checkpoint) and ``delta.npz`` (an incremental one's changed rows)."""

    __tablename__ = "model_arrays"
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class Setting(Base):
    """Key/value state: ``serving_version``, and the retrain lock."""

    __tablename__ = "settings"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
