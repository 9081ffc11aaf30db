"""The signup questionnaire: attribute questions inferred from warm users, and items to ask about."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from ..cf_core.data import liked_threshold
from ..cf_core.errors import InputError, json_shown

MAX_CATEGORIES = 40  # a string attribute with more distinct values is free text (e.g. a zip code)
MAX_BUDGET = 30  # the most items a questionnaire asks about
MAX_TEXT_ANSWER = 255  # characters of a text answer (an attribute such as a zip code), as of an id


@dataclass
class Question:
    """One attribute question: ``type`` is "number" (``range``: the training users' lowest and highest
    value), "category" (``values`` allowed) or "text"."""

    name: str
    type: str
    values: list[str] | None = None
    range: list[float] | None = None

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None or k in ("name", "type")}

    def accepted_range(self) -> tuple[float, float] | None:
        """The answers a number question takes: the training range widened on each side by its width
        (at least by its largest value's size), since a new user may be older than every training user
        but not by a hundred orders of magnitude; never below zero when no training value is (an age, a
        count). None: no range known (a version from before ranges were kept)."""
        if self.type != "number" or not self.range:
            return None
        lo, hi = (float(x) for x in self.range)
        span = max(hi - lo, abs(hi), 1.0)
        return (max(lo - span, 0.0) if lo >= 0 else lo - span), hi + span

    def conform(self, value, where: str | None = None):  # noqa: ANN001, ANN201
        """An answer as stored (a category or text as text), or an InputError naming the problem: a
        number that is not finite or far outside the training range, a category this question does not
        offer, a list or object where text is asked."""
        field = f"answers.{self.name}"
        if self.type == "number":
            if not is_finite_number(value):
                raise InputError(f"expected a {'finite ' if is_number(value) else ''}number, got {json_shown(value)}",
                                 source=where, field=field)
            accepted = self.accepted_range()
            if accepted and not accepted[0] <= value <= accepted[1]:
                raise InputError(f"{value:g} is out of range: this model takes {accepted[0]:g}..{accepted[1]:g} "
                                 f"(its training users' {self.name} spans {self.range[0]:g}..{self.range[1]:g})",
                                 source=where, field=field)
            return value
        if self.type == "category" and (isinstance(value, (dict, list, bool)) or str(value) not in (self.values or [])):
            raise InputError(f"{json_shown(value)} is not one of {', '.join(self.values or [])}", source=where, field=field)
        if isinstance(value, (dict, list, bool)):
            raise InputError(f"expected text, got {json_shown(value)}", source=where, field=field)
        if len(str(value)) > MAX_TEXT_ANSWER:
            raise InputError(f"a text answer is at most {MAX_TEXT_ANSWER} characters, got {len(str(value)):,}",
                             source=where, field=field)
        return str(value)


@dataclass
class Questionnaire:
    """What a new user is asked: attribute questions, then items (database ids, most useful first).

    Items are kept by database id, never by a model's inner index, so a questionnaire means the
    same items in every version whatever items are added later."""

    questions: list[Question]
    items: list[int] = field(default_factory=list)

    def question(self, name: str) -> Question | None:
        return next((q for q in self.questions if q.name == name), None)

    def positions(self) -> dict[int, int]:
        """Where each item (database id) is asked: 0 first (a budget Q shows positions 0..Q-1)."""
        return {int(i): k for k, i in enumerate(self.items)}

    def accepted_answers(self, attributes: dict | None) -> dict:
        """The attribute answers this questionnaire takes, as it stores them: a value it would refuse
        at sign-up (a category it does not offer, a number far outside the training range, an
        attribute it does not ask about) is left unanswered, so that a user's stored attributes (from
        ``cfb ingest users``, say) reach the model only as a sign-up could have given them."""
        out = {}
        for name, value in (attributes or {}).items():
            q = self.question(name)
            if q is not None and value is not None:
                try:
                    out[name] = q.conform(value)
                except InputError:
                    pass
        return out

    def to_json(self) -> dict:
        return {"questions": [q.to_json() for q in self.questions], "items": list(map(int, self.items))}

    @classmethod
    def from_json(cls, d: dict) -> "Questionnaire":
        return cls([Question(**q) for q in d["questions"]], [int(i) for i in d["items"]])


def is_number(v) -> bool:  # noqa: ANN001
    """A number, not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_finite_number(v) -> bool:  # noqa: ANN001
    """A number (not a bool) that is finite (an int too large for a float is not)."""
    if not is_number(v):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


MIN_ID_LIKE = 3  # users from whom a column whose every value differs is taken for an id-like one (text)


def infer_questions(attributes: list[dict]) -> list[Question]:
    """One question per attribute seen on warm users, typed by its values."""
    names = sorted({k for a in attributes for k in a})
    out = []
    for name in names:
        vals = [a[name] for a in attributes if a.get(name) is not None]
        finite = [float(v) for v in vals if is_finite_number(v)]  # (a database from before ingest refused others)
        if finite and all(is_number(v) for v in vals):
            out.append(Question(name, "number", range=[min(finite), max(finite)]))
        else:
            distinct = sorted({str(v) for v in vals})
            id_like = len(distinct) == len(vals) >= MIN_ID_LIKE  # every value its own (zip codes): text
            if len(distinct) <= MAX_CATEGORIES and not id_like:
                out.append(Question(name, "category", distinct))
            else:
                out.append(Question(name, "text"))
    return out


def choose_items(items: np.ndarray, ratings: np.ndarray, n_items: int, budget: int, strategy: str = "positive",
                 scale: tuple[float, float] | None = None, tie: np.ndarray | None = None) -> list[int]:
    """Items to ask about, most useful first, from training ratings (returns inner item indices).

    "positive": most often liked first (ratings in the top quarter of ``scale``, else of the ratings'
    range; ties: most-rated first, then ``tie``), the protocol's positive-popularity order: items most users have
    seen, and the ones that are commonly liked rather than only commonly watched (docs/coldstart.md);
    "popularity": most-rated first; "entropy": log-popularity × entropy of the item's ratings. Items
    still tied go in the order of ``tie`` (per inner item: its rank by id as text, as the protocol
    breaks ties), else of their inner index."""
    counts = np.bincount(items, minlength=n_items).astype(float)
    if strategy == "positive":
        liked_at = liked_threshold(scale if scale is not None else (ratings.min(), ratings.max()))
        liked = np.bincount(items[ratings >= liked_at], minlength=n_items)
        score = liked + counts / (counts.max() + 1)
    elif strategy == "popularity":
        score = counts
    elif strategy == "entropy":
        levels = np.unique(ratings)
        hist = np.stack([np.bincount(items[ratings == lv], minlength=n_items) for lv in levels], axis=1)
        p = hist / np.maximum(hist.sum(1, keepdims=True), 1)
        entropy = -(p * np.log(np.where(p > 0, p, 1))).sum(1)
        score = np.log1p(counts) * entropy
    else:
        raise ValueError(f"unknown questionnaire strategy {strategy!r}")
    order = np.lexsort((np.arange(n_items) if tie is None else np.asarray(tie), -score))
    return [int(i) for i in order[:budget] if counts[i] > 0]
