"""``srrl``: softmax regression representation learning (Yang et al., *Knowledge Distillation
via Softmax Regression Representation Learning*, ICLR 2021).

``srrl student.pre_logits -> teacher.pre_logits { features = 1.0  regression = 2.0 }``

The student's pooled feature, the one its classifier head reads (``pre_logits``: timm's
``forward_head(x, pre_logits=True)``, after pooling, ``fc_norm`` and ``head_drop``), goes
through a connector ``c = Linear(Ds, Dt)`` (an adapter, trained with the student) and is
taught twice:

- feature matching: ``mean((c(f_s) - f_t)^2)`` against the teacher's pooled feature;
- softmax regression: ``mean((head_t(c(f_s)) - z_t)^2)``: the connected feature through the
  teacher's own classifier head must give the teacher's logits. The head is frozen (no
  gradient reaches its parameters); gradients flow through it to the connector and the
  student.

``weight * (features * L_features + regression * L_regression)``, each a mean over batch and
channels (classes). The teacher's head must be trained: a teacher without weights, or whose
weights lack the head, is an error (as for every kind that reads the teacher's logits;
``teacher { head = random }`` says a random head is meant, in tests).

Against the authors' code (github jingyang2017/KD_SRRL, ``train_imagenet_distillation.py``;
and cls_KD's ``SRRLLoss``): on ResNets their connector is ``Conv1x1 - BN - ReLU`` on the last
feature map before pooling, the feature loss the squared difference of the two maps' spatial
means (channel mean, batch mean), and the regression loss ``F.mse_loss(fc_t(pool(c(F_s))),
z_t)``. For a ViT the head reads a pooled token, so here the connector is linear on the pooled
feature (the paper's formulation, Eq. 1-2: the penultimate feature); pooling and a linear map
commute, and no ReLU cuts off a ViT feature's negative half. Weights: the issue's and the
paper's ``features = 1``, ``regression = 2``; the authors' released ImageNet script weighs
the two 1 : 1 (``loss_stat + mse``), cls_KD's loss defaults to 1 : 5 and its ResNet config
to 1 : 1.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from vitkdl.errors import Diagnostic, error
from vitkdl.nodes import PairedTermSpec
from vitkdl.terms.base import (
    Context,
    Kind,
    KindOptions,
    StepInputs,
    TermPlan,
    Words,
    adapter_words,
    linear,
    options_of,
    term_plan,
)

if TYPE_CHECKING:
    from torch import Tensor, nn


class SRRLSpec(PairedTermSpec):
    """``srrl student.pre_logits -> teacher.pre_logits { features, regression, weight }``."""

    kind: Literal["srrl"] = "srrl"
    features: float = Field(default=1.0, ge=0)
    regression: float = Field(default=2.0, ge=0)
    weight: float = 1.0


class SRRLOptions(KindOptions):
    features: float
    regression: float
    classes: int  # the teacher head's outputs (what the regression compares)


class SRRL(Kind):
    keyword = "srrl"
    summary = (
        "SRRL: the student's pre-logits feature, through a connector, matches the teacher's "
        "and gives its logits through the teacher's frozen head"
    )
    spec = SRRLSpec
    paired = True
    reads_teacher_logits = True  # the regression target is z_t: the head must be trained
    reads_teacher_head = True

    def reads_pre_logits(self, term: SRRLSpec | None) -> bool:
        return True

    def check(self, term: SRRLSpec, ctx: Context) -> Iterable[Diagnostic]:
        for tap in (*term.student, *term.teacher):
            if tap.point != "pre_logits":
                yield error(
                    f"srrl '{term.name}' reads the pooled feature the classifier head reads, "
                    f"not {tap.text()}",
                    tap.span,
                    expected=f"{tap.side}.pre_logits",
                    hint="write srrl student.pre_logits -> teacher.pre_logits",
                )
        for side in ("student", "teacher"):
            taps = getattr(term, side)
            if len(taps) > 1:
                yield error(
                    f"srrl '{term.name}' reads one feature per model, and the {side} side "
                    f"names {len(taps)}",
                    taps[1].span,
                    expected=f"{side}.pre_logits",
                )
        m = ctx.spec.teacher
        if m is not None and m.precision == "fp8":
            yield error(
                f"srrl '{term.name}' trains through the teacher's classifier head, and "
                "precision = fp8 quantises it for inference only",
                m.at("precision"),
                hint="precision = bf16 (or auto) for the teacher",
            )

    def plan(self, term: SRRLSpec, ctx: Context) -> TermPlan:
        s, t = ctx.student, ctx.teacher
        assert s is not None and t is not None
        sp, tp = ctx.taps[(term.name, "student")], ctx.taps[(term.name, "teacher")]
        assert sp is not None and tp is not None
        return term_plan(
            term,
            ctx,
            student=sp,
            teacher=tp,
            student_shape=[s.embed_dim],
            teacher_shape=[t.embed_dim],
            adapters=[linear("connector", s.embed_dim, t.embed_dim, 1)],
            elements=1,  # two means
            options=SRRLOptions(
                features=term.features, regression=term.regression, classes=t.num_classes
            ),
        )

    def words(self, entry: TermPlan) -> Words:
        o = options_of(entry, SRRLOptions)
        connector = adapter_words(entry.adapters[0]) if entry.adapters else "c"
        return Words(
            f"{entry.weight:g} * ({o.features:g} * mean((c(f_s) - f_t)^2) + "
            f"{o.regression:g} * mean((head_t(c(f_s)) - z_t)^2))",
            f"means over batch x {entry.teacher_shape[-1]} channels and batch x {o.classes} "
            "classes",
            (
                f"c = {connector} on the pooled pre-logits feature; head_t is the teacher's "
                "classifier head, frozen: gradients flow through it to c and the student",
            ),
        )

    def module_class(self) -> type[nn.Module]:
        from vitkdl.terms.srrl.module import SRRL

        return SRRL

    def module(self, entry: TermPlan) -> nn.Module:
        o = options_of(entry, SRRLOptions)
        assert entry.teacher_width is not None
        from vitkdl.terms.srrl.module import SRRL

        return SRRL(
            entry.student_width,
            entry.teacher_width,
            features=o.features,
            regression=o.regression,
            weight=entry.weight,
        )

    def loss(self, module: nn.Module, entry: TermPlan, inputs: StepInputs) -> Tensor:
        (s,), (t,) = entry.student, entry.teacher
        return module(inputs.s_taps[s.key], inputs.t_taps[t.key], inputs.t_logits, inputs.t_head)

    def reference(self, entry: TermPlan) -> nn.Module | None:
        o = options_of(entry, SRRLOptions)
        assert entry.teacher_width is not None
        from vitkdl.terms.srrl.module import HandSRRL

        return HandSRRL(
            entry.student_width, entry.teacher_width, o.features, o.regression, entry.weight
        )


KIND = SRRL()
