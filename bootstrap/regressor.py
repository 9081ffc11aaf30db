"""The bootstrap regressor: questionnaire answers -> a new user's initial embedding and bias.

scikit-learn's ``Ridge``, whose learned coefficients are stored as plain arrays (no pickles), so
onboarding needs numpy only."""
from __future__ import annotations

import json

import numpy as np

from .features import AnswerEncoder


class Bootstrap:
    """Encoder and linear map together: answers in, (embedding, bias) out (chapter 8's "bootstrapping")."""

    def __init__(self, encoder: AnswerEncoder, coef: np.ndarray, intercept: np.ndarray):
        self.encoder, self.coef_, self.intercept_ = encoder, coef, intercept

    @classmethod
    def fit(cls, encoder: AnswerEncoder, X: np.ndarray, Y: np.ndarray, alpha: float) -> "Bootstrap":
        """Ridge regression (scikit-learn) from encoded answers ``X`` to targets ``Y`` = [embedding, bias]."""
        from sklearn.linear_model import Ridge

        ridge = Ridge(alpha=alpha).fit(X, Y)
        return cls(encoder, ridge.coef_.astype(np.float64), np.atleast_1d(ridge.intercept_).astype(np.float64))

    @property
    def questionnaire(self):  # noqa: ANN201
        return self.encoder.questionnaire

    def initial_factors(self, attributes: list[dict], item_ratings: list[dict[int, float]],
                        budget: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Initial (embeddings (n, k), biases (n,)) for users with these answers (ratings by item db id)."""
        Y = self.encoder.transform(attributes, item_ratings, budget) @ self.coef_.T + self.intercept_
        return Y[:, :-1].astype(np.float32), Y[:, -1].astype(np.float32)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"encoder": np.array(json.dumps(self.encoder.to_json())), "coef": self.coef_,
                "intercept": self.intercept_}

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> "Bootstrap":
        return cls(AnswerEncoder.from_json(json.loads(str(a["encoder"]))), a["coef"], a["intercept"])
