"""``nkd``: normalized knowledge distillation, the logit loss the ViTKD paper pairs with.

``nkd { temperature = 1.0  gamma = 1.0  weight = 1.0 }``: with y the target class (the argmax
of the mixed label under mixup), the target-class term -p_t[y] log p_s[y] (teacher detached)
plus gamma * T^2 times the soft cross-entropy between the teacher's and the student's
distributions over the non-target classes (target column removed, softmax at temperature T),
batch mean.
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
    check_not_negative,
    check_temperature,
    logit_plan,
    options_of,
)

if TYPE_CHECKING:
    from torch import Tensor, nn


class NKDSpec(TermSpec):
    """``nkd { temperature, gamma, weight }``: normalized KD."""

    kind: Literal["nkd"] = "nkd"
    temperature: float = 1.0
    gamma: float = 1.0
    weight: float = 1.0


class NKDOptions(KindOptions):
    temperature: float
    gamma: float


class NKD(Kind):
    keyword = "nkd"
    summary = "normalized KD: target-class term plus the non-target distributions' CE"
    spec = NKDSpec
    reads_teacher_logits = True

    def check(self, term: NKDSpec, ctx: Context) -> Iterable[Diagnostic]:
        yield from check_temperature(term)
        yield from check_not_negative(term, "gamma")

    def plan(self, term: NKDSpec, ctx: Context) -> TermPlan:
        return logit_plan(term, ctx, NKDOptions(temperature=term.temperature, gamma=term.gamma))

    def words(self, entry: TermPlan) -> Words:
        o = options_of(entry, NKDOptions)
        return Words(
            f"{entry.weight:g} * (-p_t[y] log p_s[y] + {o.gamma:g} * "
            f"{o.temperature**2:g} * CE(q_t, q_s) over non-target classes)",
            "mean over batch",
        )

    def module_class(self) -> type[nn.Module]:
        from vitkdl.terms.nkd.module import NKD

        return NKD

    def module(self, entry: TermPlan) -> nn.Module:
        o = options_of(entry, NKDOptions)
        from vitkdl.terms.nkd.module import NKD

        return NKD(temperature=o.temperature, gamma=o.gamma, weight=entry.weight)

    def loss(self, module: nn.Module, entry: TermPlan, inputs: StepInputs) -> Tensor:
        return module(inputs.s_logits, inputs.t_logits, inputs.targets)

    def reference(self, entry: TermPlan) -> nn.Module | None:
        o = options_of(entry, NKDOptions)
        from vitkdl.terms.nkd.module import HandNKD

        return HandNKD(o.temperature, o.gamma, entry.weight)


KIND = NKD()
