"""``dist``: DIST, knowledge distillation from a stronger teacher (Huang et al., NeurIPS 2022).

``dist { beta = 1.0  gamma = 1.0  temperature = 1.0  weight = 1.0 }``: with p = softmax(z/T)
of each model's logits ``[B, C]``, the inter-class relation is the mean over the batch of the
Pearson correlation between a sample's student and teacher distributions (over its classes),
the intra-class relation the mean over the classes of the Pearson correlation between a
class's student and teacher probabilities (over the batch). The loss is weight * T^2 *
(beta * (1 - inter) + gamma * (1 - intra)), the teacher detached, in fp32.

As the authors' code does (``hunto/image_classification_sota``, ``lib/models/losses/
dist_kd.py``, which the DIST_KD repository points to): Pearson correlation as the cosine
similarity of the centred vectors with 1e-8 added to the product of their norms, T^2 on both
relations, ``DIST(beta=1, gamma=1, tau=1)`` on ImageNet, with ``kd_loss_weight: 2``
(``configs/strategies/distill/resnet_dist.yaml`` and ``dist_b2.yaml``): ``weight = 2`` is
their setting, the default here is 1 as for every kind. The intra-class relation reads the
whole batch: under data parallelism each process correlates its own batch, as theirs does.
Targets are not read.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal

from vitkdl.errors import Diagnostic, error
from vitkdl.nodes import TermSpec
from vitkdl.terms.base import (
    logit_plan,
    check_temperature,
    check_not_negative,
    Context,
    Kind,
    KindOptions,
    StepInputs,
    TermPlan,
    Words,
    options_of,
)

if TYPE_CHECKING:
    from torch import Tensor, nn


class DISTSpec(TermSpec):
    """``dist { beta, gamma, temperature, weight }``: DIST's inter- and intra-class
    relations."""

    kind: Literal["dist"] = "dist"
    beta: float = 1.0
    gamma: float = 1.0
    temperature: float = 1.0
    weight: float = 1.0


class DISTOptions(KindOptions):
    beta: float
    gamma: float
    temperature: float


class DIST(Kind):
    keyword = "dist"
    summary = "DIST: the class distributions' Pearson correlations, per sample and per class"
    spec = DISTSpec
    reads_teacher_logits = True

    def check(self, term: DISTSpec, ctx: Context) -> Iterable[Diagnostic]:
        yield from check_temperature(term)
        yield from check_not_negative(term, "beta", "gamma")

    def plan(self, term: DISTSpec, ctx: Context) -> TermPlan:
        options = DISTOptions(beta=term.beta, gamma=term.gamma, temperature=term.temperature)
        return logit_plan(term, ctx, options)

    def words(self, entry: TermPlan) -> Words:
        o = options_of(entry, DISTOptions)
        t = o.temperature
        return Words(
            f"{entry.weight:g} * {t * t:g} * ({o.beta:g} * (1 - mean_i pearson(p_s[i], p_t[i])) "
            f"+ {o.gamma:g} * (1 - mean_c pearson(p_s[:, c], p_t[:, c])))",
            "Pearson over classes per sample (inter), over the batch per class (intra)",
            (f"p = softmax(z/{t:g}) of each model's logits",),
        )

    def module_class(self) -> type[nn.Module]:
        from vitkdl.terms.dist.module import DIST

        return DIST

    def module(self, entry: TermPlan) -> nn.Module:
        o = options_of(entry, DISTOptions)
        from vitkdl.terms.dist.module import DIST

        return DIST(beta=o.beta, gamma=o.gamma, temperature=o.temperature, weight=entry.weight)

    def loss(self, module: nn.Module, entry: TermPlan, inputs: StepInputs) -> Tensor:
        return module(inputs.s_logits, inputs.t_logits, inputs.targets)

    def reference(self, entry: TermPlan) -> nn.Module | None:
        o = options_of(entry, DISTOptions)
        from vitkdl.terms.dist.module import HandDIST

        return HandDIST(o.beta, o.gamma, o.temperature, entry.weight)


KIND = DIST()
