"""The protocol's baselines (§6): popularity, demographic popularity (average user lives with the model)."""
from __future__ import annotations

import numpy as np

from ..cf_core.data import damped_means

AGE_BANDS = [18, 25, 35, 45, 50, 56]  # under 18, 18–24, 25–34, 35–44, 45–49, 50–55, 56+


def age_band(age) -> int | None:  # noqa: ANN001
    if age is None:
        return None
    return int(np.searchsorted(AGE_BANDS, float(age), side="right"))


class Popularity:
    """Rank by number of training ratings; predict the damped mean (sum + 10·mean) / (count + 10)."""

    def __init__(self, damping: float = 10.0):
        self.damping = damping

    def fit(self, items: np.ndarray, ratings: np.ndarray, n_items: int) -> "Popularity":
        self.counts_ = np.bincount(items, minlength=n_items).astype(float)
        sums = np.bincount(items, weights=ratings, minlength=n_items)
        self.global_mean_ = float(np.mean(ratings))
        self.damped_mean_ = damped_means(sums, self.counts_, self.global_mean_, self.damping)
        return self

    def scores(self, attributes: dict | None = None) -> np.ndarray:
        return self.counts_.copy()

    def predict(self, items: np.ndarray, attributes: dict | None = None) -> np.ndarray:
        """Damped means; items outside the catalogue (index -1) get the global mean."""
        items = np.asarray(items)
        return np.where(items >= 0, self.damped_mean_[np.maximum(items, 0)], self.global_mean_)


class PositivePopularity(Popularity):
    """Rank by number of training ratings >= 4 (ties: more ratings, then item id); predict as popularity."""

    def fit(self, items: np.ndarray, ratings: np.ndarray, n_items: int) -> "PositivePopularity":
        super().fit(items, ratings, n_items)
        positives = np.bincount(items[np.asarray(ratings) >= 4], minlength=n_items).astype(float)
        # ties: more ratings first, then the lower index (the callers index items by id sorted as
        # strings); both terms together stay below 1, so they never outweigh one positive rating
        order = (n_items - np.arange(n_items)) / (n_items + 1)
        self.positive_scores_ = positives + (self.counts_ + order) / (self.counts_.max() + 2)
        return self

    def scores(self, attributes: dict | None = None) -> np.ndarray:
        return self.positive_scores_.copy()


DEMOGRAPHICS = ("gender", "age")  # the user attributes demographic popularity groups by


class DemographicPopularity(Popularity):
    """Popularity among warm users of the same gender and age band, falling back to popularity
    (global counts break ties and rank the items the group never rated)."""

    def fit_groups(self, users: np.ndarray, items: np.ndarray, attributes: list[dict], n_items: int) -> "DemographicPopularity":
        keys = [self.group(a) for a in attributes]
        self.group_counts_: dict = {}
        user_keys = np.array([hash(k) for k in keys])
        for key in set(keys):
            mask = user_keys[users] == hash(key)
            self.group_counts_[key] = np.bincount(items[mask], minlength=n_items).astype(float)
        return self

    @staticmethod
    def group(attributes: dict) -> tuple:
        gender, age = (attributes.get(k) for k in DEMOGRAPHICS)
        return (gender, age_band(age))

    def scores(self, attributes: dict | None = None) -> np.ndarray:
        group = self.group_counts_.get(self.group(attributes or {}))
        base = self.counts_ / (self.counts_.max() + 1)  # < 1: only breaks ties
        return base if group is None else group + base
