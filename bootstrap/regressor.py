"""The bootstrap regressor: questionnaire features -> a new user's initial embedding and bias.

Ridge regression in closed form, stored as plain arrays (no pickles), so onboarding needs numpy only."""
from __future__ import annotations

import json

import numpy as np

from ..cf_core.scoring import from_npz, to_npz
from .features import AnswerEncoder


class RidgeBootstrap:
    """Multi-output ridge regression (scikit-learn style: ``fit`` returns self, learned ``coef_``...)."""

    def __init__(self, alpha: float = 30.0):
        self.alpha = alpha

    def fit(self, X: np.ndarray, Y: np.ndarray, sample_weight: np.ndarray | None = None) -> "RidgeBootstrap":
        w = np.ones(len(X)) if sample_weight is None else np.asarray(sample_weight, float)
        self.x_mean_ = (w[:, None] * X).sum(0) / w.sum()
        self.intercept_ = (w[:, None] * Y).sum(0) / w.sum()
        Xc, Yc = X - self.x_mean_, Y - self.intercept_
        A = Xc.T @ (w[:, None] * Xc) + self.alpha * np.eye(X.shape[1])
        self.coef_ = np.linalg.solve(A, Xc.T @ (w[:, None] * Yc))
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        return (X - self.x_mean_) @ self.coef_ + self.intercept_


class Bootstrap:
    """Encoder and regressor together: answers in, (embedding, bias) out."""

    def __init__(self, encoder: AnswerEncoder, regressor: RidgeBootstrap):
        self.encoder, self.regressor = encoder, regressor

    def initial_factors(self, attributes: list[dict], item_ratings: list[dict[int, float]],
                        budget: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Initial (embeddings (n, k), biases (n,)) for users with these answers."""
        Y = self.regressor.predict(self.encoder.transform(attributes, item_ratings, budget))
        return Y[:, :-1].astype(np.float32), Y[:, -1].astype(np.float32)

    def to_npz(self) -> bytes:
        r = self.regressor
        return to_npz({"encoder": np.array(json.dumps(self.encoder.to_json())), "alpha": np.array(r.alpha),
                       "x_mean": r.x_mean_, "intercept": r.intercept_, "coef": r.coef_})

    @classmethod
    def from_npz(cls, blob: bytes) -> "Bootstrap":
        a = from_npz(blob)
        reg = RidgeBootstrap(float(a["alpha"]))
        reg.x_mean_, reg.intercept_, reg.coef_ = a["x_mean"], a["intercept"], a["coef"]
        return cls(AnswerEncoder.from_json(json.loads(str(a["encoder"]))), reg)
