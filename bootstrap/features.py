"""Encode questionnaire answers (attributes and item ratings) as a numeric feature matrix."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .questionnaire import Questionnaire, is_finite_number

N_BINS = 6


@dataclass
class AnswerEncoder:
    """Fixed, JSON-serialisable encoding of answers.

    - category: one-hot of the allowed values (an unanswered or unseen value is all zeros);
    - number: standardised value, one-hot quantile bin, and a "missing" flag;
    - text: one-hot of the first character among those seen in training (zip code -> region);
    - each asked item: "seen" flag and the rating's offset from the item's training mean."""

    questionnaire: Questionnaire
    numeric_stats: dict  # name -> {"mean", "std", "edges"}
    text_prefixes: dict  # name -> [first characters]
    item_means: list[float]  # aligned with questionnaire.items

    @classmethod
    def fit(cls, questionnaire: Questionnaire, attributes: list[dict], item_means: list[float]) -> "AnswerEncoder":
        """Statistics of the attribute answers of training users; ``item_means`` of the asked items."""
        numeric, text = {}, {}
        for q in questionnaire.questions:
            vals = [a.get(q.name) for a in attributes if a.get(q.name) is not None]
            if q.type == "number":  # (a database from before ingest refused infinite numbers may hold some)
                finite = [float(x) for x in vals if is_finite_number(x)]
                v = np.array(finite) if finite else np.zeros(1)
                edges = np.unique(np.quantile(v, np.linspace(0, 1, N_BINS + 1)[1:-1])).tolist()
                numeric[q.name] = {"mean": float(v.mean()), "std": float(v.std() or 1.0), "edges": edges}
            elif q.type == "text":
                text[q.name] = sorted({str(x)[:1] for x in vals if str(x)})
        return cls(questionnaire, numeric, text, [float(m) for m in item_means])

    @property
    def n_features(self) -> int:
        return self.transform([{}], [{}]).shape[1]

    def transform(self, attributes: list[dict], item_ratings: list[dict[int, float]],
                  budget: int | None = None) -> np.ndarray:
        """Rows of features for users' attribute answers and ratings of asked items (item db id -> rating).

        Only the first ``budget`` questionnaire items count as asked."""
        cols: list[np.ndarray] = []
        n = len(attributes)
        for q in self.questionnaire.questions:
            raw = [a.get(q.name) for a in attributes]
            if q.type == "category":
                index = {v: k for k, v in enumerate(q.values or [])}
                block = np.zeros((n, len(index)))
                for r, v in enumerate(raw):
                    if v is not None and str(v) in index:
                        block[r, index[str(v)]] = 1
                cols.append(block)
            elif q.type == "number":
                st = self.numeric_stats[q.name]
                missing = np.array([not is_finite_number(v) for v in raw], dtype=float)  # (None, inf: unknown)
                v = np.array([st["mean"] if m else float(x) for x, m in zip(raw, missing)])
                bins = np.zeros((n, len(st["edges"]) + 1))
                bins[np.arange(n), np.searchsorted(st["edges"], v, side="right")] = 1 - missing
                # the linear term within the training users' range: an answer past it (an age of 146, which a
                # question accepts) says no more than the range's end, as its bin does (no ridge extrapolation)
                lin = np.clip(v, *q.range) if q.range else v
                cols += [((lin - st["mean"]) / st["std"])[:, None], bins, missing[:, None]]
            else:
                prefixes = {p: k for k, p in enumerate(self.text_prefixes.get(q.name, []))}
                block = np.zeros((n, len(prefixes)))
                for r, v in enumerate(raw):
                    k = prefixes.get(str(v)[:1]) if v is not None else None
                    if k is not None:
                        block[r, k] = 1
                cols.append(block)
        asked = self.questionnaire.items if budget is None else self.questionnaire.items[:budget]
        seen = np.zeros((n, len(self.questionnaire.items)))
        offset = np.zeros((n, len(self.questionnaire.items)))
        for r, given in enumerate(item_ratings):
            for k, item in enumerate(asked):
                if item in given:
                    seen[r, k] = 1
                    offset[r, k] = given[item] - self.item_means[k]
        cols += [seen, offset]
        return np.concatenate(cols, axis=1) if cols else np.zeros((n, 0))

    def to_json(self) -> dict:
        return {"questionnaire": self.questionnaire.to_json(), "numeric_stats": self.numeric_stats,
                "text_prefixes": self.text_prefixes, "item_means": self.item_means}

    @classmethod
    def from_json(cls, d: dict) -> "AnswerEncoder":
        return cls(Questionnaire.from_json(d["questionnaire"]), d["numeric_stats"], d["text_prefixes"], d["item_means"])
