"""``kd``: Hinton's logit distillation, T^2 * KL(teacher || student) at temperature T.

``kd { temperature = 1.0  weight = 1.0 }``: the KL divergence between the teacher's and the
student's class distributions at temperature T, summed over classes, batch mean, times T^2.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal

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


class KDSpec(TermSpec):
    """``kd { temperature, weight }``: T^2 * KL(teacher || student)."""

    kind: Literal["kd"] = "kd"
    temperature: float = 1.0
    weight: float = 1.0


class KDOptions(KindOptions):
    temperature: float


class KD(Kind):
    keyword = "kd"
    summary = "logit distillation: T^2 * KL(teacher || student) at temperature T"
    spec = KDSpec
    reads_teacher_logits = True

    def check(self, term: KDSpec, ctx: Context) -> Iterable[Diagnostic]:
        yield from check_temperature(term)

    def plan(self, term: KDSpec, ctx: Context) -> TermPlan:
        return logit_plan(term, ctx, KDOptions(temperature=term.temperature))

    def words(self, entry: TermPlan) -> Words:
        t = options_of(entry, KDOptions).temperature
        return Words(
            f"{entry.weight:g} * {t * t:g} * KL(softmax(t/{t:g}) || softmax(s/{t:g}))",
            "sum over classes, mean over batch",
        )

    def module_class(self) -> type[nn.Module]:
        from vitkdl.terms.kd.module import KD

        return KD

    def module(self, entry: TermPlan) -> nn.Module:
        o = options_of(entry, KDOptions)
        from vitkdl.terms.kd.module import KD

        return KD(temperature=o.temperature, weight=entry.weight)

    def loss(self, module: nn.Module, entry: TermPlan, inputs: StepInputs) -> Tensor:
        return module(inputs.s_logits, inputs.t_logits, inputs.targets)

    def reference(self, entry: TermPlan) -> nn.Module | None:
        o = options_of(entry, KDOptions)
        from vitkdl.terms.kd.module import HandKD

        return HandKD(o.temperature, entry.weight)

    def timm_task(self, entry: TermPlan) -> dict[str, Any] | None:
        o = options_of(entry, KDOptions)
        return {
            "task": "LogitDistillationTask",
            "temperature": o.temperature,
            "distill_loss_weight": entry.weight,
        }


KIND = KD()
