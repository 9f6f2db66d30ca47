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

import functools
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel

from vitkdl.errors import Diagnostic, error
from vitkdl.spec import PairedTermSpec
from vitkdl.terms.base import (
    AdapterPlan,
    Kind,
    StepInputs,
    TermPlan,
    Words,
    align,
    check_resample,
    linear,
    paired_taps,
    resample_notes,
    resample_options,
    teacher_on_student_grid,
    term_plan,
)

if TYPE_CHECKING:
    from torch import Tensor, nn

    from vitkdl.checks import Context
    from vitkdl.planner import Plan

MLP_RATIO = 4  # the attention generator's block, as a timm ViT block


class GenerateSpec(PairedTermSpec):
    """``generate S -> T { mask, generator, align, weight }``: masked feature generation."""

    kind: Literal["generate"] = "generate"
    mask: float = 0.5
    generator: Literal["conv", "attention", "linear"] = "conv"
    align: Literal["linear", "identity"] = "linear"
    resample: Literal["bilinear", "area", "none"] = "bilinear"
    weight: float = 3e-6


class GenerateOptions(BaseModel):
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


def masked(tokens: int, mask: float) -> int:
    """Tokens masked per sample, as the authors count them: ``N - int(N * (1 - mask))``."""
    return tokens - int(tokens * (1 - mask))


def generator_plan(kind: str, width: int, heads: int, tokens: int) -> AdapterPlan:
    """The generator as numbers (forward FLOPs per image over ``tokens`` tokens)."""
    if kind == "conv":
        conv = 9 * width * width + width
        return AdapterPlan(
            name="generator",
            module="conv3x3_pair",
            dims=(width,),
            params=2 * conv,
            flops=2 * 2 * 9 * width * width * tokens,
        )
    if kind == "attention":
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
            student=sp,
            teacher=tp,
            student_shape=[n, ds],
            teacher_shape=[n, dt],
            adapters=adapters,
            elements=k * dt / term.mask,
            options=options,
        )

    def words(self, entry: TermPlan) -> Words:
        o = GenerateOptions.model_validate(entry.options)
        n, dt = entry.teacher_shape
        gen = {"conv": "conv", "attention": "attn", "linear": "lin"}[o.generator]
        return Words(
            f"{entry.weight:g} * sum_masked(({gen}(mask(align(s))) - t)^2) / (B * {o.mask:g})",
            f"sum over {o.masked_tokens} masked of {n} tokens x {dt} channels / "
            f"(batch x {o.mask:g})",
            resample_notes(o),
        )

    def module_class(self) -> type[nn.Module]:
        return module_class()

    def module(self, entry: TermPlan, plan: Plan) -> nn.Module:
        o = GenerateOptions.model_validate(entry.options)
        assert plan.teacher is not None
        return module_class()(
            plan.student.width,
            plan.teacher.width,
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

    def reference(self, entry: TermPlan, plan: Plan) -> nn.Module | None:
        o = GenerateOptions.model_validate(entry.options)
        if o.generator != "conv" or plan.teacher is None:
            return None
        return reference_class()(
            plan.student.width, plan.teacher.width, o.mask, o.align, entry.weight
        )


KIND = Generate()


# --------------------------------------------------------------------------------------------
# The torch module (built on first use: the declarations above never import torch)


@functools.cache
def module_class() -> type[nn.Module]:
    """:class:`Generate`, the loss module (``from vitkdl.strategies import Generate``)."""
    from collections.abc import Sequence

    import torch
    from torch import nn

    from vitkdl.terms._torch import adapter_input, as_list, check_tokens, make_align

    class Generate(nn.Module):
        r"""ViTKD deep feature generation.

        The student's patch tokens are aligned to the teacher width
        (:math:`A = f(S) \in \mathbb{R}^{B\times N\times D_t}`), then for each sample exactly
        :math:`k = N - \lfloor N (1-\lambda) \rfloor` tokens, chosen uniformly at random, are
        replaced by a learned mask token :math:`m` (``[1, 1, Dt]``, zero-initialised). A
        generator :math:`G` predicts the teacher's tokens :math:`T` and only masked tokens
        count:

        .. math::
            \mathcal{L} = \beta \, \frac{1}{B\lambda} \sum_{b,n} M_{b,n} \sum_c
            \big(G(\tilde A)_{b,n,c} - T_{b,n,c}\big)^2,
            \qquad \tilde A = M\,m + (1-M)\,A

        ``generator``: ``"conv"`` (the paper's: Conv3x3 - ReLU - Conv3x3 on the row-major
        :math:`\sqrt N \times \sqrt N` grid, or ``grid``), ``"attention"`` (a timm ViT block
        at width :math:`D_t` with ``heads`` heads over all tokens) or ``"linear"`` (per token).
        A fresh mask is drawn on every call unless one is passed in.

        Args:
            student_dim: student width :math:`D_s`.
            teacher_dim: teacher width :math:`D_t`.
            mask: masking ratio :math:`\lambda` in ``(0, 1]``.
            generator: ``"conv"``, ``"attention"`` or ``"linear"``.
            weight: the multiplier :math:`\beta` (3e-6 in the paper).
            align: ``"linear"`` (default), ``"identity"``, ``"mlp"`` or ``"auto"``.
            heads: heads of the ``attention`` generator (default: :math:`D_t / 64`, at least 1).
            grid: the token grid ``(h, w)`` for ``conv`` (default: square).
        """

        def __init__(
            self,
            student_dim: int,
            teacher_dim: int,
            mask: float = 0.5,
            generator: str = "conv",
            weight: float = 3e-6,
            align: str = "linear",
            heads: int | None = None,
            grid: tuple[int, int] | None = None,
        ) -> None:
            super().__init__()
            if not 0.0 < float(mask) <= 1.0:
                raise ValueError(f"Generate: mask ratio must be in (0, 1], got {mask}")
            if generator not in ("conv", "attention", "linear"):
                raise ValueError(
                    f"Generate: unknown generator {generator!r}; expected "
                    "'conv', 'attention' or 'linear'"
                )
            self.student_dim: int = int(student_dim)
            self.teacher_dim: int = int(teacher_dim)
            self.mask_ratio: float = float(mask)
            self.weight: float = float(weight)
            self.kind: str = generator
            self.grid: tuple[int, int] | None = tuple(grid) if grid else None  # type: ignore
            self.align = make_align(align, self.student_dim, self.teacher_dim)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, self.teacher_dim))
            d = self.teacher_dim
            self.generator: nn.Module
            if generator == "conv":
                self.generator = nn.Sequential(
                    nn.Conv2d(d, d, kernel_size=3, padding=1),
                    nn.ReLU(inplace=False),
                    nn.Conv2d(d, d, kernel_size=3, padding=1),
                )
            elif generator == "attention":
                from timm.models.vision_transformer import Block

                self.generator = Block(
                    d, num_heads=heads or max(1, d // 64), mlp_ratio=MLP_RATIO, qkv_bias=True
                )
            else:
                self.generator = nn.Linear(d, d)

        def num_masked(self, n_tokens: int) -> int:
            """Number of tokens masked per sample: ``N - int(N * (1 - mask_ratio))``."""
            return masked(n_tokens, self.mask_ratio)

        def make_mask(
            self, batch: int, n_tokens: int, device: torch.device | str | None = None
        ) -> Tensor:
            """A fresh bool mask ``[B, N]`` (True = masked) with exactly ``num_masked(N)`` True
            entries per row, uniformly at random (``rand(B, N).argsort(1)``: no data-dependent
            shapes, compile-friendly)."""
            k = self.num_masked(n_tokens)
            perm = torch.rand(batch, n_tokens, device=device).argsort(dim=1)
            return perm < k

        @staticmethod
        def grid_side(n_tokens: int) -> int:
            """Side of the square token grid; raises ``ValueError`` if ``n_tokens`` is not a
            square."""
            side = math.isqrt(n_tokens)
            if side * side != n_tokens:
                raise ValueError(
                    f"Generate: token count {n_tokens} is not a perfect square; the conv "
                    "generator needs a sqrt(N) x sqrt(N) patch grid (pass patch tokens only)"
                )
            return side

        def forward(
            self,
            student: Sequence[Tensor] | Tensor,
            teacher: Sequence[Tensor] | Tensor,
            mask: Tensor | None = None,
        ) -> Tensor:
            """The generation loss for one ``[B, N, Ds]`` student and one ``[B, N, Dt]``
            teacher tensor (bare or in a list of one); ``mask`` (bool ``[B, N]``, True =
            masked) pins the mask."""
            s_list, t_list = as_list(student), as_list(teacher)
            if len(s_list) != 1 or len(t_list) != 1:
                raise ValueError(
                    f"Generate: expects exactly one tap per side, got "
                    f"{len(s_list)} student and {len(t_list)} teacher"
                )
            s, t = s_list[0], t_list[0]
            check_tokens("Generate", s, t)
            b, n = s.shape[0], s.shape[1]
            if mask is None:
                mask = self.make_mask(b, n, device=s.device)
            elif tuple(mask.shape) != (b, n):
                raise ValueError(
                    f"Generate: mask must be [B, N] = {(b, n)}, got {tuple(mask.shape)}"
                )
            m = mask.to(torch.bool).unsqueeze(-1)  # [B, N, 1]
            # Adapter and generator run in the step's precision (bf16 convolutions under
            # autocast); the error and its reduction in fp32.
            x = self.align(adapter_input(s, self))
            x = torch.where(m, self.mask_token.to(x.dtype), x)  # [B, N, Dt]
            y = self._generate(x).float()
            sq = (y - t.detach().float()).pow(2) * m
            return sq.sum() / (b * self.mask_ratio) * self.weight

        def _generate(self, x: Tensor) -> Tensor:
            if self.kind != "conv":
                return self.generator(x)
            b, n, d = x.shape
            h, w = self.grid or (self.grid_side(n), self.grid_side(n))
            grid = x.transpose(1, 2).reshape(b, d, h, w)  # row-major
            return self.generator(grid).flatten(2).transpose(1, 2)

        def extra_repr(self) -> str:
            return f"mask_ratio={self.mask_ratio:g}, generator={self.kind}, weight={self.weight:g}"

    Generate.__qualname__ = "Generate"
    return Generate


@functools.cache
def reference_class() -> type[nn.Module]:
    """Deep generation as users write it: MAE-style random masking (scatter), a conv
    generator, MSE on the masked tokens, summed, / (B x ratio); written independently of
    :class:`Generate` (bench's hook-based peer)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from vitkdl.terms._torch import make_align

    class HandGenerate(nn.Module):
        def __init__(
            self,
            d_s: int,
            d_t: int,
            ratio: float = 0.5,
            align: str = "linear",
            weight: float = 3e-6,
        ) -> None:
            super().__init__()
            self.proj = make_align(align, d_s, d_t)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, d_t))
            self.generation = nn.Sequential(
                nn.Conv2d(d_t, d_t, 3, padding=1), nn.ReLU(), nn.Conv2d(d_t, d_t, 3, padding=1)
            )
            self.ratio, self.weight = ratio, weight

        def forward(
            self, student: list[Tensor], teacher: list[Tensor], mask: Tensor | None = None
        ) -> Any:
            x = self.proj(student[0].float())
            b, n, d = x.shape
            side = int(n**0.5)
            if mask is None:
                n_mask = n - int(n * (1 - self.ratio))
                ids = torch.rand(b, n, device=x.device).argsort(dim=1)
                mask = torch.zeros(b, n, device=x.device).scatter_(1, ids[:, :n_mask], 1.0)
            m = mask.float().unsqueeze(-1)
            x = x * (1 - m) + self.mask_token * m
            x = x.transpose(1, 2).reshape(b, d, side, side)
            y = self.generation(x).flatten(2).transpose(1, 2)
            loss = (F.mse_loss(y, teacher[0].float(), reduction="none") * m).sum()
            return self.weight * loss / (b * self.ratio)

    return HandGenerate
