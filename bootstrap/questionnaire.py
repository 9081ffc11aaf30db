"""The signup questionnaire: attribute questions inferred from warm users, and items to ask about."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

MAX_CATEGORIES = 40  # a string attribute with more distinct values is free text (e.g. a zip code)
MAX_BUDGET = 30  # the most items a questionnaire asks about
POSITIVE_SHARE = 0.25  # a rating in the top quarter of the scale is "liked" (>= 4 on 1..5), as the ranker's positives


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


@dataclass
class Questionnaire:
    """What a new user is asked: attribute questions, then items (database ids, most useful first).

    Items are kept by database id, never by a model's inner index, so a questionnaire means the
    same items in every version whatever items are added later."""

    questions: list[Question]
    items: list[int] = field(default_factory=list)

    def question(self, name: str) -> Question | None:
        return next((q for q in self.questions if q.name == name), None)

    def to_json(self) -> dict:
        return {"questions": [q.to_json() for q in self.questions], "items": list(map(int, self.items))}

    @classmethod
    def from_json(cls, d: dict) -> "Questionnaire":
        return cls([Question(**q) for q in d["questions"]], [int(i) for i in d["items"]])


def _is_number(v) -> bool:  # noqa: ANN001
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def infer_questions(attributes: list[dict]) -> list[Question]:
    """One question per attribute seen on warm users, typed by its values."""
    names = sorted({k for a in attributes for k in a})
    out = []
    for name in names:
        vals = [a[name] for a in attributes if a.get(name) is not None]
        if vals and all(_is_number(v) for v in vals):
            out.append(Question(name, "number", range=[float(min(vals)), float(max(vals))]))
        else:
            distinct = sorted({str(v) for v in vals})
            if len(distinct) <= MAX_CATEGORIES:
                out.append(Question(name, "category", distinct))
            else:
                out.append(Question(name, "text"))
    return out


def choose_items(items: np.ndarray, ratings: np.ndarray, n_items: int, budget: int, strategy: str = "positive",
                 scale: tuple[float, float] | None = None) -> list[int]:
    """Items to ask about, most useful first, from training ratings (returns inner item indices).

    "positive": most often liked first (ratings in the top quarter of ``scale``, else of the ratings'
    range; ties: most-rated first), the protocol's positive-popularity order: items most users have
    seen, and the ones that are commonly liked rather than only commonly watched (docs/coldstart.md);
    "popularity": most-rated first; "entropy": log-popularity × entropy of the item's ratings."""
    counts = np.bincount(items, minlength=n_items).astype(float)
    if strategy == "positive":
        lo, hi = scale if scale is not None else (float(ratings.min()), float(ratings.max()))
        liked = np.bincount(items[ratings >= hi - POSITIVE_SHARE * (hi - lo)], minlength=n_items)
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
    order = np.lexsort((np.arange(n_items), -score))
    return [int(i) for i in order[:budget] if counts[i] > 0]
