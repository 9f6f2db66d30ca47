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

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal

from vitkdl.errors import Diagnostic, error, warning
from vitkdl.nodes import TermSpec
from vitkdl.terms.base import (
    Context,
    Kind,
    KindOptions,
    StepInputs,
    TermPlan,
    Words,
    logit_plan,
    options_of,
)

if TYPE_CHECKING:
    from torch import Tensor, nn


class TokenSpec(TermSpec):
    """``token { mode, temperature, weight }``: DeiT's distillation-token loss."""

    kind: Literal["token"] = "token"
    mode: Literal["hard", "soft"] = "hard"
    temperature: float = 1.0
    weight: float = 1.0


class TokenOptions(KindOptions):
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
        soft = term.mode == "soft"
        return logit_plan(
            term, ctx, TokenOptions(mode=term.mode, temperature=term.temperature if soft else None)
        )

    def words(self, entry: TermPlan) -> Words:
        o = options_of(entry, TokenOptions)
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
        from vitkdl.terms.token.module import TokenDistillation

        return TokenDistillation

    def module(self, entry: TermPlan) -> nn.Module:
        o = options_of(entry, TokenOptions)
        from vitkdl.terms.token.module import TokenDistillation

        return TokenDistillation(mode=o.mode, temperature=o.temperature or 1.0, weight=entry.weight)

    def loss(self, module: nn.Module, entry: TermPlan, inputs: StepInputs) -> Tensor:
        dist = inputs.s_dist_logits if inputs.s_dist_logits is not None else inputs.s_logits
        return module(dist, inputs.t_logits)

    def reference(self, entry: TermPlan) -> nn.Module | None:
        o = options_of(entry, TokenOptions)
        from vitkdl.terms.token.module import HandToken

        return HandToken(o.mode, o.temperature or 1.0, entry.weight)

    def timm_task(self, entry: TermPlan) -> dict[str, Any] | None:
        o = options_of(entry, TokenOptions)
        return {
            "task": "TokenDistillationTask",
            "distill_type": o.mode,
            "temperature": o.temperature or 1.0,
            "distill_loss_weight": entry.weight,
        }


KIND = Token()
