"""``labels``: the student's own label loss (cross-entropy), in every recipe unless written.

``labels { smoothing = 0.1  weight = 1.0 }``: cross-entropy with label smoothing (``smoothing``
defaults to ``data.smoothing``) on class indices, or the soft cross-entropy on mixup/cutmix's
mixed targets (which already carry the smoothing). ``labels { weight = 0 }`` drops it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal

from vitkdl.errors import Diagnostic, error
from vitkdl.nodes import TermSpec
from vitkdl.terms.base import (
    Context,
    Kind,
    KindOptions,
    StepInputs,
    TermPlan,
    Words,
    options_of,
    term_plan,
)

if TYPE_CHECKING:
    from torch import Tensor, nn


class LabelsSpec(TermSpec):
    """``labels { smoothing, weight }``: the student's own cross-entropy (on by default).
    ``smoothing`` defaults to ``data.smoothing``."""

    kind: Literal["labels"] = "labels"
    smoothing: float | None = None
    weight: float = 1.0


class LabelsOptions(KindOptions):
    smoothing: float


class Labels(Kind):
    keyword = "labels"
    summary = "the student's own cross-entropy on the labels (on by default)"
    spec = LabelsSpec
    needs_teacher = False
    default = True

    def check(self, term: LabelsSpec, ctx: Context) -> Iterable[Diagnostic]:
        if term.smoothing is not None and not 0 <= term.smoothing < 1:
            yield error(f"smoothing must lie in [0, 1), got {term.smoothing}", term.at("smoothing"))

    def plan(self, term: LabelsSpec, ctx: Context) -> TermPlan:
        classes = ctx.student.num_classes if ctx.student else 0
        smoothing = term.smoothing if term.smoothing is not None else ctx.spec.data.smoothing
        return term_plan(
            term, ctx, student_shape=[classes], options=LabelsOptions(smoothing=smoothing)
        )

    def words(self, entry: TermPlan) -> Words:
        smoothing = options_of(entry, LabelsOptions).smoothing
        return Words(f"{entry.weight:g} * CE(s, y, smoothing={smoothing:g})", "mean over batch")

    def module_class(self) -> type[nn.Module]:
        from vitkdl.terms.labels.module import LabelLoss

        return LabelLoss

    def module(self, entry: TermPlan) -> nn.Module:
        o = options_of(entry, LabelsOptions)
        from vitkdl.terms.labels.module import LabelLoss

        return LabelLoss(smoothing=o.smoothing, weight=entry.weight)

    def loss(self, module: nn.Module, entry: TermPlan, inputs: StepInputs) -> Tensor:
        return module(inputs.s_logits, inputs.targets)

    def reference(self, entry: TermPlan) -> nn.Module | None:
        o = options_of(entry, LabelsOptions)
        from vitkdl.terms.labels.module import HandLabels

        return HandLabels(o.smoothing, entry.weight)

    def timm_task(self, entry: TermPlan) -> dict[str, Any] | None:
        o = options_of(entry, LabelsOptions)
        return {"task_loss_weight": entry.weight, "smoothing": o.smoothing}


KIND = Labels()
