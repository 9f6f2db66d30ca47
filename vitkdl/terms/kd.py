"""``kd``: Hinton's logit distillation, T^2 * KL(teacher || student) at temperature T.

``kd { temperature = 1.0  weight = 1.0 }``: the KL divergence between the teacher's and the
student's class distributions at temperature T, summed over classes, batch mean, times T^2.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel

from vitkdl.errors import Diagnostic, error
from vitkdl.spec import TermSpec
from vitkdl.terms.base import Kind, StepInputs, TermPlan, Words, term_plan

if TYPE_CHECKING:
    from torch import Tensor, nn

    from vitkdl.checks import Context
    from vitkdl.planner import Plan


class KDSpec(TermSpec):
    """``kd { temperature, weight }``: T^2 * KL(teacher || student)."""

    kind: Literal["kd"] = "kd"
    temperature: float = 1.0
    weight: float = 1.0


class KDOptions(BaseModel):
    temperature: float


class KD(Kind):
    keyword = "kd"
    summary = "logit distillation: T^2 * KL(teacher || student) at temperature T"
    spec = KDSpec
    reads_teacher_logits = True

    def check(self, term: KDSpec, ctx: Context) -> Iterable[Diagnostic]:
        if term.temperature <= 0:
            yield error(f"temperature must be > 0, got {term.temperature}", term.at("temperature"))

    def plan(self, term: KDSpec, ctx: Context) -> TermPlan:
        classes = ctx.student.num_classes if ctx.student else 0
        return term_plan(
            term,
            student_shape=[classes],
            teacher_shape=[classes],
            options=KDOptions(temperature=term.temperature),
        )

    def words(self, entry: TermPlan) -> Words:
        t = KDOptions.model_validate(entry.options).temperature
        return Words(
            f"{entry.weight:g} * {t * t:g} * KL(softmax(t/{t:g}) || softmax(s/{t:g}))",
            "sum over classes, mean over batch",
        )

    def module_class(self) -> type[nn.Module]:
        return module_class()

    def module(self, entry: TermPlan, plan: Plan) -> nn.Module:
        o = KDOptions.model_validate(entry.options)
        return module_class()(temperature=o.temperature, weight=entry.weight)

    def loss(self, module: nn.Module, entry: TermPlan, inputs: StepInputs) -> Tensor:
        return module(inputs.s_logits, inputs.t_logits, inputs.targets)

    def reference(self, entry: TermPlan, plan: Plan) -> nn.Module | None:
        o = KDOptions.model_validate(entry.options)
        return reference_class()(o.temperature, entry.weight)

    def timm_task(self, entry: TermPlan) -> dict[str, Any] | None:
        o = KDOptions.model_validate(entry.options)
        return {
            "task": "LogitDistillationTask",
            "temperature": o.temperature,
            "distill_loss_weight": entry.weight,
        }


KIND = KD()


@functools.cache
def module_class() -> type[nn.Module]:
    """:class:`KD`, the loss module (``from vitkdl.strategies import KD``)."""
    import torch.nn.functional as F
    from torch import nn

    class KD(nn.Module):
        r"""Hinton knowledge distillation.

        .. math::
            \mathcal{L} = w\, T^2 \, \frac{1}{B}\sum_b \sum_c p^t_{b,c}
            \big(\log p^t_{b,c} - \log p^s_{b,c}\big), \quad p = \operatorname{softmax}(z/T)

        Teacher logits are detached; ``target`` is accepted (a uniform call signature) and
        ignored.
        """

        def __init__(self, temperature: float = 1.0, weight: float = 1.0) -> None:
            super().__init__()
            if temperature <= 0:
                raise ValueError(f"KD: temperature must be positive, got {temperature}")
            self.temperature: float = float(temperature)
            self.weight: float = float(weight)

        def forward(
            self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor | None = None
        ) -> Tensor:
            """The KD loss for ``[B, C]`` logits."""
            tau = self.temperature
            log_ps = F.log_softmax(student_logits.float() / tau, dim=-1)
            log_pt = F.log_softmax(teacher_logits.detach().float() / tau, dim=-1)
            kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=-1)
            return kl.mean() * (self.weight * tau * tau)

        def extra_repr(self) -> str:
            return f"temperature={self.temperature:g}, weight={self.weight:g}"

    KD.__qualname__ = "KD"
    return KD


@functools.cache
def reference_class() -> type[nn.Module]:
    """KD with ``F.kl_div(..., reduction="batchmean")``, as users write it."""
    import torch.nn.functional as F
    from torch import nn

    class HandKD(nn.Module):
        def __init__(self, temperature: float = 1.0, weight: float = 1.0) -> None:
            super().__init__()
            self.t, self.weight = temperature, weight

        def forward(self, s: Tensor, t: Tensor, target: Tensor) -> Any:
            kl = F.kl_div(
                F.log_softmax(s.float() / self.t, dim=1),
                F.softmax(t.float() / self.t, dim=1),
                reduction="batchmean",
            )
            return self.weight * kl * self.t**2

    return HandKD
