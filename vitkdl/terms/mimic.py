"""``mimic``: the student's features regress the teacher's (ViTKD's shallow-layer guideline).

``mimic student.blocks[0, 1] -> teacher.blocks[0, 1] { align = linear  loss = mse }``

- ``loss = mse`` (the paper's): each student tap through its own adapter (``align``: a
  ``Linear(Ds, Dt)`` by default), squared error summed over tokens and channels, / batch.
- ``loss = mse_mean``: the same, mean over tokens and channels (scale-free).
- ``loss = relation`` (the paper's alternative): the squared error between the two models'
  token-similarity matrices (cosine similarity of every pair of patch tokens), summed / batch;
  no adapter, so any widths pair.
- ``loss = kl`` on attention maps (``blocks[i].attn_map``): KL(teacher || student) of each
  query token's attention distribution over the patch tokens, mean over batch, heads and
  queries; heads are paired when both models have as many, ``heads = mean`` averages them
  first otherwise.

A teacher on another token grid (another patch size or resolution: a DINOv2 teacher at patch
14, a 384-px teacher) has its tapped patch tokens resampled to the student's grid in the step,
``resample = bilinear`` (the default) or ``area``; ``resample = none`` makes a mismatch an
error. Attention maps are not resampled: ``loss = kl`` between different grids is an error
(a map's rows and columns both index tokens, and a resampled map is no longer the attention
the teacher computed).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel

from vitkdl.errors import Diagnostic, error, warning
from vitkdl.spec import PairedTermSpec
from vitkdl.terms.base import (
    AdapterPlan,
    Kind,
    StepInputs,
    TermPlan,
    Words,
    align,
    check_resample,
    grid_words,
    grids,
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


class MimicSpec(PairedTermSpec):
    """``mimic S -> T { align, loss, heads, weight }``: feature mimicking."""

    kind: Literal["mimic"] = "mimic"
    align: Literal["linear", "identity", "mlp"] = "linear"
    loss: Literal["mse", "mse_mean", "relation", "kl"] = "mse"
    heads: Literal["pair", "mean"] = "pair"
    resample: Literal["bilinear", "area", "none"] = "bilinear"
    weight: float = 3e-5


class MimicOptions(BaseModel):
    align: str | None  # the adapters (losses on features)
    loss: str
    heads: str | None  # how attention heads pair (loss = kl)
    layers: int
    tokens: int
    # When the teacher's grid differs from the student's: how its taps are resampled.
    resample: str | None = None
    teacher_grid: tuple[int, int] | None = None
    student_grid: tuple[int, int] | None = None


def _maps(term: MimicSpec) -> bool:
    return any(t.sub == "attn_map" for t in (*term.student, *term.teacher))


class Mimic(Kind):
    keyword = "mimic"
    summary = "the student's features regress the teacher's (shallow layers in ViTKD)"
    spec = MimicSpec
    paired = True

    def check(self, term: MimicSpec, ctx: Context) -> Iterable[Diagnostic]:
        s, t = ctx.student, ctx.teacher
        if (term.loss == "kl") != _maps(term):
            if term.loss == "kl":
                yield error(
                    "loss = kl compares attention maps: tap blocks[i].attn_map on both sides",
                    term.at("loss"),
                    hint="or use loss = mse on features",
                )
            else:
                yield error(
                    f"attention maps are compared with loss = kl, not {term.loss}",
                    term.at("loss") if "loss" in term.spans else term.span,
                    hint="write loss = kl",
                )
            return
        if term.loss == "kl" and not all(
            x.sub == "attn_map" for x in (*term.student, *term.teacher)
        ):
            yield error(
                "loss = kl pairs attention maps with attention maps",
                term.span,
                hint="tap blocks[i].attn_map on both sides",
            )
            return
        if term.loss in ("relation", "kl") and "align" in term.spans:
            yield warning(f"align is not used by loss = {term.loss} (no adapter)", term.at("align"))
        if s is None or t is None:
            return
        pair = grids(ctx)
        if term.loss == "kl" and pair is not None and pair[0] != pair[1]:
            yield error(
                f"mimic '{term.name}' compares attention maps, and the teacher's token grid "
                f"{grid_words(pair[0])} differs from the student's {grid_words(pair[1])}",
                term.span,
                expected="attention maps on one token grid (maps are not resampled)",
                hint="mimic tokens across grids (blocks[i] or blocks[i].attn, loss = mse), "
                "or give both models the same grid (img_size / patch_size)",
            )
        elif not _pooled(term):  # one pooled token per image has no grid to resample
            yield from check_resample(term, ctx)
        if (
            term.loss in ("mse", "mse_mean")
            and term.align == "identity"
            and (s.embed_dim != t.embed_dim)
        ):
            yield error(
                f"align = identity needs equal widths, the student is {s.embed_dim} "
                f"and the teacher {t.embed_dim} wide",
                term.at("align"),
                hint="use align = linear",
            )
        if term.loss == "kl" and term.heads == "pair" and s.num_heads != t.num_heads:
            yield error(
                f"heads = pair needs as many heads on both sides: the student has "
                f"{s.num_heads}, the teacher {t.num_heads}",
                term.at("heads") if "heads" in term.spans else term.span,
                hint="write heads = mean (average the heads' maps first)",
            )

    def reads_pooled(self, term: MimicSpec) -> bool:
        return term.loss in ("mse", "mse_mean")  # relation and kl need a token grid

    def plan(self, term: MimicSpec, ctx: Context) -> TermPlan:
        s, t = ctx.student, ctx.teacher
        assert s is not None and t is not None
        sp, tp = ctx.taps[(term.name, "student")], ctx.taps[(term.name, "teacher")]
        assert sp is not None and tp is not None
        pooled = _pooled(term)  # fc_norm on both sides (checks.check_pooled_taps): one token
        n, layers = (1 if pooled else s.num_patches), len(sp)
        adapters: list[AdapterPlan] = []
        if term.loss in ("mse", "mse_mean"):
            for i in range(layers):
                adapters += align(term.align, f"align.{i}", s.embed_dim, t.embed_dim, n)
            shapes = [n, s.embed_dim], [n, t.embed_dim]
            elements = layers * n * t.embed_dim if term.loss == "mse" else layers
        elif term.loss == "relation":
            shapes = [n, n], [n, n]
            elements = layers * n * n
        else:
            heads = term.heads == "pair"
            shapes = (
                [s.num_heads, n, n] if heads else [n, n],
                [t.num_heads, n, n] if heads else [n, n],
            )
            elements = layers
        features = term.loss in ("mse", "mse_mean")
        options = MimicOptions(
            align=term.align if features else None,
            loss=term.loss,
            heads=term.heads if term.loss == "kl" else None,
            layers=layers,
            tokens=n,
            **(
                {"resample": None, "teacher_grid": None, "student_grid": None}
                if pooled
                else resample_options(term.resample, ctx)
            ),
        )
        return term_plan(
            term,
            student=sp,
            teacher=tp,
            student_shape=shapes[0],
            teacher_shape=shapes[1],
            adapters=adapters,
            elements=elements,
            options=options,
        )

    def words(self, entry: TermPlan) -> Words:
        o = MimicOptions.model_validate(entry.options)
        w, n = f"{entry.weight:g}", o.tokens
        notes = resample_notes(o)
        if o.loss == "mse":
            return Words(
                f"{w} * sum((align(s) - t)^2) / B",
                f"sum over {o.layers} x {n} tokens x {entry.teacher_shape[-1]} channels / batch",
                notes,
            )
        if o.loss == "mse_mean":
            return Words(
                f"{w} * sum_layers mean((align(s) - t)^2)",
                "mean over tokens and channels, summed over layers",
                notes,
            )
        if o.loss == "relation":
            return Words(
                f"{w} * sum((R(s) - R(t))^2) / B,  R(x) = cos(x_i, x_j)",
                f"sum over {o.layers} x {n} x {n} token pairs / batch",
                notes,
            )
        maps = "per-head maps" if o.heads == "pair" else "maps averaged over heads"
        return Words(
            f"{w} * mean(KL(A_t || A_s))",
            f"{maps}: KL per query token, mean over batch, heads and queries, summed over layers",
        )

    def module_class(self) -> type[nn.Module]:
        return module_class()

    def module(self, entry: TermPlan, plan: Plan) -> nn.Module:
        o = MimicOptions.model_validate(entry.options)
        teacher = plan.teacher
        assert teacher is not None
        return module_class()(
            [plan.student.width] * o.layers,
            [teacher.width] * o.layers,
            align=o.align or "identity",
            loss=o.loss,
            heads=o.heads or "pair",
            weight=entry.weight,
        )

    def loss(self, module: nn.Module, entry: TermPlan, inputs: StepInputs) -> Tensor:
        student, teacher = paired_taps(entry, inputs)
        return module(student, teacher_on_student_grid(entry, teacher))

    def reference(self, entry: TermPlan, plan: Plan) -> nn.Module | None:
        o = MimicOptions.model_validate(entry.options)
        if o.loss not in ("mse", "mse_mean") or plan.teacher is None:
            return None
        return reference_class()(
            o.layers,
            plan.student.width,
            plan.teacher.width,
            o.align or "identity",
            o.loss,
            entry.weight,
        )


KIND = Mimic()


# --------------------------------------------------------------------------------------------
# The torch module (built on first use: the declarations above never import torch)


@functools.cache
def module_class() -> type[nn.Module]:
    """:class:`Mimic`, the loss module (``from vitkdl.strategies import Mimic``)."""
    from collections.abc import Sequence

    import torch
    import torch.nn.functional as F
    from torch import nn

    from vitkdl.terms._torch import adapter_input, as_list, check_tokens, make_align

    class Mimic(nn.Module):
        r"""ViTKD feature mimicking.

        For each paired layer :math:`l` the student patch tokens :math:`S_l \in
        \mathbb{R}^{B\times N\times D_s}` go through their own adapter :math:`f_l`
        (``Linear(Ds, Dt)`` by default) and are compared with the teacher tokens
        :math:`T_l \in \mathbb{R}^{B\times N\times D_t}`:

        ``loss="mse"`` (the paper's):
        :math:`\alpha \sum_l \frac{1}{B}\sum_{b,n,c} (f_l(S_l) - T_l)_{b,n,c}^2`;
        ``loss="mse_mean"``: :math:`\alpha \sum_l \operatorname{mean}(f_l(S_l) - T_l)^2`;
        ``loss="relation"``: :math:`\alpha \sum_l \frac{1}{B}\sum (R(S_l) - R(T_l))^2` with
        :math:`R(X)_{ij} = \cos(x_i, x_j)` (no adapter);
        ``loss="kl"``: attention maps ``[B, H, N, N]`` (rows are distributions),
        :math:`\alpha \sum_l \operatorname{mean}_{b,h,i} \mathrm{KL}(A^t_{bhi} \| A^s_{bhi})`,
        heads averaged first with ``heads="mean"``.

        Args:
            student_dims: student width per paired layer (an int means a single layer).
            teacher_dims: teacher width per paired layer (an int is broadcast).
            align: ``"linear"`` (default), ``"identity"`` (widths must match), ``"mlp"`` or
                ``"auto"`` (identity where widths match, else linear). Unused by ``relation``
                and ``kl``.
            loss: ``"mse"``, ``"mse_mean"``, ``"relation"`` or ``"kl"``.
            heads: ``"pair"`` or ``"mean"`` (``kl`` only).
            weight: the multiplier :math:`\alpha` (3e-5 in the paper, for ``"mse"``).
        """

        def __init__(
            self,
            student_dims: Sequence[int] | int,
            teacher_dims: Sequence[int] | int,
            align: str = "linear",
            loss: str = "mse",
            weight: float = 3e-5,
            heads: str = "pair",
        ) -> None:
            super().__init__()
            s_dims = [student_dims] if isinstance(student_dims, int) else list(student_dims)
            t_dims = [teacher_dims] if isinstance(teacher_dims, int) else list(teacher_dims)
            if isinstance(student_dims, int) and len(t_dims) > 1:
                s_dims = s_dims * len(t_dims)
            if isinstance(teacher_dims, int) and len(s_dims) > 1:
                t_dims = t_dims * len(s_dims)
            if len(s_dims) != len(t_dims):
                raise ValueError(
                    f"Mimic: {len(s_dims)} student widths but {len(t_dims)} teacher widths"
                )
            if not s_dims:
                raise ValueError("Mimic: needs at least one paired layer")
            if loss not in ("mse", "mse_mean", "relation", "kl"):
                raise ValueError(
                    f"Mimic: unknown loss {loss!r}; expected 'mse', 'mse_mean', 'relation' or 'kl'"
                )
            if heads not in ("pair", "mean"):
                raise ValueError(f"Mimic: heads must be 'pair' or 'mean', got {heads!r}")
            self.student_dims: list[int] = s_dims
            self.teacher_dims: list[int] = t_dims
            self.loss_kind: str = loss
            self.heads: str = heads
            self.weight: float = float(weight)
            adapters = loss in ("mse", "mse_mean")
            self.align = nn.ModuleList(
                make_align(align, ds, dt) if adapters else nn.Identity()
                for ds, dt in zip(s_dims, t_dims, strict=True)
            )

        @property
        def num_layers(self) -> int:
            """Number of paired layers."""
            return len(self.align)

        def forward(
            self, student: Sequence[Tensor] | Tensor, teacher: Sequence[Tensor] | Tensor
        ) -> Tensor:
            """The loss for one tensor per paired layer on each side (tokens ``[B, N, D]``;
            attention maps ``[B, H, N, N]`` under ``kl``)."""
            s_list, t_list = as_list(student), as_list(teacher)
            if len(s_list) != len(self.align) or len(t_list) != len(self.align):
                raise ValueError(
                    f"Mimic: expected {len(self.align)} tensors per side, got "
                    f"{len(s_list)} student and {len(t_list)} teacher"
                )
            total = s_list[0].new_zeros((), dtype=torch.float32)
            for adapter, s, t in zip(self.align, s_list, t_list, strict=True):
                total = total + self._layer(adapter, s, t.detach())
            return total * self.weight

        def _layer(self, adapter: nn.Module, s: Tensor, t: Tensor) -> Tensor:
            if self.loss_kind == "kl":
                s, t = s.float(), t.float()
                if self.heads == "mean":
                    s, t = s.mean(dim=1), t.mean(dim=1)
                # Maps over patch tokens (prefix columns dropped): rows renormalised to sum 1.
                s = s / s.sum(dim=-1, keepdim=True).clamp_min(1e-12)
                t = t / t.sum(dim=-1, keepdim=True).clamp_min(1e-12)
                log_s = s.clamp_min(1e-12).log()
                log_t = t.clamp_min(1e-12).log()
                return (t * (log_t - log_s)).sum(dim=-1).mean()
            check_tokens("Mimic", s, t)
            if self.loss_kind == "relation":
                # Similarities in fp32 even under autocast: their squared differences are small.
                with torch.autocast(s.device.type, enabled=False):
                    rs, rt = relation(s.float()), relation(t.float())
                    return (rs - rt).pow(2).sum() / s.shape[0]
            # The adapter runs in the step's precision (bf16 matmuls under autocast); the error
            # and its reduction in fp32.
            sq = (adapter(adapter_input(s, adapter)).float() - t.float()).pow(2)
            return sq.sum() / s.shape[0] if self.loss_kind == "mse" else sq.mean()

        def extra_repr(self) -> str:
            return f"loss={self.loss_kind!r}, weight={self.weight:g}"

    def relation(x: Tensor) -> Tensor:
        """Cosine similarity of every pair of tokens: ``[B, N, D] -> [B, N, N]``."""
        x = F.normalize(x, dim=-1)
        return x @ x.transpose(1, 2)

    Mimic.__qualname__ = "Mimic"
    return Mimic


@functools.cache
def reference_class() -> type[nn.Module]:
    """Shallow mimicking as in the authors' code: a projection per layer and sum-MSE / B,
    written independently of :class:`Mimic` (bench's hook-based peer)."""
    import torch.nn.functional as F
    from torch import nn

    from vitkdl.terms._torch import make_align

    class HandMimic(nn.Module):
        def __init__(
            self,
            layers: int,
            d_s: int,
            d_t: int,
            align: str = "linear",
            loss: str = "mse",
            weight: float = 3e-5,
        ) -> None:
            super().__init__()
            self.proj = nn.ModuleList(make_align(align, d_s, d_t) for _ in range(layers))
            self.loss, self.weight = loss, weight

        def forward(self, student: list[Tensor], teacher: list[Tensor]) -> Any:
            total: Any = 0.0
            for proj, s, t in zip(self.proj, student, teacher, strict=True):
                pred = proj(s.float())
                if self.loss == "mse":
                    total = total + F.mse_loss(pred, t.float(), reduction="sum") / s.shape[0]
                else:
                    total = total + F.mse_loss(pred, t.float())
            return self.weight * total

    return HandMimic


def _pooled(term: MimicSpec) -> bool:
    """Whether the term mimics the pooled, normalised feature (``fc_norm``) on both sides."""
    return all(x.point == "fc_norm" for x in (*term.student, *term.teacher))
