"""``token``: DeiT's distillation token: the student's distillation head learns the teacher.

``token { mode = hard  temperature = 1.0  weight = 0.5 }`` trains the distillation head of a
distilled DeiT student (``deit_*_distilled_patch16_224``: a second token with its own head,
``head_dist``) against the teacher, as facebookresearch/deit's ``DistillationLoss`` and timm's
``TokenDistillationTask`` do:

- ``mode = hard`` (DeiT's choice): CE(dist_logits, argmax(teacher_logits)), batch mean;
- ``mode = soft``: T^2 * KL(softmax(teacher / T) || softmax(dist / T)), summed over classes,
  batch mean (the paper's equation and timm; DeiT's code divides by B x classes instead).

Which head learns what: with a ``token`` term in a recipe, the student's two heads reach the
terms separately. This term reads the distillation head; every other logit term (the label
loss, ``kd``, ``nkd``) reads the class head, so ``labels { weight = 0.5 }`` beside
``token { weight = 0.5 }`` is DeiT's loss, (1 - a) CE(cls, y) + a L_dist with a = 0.5.
Evaluation averages the two heads (timm's inference rule); the run also reports each head's
top-1. Without a ``token`` term a distilled student's heads are averaged everywhere.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel

from vitkdl.errors import Diagnostic, error, warning
from vitkdl.spec import TermSpec
from vitkdl.terms.base import Kind, StepInputs, TermPlan, Words, term_plan

if TYPE_CHECKING:
    from torch import Tensor, nn

    from vitkdl.checks import Context
    from vitkdl.planner import Plan


class TokenSpec(TermSpec):
    """``token { mode, temperature, weight }``: DeiT's distillation-token loss."""

    kind: Literal["token"] = "token"
    mode: Literal["hard", "soft"] = "hard"
    temperature: float = 1.0
    weight: float = 1.0


class TokenOptions(BaseModel):
    mode: str
    temperature: float | None  # soft only


class Token(Kind):
    keyword = "token"
    summary = "DeiT's distillation token: the student's distillation head learns the teacher"
    spec = TokenSpec
    reads_teacher_logits = True
    reads_dist_logits = True

    def check(self, term: TokenSpec, ctx: Context) -> Iterable[Diagnostic]:
        if term.temperature <= 0:
            yield error(f"temperature must be > 0, got {term.temperature}", term.at("temperature"))
        elif term.mode == "hard" and "temperature" in term.spans:
            yield warning(
                "temperature is not used by mode = hard (the teacher's argmax is the target)",
                term.at("temperature"),
                hint="write mode = soft for T^2 * KL at temperature T",
            )
        s = ctx.student
        if s is not None and not s.distilled:
            yield error(
                f"token trains a distillation head, and the student {s.name} ({s.family}) has "
                "no distillation token",
                term.span,
                expected="a distilled DeiT student (two heads: head and head_dist)",
                hint=f"use a deit_*_distilled_patch16_224 student, or kd to distil into "
                f"{s.name}'s one head",
            )

    def plan(self, term: TokenSpec, ctx: Context) -> TermPlan:
        classes = ctx.student.num_classes if ctx.student else 0
        soft = term.mode == "soft"
        return term_plan(
            term,
            student_shape=[classes],
            teacher_shape=[classes],
            options=TokenOptions(mode=term.mode, temperature=term.temperature if soft else None),
        )

    def words(self, entry: TermPlan) -> Words:
        o = TokenOptions.model_validate(entry.options)
        heads = (
            "the distillation head learns the teacher; the class head learns the other "
            "logit terms (the labels); evaluation averages the two heads",
        )
        if o.mode == "hard":
            return Words(f"{entry.weight:g} * CE(s_dist, argmax(t))", "mean over batch", heads)
        t = o.temperature or 1.0
        return Words(
            f"{entry.weight:g} * {t * t:g} * KL(softmax(t/{t:g}) || softmax(s_dist/{t:g}))",
            "sum over classes, mean over batch",
            heads,
        )

    def module_class(self) -> type[nn.Module]:
        return module_class()

    def module(self, entry: TermPlan, plan: Plan) -> nn.Module:
        o = TokenOptions.model_validate(entry.options)
        return module_class()(mode=o.mode, temperature=o.temperature or 1.0, weight=entry.weight)

    def loss(self, module: nn.Module, entry: TermPlan, inputs: StepInputs) -> Tensor:
        dist = inputs.s_dist_logits if inputs.s_dist_logits is not None else inputs.s_logits
        return module(dist, inputs.t_logits)

    def reference(self, entry: TermPlan, plan: Plan) -> nn.Module | None:
        o = TokenOptions.model_validate(entry.options)
        return reference_class()(o.mode, o.temperature or 1.0, entry.weight)

    def timm_task(self, entry: TermPlan) -> dict[str, Any] | None:
        o = TokenOptions.model_validate(entry.options)
        return {
            "task": "TokenDistillationTask",
            "distill_type": o.mode,
            "temperature": o.temperature or 1.0,
            "distill_loss_weight": entry.weight,
        }


KIND = Token()


@functools.cache
def module_class() -> type[nn.Module]:
    """:class:`TokenDistillation`, the loss module."""
    import torch.nn.functional as F
    from torch import nn

    class TokenDistillation(nn.Module):
        r"""DeiT's distillation-token loss on the student's distillation head.

        ``mode="hard"``: :math:`w\,\mathrm{CE}(z^{dist}, \arg\max_c z^t_c)`, batch mean.
        ``mode="soft"``: :math:`w\,T^2 \frac{1}{B}\sum_b \sum_c p^t_{b,c}(\log p^t_{b,c} -
        \log p^{dist}_{b,c})` with :math:`p = \operatorname{softmax}(z/T)`. Teacher logits
        are detached.
        """

        def __init__(self, mode: str = "hard", temperature: float = 1.0, weight: float = 1.0):
            super().__init__()
            if mode not in ("hard", "soft"):
                raise ValueError(f"TokenDistillation: mode must be 'hard' or 'soft', got {mode!r}")
            if temperature <= 0:
                raise ValueError(f"TokenDistillation: temperature must be > 0, got {temperature}")
            self.mode: str = mode
            self.temperature: float = float(temperature)
            self.weight: float = float(weight)

        def forward(self, dist_logits: Tensor, teacher_logits: Tensor) -> Tensor:
            """The loss for the distillation head's ``[B, C]`` logits."""
            z, t = dist_logits.float(), teacher_logits.detach().float()
            if self.mode == "hard":
                return F.cross_entropy(z, t.argmax(dim=-1)) * self.weight
            tau = self.temperature
            log_ps = F.log_softmax(z / tau, dim=-1)
            log_pt = F.log_softmax(t / tau, dim=-1)
            kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=-1)
            return kl.mean() * (self.weight * tau * tau)

        def extra_repr(self) -> str:
            return f"mode={self.mode}, temperature={self.temperature:g}, weight={self.weight:g}"

    TokenDistillation.__qualname__ = "TokenDistillation"
    return TokenDistillation


@functools.cache
def reference_class() -> type[nn.Module]:
    """facebookresearch/deit's ``DistillationLoss`` term as users write it (batch-mean KL)."""
    import torch.nn.functional as F
    from torch import nn

    class HandToken(nn.Module):
        def __init__(self, mode: str = "hard", tau: float = 1.0, weight: float = 1.0) -> None:
            super().__init__()
            self.mode, self.tau, self.weight = mode, tau, weight

        def forward(self, outputs_kd: Tensor, teacher_outputs: Tensor) -> Any:
            if self.mode == "soft":
                t = self.tau
                loss = (
                    F.kl_div(
                        F.log_softmax(outputs_kd.float() / t, dim=1),
                        F.log_softmax(teacher_outputs.float() / t, dim=1),
                        reduction="batchmean",
                        log_target=True,
                    )
                    * t
                    * t
                )
            else:
                loss = F.cross_entropy(outputs_kd.float(), teacher_outputs.argmax(dim=1))
            return self.weight * loss

    return HandToken
