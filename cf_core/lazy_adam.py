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
                    g = p.grad.coalesce()
                    rows, vals = g.indices()[0], g.values()
                    m_rows = m[rows].mul_(b1).add_(vals, alpha=1 - b1)
                    v_rows = v[rows].mul_(b2).addcmul_(vals, vals, value=1 - b2)
                    m[rows], v[rows] = m_rows, v_rows
                    p_rows = p[rows].mul_(1 - lr * wd)
                    p_rows.addcdiv_(m_rows / c1, (v_rows / c2).sqrt_().add_(eps), value=-lr)
                    p[rows] = p_rows
                else:
                    p.mul_(1 - lr * wd)
                    m.mul_(b1).add_(p.grad, alpha=1 - b1)
                    v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                    p.addcdiv_(m / c1, (v / c2).sqrt_().add_(eps), value=-lr)
        return loss


def lazy_adamw_opt_func():  # -> fastai opt_func
    """``LazyAdamW`` as a fastai ``Learner``'s ``opt_func`` (wrapped so ``fit_one_cycle`` schedules it)."""
    from functools import partial

    from fastai.optimizer import OptimWrapper

    return partial(OptimWrapper, opt=LazyAdamW)
