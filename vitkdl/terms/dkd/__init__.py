"""``dkd``: decoupled knowledge distillation (Zhao et al., "Decoupled Knowledge Distillation",
CVPR 2022).

``dkd { alpha = 1.0  beta = 0.5  temperature = 1.0  warmup_epochs = 1  weight = 1.0 }``: with
y the target class and p = softmax(z/T) of each model's logits, the target-class part (TCKD)
is KL(b_t || b_s) between the binary distributions b = (p[y], 1 - p[y]); the non-target part
(NCKD) is KL(q_t || q_s) between the softmaxes at T over the non-target classes (target column
removed). The loss is weight * ramp * T^2 * (alpha * TCKD + beta * NCKD), each KL summed over
its classes and averaged over the batch, the teacher detached; ramp = min(epoch /
warmup_epochs, 1) with epochs counted from 1, so the first epoch already trains at 1 /
warmup_epochs and `warmup_epochs = 1` (or 0) means no ramp. The defaults are the authors'
ImageNet setting (mdistiller, ``configs/imagenet/r34_r18/dkd.yaml``: beta 0.5, T 1, warm-up
1); their CIFAR-100 setting is alpha 1, beta 8, T 4, warm-up 20 (of 240 epochs).

As the authors' code does (mdistiller ``DKD.py``): the same sums, batch mean and T^2, the ramp
``min(epoch / warmup, 1)`` with 1-indexed epochs, computed in fp32 here whatever the autocast
dtype. Where it differs: the authors mask the target logit with -1000 (after dividing by T)
before the NCKD softmax, here it is dropped exactly (the same values up to float rounding
unless logits / T span a thousand), and they take ``log`` of the summed probabilities for
TCKD, here log b comes from log-sum-exps (finite where their ``log(0)`` gives inf or nan).
Targets: the authors read class indices; a mixed label (mixup, cutmix: ``[B, C]``)
gives y = its argmax, the dominant class of the pair, as ``nkd`` does (``explain`` says so
when the recipe mixes).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal

from vitkdl.errors import Diagnostic, warning
from vitkdl.nodes import TermSpec
from vitkdl.terms.base import (
    Context,
    Kind,
    KindOptions,
    StepInputs,
    TermPlan,
    Words,
    check_not_negative,
    check_temperature,
    logit_plan,
    options_of,
)

if TYPE_CHECKING:
    from torch import Tensor, nn


class DKDSpec(TermSpec):
    """``dkd { alpha, beta, temperature, warmup_epochs, weight }``: decoupled KD."""

    kind: Literal["dkd"] = "dkd"
    alpha: float = 1.0
    beta: float = 0.5
    temperature: float = 1.0
    warmup_epochs: int = 1
    weight: float = 1.0


class DKDOptions(KindOptions):
    alpha: float
    beta: float
    temperature: float
    warmup_epochs: int
    target: str | None = None
    """How y is read from mixed labels (None: the recipe does not mix, y is the label)."""


def mixes(spec: object) -> bool:
    """Whether a recipe's training targets are mixed soft labels ``[B, C]`` (mixup or cutmix;
    label smoothing alone leaves them class indices: the label loss smooths)."""
    data = getattr(spec, "data", None)
    return data is not None and bool(data.mixup or data.cutmix)


class DKD(Kind):
    keyword = "dkd"
    summary = "decoupled KD: target-class and non-target-class KL, weighted apart"
    spec = DKDSpec
    reads_teacher_logits = True

    def check(self, term: DKDSpec, ctx: Context) -> Iterable[Diagnostic]:
        yield from check_temperature(term)
        yield from check_not_negative(term, "alpha", "beta", "warmup_epochs")
        train = getattr(ctx.spec, "train", None)
        if train is not None and term.warmup_epochs > train.epochs:
            yield warning(
                f"warmup_epochs {term.warmup_epochs} is longer than the training "
                f"({train.epochs} epochs): dkd never reaches its full weight",
                term.at("warmup_epochs"),
            )

    def plan(self, term: DKDSpec, ctx: Context) -> TermPlan:
        options = DKDOptions(
            alpha=term.alpha,
            beta=term.beta,
            temperature=term.temperature,
            warmup_epochs=term.warmup_epochs,
            target="argmax of the mixed label" if mixes(ctx.spec) else None,
        )
        return logit_plan(term, ctx, options)

    def words(self, entry: TermPlan) -> Words:
        o = options_of(entry, DKDOptions)
        t = o.temperature
        ramp = f"min(epoch / {o.warmup_epochs}, 1) * " if o.warmup_epochs > 1 else ""
        notes = [
            f"b = (p[y], 1 - p[y]), q = softmax over the classes but y, both of z/{t:g}; "
            "y the label" + (" (the argmax of the mixed label)" if o.target else ""),
        ]
        if o.warmup_epochs > 1:
            notes.append(f"warm-up: epochs 1 to {o.warmup_epochs} ramp linearly, then 1")
        return Words(
            f"{entry.weight:g} * {ramp}{t * t:g} * ({o.alpha:g} * KL(b_t || b_s) + "
            f"{o.beta:g} * KL(q_t || q_s))",
            "sum over classes, mean over batch",
            tuple(notes),
        )

    def module_class(self) -> type[nn.Module]:
        from vitkdl.terms.dkd.module import DKD

        return DKD

    def module(self, entry: TermPlan) -> nn.Module:
        o = options_of(entry, DKDOptions)
        from vitkdl.terms.dkd.module import DKD

        return DKD(
            alpha=o.alpha,
            beta=o.beta,
            temperature=o.temperature,
            warmup_epochs=o.warmup_epochs,
            weight=entry.weight,
        )

    def loss(self, module: nn.Module, entry: TermPlan, inputs: StepInputs) -> Tensor:
        return module(inputs.s_logits, inputs.t_logits, inputs.targets, inputs.epoch)

    def reference(self, entry: TermPlan) -> nn.Module | None:
        o = options_of(entry, DKDOptions)
        from vitkdl.terms.dkd.module import HandDKD

        return HandDKD(o.alpha, o.beta, o.temperature, o.warmup_epochs, entry.weight)


KIND = DKD()
