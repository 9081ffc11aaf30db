"""Training a whole version in memory, no database: the rating model (chapter 8's dot or NN), the
bootstrap prior and questionnaire, the cold-start ranker (in a side process beside the rating model at
size) and the item prior, from ``TrainingData`` to a ``TrainedModel`` (``fit_model``); and the §7
validation (``validate``). ``cfb.service.training`` reads the ratings and stores the result."""
from __future__ import annotations

import gc
import multiprocessing
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from multiprocessing.pool import AsyncResult

import numpy as np

from ..bootstrap.fit import fit_bootstrap, make_questionnaire
from .data import CollabData, default_y_range
from .errors import CfbError, InputError
from .feature_model import FeatureUserModel
from .model import ServingConfig, TrainedModel, fit_ranker_map
from .split import valid_split
from .train import MODELS, pick_device

VALID_SEED = 42  # docs/protocol.md §7


def kind_defaults(kind: str) -> dict:
    """A model kind's training settings (tuned on MovieLens 100k's training split): its class's own
    defaults, the one place they are written (``cf_core.train``)."""
    return {k: v for k, v in MODELS[kind]().get_params().items() if k not in ("y_range", "seed")}


DEFAULTS = {kind: kind_defaults(kind) for kind in MODELS}
BOOTSTRAP_ALPHA = 30.0  # ridge penalty of the bootstrap map, chosen on pseudo-cold users
# from this many training ratings (on CPU) the ranker trains in its own process while the rating model
# trains here, one torch thread each: 25M-shaped set 182 s side by side against 263 s one after the other
SIDE_BY_SIDE_AT = 5_000_000
BASE_TRAIN = 80_000  # the defaults above are tuned on MovieLens 100k's 80% training split
WARM_UP_WAIT_S = 60  # how long a retrain waits for its side process to say which device it sees
MAX_BATCH_SCALE = 32  # measured on a 6M-rating set: ×32 ran 1.8× faster than ×16 at the same MSE, ×64 lost accuracy


MIN_BATCH = 32  # the smallest batch a small ratings set's defaults shrink to


def scaled_defaults(defaults: dict, n_train: int, min_epochs: int) -> dict:
    """Defaults for the size of the ratings set; a user's explicit settings always win. MovieLens
    100k keeps the tuned defaults unchanged. A larger set: the batch size grows with the data (×2 per
    doubling, at most ``MAX_BATCH_SCALE``), the learning rate with its square root, and the epochs
    shrink likewise. A smaller one: the batch shrinks with the data (½ per halving, down to
    ``MIN_BATCH``), so that an epoch still takes about as many steps (1,400 ratings in batches of 1,024
    trained 16 steps in all, and stalled)."""
    ratio = 2.0 ** round(np.log2(max(n_train, 1) / BASE_TRAIN))
    if ratio < 1:
        return {**defaults, "bs": max(MIN_BATCH, int(defaults["bs"] * ratio))}
    scale = int(min(ratio, MAX_BATCH_SCALE))
    if scale == 1:
        return dict(defaults)
    return {**defaults, "bs": defaults["bs"] * scale, "lr": defaults["lr"] * scale ** 0.5,
            "epochs": max(min_epochs, round(defaults["epochs"] / scale ** 0.5))}


@dataclass
class TrainingData:
    """Every rating on inner indices, with the maps back to database ids and what else training needs."""

    data: CollabData
    user_ids: np.ndarray  # database id of each inner user
    item_ids: np.ndarray  # database id of each inner item
    timestamps: np.ndarray  # per rating (-1 unknown)
    attributes: list[dict]  # per inner user
    scale: tuple[float, float]
    max_seq: int
    item_attributes: list[dict] | None = None  # per inner item: its metadata
    # per inner item: its rank by external id compared as text, which orders ratings given at the same
    # time (protocol §5; None: by inner index)
    item_tie: np.ndarray | None = None


def text_ranks(ids: list[str]) -> np.ndarray:
    """Each of ``ids``' rank when they are sorted as text (ids are distinct)."""
    ranks = np.empty(len(ids), np.int64)
    ranks[np.argsort(np.array(ids, dtype=object), kind="stable")] = np.arange(len(ids))
    return ranks


def check_kind_settings(kind: str, params: dict) -> None:
    """Refuse settings a model kind cannot train with: a batch of one rating for the nn model, whose
    BatchNorm (fastai's ``EmbeddingNN``) needs at least two in a batch."""
    if kind not in MODELS:
        raise CfbError(f"unknown model kind {kind!r} (choose from {', '.join(MODELS)})")
    if kind == "nn" and params.get("bs") is not None and params["bs"] < 2:
        raise InputError("bs (--bs) must be at least 2 with the nn model: its BatchNorm needs two ratings a batch")


def rating_params(kind: str, n_train: int, params: dict) -> dict:
    """The rating model's settings: scaled defaults, overridden by the given ones (None: default)."""
    check_kind_settings(kind, params)
    if kind == "nn" and n_train < 2:  # (a batch of one, whatever --bs: see ``check_kind_settings``)
        raise InputError(f"the nn model needs at least 2 ratings to train on (its BatchNorm), and there "
                         f"{'is' if n_train == 1 else 'are'} {n_train}")
    return {**scaled_defaults(DEFAULTS[kind], n_train, 3), **{k: v for k, v in params.items() if v is not None}}


def fit_model(td: TrainingData, kind: str = "dot", params: dict | None = None, seed: int = 42,
              config: ServingConfig | None = None, ranker: bool = True, progress: bool = True,
              device: str | None = None, side: SideProcess | None = None) -> tuple[TrainedModel, dict]:
    """Train every part of a version on all of ``td`` (in memory, no database): the rating model,
    the bootstrap prior and questionnaire, and the cold-start ranker (from ``SIDE_BY_SIDE_AT`` ratings
    on a CPU, in a side process: ``side`` when given, else one of its own). Returns (model, timings)."""
    hp = rating_params(kind, len(td.data), params or {})
    est = MODELS[kind](y_range=default_y_range(*td.scale), seed=seed, device=device, progress=progress, **hp)
    questionnaire = make_questionnaire(td.data, td.item_ids, td.attributes, scale=td.scale, tie=td.item_tie)
    ranker_args = (td.data, td.timestamps, td.attributes, questionnaire.questions,
                   list(np.searchsorted(td.item_ids, questionnaire.items)), td.scale, seed, device, td.item_tie)
    side_by_side = ranker_goes_beside(ranker, len(td.data), device, side)
    if side is not None and not side_by_side:  # (a GPU): its memory back now
        side.close()
    names = metadata_names(td.item_attributes or [])  # the item prior's metadata
    config = config or ServingConfig.for_kind(kind)
    report: dict = {}
    rank_vecs = None
    with (ranker_beside(ranker_args, bool(names), side) if side_by_side else nullcontext()) as pending:
        with torch_threads(1 if side_by_side else None):
            est.fit(td.data)
        gc.collect()  # fastai's Learner is a reference cycle holding the training tensors: free them now
        report.update({"epoch_s": est.report_.epoch_s, "fit_s": est.report_.fit_s, "device": est.report_.device,
                       # (a sum over threads adds in another order: the nn model's arrays follow the count)
                       "torch_threads": 1 if side_by_side else torch_thread_count()})
        t0 = time.perf_counter()
        boot = fit_bootstrap(td.data, td.item_ids, est.user_factors_, est.user_bias_, td.attributes, questionnaire,
                             alpha=BOOTSTRAP_ALPHA, seed=seed)
        report["bootstrap_s"] = round(time.perf_counter() - t0, 3)
        prior = None
        if names:  # the item prior's rating part needs the rating model only: fitted while the ranker trains
            from .item_prior import ItemPrior, ItemPriorConfig

            t0 = time.perf_counter()
            with torch_threads(1 if side_by_side else None):  # (an NN's new items are fitted through its MLP)
                prior = ItemPrior(ItemPriorConfig(rating_weight=config.rating_weight), attributes=names,
                                  seed=seed).fit_rating_part(
                    td.item_attributes, td.data.users, td.data.items, td.data.ratings,
                    est.user_factors_, est.user_bias_, est.y_range, td.scale,
                    item_factors=est.item_factors_, item_bias=est.item_bias_,
                    head=getattr(est, "head_", None), device=device)
            report["item_prior_rating_s"] = round(time.perf_counter() - t0, 3)
            report["item_prior_l2"] = prior.l2_  # the penalty its held-out items chose (None: an NN's fit)
        fitted_ranker = None
        if side_by_side:
            arrays, report["ranker_fit_s"], rank_vecs = pending.get()
            fitted_ranker = FeatureUserModel.from_arrays(arrays)
            report["side_by_side"] = True
        elif ranker:
            t0 = time.perf_counter()
            fitted_ranker = fit_ranker(*ranker_args, progress=progress)
            report["ranker_fit_s"] = round(time.perf_counter() - t0, 3)
    settings = {"kind": kind, **est.get_params(), "bootstrap_alpha": BOOTSTRAP_ALPHA}
    if fitted_ranker is not None:
        settings["ranker"] = fitted_ranker.config.to_json()
    settings["serving"] = config.to_json()
    counts, sums = td.data.item_totals()
    model = TrainedModel(kind=kind, item_ids=td.item_ids, rating=est.rating_model(), bootstrap=boot,
                         item_counts=counts.astype(np.float64), item_sums=sums, config=config,
                         ranker=fitted_ranker, user_ids=td.user_ids, user_factors=est.user_factors_,
                         user_bias=est.user_bias_, settings=settings, n_trained_items=len(td.item_ids),
                         scale=tuple(map(float, td.scale)))
    if fitted_ranker is not None:  # how an item added later carries what its ratings say over to its ranker row
        model.ranker_map = fit_ranker_map(model)
    if prior is not None:  # the ranking part, after the side process has ended: both cores and its memory
        from .item_prior import full_history_user_vectors

        t0 = time.perf_counter()
        if rank_vecs is None and fitted_ranker is not None:  # (made by the side process when there was one)
            rank_vecs = full_history_user_vectors(fitted_ranker, td.data, td.attributes)
        model.item_prior = prior.fit_ranking_part(
            rank_vecs, rank_out=None if fitted_ranker is None else fitted_ranker.out_,
            rank_bias=None if fitted_ranker is None else fitted_ranker.out_bias_)
        model.item_meta = encoded_metadata(prior, td.item_attributes)
        report["item_prior_s"] = round(report["item_prior_rating_s"] + time.perf_counter() - t0, 3)
        settings["item_prior"] = {"attributes": list(names), **model.item_prior.config.to_json()}
    return model, report


def ranker_may_go_beside(ranker: bool, n_ratings: int) -> bool:
    """Whether a retrain of ``n_ratings`` ratings starts a side process for its ranker (from
    ``SIDE_BY_SIDE_AT``); ``ranker_goes_beside`` then decides whether it trains there."""
    return ranker and n_ratings >= SIDE_BY_SIDE_AT


def ranker_goes_beside(ranker: bool, n_ratings: int, device: str | None = None,
                       side: SideProcess | None = None) -> bool:
    """Whether the ranker trains in a side process beside the rating model: from ``SIDE_BY_SIDE_AT``
    ratings, on a CPU (on a GPU both share the device). With ``side`` started, that process (which
    has imported torch) says which device there is: torch's import (2 s) then need not come before
    the ratings are read and sent to it."""
    if not ranker_may_go_beside(ranker, n_ratings):
        return False
    return (side.device() if side is not None and device is None else pick_device(device)) == "cpu"


def fit_ranker(data: CollabData, timestamps: np.ndarray, attributes: list[dict], questions: list,
               inner_asked: list[int], scale: tuple[float, float], seed: int, device: str | None,
               item_tie: np.ndarray | None = None, progress: bool = False) -> FeatureUserModel:
    """The cold-start ranker of a version (``FeatureUserModel`` with its default settings)."""
    return FeatureUserModel(seed=seed, device=device, progress=progress).fit(
        data, timestamps, attributes, questions, inner_asked, scale, item_tie=item_tie)


def _ranker_arrays_in_child(args: tuple, with_vectors: bool = False) -> tuple[dict[str, np.ndarray], float,
                                                                              np.ndarray | None]:
    """In the side process (after ``_warm_up``): the ranker fitted; its plain arrays, seconds, and (with
    ``with_vectors``) every training user's full-history vector for the item prior, computed here while
    the rating model still trains in the parent."""
    t0 = time.perf_counter()
    fitted = fit_ranker(*args)
    seconds = round(time.perf_counter() - t0, 3)
    gc.collect()  # (the Learner's cycle holds the batches' arrays, several hundred MB at 25M ratings)
    vectors = None
    if with_vectors:
        from .item_prior import full_history_user_vectors

        data, _, attributes = args[:3]
        vectors = full_history_user_vectors(fitted, data, attributes)
    return fitted.to_arrays(), seconds, vectors


def _warm_up() -> str:
    """In the side process, first: one torch thread, a watch on the parent, and the imports the ranker
    needs (seconds), done while the parent reads the ratings. Returns the device torch would use."""
    import os
    import threading

    import torch

    torch.set_num_threads(1)
    parent = os.getppid()

    def leave_with_parent() -> None:  # a killed retrain must not leave its ranker training on
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=leave_with_parent, daemon=True).start()
    import fastai.callback.schedule  # noqa: F401
    import fastai.learner  # noqa: F401

    from . import feature_model  # noqa: F401

    return pick_device()


class SideProcess:
    """A spawned process (torch's thread pools do not survive a fork) that fits the ranker beside the
    rating model. Started before the ratings are read, it does its imports meanwhile."""

    def __init__(self) -> None:
        self.pool: multiprocessing.pool.Pool | None = multiprocessing.get_context("spawn").Pool(1)
        self._warmed = self.pool.apply_async(_warm_up)

    def device(self) -> str:
        """The device torch uses in the side process (waits for its imports; should the process die in
        them, the pool's replacement never answers: after a minute the device is picked here)."""
        try:
            return self._warmed.get(timeout=WARM_UP_WAIT_S)
        except multiprocessing.TimeoutError:
            return pick_device()

    def fit_ranker(self, args: tuple, with_vectors: bool) -> AsyncResult:
        """``.get()`` gives (arrays, seconds, full-history user vectors or None)."""
        return self.pool.apply_async(_ranker_arrays_in_child, (args, with_vectors))

    def close(self) -> None:
        """End the process (again: nothing)."""
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None


@contextmanager
def side_process(wanted: bool = True) -> Iterator[SideProcess | None]:
    """A ``SideProcess`` for the block (None unless ``wanted``); leaving the block ends it, also on an error."""
    side = SideProcess() if wanted else None
    try:
        yield side
    finally:
        if side is not None:
            side.close()


@contextmanager
def ranker_beside(args: tuple, with_vectors: bool = False, side: SideProcess | None = None) -> Iterator[AsyncResult]:
    """Fit the ranker in ``side`` (or a new side process) while the caller trains the rating model;
    ``.get()`` gives (arrays, seconds, full-history user vectors or None). Leaving the block ends the
    process, also on an error here: what runs after has both cores and the memory."""
    side = side or SideProcess()
    try:
        yield side.fit_ranker(args, with_vectors)
    finally:
        side.close()


def torch_thread_count() -> int:
    import torch

    return torch.get_num_threads()


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` for the block (None: unchanged)."""
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def metadata_names(item_attributes: list[dict], min_share: float = 0.5) -> tuple[str, ...]:
    """The item metadata a new item is bootstrapped from: attributes held by at least ``min_share``
    of the items whose values are lists (genres, authors, tags), numbers (year) or a category (text
    with at most ``MAX_CATEGORIES`` values, the questionnaire's rule: a single genre, a language code).
    Free text (titles, dates as text: MovieLens 100k's 241 release dates) is left out."""
    from ..bootstrap.questionnaire import MAX_CATEGORIES

    n = len(item_attributes)
    names: dict[str, int] = {}
    texts: dict[str, set] = {}
    for attrs in item_attributes:
        for k, v in attrs.items():
            if isinstance(v, list) or (isinstance(v, (int, float)) and not isinstance(v, bool)):
                names[k] = names.get(k, 0) + 1
            elif isinstance(v, str):
                texts.setdefault(k, set()).add(v)
                names[k] = names.get(k, 0) + 1
    categories = {k for k, values in texts.items() if len(values) <= MAX_CATEGORIES}
    return tuple(sorted(k for k, c in names.items()
                        if n and c >= min_share * n and (k not in texts or k in categories)))


def validate(td: TrainingData, kind: str, params: dict, valid_pct: float, seed: int, progress: bool) -> dict:
    """Protocol §7: train the rating model on a random (1 - ``valid_pct``) of the ratings and report
    the validation MSE/RMSE on the rest. A measurement only: the served model learns from every rating."""
    train_idx, valid_idx = valid_split(len(td.data), valid_pct, VALID_SEED)
    fewest = 2 if kind == "nn" else 1  # (the nn model's BatchNorm: ``rating_params``)
    if len(valid_idx) == 0 or len(train_idx) < fewest:  # a share that holds out none, or leaves too few: nothing to measure
        what = ("holds out none to measure" if len(valid_idx) == 0 else
                "leaves none to train on" if len(train_idx) == 0 else "leaves the nn model 1 rating to train on")
        return {"valid_pct": valid_pct, "n_valid": len(valid_idx), "valid_mse": None, "valid_rmse": None,
                "valid_note": f"{len(td.data)} ratings: a {valid_pct:g} share {what}"}
    train, valid = td.data.subset(train_idx), td.data.subset(valid_idx)
    hp = rating_params(kind, len(train), params)
    est = MODELS[kind](y_range=default_y_range(*td.scale), seed=seed, progress=progress, **hp).fit(train, valid)
    pred = np.clip(est.predict(valid.users, valid.items), *td.scale)  # as served: on the scale
    mse = float(np.mean((pred - valid.ratings) ** 2))
    return {"valid_pct": valid_pct, "n_valid": len(valid), "valid_mse": round(mse, 4),
            "valid_rmse": round(mse ** 0.5, 4), "valid_fit_s": est.report_.fit_s}


def encoded_metadata(prior, item_attributes: list[dict], chunk: int = 4096) -> dict[str, np.ndarray]:  # noqa: ANN001
    """Every trained item's metadata as the item prior encodes it, as CSR arrays (encoded densely a
    chunk of items at a time: 59k items × 600 features at once would be 140 MB)."""
    from .meta_affinity import append_rows, to_csr

    csr = to_csr(np.zeros((0, 0), np.float32))
    for start in range(0, len(item_attributes), chunk):
        part = item_attributes[start:start + chunk]
        csr = append_rows(csr, prior.encoder_.encode(part), len(part))
    return csr
