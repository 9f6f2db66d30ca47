"""One training step, shared by ``vitkdl run`` and ``vitkdl bench``.

:func:`configure_optimizer` groups parameters by the one decay rule (:mod:`vitkdl.optim`) and
builds timm's optimizer; :class:`Update` is everything after the forward: backward (scaled
under fp16), clipping, the optimizer step and the EMA update; :func:`train_step` is a forward
followed by the update. The trainer and the benchmark's vitkdl configurations call exactly
these, so a benchmark times what training runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from vitkdl.optim import decays
from vitkdl.planner import Plan, without_cache

SMALL_STEP_FLOPS = 5e9  # below this per step, one CPU thread beats several


def cpu_threads(plan: Plan, device: torch.device) -> int | None:
    """The CPU thread count a run of ``plan`` computes with (``None``: the process's own).

    Tiny models run on one thread: hand-offs cost more than the maths (measured 5x on 2
    cores). The teacher counts when its logits come from a cache too: the thread count
    changes the order of float sums, so the cache pass, a cached run and an uncached run of
    the same recipe all use this one count, and a cached run equals an uncached one bit for
    bit."""
    if device.type != "cpu":
        return None
    size = without_cache(plan).cost.total * plan.data.batch_size
    return 1 if size < SMALL_STEP_FLOPS else None


def param_groups(
    named: Iterable[tuple[str, nn.Parameter]], weight_decay: float, skip: Iterable[str] = ()
) -> list[dict[str, Any]]:
    """Two optimizer groups by :func:`vitkdl.optim.decays`: with and without weight decay
    (``skip``: what the model's ``no_weight_decay()`` names)."""
    skipped = set(skip)
    decay, no_decay = [], []
    for name, p in named:
        if p.requires_grad:
            (decay if decays(name, p.ndim, skipped) else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def model_param_groups(
    student: nn.Module, others: Iterable[tuple[str, nn.Parameter]], weight_decay: float
) -> list[dict[str, Any]]:
    """The groups of a student (its own ``no_weight_decay()`` honoured) and further named
    parameters (adapters, hand-written loss modules)."""
    skip = set(getattr(student, "no_weight_decay", lambda: set())())
    return param_groups([*student.named_parameters(), *others], weight_decay, skip)


def configure_optimizer(
    plan: Plan, groups: list[dict[str, Any]], *, fused: bool = True
) -> torch.optim.Optimizer:
    """timm's ``create_optimizer_v2`` for the plan's optimizer over ``groups``; Adam(W) fused
    (one kernel for all parameters, 3-4x faster on CPU too) unless ``fused`` is False (FSDP's
    sharded parameters)."""
    import timm.optim

    opt = plan.optimizer
    extra = dict(opt.kwargs)
    if fused and opt.name in ("adamw", "adam"):
        extra.setdefault("fused", True)
    return timm.optim.create_optimizer_v2(
        groups, opt=opt.name, lr=opt.lr, weight_decay=opt.weight_decay, **extra
    )


class Update:
    """What follows the forward: zero the gradients, backward (scaled under fp16), unscale
    and clip, the optimizer step, the scaler's update and the EMA update."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        params: list[nn.Parameter],
        clip_grad: float | None,
        device: torch.device,
        dtype: torch.dtype | None,
        ema: Any = None,
        ema_model: nn.Module | None = None,
    ) -> None:
        self.optimizer = optimizer
        self.params = params
        self.clip = clip_grad
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        self.ema, self.ema_model = ema, ema_model

    def backward(self, loss: Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()

    def step(self, step: int | None = None) -> None:
        """Clip, step, and update the EMA (``step``: the optimizer steps taken, for EMA
        warm-up)."""
        if self.clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(self.ema_model, step=step)


def train_step(
    forward: Callable[[Tensor, Tensor], dict[str, Tensor]],
    update: Update,
    images: Tensor,
    targets: Tensor,
    step: int | None = None,
) -> dict[str, Tensor]:
    """One optimisation step: the forward (``{"loss": total, term: value}``) and the update."""
    result = forward(images, targets)
    update.backward(result["loss"])
    update.step(step)
    return result
