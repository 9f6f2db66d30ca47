"""``mimic``: the student's features regress the teacher's (ViTKD's shallow-layer guideline).

``mimic student.blocks[0, 1] -> teacher.blocks[0, 1] { align = linear  loss = mse }``

- ``loss = mse`` (the paper's): each student tap through its own adapter (``align``: a
  ``Linear(Ds, Dt)`` by default), squared error summed over tokens and channels, / batch.
- ``loss = mse_mean``: the same, mean over tokens and channels (scale-free).
- ``loss = relation`` (the paper's alternative): the squared error between the two models'
  token-similarity matrices (cosine similarity of every pair of patch tokens), summed / batch;
  no adapter, so any widths pair.
- ``loss = manifold`` (Hao et al., *Learning Efficient Vision Transformers via Fine-Grained
  Manifold Distillation*, NeurIPS 2022): on L2-normalised patch tokens, three relation maps
  (cosine similarities), each compared by its mean squared difference: intra-image (N x N per
  image, weight ``intra``), inter-image (B x B per token position, ``inter``) and K random
  tokens drawn from the whole batch (K x K, ``random``, K = ``samples``; the same tokens on
  both sides, drawn from torch's generator inside the step, whose state a checkpoint keeps).
  ``intra * L_intra + inter * L_inter + random * L_random``, averaged over the paired layers,
  times ``weight`` (1 by default under this loss: the three coefficients carry the scale).
  No adapter: the maps are width-free. As the authors' code (Hao840/manifold-distillation,
  ``layer_mf_loss``): ``F.normalize`` over channels, ``(M_t - M_s)^2`` averaged over each
  map's entries, ``randperm(B * N)[:K]``, their ImageNet setting ``--w-patch 4 --w-sample 0.1
  --w-rand 0.2 --K 192`` (intra 4, inter 0.1, random 0.2, 192 samples); fewer tokens than K
  in a batch use them all.
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

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from vitkdl.errors import Diagnostic, error, warning
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
    grid_words,
    grids,
    options_of,
    paired_taps,
    resample_notes,
    resample_options,
    teacher_on_student_grid,
    term_plan,
)

if TYPE_CHECKING:
    from torch import Tensor, nn


class MimicSpec(PairedTermSpec):
    """``mimic S -> T { align, loss, heads, weight }``: feature mimicking."""

    kind: Literal["mimic"] = "mimic"
    align: Literal["linear", "identity", "mlp"] = "linear"
    loss: Literal["mse", "mse_mean", "relation", "kl", "manifold"] = "mse"
    heads: Literal["pair", "mean"] = "pair"
    resample: Literal["bilinear", "area", "none"] = "bilinear"
    # loss = manifold: the weights of its three relation maps and the random tokens drawn
    intra: float = Field(default=4.0, ge=0)
    inter: float = Field(default=0.1, ge=0)
    random: float = Field(default=0.2, ge=0)
    samples: int = Field(default=192, ge=1)
    weight: float = 3e-5

    @model_validator(mode="before")
    @classmethod
    def _manifold_weight(cls, data: Any) -> Any:
        """Under ``loss = manifold`` an unwritten weight is 1: the three map weights carry
        the scale (the paper's 3e-5 belongs to ``mse``'s sum over tokens and channels)."""
        if isinstance(data, dict) and data.get("loss") == "manifold" and "weight" not in data:
            return {**data, "weight": 1.0}
        return data


#: The fields only ``loss = manifold`` reads.
MANIFOLD_FIELDS = ("intra", "inter", "random", "samples")


class MimicOptions(KindOptions):
    align: str | None  # the adapters (losses on features)
    loss: str
    heads: str | None  # how attention heads pair (loss = kl)
    layers: int
    tokens: int
    # loss = manifold: the weights of the intra-image, inter-image and random-token relation
    # maps, and how many tokens the random map draws (None under the other losses)
    intra: float | None = None
    inter: float | None = None
    random: float | None = None
    samples: int | None = None
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
        if term.loss != "manifold":
            for name in MANIFOLD_FIELDS:
                if name in term.spans:
                    yield warning(
                        f"{name} is read by loss = manifold only, not by loss = {term.loss}",
                        term.at(name),
                        hint="write loss = manifold, or remove it",
                    )
        if term.loss in ("relation", "kl", "manifold") and "align" in term.spans:
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
        elif term.loss == "manifold":
            shapes = [n, n], [n, n]
            elements = 1  # mean-reduced maps, averaged over the layers
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
            **(
                {name: getattr(term, name) for name in MANIFOLD_FIELDS}
                if term.loss == "manifold"
                else {}
            ),
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
            ctx,
            student=sp,
            teacher=tp,
            student_shape=shapes[0],
            teacher_shape=shapes[1],
            adapters=adapters,
            elements=elements,
            options=options,
        )

    def words(self, entry: TermPlan) -> Words:
        o = options_of(entry, MimicOptions)
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
        if o.loss == "manifold":
            m = o
            return Words(
                f"{w} * mean_layers({m.intra:g} * mean((R(s) - R(t))^2)_intra + "
                f"{m.inter:g} * mean((R(s) - R(t))^2)_inter + "
                f"{m.random:g} * mean((R(s) - R(t))^2)_random),  R = cos of tokens",
                f"intra: {n} x {n} per image; inter: B x B per token position; random: "
                f"{m.samples} x {m.samples} over {m.samples} tokens drawn from the batch (the "
                "same on both sides); each map's mean, averaged over "
                f"{o.layers} layer{'s' if o.layers != 1 else ''}",
                notes,
            )
        maps = "per-head maps" if o.heads == "pair" else "maps averaged over heads"
        return Words(
            f"{w} * mean(KL(A_t || A_s))",
            f"{maps}: KL per query token, mean over batch, heads and queries, summed over layers",
        )

    def module_class(self) -> type[nn.Module]:
        from vitkdl.terms.mimic.module import Mimic

        return Mimic

    def module(self, entry: TermPlan) -> nn.Module:
        o = options_of(entry, MimicOptions)
        assert entry.teacher_width is not None
        from vitkdl.terms.mimic.module import Mimic

        return Mimic(
            [entry.student_width] * o.layers,
            [entry.teacher_width] * o.layers,
            align=o.align or "identity",
            loss=o.loss,
            heads=o.heads or "pair",
            weight=entry.weight,
            **(
                {name: getattr(o, name) for name in MANIFOLD_FIELDS} if o.loss == "manifold" else {}
            ),
        )

    def loss(self, module: nn.Module, entry: TermPlan, inputs: StepInputs) -> Tensor:
        student, teacher = paired_taps(entry, inputs)
        return module(student, teacher_on_student_grid(entry, teacher))

    def reference(self, entry: TermPlan) -> nn.Module | None:
        o = options_of(entry, MimicOptions)
        if o.loss == "manifold":
            from vitkdl.terms.mimic.module import HandManifold

            assert o.intra is not None and o.inter is not None
            assert o.random is not None and o.samples is not None
            return HandManifold(o.intra, o.inter, o.random, o.samples, entry.weight)
        if o.loss not in ("mse", "mse_mean") or entry.teacher_width is None:
            return None
        from vitkdl.terms.mimic.module import HandMimic

        return HandMimic(
            o.layers,
            entry.student_width,
            entry.teacher_width,
            o.align or "identity",
            o.loss,
            entry.weight,
        )


KIND = Mimic()


def _pooled(term: MimicSpec) -> bool:
    """Whether the term mimics the pooled, normalised feature (``fc_norm``) on both sides."""
    return all(x.point == "fc_norm" for x in (*term.student, *term.teacher))
