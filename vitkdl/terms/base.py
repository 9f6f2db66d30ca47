"""What every loss kind declares, and the plan data they share. Torch-free.

A kind (one folder per kind under :mod:`vitkdl.terms`: ``KEYWORD/__init__.py`` declares it,
``KEYWORD/module.py`` holds its torch modules) is a :class:`Kind` subclass with, top to
bottom: its keyword and one-line summary; its spec (a :class:`~vitkdl.nodes.TermSpec`
subclass: fields, defaults, bounds); what it consumes and whether it needs a teacher; its own
checks; its plan (a :class:`TermPlan`: tap points, shapes, both widths, adapters with
parameter and FLOP counts as numbers, the per-element coefficient, its typed options); its
words for ``explain`` (formula and reduction, from the plan entry alone); and its torch
module, built from the plan entry alone by importing ``module.py`` lazily, so that everything
above stays importable without torch. :class:`Context` (what checks and plans look at) lives
here too: this module imports nothing above the node types, so the spec, the checks and the
planner import the kinds and never the reverse.

The program feeds a term through :meth:`Kind.loss` with a :class:`StepInputs` (both models'
logits and taps, the targets), so no stage outside the kind knows how its module is called.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, SerializeAsAny

from vitkdl.errors import Diagnostic, error
from vitkdl.models import ModelFacts
from vitkdl.nodes import TermSpec
from vitkdl.plain import Plain as _Plain

if TYPE_CHECKING:  # typing only; torch is imported when a module is built
    from torch import Tensor, nn

# --------------------------------------------------------------------------------------------
# Plan data shared by all kinds


#: Where a tap reads, in a recipe's words (one vocabulary from the recipe to the program):
#: the points inside a block (:data:`~vitkdl.nodes.TAP_SUBPOINTS`) and the ends of a model.
Point = Literal["mlp", "attn", "attn_map", "norm", "fc_norm", "pre_logits"]

#: The points at a model's end, one per model (no block): the final norm's patch tokens, the
#: pooled normalised feature, and the pooled feature the classifier head reads.
END_POINTS = ("norm", "fc_norm", "pre_logits")


class TapPoint(_Plain):
    """One resolved tap of a model: a block's output after its FFN half (``mlp``, FFN-out;
    a recipe's ``blocks[i]`` or ``blocks[i].mlp``), the residual stream after a block's
    attention half (``attn``, MHA-out), a block's attention probabilities (``attn_map``), or
    the final norm's output (``norm``, block None): patch tokens only; or the pooled,
    normalised feature (``fc_norm``, block None), one token per image; or the pooled feature
    the classifier head reads (``pre_logits``, block None: timm's ``forward_head(x,
    pre_logits=True)``, after pooling, ``fc_norm`` and ``head_drop``; a distilled DeiT's is
    the mean of its two tokens, as timm's), ``[B, D]``."""

    block: int | None = None
    point: Point
    identity: bool = False
    """The point is ``nn.Identity`` on this model (``norm`` where ``global_pool = avg`` moves
    the final norm behind the pooling): it reads the last block's output."""

    @property
    def key(self) -> str:
        """The name of this tap in a model's pass: ``blocks.3``, ``blocks.3.attn``, ``norm``."""
        if self.point in END_POINTS:
            return self.point
        return f"blocks.{self.block}" + ("" if self.point == "mlp" else f".{self.point}")


class AdapterPlan(_Plain):
    """A module a term trains along with the student, as numbers: its kind of module, the
    dimensions that define it, its parameters and its forward FLOPs per image."""

    name: str
    module: Literal["linear", "mlp", "mask_token", "conv3x3_pair", "block"]
    dims: tuple[int, ...]
    params: int
    flops: int


class KindOptions(_Plain):
    """A kind's own options in its plan entry: each kind subclasses it with typed fields
    (``KDOptions(temperature=...)``); a kind without options leaves it empty."""


class TermPlan(_Plain):
    """One distillation term, resolved: data (keys and numbers), everything the kind's module
    is built from (:meth:`Kind.module` reads nothing else); ``explain`` asks the term's kind for
    its words."""

    name: str
    kind: str
    student_taps: list[str]  # as written
    teacher_taps: list[str]
    student: list[TapPoint]  # resolved, absolute block indices
    teacher: list[TapPoint]
    student_shape: list[int]  # per image per tap: [tokens, width], [heads, N, N], [classes]
    teacher_shape: list[int]
    adapters: list[AdapterPlan]
    adapter_params: int
    adapter_flops: int  # forward + backward per image
    weight: float
    elements: float  # what a sum-reduced loss sums over per image (1 for mean-reduced ones)
    coefficient: float  # weight x elements: its weight on the mean-reduced loss
    student_width: int  # the models' embedding widths (what adapters are built between)
    teacher_width: int | None  # None without a teacher
    options: SerializeAsAny[KindOptions]  # the kind's own options, typed (its subclass)


OptionsT = TypeVar("OptionsT", bound=KindOptions)


def options_of(entry: TermPlan, cls: type[OptionsT]) -> OptionsT:
    """A plan entry's options as its kind's type: a type check, not a re-validation (the
    kind's plan built them typed)."""
    if not isinstance(entry.options, cls):
        raise TypeError(
            f"{entry.kind} '{entry.name}': options are {type(entry.options).__name__}, "
            f"not {cls.__name__}"
        )
    return entry.options


@dataclass(frozen=True)
class Words:
    """What ``explain`` prints for a term: its formula, how it reduces, and notes (one line
    each, e.g. how the teacher's token grid is resampled)."""

    formula: str
    reduction: str
    notes: tuple[str, ...] = ()


@dataclass
class StepInputs:
    """What one step hands to every term: logits and taps of both models (keys as
    :attr:`TapPoint.key`; the teacher's are None/empty when no term reads the teacher) and the
    targets (class indices ``[B]`` or mixed soft labels ``[B, C]``).

    ``s_dist_logits`` is the student's distillation head (DeiT's distillation token) when a
    kind that reads it (:attr:`Kind.reads_dist_logits`) is in the recipe; ``s_logits`` is then
    the class head alone, otherwise the heads' mean (timm's inference rule).

    ``epoch`` is the training epoch the step belongs to, counted from 1 (a 0-dim float32
    tensor: a new epoch changes its value, never the compiled graph), for kinds whose weight
    follows the schedule (a warm-up); None where no training loop sets it (a lone loss call,
    the benchmark), which such kinds read as past their warm-up.

    ``t_head`` is the teacher's classifier head (frozen: no gradient reaches its parameters,
    gradients flow through it) when a kind that runs features through it
    (:attr:`Kind.reads_teacher_head`) is in the recipe, else None."""

    s_logits: Tensor
    s_taps: dict[str, Tensor]
    t_logits: Tensor | None
    t_taps: dict[str, Tensor]
    targets: Tensor
    s_dist_logits: Tensor | None = None
    epoch: Tensor | None = None
    t_head: nn.Module | None = None


# --------------------------------------------------------------------------------------------
# Adapters as numbers (and in words)


def linear(name: str, d_in: int, d_out: int, tokens: int) -> AdapterPlan:
    """``Linear(d_in, d_out)`` with bias, applied to ``tokens`` tokens per image."""
    return AdapterPlan(
        name=name,
        module="linear",
        dims=(d_in, d_out),
        params=d_in * d_out + d_out,
        flops=2 * d_in * d_out * tokens,
    )


def mlp(name: str, d_in: int, d_out: int, tokens: int) -> AdapterPlan:
    """``Linear(d_in, d_out) - GELU - Linear(d_out, d_out)`` on ``tokens`` tokens."""
    return AdapterPlan(
        name=name,
        module="mlp",
        dims=(d_in, d_out),
        params=d_in * d_out + d_out + d_out * d_out + d_out,
        flops=2 * (d_in * d_out + d_out * d_out) * tokens,
    )


def align(choice: str, name: str, d_in: int, d_out: int, tokens: int) -> list[AdapterPlan]:
    """The width adapter the ``align`` option ``choice`` builds (none for ``identity``)."""
    if choice == "identity":
        return []
    return [(mlp if choice == "mlp" else linear)(name, d_in, d_out, tokens)]


def adapter_words(a: AdapterPlan) -> str:
    """An adapter as a reader knows it: ``Linear(192, 384)``, ``Conv3x3(384, 384) - ...``."""
    d = a.dims
    if a.module == "linear":
        return f"Linear({d[0]}, {d[1]})"
    if a.module == "mlp":
        return f"Linear({d[0]}, {d[1]}) - GELU - Linear({d[1]}, {d[1]})"
    if a.module == "mask_token":
        return f"Parameter(1, 1, {d[0]})"
    if a.module == "conv3x3_pair":
        return f"Conv3x3({d[0]}, {d[0]}) - ReLU - Conv3x3({d[0]}, {d[0]})"
    return f"transformer Block({d[0]}, heads {d[1]}, mlp {d[2]})"


def points_words(points: Sequence[TapPoint]) -> str:
    """Resolved taps in words: ``blocks 0, 1``, ``blocks 0.attn, 1.attn``, ``norm``."""
    blocks = [
        str(p.block) + ("" if p.point == "mlp" else f".{p.point}")
        for p in points
        if p.point not in END_POINTS
    ]
    ends = {p.point: p for p in points if p.point in END_POINTS}
    parts = (["blocks " + ", ".join(blocks)] if blocks else []) + [
        f"{point} (identity on this model: the last block's output)" if p.identity else point
        for point, p in ends.items()
    ]
    return ", ".join(parts)


def term_plan(
    term: TermSpec,
    ctx: Context,
    *,
    student: Sequence[TapPoint] = (),
    teacher: Sequence[TapPoint] = (),
    student_shape: Sequence[int] = (),
    teacher_shape: Sequence[int] = (),
    adapters: Sequence[AdapterPlan] = (),
    elements: float = 1,
    options: KindOptions | None = None,
) -> TermPlan:
    """A :class:`TermPlan` from a term's spec, the models' facts (``ctx``: their widths) and
    what its kind resolved (adapters' FLOPs are forward FLOPs; forward + backward is three
    times that)."""
    written = getattr(term, "student", ()), getattr(term, "teacher", ())
    return TermPlan(
        name=term.name,
        kind=term.kind,
        student_taps=[t.text() for t in written[0]],
        teacher_taps=[t.text() for t in written[1]],
        student=list(student),
        teacher=list(teacher),
        student_shape=list(student_shape),
        teacher_shape=list(teacher_shape),
        adapters=list(adapters),
        adapter_params=sum(a.params for a in adapters),
        adapter_flops=3 * sum(a.flops for a in adapters),
        weight=term.weight,
        elements=elements,
        coefficient=term.weight * elements,
        student_width=ctx.student.embed_dim if ctx.student is not None else 0,
        teacher_width=ctx.teacher.embed_dim if ctx.teacher is not None else None,
        options=options if options is not None else KindOptions(),
    )


def logit_plan(term: TermSpec, ctx: Context, options: KindOptions) -> TermPlan:
    """The plan entry of a term that compares the two models' class distributions: one
    ``[classes]`` vector per image on each side (the checks made the class counts agree)."""
    classes = ctx.student.num_classes if ctx.student else 0
    return term_plan(term, ctx, student_shape=[classes], teacher_shape=[classes], options=options)


def check_temperature(term: Any) -> Iterable[Diagnostic]:
    """A softmax temperature must be > 0 (at the field)."""
    if term.temperature <= 0:
        yield error(f"temperature must be > 0, got {term.temperature}", term.at("temperature"))


def check_not_negative(term: Any, *names: str) -> Iterable[Diagnostic]:
    """Each named coefficient of a term must be >= 0 (at its field)."""
    for name in names:
        if getattr(term, name) < 0:
            yield error(f"{name} must be >= 0, got {getattr(term, name)}", term.at(name))


# --------------------------------------------------------------------------------------------
# What a kind's checks and plan look at


@dataclass(frozen=True)
class Context:
    """What the checks and the kinds look at: the spec, both models' facts and the
    strictness, and every paired term's taps resolved per side (None where a tap could not be
    resolved: its own error is reported once, and checks that need the taps skip the term).

    ``spec`` is the :class:`~vitkdl.spec.RecipeSpec`; it is typed loosely because the spec
    stage sits above the kinds (it asks their registry), and this module imports nothing
    above it."""

    spec: Any
    student: ModelFacts | None = None
    teacher: ModelFacts | None = None
    model_errors: tuple[Diagnostic, ...] = ()
    tap_warnings: tuple[Diagnostic, ...] = ()  # taps that resolve but read something else
    strict: bool = False
    taps: dict[tuple[str, str], list[TapPoint] | None] = field(default_factory=dict)

    def facts(self, side: str) -> ModelFacts | None:
        return self.student if side == "student" else self.teacher


# --------------------------------------------------------------------------------------------
# The kind protocol


class Kind:
    """One loss kind. Subclass it in the kind's own module and register an instance in
    :mod:`vitkdl.terms`; nothing outside those two places names the kind."""

    keyword: ClassVar[str]
    """How a recipe writes it (``distill { KEYWORD ... }``)."""
    summary: ClassVar[str]
    """One line for ``explain``, diagnostics and editors."""
    spec: ClassVar[type[TermSpec]]
    """The term's fields: a :class:`~vitkdl.nodes.TermSpec` subclass."""
    paired: ClassVar[bool] = False
    """Written with taps, ``KEYWORD student.TAPS -> teacher.TAPS``."""
    needs_teacher: ClassVar[bool] = True
    """Reads the teacher (its logits or taps)."""
    reads_teacher_logits: ClassVar[bool] = False
    """Compares the two models' class distributions (both heads need the same classes)."""
    default: ClassVar[bool] = False
    """Present in every recipe unless the recipe writes it (the student's label loss)."""
    reads_teacher_head: ClassVar[bool] = False
    """Runs student features through the teacher's frozen classifier head: the program hands
    the head over (:attr:`StepInputs.t_head`)."""
    reads_dist_logits: ClassVar[bool] = False
    """Trains the student's distillation head (DeiT's distillation token): the program then
    hands the two heads over separately (:class:`StepInputs`)."""

    def reads_pooled(self, term: Any) -> bool:
        """Whether the term compares features that need no token grid, so it can read the
        pooled, normalised feature (``fc_norm``, one token per image) on both sides."""
        return False

    def reads_pre_logits(self, term: Any) -> bool:
        """Whether the term reads the pooled feature the head reads (``pre_logits``): only
        such a term may tap it."""
        return False

    def check(self, term: Any, ctx: Context) -> Iterable[Diagnostic]:
        """The kind's own checks on a term (after taps were resolved into ``ctx.taps``)."""
        return ()

    def plan(self, term: Any, ctx: Context) -> TermPlan:
        """The term resolved against both models' facts."""
        raise NotImplementedError

    def words(self, entry: TermPlan) -> Words:
        """Formula and reduction, from the plan entry alone."""
        raise NotImplementedError

    def module_class(self) -> type[nn.Module]:
        """The class of the torch module that computes the term: a top-level class of the
        kind's ``module.py``, imported here (so importing the kind never imports torch)."""
        raise NotImplementedError

    def module(self, entry: TermPlan) -> nn.Module:
        """The torch module that computes the term, configured by its plan entry alone."""
        raise NotImplementedError

    def loss(self, module: nn.Module, entry: TermPlan, inputs: StepInputs) -> Tensor:
        """The term's value for one step: how the program feeds the module."""
        raise NotImplementedError

    def reference(self, entry: TermPlan) -> nn.Module | None:
        """An independent hand-written implementation (as users write it today, fed through
        :meth:`loss` like the module), for ``vitkdl bench``'s hook-based configuration and the
        tests; None when the kind has none."""
        return None

    def timm_task(self, entry: TermPlan) -> dict[str, Any] | None:
        """How timm's own training tasks (``timm.task``) express this term: the task's class
        name and keyword arguments (``{"task": "LogitDistillationTask", "temperature": ...}``;
        the label loss gives the task loss's weight and no class), or None when they cannot:
        ``vitkdl bench`` measures timm's task as a peer only when every term of a recipe maps
        onto one task."""
        return None


def paired_taps(entry: TermPlan, inputs: StepInputs) -> tuple[list[Tensor], list[Tensor]]:
    """The student and teacher tensors of a paired term, in pairing order."""
    return (
        [inputs.s_taps[t.key] for t in entry.student],
        [inputs.t_taps[t.key] for t in entry.teacher],
    )


# --------------------------------------------------------------------------------------------
# Token grids: a teacher on another grid is resampled to the student's


RESAMPLE_CHOICES = ("bilinear", "area", "none")


def grids(ctx: Context) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """The teacher's and the student's patch grids when both are ViTs, else None."""
    s, t = ctx.student, ctx.teacher
    if s is None or t is None or not s.vit or not t.vit:
        return None
    return t.grid, s.grid


def grid_words(g: Sequence[int]) -> str:
    return f"{g[0]}x{g[1]}"


def check_resample(term: Any, ctx: Context) -> Iterable[Diagnostic]:
    """``resample = none`` makes a grid mismatch an error (the hint says what else to do)."""
    pair = grids(ctx)
    if pair is None or pair[0] == pair[1] or term.resample != "none":
        return
    s, t = ctx.student, ctx.teacher
    assert s is not None and t is not None
    yield error(
        f"{term.kind} '{term.name}': the teacher's token grid {grid_words(t.grid)} differs "
        f"from the student's {grid_words(s.grid)}, and resample = none",
        term.at("resample"),
        expected="the same image size / patch size on both models",
        hint=f"resample = bilinear (the default) or area resamples the teacher's patch tokens "
        f"to the student's grid; or match the grids (student: img {s.img_size[0]} / patch "
        f"{s.patch_size[0]}; teacher: img {t.img_size[0]} / patch {t.patch_size[0]})",
    )


def resample_options(resample: str, ctx: Context) -> dict[str, Any]:
    """The grid options of a feature term: the mode and both grids when they differ (the
    teacher's taps are then resampled in the step), nothing when they agree."""
    pair = grids(ctx)
    if pair is None or pair[0] == pair[1]:
        return {"resample": None, "teacher_grid": None, "student_grid": None}
    return {"resample": resample, "teacher_grid": pair[0], "student_grid": pair[1]}


def resample_notes(options: BaseModel) -> tuple[str, ...]:
    """``teacher grid 16x16 -> student grid 14x14 (bilinear ...)`` when the grids differ."""
    teacher, student = (
        getattr(options, "teacher_grid", None),
        getattr(options, "student_grid", None),
    )
    if teacher is None or student is None:
        return ()
    return (
        f"teacher grid {grid_words(teacher)} -> student grid {grid_words(student)} "
        f"({getattr(options, 'resample', None)} resampling of the teacher's patch tokens, "
        "in the step)",
    )


def teacher_on_student_grid(entry: TermPlan, tensors: list[Tensor]) -> list[Tensor]:
    """The teacher's tapped tokens ``[B, N_t, D]`` on the student's grid ``[B, N_s, D]``
    (unchanged when the grids agree): the resampling a feature term plans, in the step."""
    mode = getattr(entry.options, "resample", None)
    src = getattr(entry.options, "teacher_grid", None)
    dst = getattr(entry.options, "student_grid", None)
    if mode is None or src is None or dst is None:
        return tensors
    from vitkdl.terms._torch import resample_tokens

    return [resample_tokens(x, tuple(src), tuple(dst), mode) for x in tensors]
