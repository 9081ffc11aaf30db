"""The splits of the cold-start protocol (docs/protocol.md §1, §3, §7)."""
from __future__ import annotations

import numpy as np


def valid_split(n_ratings: int, valid_pct: float, seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """§7: ``default_rng(seed).permutation`` over ratings in source order; first ``valid_pct`` is validation.

    Returns (train positions, valid positions)."""
    perm = np.random.default_rng(seed).permutation(n_ratings)
    n_valid = int(round(n_ratings * valid_pct))
    return np.sort(perm[n_valid:]), np.sort(perm[:n_valid])


def cold_users(users: list[str], seed: int) -> set[str]:
    """§1: a fifth of the users (ids as strings, sorted as strings), chosen by ``default_rng(seed)``."""
    users = sorted(users)
    rng = np.random.default_rng(seed)
    return set(rng.choice(users, size=len(users) // 5, replace=False).tolist())


def answer_pool_split(user_index: int, items: list[str], seed: int) -> tuple[list[str], list[str]]:
    """§3: shuffle a cold user's items (sorted as strings) with ``default_rng([seed, user_index])``.

    Returns (answer pool = first half rounded down, test set = the rest)."""
    items = sorted(items)
    perm = np.random.default_rng([seed, int(user_index)]).permutation(len(items))
    shuffled = [items[i] for i in perm]
    half = len(items) // 2
    return shuffled[:half], shuffled[half:]
