"""Cold start v2: a user vector *computed* from what is known about the user.

A user's vector is a constant, plus one embedding per attribute answer (category → its value; number →
quantile bin of the training users' values; text → first character; each with a "missing" row), plus
the revealed items (sum of an input "seen" table / √(n + 1)), plus how they were rated (sum of a second item
table weighted by the centred rating (r − mid) / half-range / √(n + 1)), plus an embedding of the number of
revealed items (log₂ buckets) and of how they were revealed (questionnaire of size Q, or organic). An
item's score is ``user_vec · out_item + out_bias``.

It is trained (fastai ``Learner`` + ``fit_one_cycle`` on whole-tensor batches built here) only on
training users whose reveals are simulated afresh for every sample: (a) their first n ratings in time
order, (b) the popular questionnaire answered from a random half of their ratings, (c) a random subset of
their ratings; the targets are their other items rated in the top quarter of the scale (≥ 4 on 1..5),
with a full softmax over the catalogue and every positive weighted equally. Items the evaluation would
remove from the ranking (revealed items, the rest of the answer pool, the rest of the first ten) are
masked out of the softmax rather than counted as negatives.

Inference (``user_vectors``, ``item_scores``, ``to_arrays``/``from_arrays``) is numpy only; torch and
fastai are imported inside ``fit``.

What each setting bought, measured on pseudo-cold users, and the protocol's figures are in
docs/coldstart.md; a fit on MovieLens 100k takes about 6–10 s on one CPU thread.
"""
from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, fields

import numpy as np

from .data import POSITIVE_SHARE, CollabData, is_finite_value, liked_threshold
from .progress import training_output

N_COUNT_BUCKETS = 12  # n = 0, 1, 2–3, 4–7, …, ≥ 1024


@dataclass(frozen=True)
class FeatureModelConfig:
    """Settings of ``FeatureUserModel`` (defaults chosen on pseudo-cold MovieLens 100k users,
    bench/tune_feature_model.py).

    n_factors: width d of every embedding.
    epochs: epochs of ``fit_one_cycle``; one epoch = ``samples_per_user`` simulated reveals per training user.
    lr: peak learning rate of the one-cycle schedule.
    wd: fastai (decoupled) weight decay.
    dropout: dropout on each attribute embedding and on the user vector.
    users_per_batch: simulated users per batch, capped at a quarter of the training users (a rule that
        scales with the data: 12 steps per epoch up to 4 × users_per_batch training users, more beyond).
    samples_per_user: simulated reveals per training user and epoch.
    mix: probabilities of the reveal simulations (first n in time order, questionnaire, random subset).
    max_time_reveals: n of simulation (a) is drawn uniformly from 0..max_time_reveals.
    budgets: questionnaire sizes Q of simulation (b); the questionnaire is the ``questionnaire_items``
        passed to ``fit``, answered from a random half of the user's ratings.
    time_mask_first: in simulation (a) the unrevealed items among the first ``time_mask_first`` in time
        order are masked out of the softmax (neither positive nor negative), as the fold-in evaluation does.
    n_bins: quantile bins of a number attribute (edges from the training users' values).
    positive_share: top share of the rating scale that counts as a positive (0.25: ≥ 4 on 1..5).
    rating_centre: where the rating weight is zero, as a share of the scale (0.5: the middle, 3 on 1..5);
        the weight is (r − centre) / half-range.
    shrink: the item bags are divided by √(n + shrink) rather than √n (damps the first few reveals).
    count_scale: the item bags are also weighted by a learned factor per count bucket (1 + a parameter
        that weight decay pulls toward 0), so the model can set how much one, two, … reveals count.
    max_user_epochs: a rule that scales with the data: beyond this many (training users × epochs) the
        epochs shrink in proportion; at the floor of 2 epochs each of an epoch's ``samples_per_user``
        passes draws its own random ``max_user_epochs / 2`` of the users, so the ranker's cost stops
        growing with the users.
    full_softmax_items: up to this many catalogue items the softmax is over the whole catalogue; beyond
        it (a rule that scales with the catalogue) it is sampled: a row's normaliser runs over its
        positives and ``negatives`` items drawn per batch in proportion to popularity^0.75 (log-inclusion
        corrected; its masked items and positives left out of them), and the item tables get sparse
        gradients and a lazy AdamW (``lazy_adam``) that moves only the batch's rows; the output biases
        (one number per item) stay dense, decayed and moved every step.
    """

    n_factors: int = 128
    epochs: int = 30
    lr: float = 1e-2
    wd: float = 0.3
    dropout: float = 0.7
    users_per_batch: int = 256
    samples_per_user: int = 3
    mix: tuple[float, float, float] = (0.4, 0.5, 0.1)
    max_time_reveals: int = 15
    budgets: tuple[int, ...] = (0, 5, 15, 30)
    time_mask_first: int = 10
    n_bins: int = 10
    positive_share: float = POSITIVE_SHARE
    rating_centre: float = 0.5
    shrink: float = 1.0
    max_user_epochs: int = 200_000
    full_softmax_items: int = 4096
    negatives: int = 2048
    count_scale: bool = True

    def epochs_for(self, n_users: int) -> int:
        """Epochs for ``n_users`` training users (see ``max_user_epochs``)."""
        return int(max(min(2, self.epochs), min(self.epochs, self.max_user_epochs // max(n_users, 1))))

    def users_per_epoch(self, n_users: int) -> int:
        """Users drawn per epoch (all of them unless the epoch floor is reached; see ``max_user_epochs``)."""
        return int(min(n_users, max(1, self.max_user_epochs // self.epochs_for(n_users))))

    def to_json(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_json(cls, d: dict) -> "FeatureModelConfig":
        names = {f.name for f in fields(cls)}
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names}
        return cls(**kw)


@dataclass
class Reveal:
    """What is known of one user: attribute answers, revealed items (inner item indices) and their
    ratings, and how they were revealed."""

    attributes: dict
    items: np.ndarray  # int64 inner indices
    ratings: np.ndarray  # float
    budget: int | None = None  # questionnaire size Q when the items are questionnaire answers; None = organic ratings


def count_bucket(n: np.ndarray | int) -> np.ndarray:
    """Log₂ bucket of a number of revealed items: 0 → 0, 1 → 1, 2–3 → 2, 4–7 → 3, …"""
    n = np.asarray(n, dtype=np.int64)
    b = np.where(n > 0, np.floor(np.log2(np.maximum(n, 1))).astype(np.int64) + 1, 0)
    return np.minimum(b, N_COUNT_BUCKETS - 1)


def inclusion_probabilities(w: np.ndarray, m: int) -> np.ndarray:
    """Approximate probability that each item is among ``m`` drawn without replacement in proportion to
    ``w`` (Gumbel top-k, i.e. successive sampling): 1 − exp(−λ · w), with λ chosen so that they sum to
    m (1 for every item when m ≥ len(w))."""
    w = np.asarray(w, dtype=np.float64)
    if m >= len(w):
        return np.ones(len(w))
    lo, hi = 0.0, 1.0
    while (1 - np.exp(-hi * w)).sum() < m:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if (1 - np.exp(-mid * w)).sum() < m else (lo, mid)
    return np.maximum(1 - np.exp(-hi * w), 1e-12)


def time_order(users: np.ndarray, items: np.ndarray, timestamps: np.ndarray,
               item_tie: np.ndarray | None = None) -> np.ndarray:
    """Indices that order ratings by user, then time (ties by ``item_tie[item]``, the items' order by
    external id as text, as protocol §5 breaks them; None: by inner index); ratings of unknown time
    (< 0) come first, in data order. Whole-number times (the usual seconds) are sorted as one int64 key
    (time, tie-break) and then stably by user: 4x faster than ``np.lexsort`` on 25M."""
    ts = np.asarray(timestamps, dtype=np.float64)
    unknown = ts < 0
    time_key = np.where(unknown, -1.0, ts)
    items = np.asarray(items, np.int64) if item_tie is None else np.asarray(item_tie, np.int64)[items]
    tie = np.where(unknown, np.arange(len(ts)), items)
    if len(ts) and np.all(np.isfinite(time_key)) and np.all(time_key == np.floor(time_key)):
        lo, hi = int(time_key.min()), int(time_key.max())
        span = max(len(ts), int(np.max(items, initial=0)) + 1)
        if (hi - lo + 1) * span < 2 ** 62:
            by_time = np.argsort((time_key.astype(np.int64) - lo) * span + tie)  # keys unique within a user
            return by_time[np.argsort(np.asarray(users)[by_time], kind="stable")]
    return np.lexsort((tie, time_key, users))


def _first_char(v) -> str:  # noqa: ANN001
    s = str(v).strip()
    return s[:1].upper()


class _AttrEncoder:
    """Attribute answers → one table row per question (0 = missing or unknown)."""

    def __init__(self, spec: list[dict]):
        self.spec = spec
        self._lookup = [{v: k + 1 for k, v in enumerate(s["vocab"])} if s["type"] != "number" else None
                        for s in spec]

    @classmethod
    def fit(cls, questions: list, attributes: list[dict], n_bins: int) -> "_AttrEncoder":
        spec = []
        for q in questions:
            vals = [a.get(q.name) for a in attributes if a.get(q.name) is not None]
            if q.type == "number":
                x = np.array([float(v) for v in vals if is_finite_value(v)], dtype=float)
                edges = (np.unique(np.quantile(x, np.linspace(0, 1, n_bins + 1)[1:-1])).tolist()
                         if len(x) else [])
                spec.append({"name": q.name, "type": "number", "edges": edges})
            elif q.type == "category":
                vocab = list(q.values) if q.values is not None else sorted({str(v) for v in vals})
                spec.append({"name": q.name, "type": "category", "vocab": vocab})
            else:
                spec.append({"name": q.name, "type": "text", "vocab": sorted({_first_char(v) for v in vals} - {""})})
        return cls(spec)

    def sizes(self) -> list[int]:
        return [len(s["edges"]) + 2 if s["type"] == "number" else len(s["vocab"]) + 1 for s in self.spec]

    def encode(self, attributes: dict) -> np.ndarray:
        out = np.zeros(len(self.spec), dtype=np.int64)
        for k, s in enumerate(self.spec):
            v = (attributes or {}).get(s["name"])
            if v is None:
                continue
            if s["type"] == "number":
                if is_finite_value(v):
                    out[k] = 1 + int(np.searchsorted(s["edges"], float(v), side="right"))
            elif s["type"] == "category":
                out[k] = self._lookup[k].get(str(v), 0)
            else:
                out[k] = self._lookup[k].get(_first_char(v), 0)
        return out


def budget_code(budget: int | None, budgets: tuple[int, ...]) -> int:
    """How the items were revealed: 0 = organic (or no questionnaire), else 1 + index of the trained
    questionnaire size nearest to ``budget`` on a log scale."""
    pos = [b for b in budgets if b > 0]
    if budget is None or budget <= 0 or not pos:
        return 0
    return 1 + int(np.argmin([abs(math.log(budget) - math.log(b)) for b in pos]))


class _Batches:
    """Simulated reveals for fastai's Learner: each epoch, ``samples_per_user`` passes over a permutation
    of the training users in batches of ``bs``; every sample draws its own simulation. Yields
    ``((attrs, items, offsets, w_seen, w_rated, count, how), y)`` with ``y`` (bs × n_items, int8):
    1 = positive, 0 = negative, −1 = masked out of the softmax."""

    n_inp = 1

    def __init__(self, fm: "FeatureUserModel", prep: dict, rng: np.random.Generator, bs: int, device: str):
        self.fm, self.p, self.rng, self.bs, self.device = fm, prep, rng, bs, device
        self.n_users = len(prep["lens"])
        self.budget_codes = np.array([budget_code(b, fm.config.budgets) for b in fm.config.budgets], np.int64)

    @property
    def n(self) -> int:
        return self.fm.config.users_per_epoch(self.n_users) * self.fm.config.samples_per_user

    def __len__(self) -> int:
        return math.ceil(self.n / self.bs)

    def to(self, device) -> "_Batches":  # noqa: ANN001
        self.device = device
        return self

    def __iter__(self):
        take = self.fm.config.users_per_epoch(self.n_users)
        order = np.concatenate([self.rng.permutation(self.n_users)[:take]
                                for _ in range(self.fm.config.samples_per_user)])
        for start in range(0, len(order), self.bs):
            yield self.make(order[start:start + self.bs])

    def make(self, ub: np.ndarray):
        import torch

        cfg, p, rng = self.fm.config, self.p, self.rng
        n_items = p["n_items"]
        B = len(ub)
        lens = p["lens"][ub]
        seg_start = np.concatenate([[0], np.cumsum(lens)[:-1]])
        total = int(lens.sum())
        seg = np.repeat(np.arange(B), lens)
        idx = np.repeat(p["indptr"][ub] - seg_start, lens) + np.arange(total)
        items, trank, pos = p["items"][idx], p["trank"][idx], p["pos"][idx]
        # each rating's rank within its user in a random order: by the random key, then stably by user
        # (what np.lexsort((key, seg)) gives, ties between random keys aside, in a third of its time:
        # the second sort is a radix sort)
        by_key = np.argsort(rng.random(total))
        o2 = by_key[np.argsort(seg.astype(np.int16 if B < 2**15 else np.int64)[by_key], kind="stable")]
        rrank = np.empty(total, dtype=np.int64)
        rrank[o2] = np.arange(total) - seg_start[seg[o2]]

        sc = rng.choice(3, size=B, p=np.asarray(cfg.mix) / np.sum(cfg.mix))
        # (a) first n in time order
        n_t = rng.integers(0, cfg.max_time_reveals + 1, size=B)
        hide_t = np.maximum(n_t, cfg.time_mask_first)
        rev_a = trank < n_t[seg]
        tgt_a = (trank >= hide_t[seg]) & pos
        # (b) questionnaire answered from a random half
        budgets = np.asarray(cfg.budgets)
        q_at = rng.integers(0, len(budgets), size=B)
        q = budgets[q_at]
        pool = rrank < (lens // 2)[seg]
        rev_b = pool & (p["qrank"][items] < q[seg])
        tgt_b = ~pool & pos
        # (c) organic: a random subset (size log-uniform in 1..len-1)
        m = np.floor(np.exp(rng.random(B) * np.log(np.maximum(lens, 2)))).astype(np.int64)
        m = np.clip(m, 1, np.maximum(lens - 1, 1))
        rev_c = rrank < m[seg]
        tgt_c = ~rev_c & pos

        s = sc[seg]
        rev = np.select([s == 0, s == 1], [rev_a, rev_b], rev_c)
        tgt = np.select([s == 0, s == 1], [tgt_a, tgt_b], tgt_c)
        masked = np.select([s == 0, s == 1], [trank < hide_t[seg], pool], rev_c)

        n_rev = np.bincount(seg[rev], minlength=B)
        inv = 1.0 / np.sqrt(np.maximum(n_rev + cfg.shrink, 1e-9))
        r_items = items[rev]
        w_seen = inv[seg[rev]]
        w_rated = p["centred"][idx][rev] * w_seen
        offsets = np.concatenate([[0], np.cumsum(n_rev)[:-1]])
        how = np.where(sc == 1, self.budget_codes[q_at], 0)
        t = lambda a, dt=torch.long: torch.as_tensor(a, dtype=dt, device=self.device)  # noqa: E731
        x = (t(p["attrs"][ub]), t(r_items), t(offsets), t(w_seen, torch.float32), t(w_rated, torch.float32),
             t(count_bucket(n_rev)), t(how))
        if "neg_logw" in p:
            return x, self._sampled_targets(seg, items, masked, tgt, B, t)
        y = np.zeros((B, n_items), dtype=np.int8)
        y[seg[masked], items[masked]] = -1
        y[seg[tgt], items[tgt]] = 1
        return x, t(y, torch.int8)

    def _sampled_targets(self, seg, items, masked, tgt, B: int, t):  # noqa: ANN001, ANN202
        """Targets of the sampled softmax: the positives as (row, item) pairs, the batch's negatives
        (drawn without replacement by Gumbel top-k on popularity^0.75), which of them each row leaves
        out (its masked items and positives), and their log inclusion probabilities."""
        import torch

        logw, m = self.p["neg_logw"], min(self.fm.config.negatives, self.p["n_items"])
        neg = np.argpartition(-(logw + self.rng.gumbel(size=len(logw))), m - 1)[:m]
        log_pi = self.p["neg_log_pi"][neg]
        slot = np.full(self.p["n_items"], -1, dtype=np.int64)
        slot[neg] = np.arange(m)
        out = masked | tgt
        k = slot[items[out]]
        left_out = np.zeros((B, m), dtype=bool)
        left_out[seg[out][k >= 0], k[k >= 0]] = True
        return (t(seg[tgt]), t(items[tgt]), t(neg), t(left_out, torch.bool), t(log_pi, torch.float32))


class _EmptyBatches:
    n_inp, n, bs = 1, 0, 1

    def __len__(self) -> int:
        return 0

    def __iter__(self):
        return iter(())

    def to(self, device) -> "_EmptyBatches":  # noqa: ANN001
        return self


def _build_net(n_items: int, attr_sizes: list[int], n_how: int, cfg: FeatureModelConfig,  # -> torch.nn.Module
               sampled: bool = False):
    import torch
    import torch.nn as nn
    from fastai.layers import Embedding

    d = cfg.n_factors

    class FeatureUserNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.attrs = nn.ModuleList([Embedding(s, d) for s in attr_sizes])
            # sampled (large catalogue): sparse gradients, so a step touches only the batch's rows
            self.seen = nn.EmbeddingBag(n_items, d, mode="sum", sparse=sampled)
            self.rated = nn.EmbeddingBag(n_items, d, mode="sum", sparse=sampled)
            for bag in (self.seen, self.rated):
                nn.init.trunc_normal_(bag.weight, std=0.01)
            self.count = Embedding(N_COUNT_BUCKETS, d)
            self.how = Embedding(n_how, d)
            self.const = nn.Parameter(torch.zeros(d))
            # the item bags' weight per count bucket is 1 + this (weight decay pulls this toward 0, the weight toward 1)
            self.bag_scale = nn.Parameter(torch.zeros(N_COUNT_BUCKETS)) if cfg.count_scale else None
            self.out = Embedding(n_items, d)
            self.out_bias = nn.Parameter(torch.zeros(n_items))
            self.drop_attr = nn.Dropout(cfg.dropout)
            self.drop_user = nn.Dropout(cfg.dropout)

        def user(self, x):  # noqa: ANN001
            attrs, items, offsets, w_seen, w_rated, count, how = x
            u = self.const + self.count(count) + self.how(how)
            for k, emb in enumerate(self.attrs):
                u = u + self.drop_attr(emb(attrs[:, k]))
            bag = self.seen(items, offsets, per_sample_weights=w_seen)
            bag = bag + self.rated(items, offsets, per_sample_weights=w_rated)
            if self.bag_scale is not None:
                bag = bag * (1 + self.bag_scale[count])[:, None]
            return self.drop_user(u + bag)

        def forward(self, x):  # noqa: ANN001
            if sampled:  # the loss scores the positives and the sampled negatives itself
                return self.user(x)
            return self.user(x) @ self.out.weight.T + self.out_bias

    return FeatureUserNet()


def _sampled_softmax_loss(net):  # noqa: ANN001, ANN202
    """The full softmax's loss with its normaliser estimated on a sample: a row's log-sum-exp runs over
    its positives and the batch's sampled negatives (log-inclusion corrected; the row's masked items
    and positives left out of them); every positive weighted equally."""
    import torch
    import torch.nn.functional as F

    def loss(u, y):  # noqa: ANN001
        rows, pos_items, neg, left_out, log_pi = y
        if not len(rows):
            return u.sum() * 0.0
        out = lambda i: F.embedding(i, net.out.weight, sparse=True)  # noqa: E731  (sparse gradient)
        s_pos = (u[rows] * out(pos_items)).sum(1) + net.out_bias[pos_items]
        s_neg = (u @ out(neg).T + net.out_bias[neg] - log_pi).masked_fill(left_out, float("-inf"))
        top = torch.full((len(u),), float("-inf"), device=u.device).scatter_reduce(0, rows, s_pos, "amax")
        top = torch.maximum(top, s_neg.max(1).values).detach()
        total = torch.exp(s_neg - top[:, None]).sum(1).index_add(0, rows, torch.exp(s_pos - top[rows]))
        return (torch.log(total[rows]) + top[rows] - s_pos).mean()

    return loss


def _softmax_loss(logits, y):  # noqa: ANN001
    """Full-softmax cross-entropy, masked items left out, every positive weighted equally."""
    import torch

    logits = logits.masked_fill(y < 0, float("-inf"))
    logp = torch.log_softmax(logits, dim=1)
    pos = y > 0
    return -torch.where(pos, logp, torch.zeros_like(logp)).sum() / pos.sum().clamp(min=1)


class FeatureUserModel:
    """Cold-start model whose user side is computed from features and revealed ratings (see module doc)."""

    def __init__(self, config: FeatureModelConfig = FeatureModelConfig(), seed: int = 42, device: str | None = None,
                 progress: bool = True):
        self.config, self.seed, self.device, self.progress = config, seed, device, progress
        self.bag_scale_: np.ndarray | None = None  # (with count_scale) the item bags' weight per count bucket

    # ----------------------------------------------------------------- training
    def _prepare(self, data: CollabData, timestamps: np.ndarray, attributes: list[dict],
                 questionnaire_items: list[int], item_tie: np.ndarray | None) -> dict:
        ts = np.asarray(timestamps, dtype=np.float64)
        if len(ts) != len(data):
            raise ValueError("timestamps must have one entry per rating")
        order = time_order(data.users, data.items, ts, item_tie)
        users, items, ratings = data.users[order], data.items[order], data.ratings[order].astype(np.float64)
        lens = np.bincount(users, minlength=data.n_users)
        indptr = np.concatenate([[0], np.cumsum(lens)[:-1]])
        trank = np.arange(len(users)) - indptr[users]
        qrank = np.full(data.n_items, np.iinfo(np.int64).max // 2, dtype=np.int64)
        for k, i in enumerate(questionnaire_items):
            if 0 <= int(i) < data.n_items:
                qrank[int(i)] = min(qrank[int(i)], k)
        attrs = np.zeros((data.n_users, len(self.encoder_.spec)), np.int64)
        for u in range(min(data.n_users, len(attributes))):
            attrs[u] = self.encoder_.encode(attributes[u])
        prep = {"n_items": data.n_items, "lens": lens, "indptr": indptr, "items": items, "ratings": ratings,
                "trank": trank, "pos": ratings >= self.threshold_, "qrank": qrank, "attrs": attrs,
                "centred": self._centred(ratings)}
        if data.n_items > self.config.full_softmax_items:
            w = (np.bincount(items, minlength=data.n_items) + 1.0) ** 0.75
            prep["neg_logw"] = np.log(w)
            prep["neg_log_pi"] = np.log(inclusion_probabilities(w, min(self.config.negatives, data.n_items)))
        return prep

    def _centred(self, ratings: np.ndarray) -> np.ndarray:
        """The weight of a revealed rating in the rated-items table."""
        lo, hi = self.scale_
        centre = lo + self.config.rating_centre * (hi - lo)
        return (np.asarray(ratings, dtype=np.float64) - centre) / ((hi - lo) / 2 if hi > lo else 1.0)

    def fit(self, data: CollabData, timestamps: np.ndarray, attributes: list[dict], questions: list,
            questionnaire_items: list[int], scale: tuple[float, float],
            item_tie: np.ndarray | None = None) -> "FeatureUserModel":
        """Train on ``data`` (training users only); ``attributes[u]`` are inner user u's answers,
        ``timestamps`` one per rating (−1 = unknown: data order), ``questions`` the attribute questions
        (``bootstrap.questionnaire.Question``), ``questionnaire_items`` the items a new user is asked,
        most useful first, ``scale`` the rating scale (lo, hi), ``item_tie`` per inner item its rank by
        external id as text (``time_order``: ratings given at the same time; None: by inner index)."""
        import torch
        from fastai.callback.schedule import fit_one_cycle  # noqa: F401  (patches Learner)
        from fastai.data.core import DataLoaders
        from fastai.learner import Learner
        from fastai.torch_core import set_seed

        from .train import compact_losses, pick_device, tensor_to_numpy

        cfg = self.config
        lo, hi = float(scale[0]), float(scale[1])
        self.scale_ = (lo, hi)
        self.threshold_ = liked_threshold(scale, cfg.positive_share)
        self.encoder_ = _AttrEncoder.fit(questions, [attributes[u] for u in range(min(len(attributes), data.n_users))],
                                         cfg.n_bins)
        prep = self._prepare(data, timestamps, attributes, questionnaire_items, item_tie)

        device = pick_device(self.device)
        deterministic = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True, warn_only=True)
        bs = max(1, min(cfg.users_per_batch, math.ceil(data.n_users / 4)))
        n_how = 1 + len([b for b in cfg.budgets if b > 0])
        set_seed(self.seed, reproducible=True)
        torch.manual_seed(self.seed)
        rng = np.random.default_rng(self.seed)
        sampled = "neg_logw" in prep
        net = _build_net(data.n_items, self.encoder_.sizes(), n_how, cfg, sampled).to(device)
        dls = DataLoaders(_Batches(self, prep, rng, bs, device), _EmptyBatches(), device=device)
        if sampled:  # sparse item tables: only the batch's rows move
            from .lazy_adam import lazy_adamw_opt_func

            learn = Learner(dls, net, loss_func=_sampled_softmax_loss(net), cbs=[compact_losses()],
                            opt_func=lazy_adamw_opt_func())
        else:
            learn = Learner(dls, net, loss_func=_softmax_loss, cbs=[compact_losses()])
        self.sampled_softmax_ = sampled
        t0 = time.perf_counter()
        try:
            epochs = cfg.epochs_for(data.n_users)
            with training_output(learn, self.progress):
                learn.fit_one_cycle(epochs, cfg.lr, wd=cfg.wd)
        finally:
            torch.use_deterministic_algorithms(deterministic)
        self.fit_s_ = round(time.perf_counter() - t0, 3)
        self.train_loss_ = [float(v[0]) for v in learn.recorder.values]
        net.eval()
        self.const_ = tensor_to_numpy(net.const)
        self.attr_tables_ = [tensor_to_numpy(e.weight) for e in net.attrs]
        self.seen_, self.rated_ = tensor_to_numpy(net.seen.weight), tensor_to_numpy(net.rated.weight)
        self.count_, self.how_ = tensor_to_numpy(net.count.weight), tensor_to_numpy(net.how.weight)
        self.bag_scale_ = None if net.bag_scale is None else 1 + tensor_to_numpy(net.bag_scale)
        self.out_, self.out_bias_ = tensor_to_numpy(net.out.weight), tensor_to_numpy(net.out_bias)
        return self

    # ----------------------------------------------------------------- inference (numpy only)
    @property
    def n_items(self) -> int:
        return len(self.out_bias_)

    def user_vectors(self, reveals: list[Reveal]) -> np.ndarray:
        """(n, d) user vectors of the reveals (eval mode: no dropout)."""
        n_items = self.n_items
        out = np.empty((len(reveals), len(self.const_)), dtype=np.float32)
        for k, r in enumerate(reveals):
            u = self.const_.astype(np.float64)
            for table, code in zip(self.attr_tables_, self.encoder_.encode(r.attributes)):
                u = u + table[code]
            items = np.asarray(r.items, dtype=np.int64).reshape(-1)
            ratings = np.asarray(r.ratings, dtype=np.float64).reshape(-1)
            keep = (items >= 0) & (items < n_items)
            items, ratings = items[keep], ratings[keep]
            n = len(items)
            bucket = int(count_bucket(n))
            u = u + self.count_[bucket] + self.how_[budget_code(r.budget, self.config.budgets)]
            if n:
                c = self._centred(ratings)
                bag = self.seen_[items].sum(0) + (self.rated_[items] * c[:, None]).sum(0)
                scale = 1.0 if self.bag_scale_ is None else float(self.bag_scale_[bucket])
                u = u + bag * (scale / math.sqrt(n + self.config.shrink))
            out[k] = u
        return out.astype(np.float32)

    def history_vectors(self, users: np.ndarray, items: np.ndarray, ratings: np.ndarray, n_users: int,
                        attributes: list[dict]) -> np.ndarray:
        """(n_users, d) vectors of users 0..n_users−1, each from all their (user, item, rating) triples
        as organic reveals: ``user_vectors`` of one ``Reveal(attributes[u], items, ratings, None)`` per
        user, with the item bags as two sparse products (torch, every thread) instead of a loop over
        users: 162k users and 25M ratings in seconds rather than half a minute. Training only."""
        import torch

        users, items = np.asarray(users, np.int64), np.asarray(items, np.int64)
        keep = (items >= 0) & (items < self.n_items)
        users, items, ratings = users[keep], items[keep], np.asarray(ratings)[keep]
        if len(users) and (users[1:] < users[:-1]).any():  # rows of a CSR matrix go by user
            order = np.argsort(users, kind="stable")
            users, items, ratings = users[order], items[order], ratings[order]
        n = np.bincount(users, minlength=n_users)
        bucket = count_bucket(n)
        scale = np.ones(n_users) if self.bag_scale_ is None else self.bag_scale_[bucket].astype(np.float64)
        w = (scale / np.sqrt(n + self.config.shrink))[users]
        indptr = torch.from_numpy(np.concatenate([[0], np.cumsum(n)]))

        def bag(weights: np.ndarray, table: np.ndarray) -> np.ndarray:
            with warnings.catch_warnings():  # "sparse CSR support is in beta"
                warnings.simplefilter("ignore", UserWarning)
                m = torch.sparse_csr_tensor(indptr, torch.from_numpy(items),
                                            torch.from_numpy(weights.astype(np.float32)), size=(n_users, self.n_items))
            return (m @ torch.from_numpy(np.array(table, np.float32))).numpy().astype(np.float64)

        out = bag(w, self.seen_) + bag(w * self._centred(ratings), self.rated_)
        out += self.const_ + self.count_[bucket] + self.how_[budget_code(None, self.config.budgets)]
        if self.attr_tables_:
            codes = np.stack([self.encoder_.encode(attributes[u] if u < len(attributes) else {})
                              for u in range(n_users)])
            for k, table in enumerate(self.attr_tables_):
                out += table[codes[:, k]]
        return out.astype(np.float32)

    def item_scores(self, user_vecs: np.ndarray) -> np.ndarray:
        """(n, n_items) ranking scores of user vectors (higher = recommend first)."""
        return np.asarray(user_vecs, dtype=np.float32) @ self.out_.T + self.out_bias_

    def add_items(self, n_new: int, out: np.ndarray | None = None, out_bias: np.ndarray | None = None) -> None:
        """Append ``n_new`` catalogue items: zero input rows; output rows and biases as given (e.g. from
        their metadata, ``ItemPrior``), else zero rows and the minimum bias."""
        if n_new <= 0:
            return
        d = self.out_.shape[1]
        z = np.zeros((n_new, d), dtype=np.float32)
        self.seen_ = np.concatenate([self.seen_, z])
        self.rated_ = np.concatenate([self.rated_, z])
        self.out_ = np.concatenate([self.out_, z if out is None else np.asarray(out, np.float32)])
        self.out_bias_ = np.concatenate([self.out_bias_, np.full(n_new, self.out_bias_.min(), np.float32)
                                         if out_bias is None else np.asarray(out_bias, np.float32)])

    # ----------------------------------------------------------------- persistence
    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays (one JSON string array for the settings and attribute encoders); no pickles."""
        meta = {"config": self.config.to_json(), "seed": self.seed, "scale": list(self.scale_),
                "threshold": self.threshold_, "attributes": self.encoder_.spec}
        arrays = {"meta_json": np.array(json.dumps(meta)), "const": self.const_, "seen": self.seen_,
                  "rated": self.rated_, "count": self.count_, "how": self.how_, "out": self.out_,
                  "out_bias": self.out_bias_}
        for k, t in enumerate(self.attr_tables_):
            arrays[f"attr_{k}"] = t
        if self.bag_scale_ is not None:
            arrays["bag_scale"] = self.bag_scale_
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "FeatureUserModel":
        """Rebuild a trained model from ``to_arrays`` (numpy only: imports neither torch nor fastai)."""
        meta = json.loads(str(np.asarray(arrays["meta_json"])[()]))
        m = cls(FeatureModelConfig.from_json(meta["config"]), seed=int(meta["seed"]), progress=False)
        m.scale_ = tuple(float(v) for v in meta["scale"])
        m.threshold_ = float(meta["threshold"])
        m.encoder_ = _AttrEncoder(meta["attributes"])
        for name in ("const", "seen", "rated", "count", "how", "out", "out_bias"):
            setattr(m, name + "_", np.asarray(arrays[name], dtype=np.float32))
        m.attr_tables_ = [np.asarray(arrays[f"attr_{k}"], dtype=np.float32) for k in range(len(m.encoder_.spec))]
        m.bag_scale_ = np.asarray(arrays["bag_scale"], dtype=np.float32) if "bag_scale" in arrays else None
        return m
