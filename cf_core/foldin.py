"""Fold a user's ratings into a trained model with item factors frozen."""
from __future__ import annotations

import numpy as np

from .scoring import ScoringModel, logit_range


def fold_in_user(model: ScoringModel, items: np.ndarray, ratings: np.ndarray, prior_vec: np.ndarray,
                 prior_bias: float, reg: float = 5.0, reg_bias: float = 1.0) -> tuple[np.ndarray, float]:
    """Solve for a user's embedding and bias given their ratings, shrunk toward a prior.

    Dot model: ridge regression in the logit space of ``sigmoid_range`` (closed form, numpy).
    NN model: a few hundred Adam steps on the user's embedding (torch). With no ratings the prior
    is returned unchanged."""
    items = np.asarray(items, dtype=np.int64)
    if len(items) == 0:
        return prior_vec.astype(np.float32), float(prior_bias)
    if model.kind == "nn":
        return _fold_in_nn(model, items, ratings, prior_vec, reg)
    lo, hi = model.y_range
    target = logit_range(ratings, lo, hi) - model.item_bias[items]
    X = np.concatenate([model.item_factors[items].astype(np.float64), np.ones((len(items), 1))], axis=1)
    lam = np.r_[np.full(model.n_factors, reg), reg_bias]
    prior = np.r_[prior_vec, prior_bias]
    sol = np.linalg.solve(X.T @ X + np.diag(lam), X.T @ target + lam * prior)
    return sol[:-1].astype(np.float32), float(sol[-1])


def _fold_in_nn(model: ScoringModel, items: np.ndarray, ratings: np.ndarray, prior_vec: np.ndarray,
                reg: float, steps: int = 200) -> tuple[np.ndarray, float]:
    import torch

    head = [(op, [torch.from_numpy(p) for p in params]) for op, params in model.head or []]
    item_emb = torch.from_numpy(model.item_factors[items])
    y = torch.as_tensor(np.asarray(ratings, np.float32))
    prior = torch.from_numpy(prior_vec.astype(np.float32))
    u = prior.clone().requires_grad_(True)
    opt = torch.optim.Adam([u], lr=0.05)
    lo, hi = model.y_range
    for _ in range(steps):
        x = torch.cat([u.expand(len(items), -1), item_emb], 1)
        for op, p in head:
            x = x @ p[0].T + p[1] if op == "linear" else torch.relu(x) if op == "relu" else x * p[0] + p[1]
        pred = torch.sigmoid(x[:, 0]) * (hi - lo) + lo
        loss = ((pred - y) ** 2).sum() + reg * 0.01 * ((u - prior) ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return u.detach().numpy().astype(np.float32), 0.0
