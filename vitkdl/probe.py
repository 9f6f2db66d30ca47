"""``vitkdl explain --probe``: what each term does on a few real batches, before training.

On N batches of the recipe's training stream (its loader, augmentation and mixup, as the first
steps see them), eager and without an optimizer step, the probe reports each term's value,
its share of the total loss, the norm of its own gradient with respect to the student's
parameters and its share of the total gradient, and the teacher's own top-1 on those batches
(eval mode, on the images before mixup, against their labels). A wrong checkpoint or
normalisation shows in the teacher's top-1, a term that swamps or starves the others in the
shares: in seconds, not after a day of training.

A teacher held in a lower precision than it was loaded in (``teacher { precision = bf16 }``,
``fp8``, or bf16 autocast on CUDA, which holds it in bf16) is measured against itself one
step up (fp32; bf16 for FP8) on the same images: the cosine of each tapped feature with the
reference's (along the feature dimension, mean over tokens and images) and how often its top-1
agrees with the reference's. What the lower precision changes, before anyone trains with it.

The gradient share of a term is its gradient's projection on the total gradient,
``<g_term, g_total> / |g_total|^2``: the shares sum to 1 (the gradients sum to the total), and
a negative share means the term pulls against the others. Each term's gradient is taken alone
(one backward pass per term); nothing is written to ``.grad`` and no parameter moves.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from vitkdl.planner import Plan, without_cache
from vitkdl.program import Program, _autocast, build
from vitkdl.terms import KINDS


@dataclass(frozen=True)
class TermProbe:
    """One term over the probed batches (means over the batches)."""

    name: str
    kind: str
    value: float
    loss_share: float  # its value over the total loss (the shares sum to 1)
    grad_norm: float  # |d term / d student parameters|, the term alone
    grad_share: float  # <g_term, g_total> / |g_total|^2 (the shares sum to 1)


@dataclass(frozen=True)
class Fidelity:
    """The teacher in its held precision against its reference precision, on the probed
    images (before mixup)."""

    held: str  # how the step runs the teacher: bf16, fp8
    reference: str  # what it is measured against: fp32, bf16
    # Per tapped point (its key): the mean cosine along the feature dimension.
    cosine: dict[str, float]
    # Percent of images whose top-1 is the reference's, and their count; None without a head.
    top1_agreement: float | None
    agreed: int | None


@dataclass(frozen=True)
class ProbeReport:
    """What :func:`probe` measured."""

    batches: int
    images: int
    device: str
    loss: float  # the total loss, mean over the batches
    grad_norm: float  # |d loss / d student parameters|, mean over the batches
    terms: list[TermProbe]
    # The teacher's top-1 (percent) and its correct count on the probed images, None when no
    # term reads the teacher or it has no classifier head.
    teacher_top1: float | None
    teacher_correct: int | None
    # The held precision against the reference, when the teacher is held lower (else None).
    fidelity: Fidelity | None = None

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        return dataclasses.asdict(self)


@dataclass
class _Batch:
    """One batch's raw numbers."""

    values: dict[str, float]
    norms: dict[str, float]
    dots: dict[str, float]  # <g_term, g_total>
    total_norm: float


def term_values(program: Program, images: Tensor, targets: Tensor) -> dict[str, Tensor]:
    """Each term's value on a batch, with its graph (what ``program.step`` returns detached,
    computed by the same calls in the same order, so the same random masks are drawn)."""
    plan = program.plan
    t_logits, t_taps = program.teacher_pass(images)
    with _autocast(images.device.type, program.autocast_dtype):
        inputs = program.core.step_inputs(images, targets, t_logits, t_taps)
        return {
            t.name: KINDS[t.kind].loss(program.terms[t.name], t, inputs).float() for t in plan.terms
        }


def student_parameters(program: Program) -> list[torch.nn.Parameter]:
    """The student's trainable parameters (adapters excluded: only their own term reaches
    them)."""
    return [p for p in program.student.parameters() if p.requires_grad]


def _flat_grad(value: Tensor, params: list[torch.nn.Parameter]) -> Tensor:
    grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
    return torch.cat(
        [
            (g if g is not None else torch.zeros_like(p)).reshape(-1).float()
            for g, p in zip(grads, params, strict=True)
        ]
    )


def probe_batch(program: Program, images: Tensor, targets: Tensor) -> _Batch:
    """Values and gradients of every term on one batch (one backward pass per term, and one
    for the total; the total gradient is kept, each term's is reduced and dropped)."""
    values = term_values(program, images, targets)
    params = student_parameters(program)
    if not values:
        return _Batch({}, {}, {}, 0.0)
    total = _flat_grad(torch.stack(list(values.values())).sum(), params)
    norms, dots = {}, {}
    for name, value in values.items():
        g = _flat_grad(value, params)
        norms[name] = float(g.norm())
        dots[name] = float(g @ total)
    return _Batch(
        {k: float(v.detach()) for k, v in values.items()}, norms, dots, float(total.norm())
    )


def teacher_correct(program: Program, images: Tensor, labels: Tensor) -> int | None:
    """How many of a batch's images the teacher classifies right (its full forward, eval
    mode), or None when no term reads the teacher or it has no classifier head."""
    teacher = program.plan.teacher
    if program.teacher is None or teacher is None or not program.plan.teacher_used:
        return None
    if not teacher.num_classes:
        return None
    logits = program.teacher_logits(images)
    return int((logits.argmax(dim=-1) == labels).sum())


@dataclass
class FidelityMeter:
    """Running sums of the fidelity figures over batches: :meth:`add` each batch, then
    :meth:`fidelity` (the probe's, and bench's for its bf16 and fp8 teachers)."""

    cosine: dict[str, tuple[float, int]] = dataclasses.field(default_factory=dict)
    agreed: int | None = 0
    images: int = 0

    def add(self, program: Program, images: Tensor) -> None:
        """The held teacher against :attr:`Program.teacher_reference` on one batch."""
        ref_logits, ref_taps = program.reference_pass(images)
        with torch.no_grad():
            _, taps = program.teacher_pass(images)  # empty for a masked teacher
            for key, ref in ref_taps.items():
                if key not in taps:
                    continue
                cos = F.cosine_similarity(taps[key].float(), ref.float(), dim=-1)
                total, count = self.cosine.get(key, (0.0, 0))
                self.cosine[key] = (total + float(cos.double().sum()), count + cos.numel())
            teacher = program.plan.teacher
            if teacher is None or not teacher.num_classes or self.agreed is None:
                self.agreed = None
            else:
                held = program.teacher_logits(images)
                self.agreed += int((held.argmax(dim=-1) == ref_logits.argmax(dim=-1)).sum())
        self.images += int(images.shape[0])

    def fidelity(self, program: Program) -> Fidelity:
        """The means over the batches added."""
        ref = program.teacher_reference
        assert ref is not None
        known = self.agreed is not None and self.images > 0
        return Fidelity(
            held=ref.held,
            reference=ref.name,
            cosine={k: total / count for k, (total, count) in self.cosine.items() if count},
            top1_agreement=100.0 * self.agreed / self.images
            if known and self.agreed is not None
            else None,
            agreed=self.agreed if known else None,
        )


def probe_batches(
    program: Program,
    batches: Iterable[tuple[Tensor, Tensor]],
    mixup: Any = None,
) -> ProbeReport:
    """The probe on given ``(images, labels)`` batches (already on the program's device):
    ``mixup`` (timm's, as the loop applies it) mixes each batch for the terms; the teacher's
    top-1 is taken on the images before mixing. A program built with a teacher reference
    (``build(..., reference=True)`` and a teacher held lower) is measured against it, on the
    images before mixing too."""
    program.train()  # as the step runs: drop path, dropout, the teacher in eval mode
    seen: list[_Batch] = []
    images_seen = 0
    correct: int | None = 0
    measured = FidelityMeter() if program.teacher_reference is not None else None
    for images, labels in batches:
        with torch.no_grad():
            right = teacher_correct(program, images, labels)
        correct = None if right is None or correct is None else correct + right
        if measured is not None:
            measured.add(program, images)
        x, targets = mixup(images, labels) if mixup is not None else (images, labels)
        seen.append(probe_batch(program, x, targets))
        images_seen += int(images.shape[0])
    report = _report(program, seen, images_seen, correct)
    if measured is None:
        return report
    return dataclasses.replace(report, fidelity=measured.fidelity(program))


def _report(program: Program, seen: list[_Batch], images: int, correct: int | None) -> ProbeReport:
    n = max(len(seen), 1)
    totals = [sum(b.values.values()) for b in seen]
    loss_sum = sum(totals)
    terms = []
    for t in program.plan.terms:
        value_sum = sum(b.values[t.name] for b in seen)
        terms.append(
            TermProbe(
                name=t.name,
                kind=t.kind,
                value=value_sum / n,
                loss_share=value_sum / loss_sum if loss_sum else math.nan,
                grad_norm=sum(b.norms[t.name] for b in seen) / n,
                grad_share=sum(
                    b.dots[t.name] / b.total_norm**2 if b.total_norm else math.nan for b in seen
                )
                / n,
            )
        )
    known = correct is not None and images > 0
    return ProbeReport(
        batches=len(seen),
        images=images,
        device=str(next(program.student.parameters()).device),
        loss=loss_sum / n,
        grad_norm=sum(b.total_norm for b in seen) / n,
        terms=terms,
        teacher_top1=100.0 * correct / images if known and correct is not None else None,
        teacher_correct=correct if known else None,
    )


def probe(
    plan: Plan,
    batches: int = 2,
    device: str | None = None,
    *,
    load: bool = True,
    runs_dir: str | Path = "runs",
) -> ProbeReport:
    """Build the recipe's program (eager, its weights loaded) and probe it on the first
    ``batches`` batches of its training stream (:func:`probe_batches`)."""
    from vitkdl.train.data import build_loaders, build_mixup

    if batches < 1:
        raise ValueError("--batches must be at least 1")
    random.seed(plan.seed)
    np.random.seed(plan.seed % 2**32)
    torch.manual_seed(plan.seed)
    program = build(
        without_cache(plan), device, load=load, runs_dir=runs_dir, compile="off", reference=True
    )
    dev = next(program.student.parameters()).device
    cfg = plan.data.model_copy(update={"workers": 0})  # a few batches: no workers
    loader, _, num_classes = build_loaders(cfg)
    mixup = build_mixup(cfg, num_classes)

    def stream() -> Iterable[tuple[Tensor, Tensor]]:
        for i, (images, labels) in enumerate(loader):
            if i >= batches:
                return
            yield images.to(dev, non_blocking=True), labels.to(dev, non_blocking=True)

    return probe_batches(program, stream(), mixup)
