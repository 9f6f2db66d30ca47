"""``generate``: masked student tokens regenerate the teacher's (ViTKD's deep-layer guideline).

``generate student.norm -> teacher.norm { mask = 0.5  generator = conv }``

The student's tokens are projected to the teacher's width (``align``), a random fraction
``mask`` of them per sample is replaced by a learned mask token, a generator predicts the
teacher's tokens and the squared error counts the masked tokens only, summed, / (batch x mask).
Generators (the paper compared them): ``conv`` (the paper's: Conv3x3 - ReLU - Conv3x3 on the
token grid), ``attention`` (one transformer block at the teacher's width over all tokens, mask
tokens included) and ``linear`` (per token: the control without context).

A teacher on another token grid has its tapped tokens resampled to the student's grid in the
step (``resample = bilinear`` by default, ``area``; ``none`` makes a mismatch an error): the
target is the resampled teacher grid, and the generator runs on the student's grid.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal

from vitkdl.errors import Diagnostic, error
from vitkdl.nodes import PairedTermSpec
from vitkdl.terms.base import (
    AdapterPlan,
    Context,
    Kind,
    KindOptions,
    StepInputs,
    TermPlan,
    Words,
    align,
    check_resample,
    linear,
    options_of,
    paired_taps,
    resample_notes,
    resample_options,
    teacher_on_student_grid,
    term_plan,
)
from vitkdl.terms.generate.counts import MLP_RATIO, masked

if TYPE_CHECKING:
    from torch import Tensor, nn


class GenerateSpec(PairedTermSpec):
    """``generate S -> T { mask, generator, align, weight }``: masked feature generation."""

    kind: Literal["generate"] = "generate"
    mask: float = 0.5
    generator: Literal["conv", "attention", "linear"] = "conv"
    align: Literal["linear", "identity"] = "linear"
    resample: Literal["bilinear", "area", "none"] = "bilinear"
    weight: float = 3e-6


class GenerateOptions(KindOptions):
    mask: float
    masked_tokens: int
    generator: str
    align: str
    grid: tuple[int, int]  # where the generator runs: the student's grid
    heads: int | None  # of the attention generator
    # When the teacher's grid differs from the student's: how its taps are resampled.
    resample: str | None = None
    teacher_grid: tuple[int, int] | None = None
    student_grid: tuple[int, int] | None = None


def generator_plan(generator: str, width: int, heads: int, tokens: int) -> AdapterPlan:
    """The generator as numbers (forward FLOPs per image over ``tokens`` tokens)."""
    if generator == "conv":
        conv = 9 * width * width + width
        return AdapterPlan(
            name="generator",
            module="conv3x3_pair",
            dims=(width,),
            params=2 * conv,
            flops=2 * 2 * 9 * width * width * tokens,
        )
    if generator == "attention":
        hidden = MLP_RATIO * width
        params = (
            4 * width  # two LayerNorms
            + 3 * width * width
            + 3 * width
            + width * width
            + width  # qkv, proj
            + width * hidden
            + hidden
            + hidden * width
            + width
        )  # mlp
        flops = (
            2 * (4 * width * width + 2 * width * hidden) * tokens  # projections, mlp
            + 2 * 2 * tokens * tokens * width
        )  # q k^T and attn v
        return AdapterPlan(
            name="generator",
            module="block",
            dims=(width, heads, hidden),
            params=params,
            flops=flops,
        )
    return linear("generator", width, width, tokens)


class Generate(Kind):
    keyword = "generate"
    summary = "masked student tokens regenerate the teacher's (deep layers in ViTKD)"
    spec = GenerateSpec
    paired = True

    def check(self, term: GenerateSpec, ctx: Context) -> Iterable[Diagnostic]:
        s_taps, t_taps = ctx.taps.get((term.name, "student")), ctx.taps.get((term.name, "teacher"))
        if s_taps is not None and t_taps is not None and len(s_taps) == len(t_taps) != 1:
            yield error(
                f"generate '{term.name}' takes one tap a side, got {len(s_taps)}",
                term.span,
                hint="write one generate term per pair, e.g. generate student.norm -> teacher.norm",
            )
        for tap in (*term.student, *term.teacher):
            if tap.sub == "attn_map":
                yield error(
                    "generate regenerates tokens, not attention maps",
                    tap.span,
                    hint="tap blocks[i], blocks[i].attn or norm",
                )
        if not 0 < term.mask < 1:
            yield error(
                f"mask must lie in (0, 1), got {term.mask}",
                term.at("mask"),
                hint="the paper masks half the tokens: mask = 0.5",
            )
        s, t = ctx.student, ctx.teacher
        if t is None or not t.vit:
            return
        yield from check_resample(term, ctx)
        # The generator runs on the student's grid (the teacher's, resampled, when they differ).
        on = s if s is not None and s.vit else t
        whose = "the teacher's" if on.grid == t.grid else "the student's"
        if 0 < term.mask < 1 and masked(on.num_patches, term.mask) == 0:
            yield error(f"mask = {term.mask} masks no token of {on.num_patches}", term.at("mask"))
        if term.generator == "conv" and on.grid[0] != on.grid[1]:
            yield error(
                f"generate '{term.name}' with generator = conv needs a square token "
                f"grid, {whose} is {on.grid[0]}x{on.grid[1]}",
                term.span,
                hint="generator = attention or linear take any grid",
            )
        if s is not None and term.align == "identity" and s.embed_dim != t.embed_dim:
            yield error(
                f"align = identity needs equal widths, the student is {s.embed_dim} "
                f"and the teacher {t.embed_dim} wide",
                term.at("align"),
                hint="use align = linear",
            )

    def plan(self, term: GenerateSpec, ctx: Context) -> TermPlan:
        s, t = ctx.student, ctx.teacher
        assert s is not None and t is not None
        sp, tp = ctx.taps[(term.name, "student")], ctx.taps[(term.name, "teacher")]
        assert sp is not None and tp is not None
        n, ds, dt = s.num_patches, s.embed_dim, t.embed_dim
        adapters = [
            *align(term.align, "align", ds, dt, n),
            AdapterPlan(name="mask_token", module="mask_token", dims=(dt,), params=dt, flops=0),
            generator_plan(term.generator, dt, t.num_heads, n),
        ]
        k = masked(n, term.mask)
        options = GenerateOptions(
            mask=term.mask,
            masked_tokens=k,
            generator=term.generator,
            align=term.align,
            grid=s.grid,
            heads=t.num_heads if term.generator == "attention" else None,
            **resample_options(term.resample, ctx),
        )
        # Summed over k masked tokens x Dt channels, divided by mask: k * Dt / mask elements.
        return term_plan(
            term,
            ctx,
            student=sp,
            teacher=tp,
            student_shape=[n, ds],
            teacher_shape=[n, dt],
            adapters=adapters,
            elements=k * dt / term.mask,
            options=options,
        )

    def words(self, entry: TermPlan) -> Words:
        o = options_of(entry, GenerateOptions)
        n, dt = entry.teacher_shape
        gen = {"conv": "conv", "attention": "attn", "linear": "lin"}[o.generator]
        return Words(
            f"{entry.weight:g} * sum_masked(({gen}(mask(align(s))) - t)^2) / (B * {o.mask:g})",
            f"sum over {o.masked_tokens} masked of {n} tokens x {dt} channels / "
            f"(batch x {o.mask:g})",
            resample_notes(o),
        )

    def module_class(self) -> type[nn.Module]:
        from vitkdl.terms.generate.module import Generate

        return Generate

    def module(self, entry: TermPlan) -> nn.Module:
        o = options_of(entry, GenerateOptions)
        assert entry.teacher_width is not None
        from vitkdl.terms.generate.module import Generate

        return Generate(
            entry.student_width,
            entry.teacher_width,
            mask=o.mask,
            generator=o.generator,
            weight=entry.weight,
            align=o.align,
            heads=o.heads,
            grid=o.grid,
        )

    def loss(self, module: nn.Module, entry: TermPlan, inputs: StepInputs) -> Tensor:
        student, teacher = paired_taps(entry, inputs)
        return module(student, teacher_on_student_grid(entry, teacher))

    def reference(self, entry: TermPlan) -> nn.Module | None:
        o = options_of(entry, GenerateOptions)
        if o.generator != "conv" or entry.teacher_width is None:
            return None
        from vitkdl.terms.generate.module import HandGenerate

        return HandGenerate(entry.student_width, entry.teacher_width, o.mask, o.align, entry.weight)


KIND = Generate()
