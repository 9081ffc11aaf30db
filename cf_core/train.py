"""fastai trainers for the two models of chapter 8, as estimators: ``fit`` returns self,
learned arrays end in ``_``. Training goes through fastai's ``Learner`` and ``fit_one_cycle``
on whole-tensor batches (``TensorBatches``), on CUDA when present."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from .data import CollabData
from .errors import CfbError
from .progress import training_output
from .rating import DotRating, NNRating
from .scoring import Head


@dataclass
class TrainReport:
    epoch_s: list[float]
    fit_s: float
    train_loss: list[float]
    valid_loss: list[float | None]
    device: str


def compact_losses():  # -> fastai Callback
    """A callback that keeps fastai's Recorder from growing the process: the smoothed loss it appends
    after every batch is stored as a Python float. (Kept as small tensors, one per batch, they pinned
    freed batch memory in the allocator: a retrain on 5M ratings grew by 6 GB.)"""
    from fastai.callback.core import Callback

    class CompactLosses(Callback):
        order = 60  # after the Recorder (50)

        def after_batch(self):
            rec = getattr(self.learn, "recorder", None)
            if self.training and rec is not None and rec.losses:
                rec.losses[-1] = float(rec.losses[-1])

    return CompactLosses()


class TrainingDiverged(CfbError):
    """The rating model did not learn: a non-finite loss or weight, or a fit worse than the mean rating."""


MSE_SAMPLE = 500_000  # training ratings the final MSE is measured on (all of them up to this many)
# a fit is refused past MSE_WORSE × the ratings' variance (a model clearly worse than their mean: a
# diverged learning rate gives 1.3× and more on MovieLens 100k, while a few epochs on a small noisy set
# can end a little above 1×, undertrained but not broken), plus room as a share of the squared y_range:
# ratings that (nearly) never vary have a variance of (about) 0, which a sigmoid never quite reaches
MSE_WORSE = 1.1
MSE_SLACK = 1e-3
STALLED = 1e-4  # a fit no better than the mean whose weights moved by at most this share of their norm learned nothing


def stop_on_non_finite():  # -> fastai Callback
    """A callback that ends the fit at the first non-finite training loss, noting its epoch
    (``bad_epoch``, from 1): once the weights hold NaN the remaining epochs cannot recover."""
    import math

    from fastai.callback.core import Callback, CancelFitException

    class StopOnNonFinite(Callback):
        order = 65  # after CompactLosses (60): the loss is a float by then
        bad_epoch: int | None = None

        def after_batch(self):
            rec = getattr(self.learn, "recorder", None)
            if self.training and rec is not None and rec.losses and not math.isfinite(rec.losses[-1]):
                self.bad_epoch = self.epoch + 1
                raise CancelFitException()

    return StopOnNonFinite()


def pick_device(device: str | None = None) -> str:
    """The given device, else "cuda" when available, else "cpu"."""
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class CollabModel:
    """Shared fit loop; subclasses build the torch module and export its arrays.

    ``lazy_at``: from this many training ratings on, the embeddings get sparse gradients and a lazy
    AdamW (``lazy_adam``): a dense Adam step over every user's and item's row is most of a step's time
    at tens of millions of ratings. None: never."""

    kind = ""
    lazy_at: int | None = None

    def __init__(self, n_factors: int = 50, epochs: int = 8, lr: float = 5e-3, wd: float = 0.3,
                 bs: int = 1024, y_range: tuple[float, float] = (0.0, 5.5), seed: int = 42,
                 device: str | None = None, progress: bool = True):
        self.n_factors, self.epochs, self.lr, self.wd, self.bs = n_factors, epochs, lr, wd, bs
        self.y_range, self.seed, self.device, self.progress = tuple(y_range), seed, device, progress

    def get_params(self) -> dict:
        return {"n_factors": self.n_factors, "epochs": self.epochs, "lr": self.lr, "wd": self.wd,
                "bs": self.bs, "y_range": list(self.y_range), "seed": self.seed}

    def _build(self, n_users: int, n_items: int):  # -> torch.nn.Module
        raise NotImplementedError

    def _export(self, module) -> None:  # noqa: ANN001
        raise NotImplementedError

    def fit(self, train: CollabData, valid: CollabData | None = None) -> "CollabModel":
        """Train on ``train`` (validation loss per epoch on ``valid`` when given)."""
        import torch
        from fastai.callback.core import Callback
        from fastai.callback.schedule import fit_one_cycle  # noqa: F401  (patches Learner)
        from fastai.data.core import DataLoaders
        from fastai.learner import Learner
        from fastai.torch_core import set_seed

        device = pick_device(self.device)
        if str(device).startswith("cuda"):  # CUDA's embedding backward adds with atomics unless told not to
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        deterministic = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True, warn_only=True)
        set_seed(self.seed, reproducible=True)
        gen = torch.Generator().manual_seed(self.seed)

        dls = DataLoaders(self._batches(train, True, gen), self._batches(valid, False, gen), device=device)
        module = self._build(train.n_users, train.n_items).to(device)

        class EpochClock(Callback):
            order = 100

            def before_fit(self):
                self.epoch_s = []

            def before_epoch(self):
                self.t0 = time.perf_counter()

            def after_epoch(self):
                self.epoch_s.append(time.perf_counter() - self.t0)

        clock = EpochClock()
        extra = {}
        if self.lazy_at is not None and len(train) >= self.lazy_at:  # only the batch's rows move
            from .lazy_adam import lazy_adamw_opt_func

            for m in module.modules():
                if isinstance(m, torch.nn.Embedding):
                    m.sparse = True
            extra["opt_func"] = lazy_adamw_opt_func()
        start = [p.detach().clone() for p in module.parameters()]  # to tell a fit that never moved
        stop = stop_on_non_finite()
        learn = Learner(dls, module, loss_func=self._loss(), cbs=[clock, compact_losses(), stop], **extra)
        t0 = time.perf_counter()
        try:
            with training_output(learn, self.progress):
                learn.fit_one_cycle(self.epochs, self.lr, wd=self.wd)
        except RuntimeError as e:  # a learning rate or weight decay past float32 (1e39): Adam's step overflows
            if "without overflow" not in str(e):  # (torch: "value cannot be converted to type float without overflow")
                raise
            raise self._diverged("a step overflowed float32") from None
        finally:
            torch.use_deterministic_algorithms(deterministic)
        fit_s = time.perf_counter() - t0
        if stop.bad_epoch is not None:
            raise self._diverged(f"non-finite loss at epoch {stop.bad_epoch} of {self.epochs}")
        values = learn.recorder.values
        module.eval()
        self._export(module)
        with torch.no_grad():
            moved = float(sum(((p.detach() - p0) ** 2).sum() for p, p0 in zip(module.parameters(), start)) ** 0.5
                          / max(float(sum((p0 ** 2).sum() for p0 in start)) ** 0.5, 1e-12))
        del start
        losses = learn.recorder.losses
        self._check_learned(train, moved, float(losses[0]) if losses else None)
        self.report_ = TrainReport(
            epoch_s=[round(s, 4) for s in clock.epoch_s], fit_s=round(fit_s, 3),
            train_loss=[float(v[0]) for v in values],
            valid_loss=[float(v[1]) if len(v) > 1 and v[1] is not None else None for v in values],
            device=str(device))
        return self

    def _settings(self) -> str:
        """The learning rate, and the weight decay where it is large enough to be the cause."""
        return f"the learning rate (--lr, now {self.lr:g})" + (
            f" or the weight decay (--wd, now {self.wd:g})" if self.wd > 10 else "")

    def _diverged(self, what: str) -> TrainingDiverged:
        return TrainingDiverged(f"training diverged ({what}); lower {self._settings()}")

    def _stalled(self, mse: float, var: float) -> TrainingDiverged:
        return TrainingDiverged(
            f"training diverged or stalled (training MSE {mse:.4f} is over {MSE_WORSE:g} × the variance {var:.4f} of "
            f"the training ratings: clearly worse than predicting their mean); lower {self._settings()} or "
            f"train more epochs (--epochs, now {self.epochs})")

    def _undertrained(self, mse: float, var: float, first: float) -> TrainingDiverged:
        return TrainingDiverged(
            f"training stopped short (training MSE {mse:.4f} is over {MSE_WORSE:g} × the variance {var:.4f} of the "
            f"training ratings, though down from {first:.4f} on its first batch: it was still learning); train more "
            f"epochs (--epochs, now {self.epochs}) or raise the learning rate (--lr, now {self.lr:g})")

    def _did_not_learn(self, mse: float, var: float) -> TrainingDiverged:
        return TrainingDiverged(
            f"training stalled (its weights did not move in {self.epochs} epochs, and its MSE {mse:.4f} is no better "
            f"than the variance {var:.4f} of the training ratings); raise the learning rate (--lr, now {self.lr:g})")

    def _learned_arrays(self) -> list[np.ndarray]:
        """Every exported array the served model is made of."""
        return [self.user_factors_, self.item_factors_, self.user_bias_, self.item_bias_]

    def _sample_mse(self, train: CollabData) -> tuple[float, float]:
        """(the model's MSE, the ratings' variance) on up to ``MSE_SAMPLE`` training ratings (at least one)."""
        idx = slice(None)
        if len(train) > MSE_SAMPLE:
            idx = np.random.default_rng(self.seed).integers(0, len(train), MSE_SAMPLE)
        ratings = train.ratings[idx].astype(np.float64)
        with np.errstate(over="ignore"):  # (a saturated sigmoid of huge weights: exp overflows to a bound)
            pred = self.predict(train.users[idx], train.items[idx])
        return float(np.mean((pred - ratings) ** 2)), float(np.var(ratings))

    def _check_learned(self, train: CollabData, moved: float | None = None, first_loss: float | None = None) -> None:
        """Raise ``TrainingDiverged`` unless every learned array is finite and the model fits the training
        ratings about as well as their mean does or better (its MSE, on up to ``MSE_SAMPLE`` of them, at most
        ``MSE_WORSE`` × their variance), and, where it is no better than their mean, its weights moved
        (``moved``: the norm of their change over the norm of the untrained ones): a model that learned
        nothing (a learning rate of 1e-300) is not served as one that is only undertrained, nor told to
        lower its learning rate. One worse than the mean whose MSE is below ``first_loss`` (the untrained
        model's loss on the first batch) was still learning: a few steps on a tiny set, told to train more."""
        if not all(np.isfinite(a).all() for a in self._learned_arrays()):
            raise self._diverged("non-finite learned weights")
        if len(train) == 0:
            return
        mse, var = self._sample_mse(train)
        unmoved = moved is not None and moved <= STALLED
        if not mse <= MSE_WORSE * var + MSE_SLACK * (self.y_range[1] - self.y_range[0]) ** 2:
            if unmoved:
                raise self._did_not_learn(mse, var)
            if first_loss is not None and mse < first_loss:
                raise self._undertrained(mse, var, first_loss)
            raise self._stalled(mse, var)
        if unmoved and mse > var:
            raise self._did_not_learn(mse, var)

    def _batches(self, d: CollabData | None, shuffle: bool, gen):  # noqa: ANN001
        import torch

        from .loader import TensorBatches

        if d is None or len(d) == 0:
            x, y = torch.zeros((0, 2), dtype=torch.long), torch.zeros(0)
        else:
            x = torch.from_numpy(np.stack([d.users, d.items], axis=1))
            y = torch.from_numpy(np.array(d.ratings))  # a copy: pandas may hand over read-only arrays
        # validation needs no gradients: large batches cut fastai's per-batch overhead
        return TensorBatches(x, y, self.bs if shuffle else max(self.bs, 16384), shuffle=shuffle, generator=gen)

    def _loss(self):
        from fastai.losses import MSELossFlat

        return MSELossFlat()

    def rating_model(self) -> DotRating | NNRating:
        """The trained item side as plain arrays, served with numpy."""
        raise NotImplementedError

    def predict(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Predicted ratings for (inner user, inner item) pairs."""
        rm = self.rating_model()
        return np.concatenate([rm.predict_pairs(self.user_factors_[users[s:s + 65536]],
                                                self.user_bias_[users[s:s + 65536]], items[s:s + 65536])
                               for s in range(0, len(users), 65536)] or [np.zeros(0, np.float32)])


def tensor_to_numpy(t) -> np.ndarray:  # noqa: ANN001
    """A learned tensor as a float32 numpy array (on the CPU, out of autograd): what a version stores."""
    return t.detach().float().cpu().numpy().astype(np.float32)


class DotBias(CollabModel):
    """fastai's ``EmbeddingDotBias``: dot product of embeddings plus user and item biases,
    squashed by ``sigmoid_range`` into ``y_range``."""

    kind = "dot"
    lazy_at = 5_000_000  # (MovieLens 1M and smaller train exactly as before)

    def _build(self, n_users: int, n_items: int):
        from fastai.collab import EmbeddingDotBias

        return EmbeddingDotBias(self.n_factors, n_users, n_items, y_range=self.y_range)

    def rating_model(self) -> DotRating:
        return DotRating(self.y_range, self.item_factors_, self.item_bias_)

    def _export(self, module) -> None:  # noqa: ANN001
        self.user_factors_ = tensor_to_numpy(module.u_weight.weight)
        self.item_factors_ = tensor_to_numpy(module.i_weight.weight)
        self.user_bias_ = tensor_to_numpy(module.u_bias.weight)[:, 0]
        self.item_bias_ = tensor_to_numpy(module.i_bias.weight)[:, 0]


class NeuralCF(CollabModel):
    """fastai's ``EmbeddingNN``: user and item embeddings concatenated into an MLP (``layers``)."""

    kind = "nn"

    def __init__(self, n_factors: int = 50, epochs: int = 5, lr: float = 5e-3, wd: float = 0.1,
                 bs: int = 256, y_range: tuple[float, float] = (0.0, 5.5), seed: int = 42,
                 device: str | None = None, progress: bool = True, layers: tuple[int, ...] = (100, 50)):
        super().__init__(n_factors, epochs, lr, wd, bs, y_range, seed, device, progress)
        self.layers = tuple(layers)

    def get_params(self) -> dict:
        return {**super().get_params(), "layers": list(self.layers)}

    def _build(self, n_users: int, n_items: int):
        from fastai.collab import EmbeddingNN

        return EmbeddingNN([(n_users, self.n_factors), (n_items, self.n_factors)],
                           layers=list(self.layers), y_range=self.y_range)

    def rating_model(self) -> NNRating:
        return NNRating(self.y_range, self.item_factors_, self.item_bias_, head=self.head_)

    def _learned_arrays(self) -> list[np.ndarray]:
        return [*super()._learned_arrays(), *(a for _, arrays in self.head_ for a in arrays)]

    def _export(self, module) -> None:  # noqa: ANN001
        self.user_factors_ = tensor_to_numpy(module.embeds[0].weight)
        self.item_factors_ = tensor_to_numpy(module.embeds[1].weight)
        self.user_bias_ = np.zeros(len(self.user_factors_), dtype=np.float32)
        self.item_bias_ = np.zeros(len(self.item_factors_), dtype=np.float32)
        self.head_ = export_head(module.layers)


def export_head(layers) -> Head:  # noqa: ANN001
    """Flatten an eval-mode fastai MLP (LinBnDrop blocks, SigmoidRange) into numpy ops."""
    import torch.nn as nn

    def leaves(m):  # not ``modules()``: fastai shares one ReLU instance, which that would list once
        kids = list(m._modules.values())
        return [m] if not kids else [leaf for k in kids for leaf in leaves(k)]

    head: Head = []
    for m in leaves(layers):
        if isinstance(m, nn.Linear):
            bias = tensor_to_numpy(m.bias) if m.bias is not None else np.zeros(m.out_features, dtype=np.float32)
            head.append(("linear", [tensor_to_numpy(m.weight), bias]))
        elif isinstance(m, nn.ReLU):
            head.append(("relu", []))
        elif isinstance(m, nn.BatchNorm1d):
            scale = tensor_to_numpy(m.weight) / np.sqrt(tensor_to_numpy(m.running_var) + m.eps)
            shift = tensor_to_numpy(m.bias) - tensor_to_numpy(m.running_mean) * scale
            head.append(("affine", [scale.astype(np.float32), shift.astype(np.float32)]))
    return head


MODELS = {"dot": DotBias, "nn": NeuralCF}
