"""``wsld``: weighted soft labels (Zhou et al., "Rethinking Soft Labels for Knowledge
Distillation: A Bias-Variance Tradeoff Perspective", ICLR 2021).

``wsld { temperature = 2.0  weight = 1.0 }``: each sample's soft cross-entropy between the
teacher's and the student's softmax at T, -sum_c softmax(t/T)_c log softmax(s/T)_c, weighted
by w = 1 - exp(-max(CE_s / CE_t, 0)), where CE_s and CE_t are the student's and the teacher's
cross-entropies with the label at T = 1, computed without gradient (w steers, it is not
trained); the loss is weight * T^2 * the batch mean of w * CE. A sample the teacher gets
right and the student does not (CE_s >> CE_t) keeps its soft label at full weight; one the
student already fits better than the teacher is down-weighted.

As the authors' code does (``knowledge_distiller.py``, ``WSLDistiller``): T = 2, the weight
from detached logits, their 1e-7 on CE_t, the clamp at 0, the T^2 and batch mean; their
ImageNet training adds this term times ``alpha = 2.5`` to the label loss (the paper writes
2.25): ``weight = 2.5`` is their setting, the default here is 1 as for every kind. Where it
differs: the authors one-hot the label (``F.one_hot(label, num_classes=1000)``); here a mixed
label (mixup, cutmix: ``[B, C]``) gives the soft cross-entropies -sum_c y_c log p_c, which is
theirs on a one-hot label.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal

from vitkdl.errors import Diagnostic
from vitkdl.nodes import TermSpec
from vitkdl.terms.base import (
    Context,
    Kind,
    KindOptions,
    StepInputs,
    TermPlan,
    Words,
    check_temperature,
    logit_plan,
    options_of,
)

if TYPE_CHECKING:
    from torch import Tensor, nn


class WSLDSpec(TermSpec):
    """``wsld { temperature, weight }``: soft labels weighted per sample."""

    kind: Literal["wsld"] = "wsld"
    temperature: float = 2.0
    weight: float = 1.0


class WSLDOptions(KindOptions):
    temperature: float


class WSLD(Kind):
    keyword = "wsld"
    summary = "weighted soft labels: KD's cross-entropy weighted per sample by the two CEs"
    spec = WSLDSpec
    reads_teacher_logits = True

    def check(self, term: WSLDSpec, ctx: Context) -> Iterable[Diagnostic]:
        yield from check_temperature(term)

    def plan(self, term: WSLDSpec, ctx: Context) -> TermPlan:
        return logit_plan(term, ctx, WSLDOptions(temperature=term.temperature))

    def words(self, entry: TermPlan) -> Words:
        t = options_of(entry, WSLDOptions).temperature
        return Words(
            f"{entry.weight:g} * {t * t:g} * w * CE(softmax(t/{t:g}), softmax(s/{t:g}))",
            "sum over classes, mean over batch",
            ("w = 1 - exp(-max(CE(y, s) / CE(y, t), 0)) per sample: label CEs at T = 1, no grad",),
        )

    def module_class(self) -> type[nn.Module]:
        from vitkdl.terms.wsld.module import WSLD

        return WSLD

    def module(self, entry: TermPlan) -> nn.Module:
        o = options_of(entry, WSLDOptions)
        from vitkdl.terms.wsld.module import WSLD

        return WSLD(temperature=o.temperature, weight=entry.weight)

    def loss(self, module: nn.Module, entry: TermPlan, inputs: StepInputs) -> Tensor:
        return module(inputs.s_logits, inputs.t_logits, inputs.targets)

    def reference(self, entry: TermPlan) -> nn.Module | None:
        o = options_of(entry, WSLDOptions)
        from vitkdl.terms.wsld.module import HandWSLD

        return HandWSLD(o.temperature, entry.weight)


KIND = WSLD()
