"""Fold a user's ratings into a trained model with item factors frozen."""
from __future__ import annotations

import numpy as np

from .scoring import ScoringModel


def fold_in_user(model: ScoringModel, items: np.ndarray, ratings: np.ndarray, prior_vec: np.ndarray,
                 prior_bias: float, reg: float = 5.0, reg_bias: float = 1.0,
                 rank_reg: float = 5.0) -> tuple[np.ndarray, float]:
    """Solve for a user's embedding and bias given their ratings, shrunk toward a prior.

    Rating part, dot model: Gauss-Newton on squared error in rating units with a Gaussian prior
    (numpy); NN model: Adam steps on the user's embedding (torch). Ranking part (when the model has
    one): the rated items are positives of a logistic model, solved by Newton's method. With no
    ratings the prior is returned unchanged."""
    items = np.asarray(items, dtype=np.int64)
    prior_vec = np.asarray(prior_vec, dtype=np.float32)
    if len(items) == 0:
        return prior_vec, float(prior_bias)
    prior_rating, prior_rank = model.split_user(prior_vec)
    if model.kind == "nn":
        vec, bias = _fold_in_nn(model, items, ratings, prior_rating, reg)
    else:
        vec, bias = _fold_in_dot(model, items, np.asarray(ratings, np.float64), prior_rating, prior_bias, reg, reg_bias)
    if model.rank_factors is not None:
        vec = np.concatenate([vec, fold_in_ranking(model.rank_factors, model.rank_bias, items, prior_rank, rank_reg)])
    return vec.astype(np.float32), bias


def fold_in_ranking(rank_factors: np.ndarray, rank_bias: np.ndarray, items: np.ndarray, prior: np.ndarray,
                    reg: float, iterations: int = 10) -> np.ndarray:
    """Ranking embedding that makes the user's rated ``items`` likely: maximise
    sum log sigmoid(f_i . u + b_i) - reg/2 |u - prior|^2 (Newton's method; concave, so it converges)."""
    F = rank_factors[items].astype(np.float64)
    b = rank_bias[items].astype(np.float64)
    prior = prior.astype(np.float64)
    u = prior.copy()
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(F @ u + b)))
        grad = F.T @ (1 - p) - reg * (u - prior)
        hess = F.T @ (F * (p * (1 - p))[:, None]) + reg * np.eye(len(u))
        step = np.linalg.solve(hess, grad)
        u += step
        if np.abs(step).max() < 1e-6:
            break
    return u.astype(np.float32)


def _fold_in_dot(model: ScoringModel, items: np.ndarray, ratings: np.ndarray, prior_vec: np.ndarray,
                 prior_bias: float, reg: float, reg_bias: float, iterations: int = 8) -> tuple[np.ndarray, float]:
    """Gauss-Newton on the squared error in rating units (through ``sigmoid_range``), with a
    Gaussian prior: minimise sum (r - pred)^2 + reg |u - u0|^2 + reg_bias (b - b0)^2."""
    lo, hi = model.y_range
    X = np.concatenate([model.item_factors[items].astype(np.float64), np.ones((len(items), 1))], axis=1)
    offset = model.item_bias[items].astype(np.float64)
    lam = np.r_[np.full(model.n_factors, reg), reg_bias]
    prior = np.r_[prior_vec, prior_bias].astype(np.float64)
    theta = prior.copy()
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(X @ theta + offset)))
        resid = ratings - (lo + (hi - lo) * p)
        J = X * ((hi - lo) * p * (1 - p))[:, None]
        step = np.linalg.solve(J.T @ J + np.diag(lam), J.T @ resid - lam * (theta - prior))
        theta += step
        if np.abs(step).max() < 1e-6:
            break
    return theta[:-1].astype(np.float32), float(theta[-1])


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
