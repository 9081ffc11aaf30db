"""Adam with decoupled weight decay that updates only the rows a sparse gradient touches.

For embedding tables of a large catalogue trained with sampled items, a dense Adam step rewrites every
row of every table each batch (most of a step's time at 59k items); here a table with a sparse
gradient updates only the batch's rows ("lazy" Adam: a row's moments and decay advance when it is
used), and dense parameters are updated as AdamW does. Hyper-parameter names are torch's (``lr``,
``betas``, ``eps``, ``weight_decay``), so fastai's ``OptimWrapper`` schedules them (``fit_one_cycle``).
"""
from __future__ import annotations

import torch


class LazyAdamW(torch.optim.Optimizer):
    """AdamW for dense gradients; for sparse ones, the same update on the touched rows only."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.99), eps: float = 1e-5,  # noqa: ANN001
                 weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "step" not in state:  # (fastai may have put other keys there)
                    state["step"] = 0
                    state["m"] = torch.zeros_like(p)
                    state["v"] = torch.zeros_like(p)
                state["step"] += 1
                c1, c2 = 1 - b1 ** state["step"], 1 - b2 ** state["step"]
                m, v = state["m"], state["v"]
                if p.grad.is_sparse:
                    rows, vals = _sum_rows(p.grad)
                    m_rows = m.index_select(0, rows).lerp_(vals, 1 - b1)
                    v_rows = v.index_select(0, rows).mul_(b2).addcmul_(vals, vals, value=1 - b2)
                    m.index_copy_(0, rows, m_rows)
                    v.index_copy_(0, rows, v_rows)
                    denom = v_rows.sqrt_().div_(c2 ** 0.5).add_(eps)
                    p_rows = p.index_select(0, rows).mul_(1 - lr * wd).addcdiv_(m_rows, denom, value=-lr / c1)
                    p.index_copy_(0, rows, p_rows)
                else:
                    p.mul_(1 - lr * wd)
                    m.mul_(b1).add_(p.grad, alpha=1 - b1)
                    v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                    p.addcdiv_(m / c1, (v / c2).sqrt_().add_(eps), value=-lr)
        return loss


def _sum_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows a sparse (COO, uncoalesced) gradient touches, ascending, and each row's summed
    gradient: ``coalesce`` without its sort (a mark per table row, then one ``index_add_``)."""
    idx, vals = grad._indices()[0], grad._values()
    seen = torch.zeros(grad.shape[0], dtype=torch.bool, device=idx.device)
    seen.index_fill_(0, idx, True)
    rows = seen.nonzero().squeeze(1)
    slot = torch.empty(grad.shape[0], dtype=torch.long, device=idx.device)
    slot.index_copy_(0, rows, torch.arange(len(rows), device=idx.device))
    summed = torch.zeros((len(rows), *vals.shape[1:]), dtype=vals.dtype, device=vals.device)
    return rows, summed.index_add_(0, slot[idx], vals)


def lazy_adamw_opt_func():  # -> fastai opt_func
    """``LazyAdamW`` as a fastai ``Learner``'s ``opt_func`` (wrapped so ``fit_one_cycle`` schedules it)."""
    from functools import partial

    from fastai.optimizer import OptimWrapper

    return partial(OptimWrapper, opt=LazyAdamW)
