"""``labels``: the student's own label loss (cross-entropy), in every recipe unless written.

``labels { smoothing = 0.1  weight = 1.0 }``: cross-entropy with label smoothing (``smoothing``
defaults to ``data.smoothing``) on class indices, or the soft cross-entropy on mixup/cutmix's
mixed targets (which already carry the smoothing). ``labels { weight = 0 }`` drops it.
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


class LabelsSpec(TermSpec):
    """``labels { smoothing, weight }``: the student's own cross-entropy (on by default).
    ``smoothing`` defaults to ``data.smoothing``."""

    kind: Literal["labels"] = "labels"
    smoothing: float | None = None
    weight: float = 1.0


class LabelsOptions(BaseModel):
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
        return term_plan(term, student_shape=[classes], options=LabelsOptions(smoothing=smoothing))

    def words(self, entry: TermPlan) -> Words:
        smoothing = LabelsOptions.model_validate(entry.options).smoothing
        return Words(f"{entry.weight:g} * CE(s, y, smoothing={smoothing:g})", "mean over batch")

    def module_class(self) -> type[nn.Module]:
        return module_class()

    def module(self, entry: TermPlan, plan: Plan) -> nn.Module:
        o = LabelsOptions.model_validate(entry.options)
        return module_class()(smoothing=o.smoothing, weight=entry.weight)

    def loss(self, module: nn.Module, entry: TermPlan, inputs: StepInputs) -> Tensor:
        return module(inputs.s_logits, inputs.targets)

    def reference(self, entry: TermPlan, plan: Plan) -> nn.Module | None:
        o = LabelsOptions.model_validate(entry.options)
        return reference_class()(o.smoothing, entry.weight)

    def timm_task(self, entry: TermPlan) -> dict[str, Any] | None:
        o = LabelsOptions.model_validate(entry.options)
        return {"task_loss_weight": entry.weight, "smoothing": o.smoothing}


KIND = Labels()


@functools.cache
def module_class() -> type[nn.Module]:
    """:class:`LabelLoss`, the loss module (``from vitkdl.strategies import LabelLoss``)."""
    import torch.nn.functional as F
    from torch import nn

    class LabelLoss(nn.Module):
        r"""Supervised loss on the ground truth, times ``weight``.

        * ``target`` class indices ``[B]``: cross-entropy with label smoothing
          :math:`\epsilon` (``F.cross_entropy(..., label_smoothing=smoothing)``).
        * ``target`` soft labels ``[B, C]`` (timm's Mixup, which already folds the smoothing
          in): :math:`-\frac{1}{B}\sum_b \sum_c y_{b,c} \log\operatorname{softmax}(z)_{b,c}`.
        """

        def __init__(self, smoothing: float = 0.1, weight: float = 1.0) -> None:
            super().__init__()
            if not 0.0 <= smoothing < 1.0:
                raise ValueError(f"LabelLoss: smoothing must be in [0, 1), got {smoothing}")
            self.smoothing: float = float(smoothing)
            self.weight: float = float(weight)

        def forward(self, logits: Tensor, target: Tensor) -> Tensor:
            """The label loss for ``[B, C]`` logits."""
            z = logits.float()
            if target.dim() == z.dim():
                loss = -(target.float() * F.log_softmax(z, dim=-1)).sum(dim=-1).mean()
            else:
                loss = F.cross_entropy(z, target.long(), label_smoothing=self.smoothing)
            return loss * self.weight

        def extra_repr(self) -> str:
            return f"smoothing={self.smoothing:g}, weight={self.weight:g}"

    LabelLoss.__qualname__ = "LabelLoss"
    return LabelLoss


@functools.cache
def reference_class() -> type[nn.Module]:
    """Cross-entropy on hard labels (smoothed) or on soft mixup targets, as users write it."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class HandLabels(nn.Module):
        def __init__(self, smoothing: float = 0.1, weight: float = 1.0) -> None:
            super().__init__()
            self.smoothing, self.weight = smoothing, weight

        def forward(self, s: Tensor, target: Tensor) -> Any:
            if target.dim() > 1:
                loss = torch.sum(-target * F.log_softmax(s.float(), dim=-1), dim=-1).mean()
            else:
                loss = F.cross_entropy(s.float(), target, label_smoothing=self.smoothing)
            return self.weight * loss

    return HandLabels
