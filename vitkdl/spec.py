"""Stage 2: syntax tree -> :class:`RecipeSpec` (pydantic, frozen, unknown fields forbidden).

This stage resolves ``extends`` (field by field; paths relative to the including file; cycles
reported), loads the recipe a ``teacher from "PATH"`` names, applies ``--set PATH=VALUE``
overrides, and validates every field's type and choice. Every node keeps the span of the text
it came from, so later stages can point at it. Problems are collected, never raised one by one:
a field that fails is dropped (its default stands in) and loading goes on, so one run reports
everything.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    Field,
    SerializeAsAny,
    ValidationError,
    field_validator,
)

from vitkdl import syntax as syn
from vitkdl.errors import Diagnostic, Sources, Span, VkdError, did_you_mean, error, one_of
from vitkdl.nodes import TAP_SUBPOINTS as TAP_SUBPOINTS
from vitkdl.nodes import Node as Node
from vitkdl.nodes import PairedTermSpec as PairedTermSpec
from vitkdl.nodes import SliceSpec as SliceSpec
from vitkdl.nodes import TapSpec as TapSpec
from vitkdl.nodes import TermSpec as TermSpec
from vitkdl.sources import known_classes

# --------------------------------------------------------------------------------------------
# Spec models


@dataclass(frozen=True)
class ModelField:
    """Marks a field a recipe writes in a model block (``Annotated[TYPE, ModelField(...)]``).

    ``timm``: the ``timm.create_model`` argument the field becomes (None: vitkdl's own field,
    which timm never sees). A field written in a model block that no field declares goes to
    timm as written (``ModelSpec.extra``).
    """

    timm: str | None = None


_PositiveInt = Annotated[int, Field(gt=0)]
_Rate = Annotated[float, Field(ge=0, lt=1)]


class ModelSpec(Node):
    """A timm model: ``student NAME { ... }`` or ``teacher NAME { ... }``."""

    role: Literal["teacher", "student"]
    model: str
    weights: Annotated[str | None, ModelField()] = None
    pretrained: Annotated[bool, ModelField()] = False
    num_classes: Annotated[_PositiveInt | None, ModelField("num_classes")] = None
    img_size: Annotated[_PositiveInt | list[_PositiveInt] | None, ModelField("img_size")] = None
    patch_size: Annotated[_PositiveInt | None, ModelField("patch_size")] = None
    drop_path: Annotated[_Rate | None, ModelField("drop_path_rate")] = None
    depth: Annotated[_PositiveInt | None, ModelField("depth")] = None
    embed_dim: Annotated[_PositiveInt | None, ModelField("embed_dim")] = None
    num_heads: Annotated[_PositiveInt | None, ModelField("num_heads")] = None
    in_chans: Annotated[_PositiveInt | None, ModelField("in_chans")] = None
    mlp_ratio: Annotated[Annotated[float, Field(gt=0)] | None, ModelField("mlp_ratio")] = None
    drop_rate: Annotated[_Rate | None, ModelField("drop_rate")] = None
    # `head = random`: a teacher head its weights do not provide is meant (a test); logit
    # terms refuse one otherwise. `pretrained` (the default, None) asks the weights for it.
    head: Annotated[Literal["pretrained", "random"] | None, ModelField()] = None
    # `precision = bf16` (a teacher): how its frozen weights are held. auto: bf16 under bf16
    # autocast on CUDA, else as loaded (fp32); fp8: its linear layers in FP8 (torchao's float8
    # inference, the [fp8] extra; GPUs with FP8). The student trains under train.precision.
    precision: Annotated[Literal["auto", "fp32", "bf16", "fp8"], ModelField()] = "auto"
    # `keep = 0.5` (a ViT teacher, logit terms only): MaskedKD. The teacher sees only that share
    # of the patch tokens, those the student's last block's class-token attention ranks highest
    # (None: all of them). Checked in vitkdl.checks.check_masked_teacher.
    keep: Annotated[Annotated[float, Field(gt=0, le=1)] | None, ModelField()] = None
    # `cache = "PATH"` (a teacher whose logits alone the terms read): its logits over every
    # epoch's augmented batches, stored once (`vitkdl cache`, or before training) and
    # replayed; the step then skips the teacher. `topk = 100`: the logits kept per sample
    # (`all`: every class in fp32, exact; the default 100, or all when there are fewer).
    cache: Annotated[str | None, ModelField()] = None
    topk: Annotated[Annotated[int, Field(gt=0)] | Literal["all"] | None, ModelField()] = None
    extra: dict[str, Any] = Field(default_factory=dict)
    # `teacher from "PATH"`: the recipe whose final student this teacher is.
    from_recipe: str | None = None
    from_name: str | None = None
    from_hash: str | None = None

    def timm_kwargs(self, num_classes: int | None = None) -> dict[str, Any]:
        """Keyword arguments for ``timm.create_model``: each field declared with a timm name
        (:class:`ModelField`) that is written, under that name, those timm takes as written
        first and the renamed ones (``drop_path`` is ``drop_path_rate``) after them; then the
        classes (as written, else ``num_classes``); then the fields no one declares."""
        written = [
            (name, arg, getattr(self, name))
            for name, arg in _TIMM_ARGS.items()
            if arg is not None and name != "num_classes" and getattr(self, name) is not None
        ]
        out = {arg: value for name, arg, value in written if arg == name}
        out.update({arg: value for name, arg, value in written if arg != name})
        classes = self.num_classes if self.num_classes is not None else num_classes
        if classes is not None:
            out["num_classes"] = classes
        out.update(self.extra)
        return out


def _model_fields() -> dict[str, str | None]:
    """Each :class:`ModelField` of :class:`ModelSpec`, in declaration order, with its timm
    name."""
    return {
        name: marker.timm
        for name, info in ModelSpec.model_fields.items()
        for marker in info.metadata
        if isinstance(marker, ModelField)
    }


_TIMM_ARGS = _model_fields()

#: The fields a model block types; any other field is passed to timm's create_model as
#: written.
MODEL_FIELDS: tuple[str, ...] = tuple(_TIMM_ARGS)


class DataSpec(Node):
    """``data SOURCE { ... }``; the embedded ``digits`` data when a recipe names none."""

    source: Literal["imagefolder", "digits", "synthetic", "hfds", "wds"] = "digits"
    root: str | None = None
    image_size: Annotated[int, Field(gt=0)] | None = None
    batch_size: Annotated[int, Field(gt=0)] = 64
    workers: Annotated[int, Field(ge=0)] | None = None
    augment: Literal["deit", "basic", "none"] = "none"
    mixup: Annotated[float, Field(ge=0)] = 0.0
    cutmix: Annotated[float, Field(ge=0)] = 0.0
    smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.0
    size: Annotated[int, Field(gt=0)] = 1024
    classes: Annotated[int, Field(gt=1)] | None = None
    # hfds: a dataset by hub name (or `root`: a save_to_disk directory), its splits and
    # columns; wds: the validation shards and the sample members.
    name: str | None = None
    split: str = "train"
    val_split: str | None = None
    val_root: str | None = None
    image_key: str | None = None
    label_key: str | None = None
    # The data stream's seed: the order, every sample's augmentation and each batch's
    # mixup/cutmix (and synthetic's content). None: train.seed. Kept apart from train.seed
    # (the student's initialisation, drop path, masks), students of several seeds see one
    # stream, which a teacher cache (teacher { cache = ... }) replays.
    seed: Annotated[int, Field(ge=0)] | None = None


OPTIMIZERS = (
    "adamw",
    "adam",
    "sgd",
    "momentum",
    "nesterov",
    "lamb",
    "lars",
    "lion",
    "adan",
    "nadamw",
    "rmsprop",
    "rmsproptf",
    "adafactor",
    "adopt",
    "laprop",
)
SCHEDULES = ("cosine", "step", "multistep", "poly", "tanh", "constant")


class OptimizerSpec(Node):
    """``optimizer = adamw(lr = 1e-3, weight_decay = 0.05, ...)`` (timm's optimizer names)."""

    name: Literal[OPTIMIZERS] = "adamw"  # type: ignore[valid-type]
    lr: Annotated[float, Field(gt=0)] = 1e-3
    # 0.05 is the default *call* (DeiT's AdamW), used when a recipe writes no optimizer. A
    # written call replaces it whole: what it leaves out takes the optimizer's own default,
    # timm's (CALL_DEFAULTS), not the value of the call it replaces.
    weight_decay: Annotated[float, Field(ge=0)] = 0.05
    kwargs: dict[str, Any] = Field(default_factory=dict)

    #: The arguments of a written call whose default differs from the default call's.
    CALL_DEFAULTS: ClassVar[dict[str, Any]] = {"weight_decay": 0.0}


class ScheduleSpec(Node):
    """``schedule = cosine(warmup_epochs = 20, min_lr = 1e-5, warmup_lr = 1e-6)``."""

    #: As for OptimizerSpec: the default call's values are the schedule's own.
    CALL_DEFAULTS: ClassVar[dict[str, Any]] = {}

    name: Literal[SCHEDULES] = "cosine"  # type: ignore[valid-type]
    warmup_epochs: Annotated[float, Field(ge=0)] = 0
    min_lr: Annotated[float, Field(ge=0)] = 0.0
    warmup_lr: Annotated[float, Field(ge=0)] = 1e-6
    decay_epochs: Annotated[float, Field(gt=0)] | None = None
    decay_rate: Annotated[float, Field(gt=0)] = 0.1


#: The units of ``checkpoint_every`` and the words that name them.
INTERVAL_UNITS = {
    "epochs": ("epoch", "epochs"),
    "steps": ("step", "steps"),
    "minutes": ("min", "mins", "minute", "minutes"),
}


def checkpoint_interval(value: int | str) -> tuple[int | float, str]:
    """``checkpoint_every`` as (amount, unit): a whole number counts epochs (``2``); a string
    names its unit, ``"2 epochs"``, ``"500 steps"`` or ``"30 min"`` (minutes may be
    fractional). Raises ValueError, in words, for anything else."""
    if isinstance(value, int):
        return value, "epochs"
    words = value.split()
    units = [w for names in INTERVAL_UNITS.values() for w in names]
    example = 'write e.g. "2 epochs", "500 steps" or "30 min"'
    if len(words) != 2:
        raise ValueError(f"expected an amount and a unit, got {value!r}; {example}")
    amount_text, unit_word = words
    unit = next((u for u, names in INTERVAL_UNITS.items() if unit_word.lower() in names), None)
    if unit is None:
        hint = did_you_mean(unit_word, units)
        units_text = "units: epochs, steps, min" + (f"; {hint}" if hint else "")
        raise ValueError(f"unknown unit {unit_word!r} ({units_text})")
    try:
        amount: int | float = int(amount_text) if unit != "minutes" else float(amount_text)
    except ValueError:
        whole = "a number" if unit == "minutes" else "a whole number"
        raise ValueError(f"the amount of {unit} must be {whole}, got {amount_text!r}") from None
    if not amount > 0:
        raise ValueError(f"the amount must be positive, got {amount_text}")
    return amount, unit


class TrainSpec(Node):
    """``train { ... }``: the optimisation, precision and compile settings."""

    epochs: Annotated[int, Field(gt=0)] = 300
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    clip_grad: Annotated[float, Field(gt=0)] | None = None
    ema: Annotated[float, Field(gt=0, lt=1)] | None = None
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    compile: Literal["auto", "off", "default", "max-autotune"] = "auto"
    shard: Literal["none", "fsdp"] = "none"
    seed: Annotated[int, Field(ge=0)] = 0
    eval_every: Annotated[int, Field(gt=0)] = 1
    # A whole number of epochs, or a string with its unit: "500 steps", "30 min".
    checkpoint_every: Annotated[int, Field(gt=0)] | str = 1
    log_every: Annotated[int, Field(gt=0)] = 50

    @field_validator("checkpoint_every")
    @classmethod
    def _interval(cls, value: int | str) -> int | str:
        checkpoint_interval(value)
        return value


class RecipeSpec(Node):
    """A whole recipe after ``extends``, ``teacher from`` and overrides are resolved."""

    name: str
    file: str
    student: ModelSpec | None = None
    teacher: ModelSpec | None = None
    data: DataSpec = Field(default_factory=DataSpec)
    terms: tuple[SerializeAsAny[TermSpec], ...] = ()
    train: TrainSpec = Field(default_factory=TrainSpec)
    extends: tuple[str, ...] = ()
    overrides: tuple[str, ...] = ()

    def term(self, name: str) -> TermSpec | None:
        """The term called ``name``, or None."""
        return next((t for t in self.terms if t.name == name), None)

    def origin(self, span: Span | None) -> str:
        """Where a value came from, by its span: ``this file`` (the recipe named), ``base
        FILE`` (a recipe it extends), ``--set``/``--grid``, or ``default`` (not written)."""
        if span is None:
            return "default"
        if span.file == self.file:
            return "this file"
        if span.file in self.extends:
            return f"base {span.file}"
        return span.file

    def call_origins(self, call: OptimizerSpec | ScheduleSpec) -> dict[str, str]:
        """Each argument of an optimizer/schedule call, with :meth:`origin`."""
        names = [n for n in type(call).model_fields if n not in ("name", "span", "spans")]
        names = [n for n in names if n != "kwargs"] + list(getattr(call, "kwargs", {}))
        return {n: self.origin(call.spans.get(n)) for n in names}

    def canonical(self) -> dict[str, Any]:
        """The resolved recipe as plain data (no spans, no file names)."""
        data = self.model_dump(mode="json", exclude={"file", "extends", "overrides"})
        return data

    def hash(self) -> str:
        """A short hash of the resolved recipe: what decides whether a run is stale. Fields at
        their defaults are left out, so a new field in a later vitkdl keeps old runs fresh."""
        # Where a teacher recipe lies is left out (a path relative to the working directory):
        # what it is enters through its own hash, from_hash.
        data = self.model_dump(
            mode="json",
            exclude={"file": True, "extends": True, "overrides": True, "teacher": {"from_recipe"}},
            exclude_defaults=True,
        )
        if "terms" in data:  # a term's kind is a default of its class, but it matters
            data["terms"] = [
                {**d, "kind": t.kind} for t, d in zip(self.terms, data["terms"], strict=True)
            ]
        text = json.dumps(data, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Raw recipe: statements merged across `extends`, before typing


@dataclass
class RawBlock:
    keyword: str
    arg: str | None
    arg_span: Span | None
    span: Span
    fields: dict[str, syn.Field] = field(default_factory=dict)
    from_path: bool = False
    file: str = ""
    # Call fields (optimizer, schedule) an override built on the default call rather than on
    # one the recipe writes: their unwritten arguments keep the default call's values.
    defaulted: set[str] = field(default_factory=set)


@dataclass
class RawTerm:
    name: str
    term: syn.Term
    fields: dict[str, syn.Field]


@dataclass
class RawRecipe:
    file: str
    name: str | None = None
    name_span: Span | None = None
    blocks: dict[str, RawBlock] = field(default_factory=dict)
    terms: dict[str, RawTerm] = field(default_factory=dict)
    extends: list[str] = field(default_factory=list)
    # Default kinds (labels) removed by ``~distill.KIND``: not added back when typing.
    removed: dict[str, Span] = field(default_factory=dict)


BLOCK_FIELDS: dict[str, tuple[str, ...]] = {
    "data": tuple(n for n in DataSpec.model_fields if n not in ("source", "span", "spans")),
    "train": tuple(n for n in TrainSpec.model_fields if n not in ("span", "spans")),
}


def _fields(
    block: Iterable[syn.Field], where: str, diags: list[Diagnostic]
) -> dict[str, syn.Field]:
    out: dict[str, syn.Field] = {}
    for f in block:
        if f.name in out:
            first = out[f.name].name_span
            diags.append(
                error(
                    f"'{f.name}' is set twice in {where}",
                    f.name_span,
                    hint=f"first set at {first.line}:{first.column}; keep one",
                )
            )
        out[f.name] = f
    return out


def _term_names(terms: Sequence[syn.Term], diags: list[Diagnostic]) -> list[tuple[str, syn.Term]]:
    named: list[tuple[str, syn.Term]] = []
    seen: dict[str, syn.Term] = {}
    counts: dict[str, int] = {}
    for t in terms:
        if t.alias is not None:
            name = t.alias
            if name in seen:
                diags.append(
                    error(
                        f"two distill terms are named '{name}'",
                        t.alias_span,
                        hint="give each term its own name with `as NAME`",
                    )
                )
                continue
        else:
            counts[t.kind] = counts.get(t.kind, 0) + 1
            name = t.kind if counts[t.kind] == 1 else f"{t.kind}_{counts[t.kind]}"
            while name in seen:
                counts[t.kind] += 1
                name = f"{t.kind}_{counts[t.kind]}"
        seen[name] = t
        named.append((name, t))
    return named


def _merge_tree(raw: RawRecipe, tree: syn.SyntaxTree, diags: list[Diagnostic]) -> None:
    """Lay one file's statements over ``raw`` (the resolved bases): field by field for blocks,
    whole terms by name for ``distill``."""
    seen: dict[str, Span] = {}
    for st in tree.statements:
        if st.keyword == "extends":
            continue
        if st.keyword in seen:
            first = seen[st.keyword]
            diags.append(
                error(
                    f"a second '{st.keyword}' statement",
                    st.span,
                    hint=f"the first is at {first.line}:{first.column}; merge them into one",
                )
            )
            continue
        seen[st.keyword] = st.span
        if st.keyword == "sweep":  # the experiment over this recipe: vitkdl.experiment reads it
            continue
        if st.keyword == "recipe":
            raw.name, raw.name_span = st.arg, st.arg_span
        elif st.keyword == "distill":
            for name, term in _term_names(st.terms, diags):
                raw.terms[name] = RawTerm(
                    name, term, _fields(term.fields, f"{term.kind} term", diags)
                )
        else:
            base = raw.blocks.get(st.keyword)
            fields = _fields(st.fields, f"the {st.keyword} block", diags)
            block = RawBlock(
                st.keyword, st.arg, st.arg_span, st.span, from_path=st.from_path, file=tree.file
            )
            if base is not None:
                if st.arg is None:
                    block.arg, block.arg_span, block.from_path = (
                        base.arg,
                        base.arg_span,
                        base.from_path,
                    )
                block.fields = {**base.fields, **fields}
            else:
                block.fields = fields
            raw.blocks[st.keyword] = block


def _load_raw(
    path: Path,
    sources: Sources,
    diags: list[Diagnostic],
    stack: tuple[Path, ...],
    at: Span | None,
    text: str | None = None,
) -> RawRecipe | None:
    """Read, parse and resolve ``extends`` for one recipe file (``text``: its unsaved text)."""
    name = _display(path)
    if at is not None:  # reached through `extends`, not named by the user
        refused = _not_a_recipe(path, "extends", at)
        if refused is not None:
            diags.append(refused)
            return None
    resolved = path.resolve()
    if resolved in stack:
        chain = " -> ".join(_display(p) for p in (*stack, resolved))
        diags.append(
            error(
                f"extends cycle: {chain}",
                at,
                hint="a recipe cannot extend itself, directly or through another",
            )
        )
        return None
    try:
        text = syn.read_source(path, sources, at) if text is None else text
        sources.add(name, text)
        tree = syn.parse(text, name)
    except VkdError as exc:
        for key, value in exc.sources.texts.items():
            sources.add(key, value)
        diags.extend(exc.diagnostics)
        return None
    raw = RawRecipe(file=name)
    extends = [st for st in tree.statements if st.keyword == "extends"]
    for st in extends[1:]:
        diags.append(
            error(
                "a recipe extends at most one base",
                st.span,
                hint="make the base extend the other one instead",
            )
        )
    if extends:
        st = extends[0]
        assert st.arg is not None
        base = _load_raw(path.parent / st.arg, sources, diags, (*stack, resolved), st.arg_span)
        if base is not None:
            raw.blocks, raw.terms = base.blocks, base.terms
            raw.extends = [base.file, *base.extends]
    _merge_tree(raw, tree, diags)
    return raw


def _not_a_recipe(path: Path, keyword: str, at: Span | None) -> Diagnostic | None:
    """The error for an ``extends`` / ``teacher from`` path that does not name a ``.vkd`` file
    (as written, or where a link leads), or ``None`` for one that does.

    Such a file is never read: parsing any readable file as a recipe would echo its lines as
    syntax errors, and a recipe in a repository would then print, e.g., ``/etc/passwd`` into a
    CI log.
    """
    if path.suffix == ".vkd" and (not path.exists() or path.resolve().suffix == ".vkd"):
        return None
    linked = path.suffix == ".vkd"
    example = "base.vkd" if keyword == "extends" else "teacher.vkd"
    return error(
        f"`{keyword}` names {_display(path)}, "
        + ("a link to a file that is not a .vkd recipe" if linked else "not a .vkd recipe"),
        at,
        hint=f'`{keyword}` takes a recipe file ending in .vkd, e.g. `{keyword} "{example}"`',
    )


def _display(path: Path) -> str:
    """A path as the user would write it: relative to the working directory when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------------------------
# Overrides: --set PATH=VALUE


def _override_span(index: int, column: int, length: int) -> Span:
    return Span(
        file="--set",
        line=index + 1,
        column=column,
        end_line=index + 1,
        end_column=column + max(1, length),
    )


def _apply_overrides(
    raw: RawRecipe, overrides: Sequence[str], sources: Sources, diags: list[Diagnostic]
) -> None:
    """Apply ``PATH=VALUE``, ``+PATH=VALUE`` and ``~PATH`` overrides to the merged raw
    recipe. The same path given twice is an error at the second, naming the first."""
    sources.add("--set", "\n".join(overrides))
    seen: dict[str, int] = {}
    for i, text in enumerate(overrides):
        op, _ = split_op(text)
        if op == "~":
            if "=" in text:
                diags.append(
                    error(
                        f"~PATH removes and takes no value, got '{text}'",
                        _override_span(i, 1, len(text)),
                        hint=f"write {text.split('=', 1)[0].strip()}",
                    )
                )
                continue
            path, value_text = text, None
        elif "=" not in text:
            diags.append(
                error(
                    f"an override is PATH=VALUE, got '{text}'",
                    _override_span(i, 1, len(text)),
                    hint="e.g. --set train.epochs=1 (+PATH=VALUE adds, ~PATH removes)",
                )
            )
            continue
        else:
            path, value_text = text.split("=", 1)
        path_span = _override_span(i, 1, len(path))
        _, bare = split_op(path)
        if bare in seen:
            first = seen[bare]
            diags.append(
                error(
                    f"{bare} is given twice: --set {overrides[first]} and --set {text}",
                    path_span,
                    hint=f"the first is --set argument {first + 1}; keep one",
                )
            )
            continue
        seen[bare] = i
        value: syn.Value | None = None
        if value_text is not None:
            try:
                value = syn.move(
                    syn.parse_value(value_text, "--set", column=len(path) + 2), line=i + 1
                )
            except VkdError:
                # Not a recipe value: take the text as written, as a shell user expects for
                # paths (--set data.root=/data/imagenet). A field that wants a number still
                # says so.
                value = syn.String(value_text, _override_span(i, len(path) + 2, len(value_text)))
        _set_path(raw, bare.split("."), value, path_span, diags, op=op)


def _as_field(name: str, value: syn.Value, span: Span) -> syn.Field:
    return syn.Field(
        name, value, span, span.model_copy(update={"end_column": value.span.end_column})
    )


#: The operators an override path may start with, Hydra's: ``+PATH=V`` adds what the recipe
#: does not have, ``~PATH`` removes what it has, ``++PATH=V`` sets whether or not it has it.
#: A plain ``PATH=V`` changes only what the recipe (or a field's default) has.
OVERRIDE_OPS = ("++", "+", "~")


def split_op(path: str) -> tuple[str, str]:
    """``"+distill.kd.weight"`` as ``("+", "distill.kd.weight")``; ``""`` for a plain path."""
    path = path.strip()
    for op in OVERRIDE_OPS:
        if path.startswith(op):
            return op, path[len(op) :].strip()
    return "", path


@dataclass
class _Override:
    """One override on its way into the raw recipe: ``op`` (``""``, ``+``, ``++``, ``~``),
    the path's parts, the value (None for ``~``), where the path was written (``span``) and
    where the value's own errors point (``at``)."""

    op: str
    parts: list[str]
    value: syn.Value | None
    span: Span
    at: Span

    @property
    def path(self) -> str:
        return ".".join(self.parts)

    def fail(self, message: str, diags: list[Diagnostic], **kw: Any) -> None:
        diags.append(error(message, self.span, **kw))

    def exists(self, what: str, diags: list[Diagnostic], example: str | None = None) -> None:
        """``+PATH`` on something the recipe has (Hydra: 'Could not append to config')."""
        self.fail(
            f"cannot add {self.path}: {what}",
            diags,
            hint=f"to change it, write {example or self.path}=... without the +",
        )

    def missing(self, what: str, diags: list[Diagnostic], **kw: Any) -> None:
        self.fail(
            f"cannot {'remove' if self.op == '~' else 'set'} {self.path}: {what}", diags, **kw
        )

    def remove(
        self, fields: dict[str, syn.Field], name: str, where: str, diags: list[Diagnostic]
    ) -> None:
        """``~PATH`` of a written field: it goes (back to its default); an error when
        ``where`` does not write it."""
        if name not in fields:
            self.missing(
                f"{where} does not set {name}",
                diags,
                expected=one_of(fields) if fields else "(no fields written)",
            )
            return
        del fields[name]


def _set_path(
    raw: RawRecipe,
    parts: list[str],
    value: syn.Value | None,
    span: Span,
    diags: list[Diagnostic],
    at: Span | None = None,
    op: str = "",
) -> None:
    """Apply one override to the raw recipe: set (``op`` ``""``), add (``+``), set-or-add
    (``++``) or remove (``~``, ``value`` None) what ``parts`` names. ``span`` is where the
    path was written (its errors point there); ``at`` where the value's own errors point
    (default: ``span``)."""
    o = _Override(op, parts, value, span, at or span)
    handler = _OVERRIDE_HANDLERS.get(parts[0])
    if handler is None:
        o.fail(
            f"unknown override path '{o.path}'",
            diags,
            expected=one_of(_OVERRIDE_ROOTS),
            hint=did_you_mean(parts[0], _OVERRIDE_ROOTS),
        )
        return
    handler(raw, o, diags)


def _set_recipe(raw: RawRecipe, o: _Override, diags: list[Diagnostic]) -> None:
    if (
        o.parts[1:] == ["name"]
        and o.op in ("", "++")
        and isinstance(o.value, (syn.Word, syn.String))
    ):
        raw.name, raw.name_span = o.value.value, o.value.span
    else:
        o.fail("only recipe.name can be overridden, as recipe.name=NAME", diags)


def _set_distill(raw: RawRecipe, o: _Override, diags: list[Diagnostic]) -> None:
    """``distill.TERM.FIELD`` (set, add a field, remove a field; ``+`` adds a kind without
    taps) or ``~distill.TERM`` (the same recipe without the term)."""
    parts = o.parts
    if not (len(parts) == 3 or (o.op == "~" and len(parts) == 2)):
        example = next(iter(raw.terms), "TERM")
        o.fail(
            f"a distill override is distill.TERM.FIELD, got '{o.path}'",
            diags,
            hint=f"e.g. distill.{example}.weight, or ~distill.{example} to remove the term",
        )
        return
    terms = _DistillTerms(raw, parts[1])
    if len(parts) == 2:
        _remove_term(raw, o, terms, diags)
        return
    if not terms.has:
        if not _may_add_term(o, terms, diags):
            return
        raw.removed.pop(terms.name, None)
    elif o.op == "+":
        o.exists(f"the recipe already has a distill term '{terms.name}'", diags)
        return
    term = raw.terms.get(terms.name)
    if term is None:  # an unwritten default kind, or a kind being added
        t = syn.Term(terms.name, (), (), None, None, (), o.span, o.span)
        term = raw.terms[terms.name] = RawTerm(terms.name, t, {})
    fname = parts[2]
    if o.op == "~":
        o.remove(term.fields, fname, f"the {terms.name} term", diags)
        return
    assert o.value is not None
    # A field the term's kind does not know is the term's own error, reported once.
    term.fields[fname] = _as_field(fname, o.value, o.at)


@dataclass
class _DistillTerms:
    """The terms a ``distill.TERM`` override meets: whether the recipe has ``name`` (written,
    or a default kind not removed), the names it has, whether ``name`` could be added."""

    raw: RawRecipe
    name: str

    @property
    def kind(self) -> Any:
        from vitkdl.terms import KINDS

        return KINDS.get(self.name)

    @property
    def has(self) -> bool:
        default = self.kind
        # A default kind (labels) is in every recipe that does not remove it.
        return self.name in self.raw.terms or (
            default is not None and default.default and self.name not in self.raw.removed
        )

    @property
    def have(self) -> list[str]:
        from vitkdl.terms import KINDS

        raw = self.raw
        defaults = [k for k, v in KINDS.items() if v.default and k not in raw.terms]
        return [n for n in (*raw.terms, *defaults) if n not in raw.removed]

    @property
    def addable(self) -> bool:
        return self.kind is not None and not self.kind.paired


def _remove_term(
    raw: RawRecipe, o: _Override, terms: _DistillTerms, diags: list[Diagnostic]
) -> None:
    """``~distill.TERM``: the term goes; a default kind is remembered as removed."""
    if not terms.has:
        have = terms.have
        o.fail(
            f"no distill term named '{terms.name}'",
            diags,
            expected=one_of(have) if have else "(no terms)",
            hint=did_you_mean(terms.name, have),
        )
        return
    raw.terms.pop(terms.name, None)
    if terms.kind is not None and terms.kind.default:
        raw.removed[terms.name] = o.span


def _may_add_term(o: _Override, terms: _DistillTerms, diags: list[Diagnostic]) -> bool:
    """Whether an override may set a field of a term the recipe does not have: only ``+`` or
    ``++`` of a kind without taps; otherwise the error says what the recipe has."""
    from vitkdl.terms import KINDS

    name, have = terms.name, terms.have
    if o.op == "~":
        o.fail(f"no distill term named '{name}'", diags, expected=one_of(have))
        return False
    if o.op == "":
        hints = (
            did_you_mean(name, have),
            f"+{o.path}=... adds a {name} term" if terms.addable else None,
        )
        o.fail(
            f"no distill term named '{name}'",
            diags,
            expected=one_of(have) if have else "(no terms)",
            hint=" ".join(h for h in hints if h) or None,
        )
        return False
    if not terms.addable:  # a term with taps is written in the recipe
        o.fail(
            f"cannot add a distill term '{name}' from an override",
            diags,
            expected="a kind without taps: "
            + one_of(sorted(k for k, v in KINDS.items() if not v.paired)),
            hint=did_you_mean(name, KINDS)
            or "a term that pairs taps is written in the recipe's distill block",
        )
        return False
    return True


def _block_for(raw: RawRecipe, o: _Override, diags: list[Diagnostic]) -> RawBlock | None:
    """The block an override of ``teacher``/``student``/``data``/``train`` goes to: data
    and train always exist (with their defaults); a model block only when written, or
    added by ``+ROLE.model=NAME``."""
    root = o.parts[0]
    block = raw.blocks.get(root)
    if block is not None:
        return block
    if root in ("teacher", "student"):
        if o.op in ("+", "++") and o.parts[1:] == ["model"]:
            block = raw.blocks[root] = RawBlock(root, None, None, o.span, file="--set")
            return block
        o.missing(
            f"the recipe has no {root}",
            diags,
            hint=f"add one with +{root}.model=NAME, or write `{root} MODEL {{ ... }}`",
        )
        return None
    block = raw.blocks[root] = RawBlock(
        root, "digits" if root == "data" else None, None, o.span, file="--set"
    )
    return block


def _set_block(raw: RawRecipe, o: _Override, diags: list[Diagnostic]) -> None:
    root, parts = o.parts[0], o.parts
    if len(parts) < 2:
        o.fail(
            f"an override names a field: {root}.FIELD",
            diags,
            hint=f"e.g. --set {root}.{'epochs' if root == 'train' else 'root'}=...",
        )
        return
    had_model = root in raw.blocks
    block = _block_for(raw, o, diags)
    if block is None:
        return
    fname = parts[1]
    if (root in ("teacher", "student") and fname == "model") or (
        root == "data" and fname == "source"
    ):
        if o.op == "~":
            o.fail(f"{root}.{fname} cannot be removed", diags)
            return
        if o.op == "+" and (had_model or root == "data"):
            o.exists(f"the recipe already has a {root} block", diags)
            return
        if len(parts) == 2 and isinstance(o.value, (syn.Word, syn.String)):
            block.arg, block.arg_span, block.from_path = o.value.value, o.value.span, False
        else:
            diags.append(error(f"{root}.{fname} takes a name", o.value.span if o.value else o.span))
        return
    if len(parts) == 2:
        _set_field(block, o, fname, _schema_fields(root), diags)
        return
    if len(parts) == 3 and root == "train" and fname in ("optimizer", "schedule"):
        _set_call_arg(block, o, diags)
        return
    o.fail(
        f"unknown override path '{o.path}'",
        diags,
        hint="paths are BLOCK.FIELD, train.optimizer.ARG or distill.TERM.FIELD",
    )


def _schema_fields(root: str) -> tuple[str, ...] | None:
    """The fields a block has with defaults; None where any name is the block's own error
    (data, train: an unknown field is reported once, when the block is typed)."""
    return MODEL_FIELDS if root in ("teacher", "student") else None


def _set_field(
    block: RawBlock,
    o: _Override,
    fname: str,
    known: Sequence[str] | None,
    diags: list[Diagnostic],
) -> None:
    """Set, add or remove ``fname`` of ``block``. ``known``: the fields that exist with a
    default (a model's); a name outside them is a free argument that ``+`` adds."""
    written = fname in block.fields
    present = written or known is None or fname in known
    where = f"the {block.keyword} block"
    if o.op == "~":
        o.remove(block.fields, fname, where, diags)
        return
    if o.op == "+" and present:
        o.exists(
            f"{where} already has {fname}" + ("" if written else " (a field with a default)"),
            diags,
            example=o.path,
        )
        return
    if o.op == "" and not present:
        assert known is not None
        o.missing(
            f"{where} has no field {fname}",
            diags,
            expected=one_of(known),
            hint=did_you_mean(fname, known) or f"+{o.path}=... passes {fname} to timm.create_model",
        )
        return
    assert o.value is not None
    block.fields[fname] = _as_field(fname, o.value, o.at)
    block.defaulted.discard(fname)  # a whole call written: no longer the default one


def _set_call_arg(block: RawBlock, o: _Override, diags: list[Diagnostic]) -> None:
    """``train.optimizer.ARG`` / ``train.schedule.ARG``: one argument of the call, the rest
    kept; on a recipe that writes no call, of the default call (its arguments kept too)."""
    fname, arg = o.parts[1], o.parts[2]
    model = OptimizerSpec if fname == "optimizer" else ScheduleSpec
    old = block.fields.get(fname)
    if old is not None and isinstance(old.value, syn.Call):
        call = old.value
    elif old is not None and isinstance(old.value, syn.Word):
        call = syn.Call(old.value.value, (), old.value.span, old.value.span)
    else:
        call = syn.Call(_default_call(fname).name, (), o.span, o.span)
        block.defaulted.add(fname)
    written = {k.name for k in call.kwargs}
    known = set(model.model_fields) - {"span", "spans", "kwargs", "name"}
    if o.op == "~":
        if arg not in written:
            o.missing(
                f"{call.name}(...) does not set {arg}",
                diags,
                expected=one_of(sorted(written)) if written else "(no arguments written)",
            )
            return
    elif o.op == "+" and (arg in written or arg in known):
        o.exists(f"{call.name}(...) already has {arg}", diags)
        return
    elif o.op == "" and arg not in written and arg not in known:
        o.missing(
            f"{call.name}(...) has no argument {arg}",
            diags,
            expected=one_of(sorted(known | written)),
            hint=did_you_mean(arg, sorted(known | written))
            or f"+{o.path}=... passes {arg} to the {fname}",
        )
        return
    kwargs = [k for k in call.kwargs if k.name != arg]
    if o.value is not None:
        kwargs.append(_as_field(arg, o.value, o.at))
    block.fields[fname] = _as_field(
        fname, syn.Call(call.name, tuple(kwargs), call.span, call.name_span), o.span
    )


#: What an override path may start with (its root), and the function that applies it: the
#: roots an unknown path is told about are this table's keys, in this order.
_OVERRIDE_HANDLERS: dict[str, Callable[[RawRecipe, _Override, list[Diagnostic]], None]] = {
    "teacher": _set_block,
    "student": _set_block,
    "data": _set_block,
    "train": _set_block,
    "distill": _set_distill,
    "recipe": _set_recipe,
}
_OVERRIDE_ROOTS = tuple(_OVERRIDE_HANDLERS)


# --------------------------------------------------------------------------------------------
# Typing: raw values -> pydantic nodes, every problem collected


def _plain(value: syn.Value) -> Any:
    if isinstance(value, (syn.Number, syn.String, syn.Bool, syn.Word)):
        return value.value
    if isinstance(value, syn.List):
        return [_plain(v) for v in value.items]
    if isinstance(value, syn.Call):
        return {"name": value.name, **{k.name: _plain(k.value) for k in value.kwargs}}
    raise TypeError(value)


def _describe_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"'{value}'"
    if isinstance(value, dict):
        return f"{value.get('name', '?')}(...)"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def _choices_of(model: type[BaseModel], name: str) -> tuple[str, ...]:
    import typing

    ann = model.model_fields[name].annotation
    out: list[str] = []
    stack = [ann]
    while stack:
        a = stack.pop()
        if typing.get_origin(a) is Literal:
            out.extend(str(x) for x in typing.get_args(a))
        else:
            stack.extend(typing.get_args(a))
    return tuple(out)


def _translate(
    err: dict[str, Any],
    model: type[BaseModel],
    where: str,
    value: Any,
    span: Span | None,
    called: str | None = None,
) -> Diagnostic:
    """A pydantic error in the words of a recipe author (``called``: what the user wrote for
    a call's name, e.g. ``schedule`` for ``schedule = cosin(...)``)."""
    error_type = err["type"]
    loc = err["loc"]
    field_name = str(loc[0]) if loc else where
    name = called if called is not None and field_name == "name" else field_name
    ctx = err.get("ctx") or {}
    fields = [
        n
        for n in model.model_fields
        if n
        not in (
            "span",
            "spans",
            "kind",
            "name",
            "role",
            "model",
            "student",
            "teacher",
            "extra",
            "kwargs",
        )
    ]
    if error_type == "extra_forbidden":
        return error(
            f"unknown field '{name}' in {where}",
            span,
            expected=one_of(fields),
            hint=did_you_mean(name, fields),
        )
    if error_type == "literal_error":
        choices = _choices_of(model, field_name)
        got = value if isinstance(value, str) else _describe_value(value)
        return error(
            f"unknown choice '{got}' for {name}",
            span,
            expected=one_of(choices),
            hint=did_you_mean(str(got), choices),
        )
    shown = _describe_value(value)
    if error_type in ("int_type", "int_parsing", "int_from_float"):
        return error(f"{name} must be a whole number, got {shown}", span)
    if error_type in ("float_type", "float_parsing"):
        return error(f"{name} must be a number, got {shown}", span)
    if error_type in ("bool_type", "bool_parsing"):
        return error(f"{name} must be true or false, got {shown}", span)
    if error_type in ("string_type",):
        return error(
            f"{name} must be a string, got {shown}", span, hint='write it in double quotes: "..."'
        )
    bounds = {
        "greater_than": ">",
        "greater_than_equal": ">=",
        "less_than": "<",
        "less_than_equal": "<=",
    }
    if error_type in bounds:
        limit = next(iter(ctx.values())) if ctx else "?"
        if isinstance(limit, float):  # a float field's bound as written: >= 0, not >= 0.0
            limit = f"{limit:g}"
        return error(f"{name} must be {bounds[error_type]} {limit}, got {shown}", span)
    if error_type == "value_error" and "error" in ctx:  # a field's own check, in words
        return error(f"{name}: {ctx['error']}", span)
    return error(f"{name}: {err['msg']}", span)


def _validate(
    model: type[BaseModel],
    data: dict[str, Any],
    spans: dict[str, Span],
    where: str,
    at: Span | None,
    diags: list[Diagnostic],
    called: str | None = None,
) -> Any:
    """Validate ``data`` as ``model``; report each failing field at its span and retry
    without it, so the node still exists with defaults."""
    data = dict(data)
    for _ in range(len(data) + 1):
        try:
            return model.model_validate({**data, "spans": spans, "span": at})
        except ValidationError as exc:
            bad: set[str] = set()
            for err in exc.errors():
                loc = err["loc"]
                name = str(loc[0]) if loc else ""
                if name in bad:
                    continue
                bad.add(name)
                span = spans.get(name, at)
                diags.append(_translate(err, model, where, data.get(name), span, called))
            remaining = {k: v for k, v in data.items() if k not in bad}
            if remaining == data:
                return None
            data = remaining
    return None


def _default_call(name: str) -> OptimizerSpec | ScheduleSpec:
    """The call a recipe that writes no ``train.NAME`` gets (TrainSpec's default)."""
    factory = TrainSpec.model_fields[name].default_factory
    assert factory is not None
    return factory()  # type: ignore[call-arg,return-value]


def _call_spec(
    model: type[OptimizerSpec] | type[ScheduleSpec],
    f: syn.Field,
    diags: list[Diagnostic],
    defaulted: bool = False,
) -> Any:
    """``adamw(lr = 1e-3)`` or a bare ``adamw`` as an optimizer/schedule node. A written call
    replaces the whole call: an argument it leaves out takes the optimizer's/schedule's own
    default (``model.CALL_DEFAULTS``). ``defaulted``: the call is the default one with
    arguments set by overrides (``--set train.optimizer.lr=...`` on a recipe that writes no
    optimizer), whose other arguments keep the default call's values."""
    v = f.value
    if isinstance(v, (syn.Word, syn.String)):
        name, kwargs, name_span = v.value, (), v.span
    elif isinstance(v, syn.Call):
        name, kwargs, name_span = v.name, v.kwargs, v.name_span
    else:
        diags.append(
            error(
                f"{f.name} must be a name or a call like "
                f"{'adamw(lr = 1e-3)' if f.name == 'optimizer' else 'cosine()'}, "
                f"got {_describe_value(_plain(v))}",
                v.span,
            )
        )
        return None
    data: dict[str, Any] = {"name": name}
    if not defaulted:
        data.update(model.CALL_DEFAULTS)
    spans = {"name": name_span}
    known = set(model.model_fields) - {"span", "spans", "kwargs"}
    extra: dict[str, Any] = {}
    for k in _fields(kwargs, f"{f.name}(...)", diags).values():
        if k.name in known or "kwargs" not in model.model_fields:
            data[k.name] = _plain(k.value)
        else:
            extra[k.name] = _plain(k.value)
        spans[k.name] = k.span
    if "kwargs" in model.model_fields:
        data["kwargs"] = extra
    return _validate(model, data, spans, f"{f.name} {name}(...)", f.span, diags, called=f.name)


def _block_data(block: RawBlock) -> tuple[dict[str, Any], dict[str, Span]]:
    return (
        {n: _plain(f.value) for n, f in block.fields.items()},
        {n: f.span for n, f in block.fields.items()},
    )


def _model_spec(block: RawBlock, diags: list[Diagnostic]) -> ModelSpec | None:
    data, spans = _block_data(block)
    extra = {k: data.pop(k) for k in list(data) if k not in MODEL_FIELDS}
    data.update(role=block.keyword, model=block.arg or "", extra=extra)
    spans["model"] = block.arg_span or block.span
    return _validate(ModelSpec, data, spans, f"the {block.keyword} block", block.span, diags)


def _tap_spec(tap: syn.Tap, diags: list[Diagnostic]) -> TapSpec | None:
    index: tuple[int | SliceSpec, ...] | None = None
    if tap.index is not None:
        items: list[int | SliceSpec] = []
        for i in tap.index:
            if isinstance(i, syn.Slice):
                if i.step == 0:
                    diags.append(error("a slice step cannot be 0", i.span))
                    return None
                items.append(SliceSpec(start=i.start, stop=i.stop, step=i.step, span=i.span))
            else:
                items.append(i.value)
        index = tuple(items)
    points = typing.get_args(TapSpec.model_fields["point"].annotation)
    if tap.point not in points:
        diags.append(
            error(
                f"unknown tap point '{tap.point}'",
                tap.point_span,
                expected="blocks[...], " + ", ".join(points[1:-1]) + f" or {points[-1]}",
                hint=did_you_mean(tap.point, points),
            )
        )
        return None
    if tap.point != "blocks" and (index is not None or tap.sub is not None):
        diags.append(
            error(
                f"{tap.point} is one tap and takes no index",
                tap.span,
                hint=f"write {tap.side}.{tap.point}",
            )
        )
        return None
    if tap.point == "blocks" and index is None:
        diags.append(
            error(
                "blocks needs an index", tap.span, expected="blocks[0, 1], blocks[0:2], blocks[-1]"
            )
        )
        return None
    if tap.sub is not None and tap.sub not in TAP_SUBPOINTS:
        diags.append(
            error(
                f"unknown point '{tap.sub}' inside a block",
                tap.sub_span,
                expected=one_of(TAP_SUBPOINTS),
                hint=did_you_mean(tap.sub, TAP_SUBPOINTS),
            )
        )
        return None
    spans = {"point": tap.point_span}
    if tap.sub_span is not None:
        spans["sub"] = tap.sub_span
    return TapSpec(
        side=tap.side, point=tap.point, index=index, sub=tap.sub, span=tap.span, spans=spans
    )


def _term_spec(raw: RawTerm, diags: list[Diagnostic]) -> TermSpec | None:
    from vitkdl.terms import KINDS

    t = raw.term
    kind = KINDS.get(t.kind)
    if kind is None:
        diags.append(
            error(
                f"unknown distill term '{t.kind}'",
                t.kind_span,
                expected=one_of(KINDS),
                hint=did_you_mean(t.kind, KINDS),
            )
        )
        return None
    data = {n: _plain(f.value) for n, f in raw.fields.items()}
    spans = {n: f.span for n, f in raw.fields.items()}
    data.update(kind=t.kind, name=raw.name)
    written = bool(t.students or t.teachers)
    if kind.paired and not written:
        diags.append(
            error(
                f"{t.kind} pairs student taps with teacher taps",
                t.kind_span,
                hint=f"write {t.kind} student.blocks[0] -> teacher.blocks[0]",
            )
        )
        return None
    if not kind.paired and written:
        diags.append(
            error(
                f"{t.kind} takes no taps",
                t.span,
                hint=f"write {t.kind} {{ ... }}; it reads the models' logits",
            )
        )
        return None
    if kind.paired:
        taps = {}
        ok = True
        for side, items in (("student", t.students), ("teacher", t.teachers)):
            specs = []
            for tap in items:
                if tap.side != side:
                    where = "left" if side == "student" else "right"
                    diags.append(
                        error(
                            f"the {where} side of -> names {side} taps, not {tap.side}",
                            tap.span,
                            hint=f"write {t.kind} student.... -> teacher....",
                        )
                    )
                    ok = False
                    continue
                spec = _tap_spec(tap, diags)
                ok = ok and spec is not None
                specs.append(spec)
            taps[side] = tuple(specs)
        if not ok:
            return None
        data.update(taps)
    return _validate(kind.spec, data, spans, f"the {t.kind} term", t.span, diags)


def _build_spec(
    raw: RawRecipe,
    file: str,
    overrides: Sequence[str],
    sources: Sources,
    diags: list[Diagnostic],
    stack: tuple[Path, ...],
) -> RecipeSpec:
    student = teacher = None
    if "student" in raw.blocks:
        student = _model_spec(raw.blocks["student"], diags)
    else:
        diags.append(_no_student(raw, file))
    if "teacher" in raw.blocks:
        block = raw.blocks["teacher"]
        if block.from_path:
            teacher = _teacher_from(block, sources, diags, stack)
        else:
            teacher = _model_spec(block, diags)
    data = DataSpec()
    if "data" in raw.blocks:
        block = raw.blocks["data"]
        values, spans = _block_data(block)
        values["source"] = block.arg or "digits"
        spans["source"] = block.arg_span or block.span
        data = _validate(DataSpec, values, spans, "the data block", block.span, diags) or data
    train = TrainSpec()
    if "train" in raw.blocks:
        block = raw.blocks["train"]
        values, spans = _block_data(block)
        for name, model in (("optimizer", OptimizerSpec), ("schedule", ScheduleSpec)):
            if name in block.fields:
                node = _call_spec(model, block.fields[name], diags, name in block.defaulted)
                values.pop(name)
                if node is not None:
                    values[name] = node
        train = _validate(TrainSpec, values, spans, "the train block", block.span, diags) or train
    from vitkdl.terms import KINDS

    terms = [s for s in (_term_spec(t, diags) for t in raw.terms.values()) if s is not None]
    for kind in KINDS.values():  # kinds every recipe has unless it writes them (labels)
        if (
            kind.default
            and kind.keyword not in raw.removed
            and not any(t.kind == kind.keyword for t in terms)
        ):
            terms.append(kind.spec(kind=kind.keyword, name=kind.keyword))
    if not terms and raw.removed:  # ~distill.labels on a recipe with nothing else to learn from
        name, at = next(iter(raw.removed.items()))
        diags.append(
            error(
                f"removing {name} leaves the recipe without a loss term",
                at,
                hint="add one (+distill.kd.weight=1) or keep it (distill.labels.weight=...)",
            )
        )
    name = raw.name or Path(file).stem
    return RecipeSpec(
        name=name,
        file=file,
        student=student,
        teacher=teacher,
        data=data,
        terms=tuple(terms),
        train=train,
        extends=tuple(raw.extends),
        overrides=tuple(overrides),
        span=Span.point(file),
        spans=_recipe_spans(raw),
    )


def _no_student(raw: RawRecipe, file: str) -> Diagnostic:
    """A recipe without a student; one with only data and train blocks (and no ``extends``)
    is a base for other recipes (``recipes/base/``), which is said as such."""
    if raw.extends or raw.terms or "teacher" in raw.blocks or not raw.blocks:
        return error(
            "the recipe has no student",
            Span.point(file),
            hint="add `student MODEL { ... }`, e.g. student deit_tiny_patch16_224",
        )
    return error(
        f"a base recipe (only {' and '.join(raw.blocks)} blocks, no student), not a runnable one",
        Span.point(file),
        hint=f'extend it from a recipe with a student: `extends "{Path(file).name}"` (a path '
        "relative to that recipe)",
    )


def _recipe_spans(raw: RawRecipe) -> dict[str, Span]:
    """Where the recipe names itself and declares its teacher: a declared teacher that failed
    to load (its errors already reported) is not also "no teacher" to the checks."""
    spans = {"name": raw.name_span} if raw.name_span else {}
    if "teacher" in raw.blocks:
        spans["teacher"] = raw.blocks["teacher"].span
    return spans


def _teacher_from(
    block: RawBlock, sources: Sources, diags: list[Diagnostic], stack: tuple[Path, ...]
) -> ModelSpec | None:
    """``teacher from "PATH"``: the final student of that recipe, loaded as written there."""
    assert block.arg is not None
    path = Path(block.file).parent / block.arg
    if path.resolve() in stack:
        chain = " -> ".join(_display(p) for p in (*stack, path.resolve()))
        diags.append(error(f"teacher from cycle: {chain}", block.arg_span))
        return None
    refused = _not_a_recipe(path, "teacher from", block.arg_span)
    if refused is not None:
        diags.append(refused)
        return None
    if not path.exists():
        diags.append(
            error(
                f"no such recipe: {_display(path)}",
                block.arg_span,
                hint="the path is relative to the recipe that names it",
            )
        )
        return None
    before = len(diags)
    dep = _load_spec(path, (), sources, diags, stack)
    if _note_teacher_recipe(diags, before, block) or dep is None or dep.student is None:
        if not any(d.is_error for d in diags[before:]):  # its own errors say why, when it has
            diags.append(
                error(f"the teacher recipe {_display(path)} could not be loaded", block.arg_span)
            )
        return None
    data, spans = _block_data(block)
    extra = {k: data.pop(k) for k in list(data) if k not in MODEL_FIELDS}
    # The architecture of the dependency's student, not where its training started from: the
    # teacher's weights are that recipe's finished run (its `weights` / `pretrained` were
    # the student's initialisation).
    base = dep.student.model_dump(
        exclude={
            "role",
            "extra",
            "from_recipe",
            "from_name",
            "from_hash",
            "weights",
            "pretrained",
            "head",
        }
    )
    merged = {
        **base,
        **data,
        "role": "teacher",
        "extra": {**dep.student.extra, **extra},
        "from_recipe": _display(path),
        "from_name": dep.name,
        "from_hash": dep.hash(),
    }
    if base.get("num_classes") is None:  # the head the dependency's data gave its student
        merged["num_classes"] = known_classes(dep.data.source, dep.data.classes)
    spans["model"] = block.arg_span or block.span
    return _validate(ModelSpec, merged, spans, "the teacher block", block.span, diags)


def _note_teacher_recipe(diags: list[Diagnostic], start: int, block: RawBlock) -> bool:
    """Give the diagnostics a ``teacher from`` recipe added (from ``start`` on; they keep their
    own file and line) the student's ``teacher from`` line as context; whether any is an
    error."""
    where = block.arg_span or block.span
    note = f'this recipe is the teacher named by `teacher from "{block.arg}"` at {where}'
    for i in range(start, len(diags)):
        d = diags[i]
        if d.span is not None and d.span.file != block.file:
            diags[i] = dataclasses.replace(d, hint=f"{d.hint}; {note}" if d.hint else note)
    return any(d.is_error for d in diags[start:])


@dataclass(frozen=True)
class Assignment:
    """A field set from outside the recipe, positioned where it was written: one value of a
    sweep axis (``PATH = [v1, v2]`` in a ``sweep`` block, or ``--grid PATH=v1,v2``). It acts
    as ``--set PATH=TEXT`` would, but its errors point at ``value`` (the path's at
    ``path_span``). ``text`` is the value as written."""

    path: str
    value: syn.Value
    path_span: Span
    text: str

    @property
    def override(self) -> str:
        """The same as a ``--set`` argument, ``PATH=TEXT``."""
        return f"{self.path}={self.text}"


def _load_spec(
    path: Path,
    overrides: Sequence[str],
    sources: Sources,
    diags: list[Diagnostic],
    stack: tuple[Path, ...] = (),
    text: str | None = None,
    assignments: Sequence[Assignment] = (),
) -> RecipeSpec | None:
    raw = _load_raw(path, sources, diags, stack, None, text)
    if raw is None:
        return None
    if overrides:
        _apply_overrides(raw, overrides, sources, diags)
    for a in assignments:
        op, bare = split_op(a.path)
        _set_path(raw, bare.split("."), a.value, a.path_span, diags, at=a.value.span, op=op)
    overrides = [*overrides, *(a.override for a in assignments)]
    return _build_spec(raw, raw.file, overrides, sources, diags, (*stack, path.resolve()))


def load_spec(
    path: str | Path,
    overrides: Sequence[str] = (),
    sources: Sources | None = None,
    *,
    text: str | None = None,
    assignments: Sequence[Assignment] = (),
) -> tuple[RecipeSpec | None, list[Diagnostic], Sources]:
    """Load a recipe into a :class:`RecipeSpec`, collecting every diagnostic.

    Returns ``(spec, diagnostics, sources)``; ``spec`` is None only when the file could not be
    read or parsed. ``text`` is the recipe's text when it is not (yet) what the file at
    ``path`` holds, e.g. an editor's unsaved buffer; ``path`` still names it and anchors its
    relative ``extends`` and ``teacher from`` paths. ``assignments`` (one cell of a sweep)
    are applied after ``overrides``. Nothing here imports torch or timm.
    """
    sources = sources or Sources()
    diags: list[Diagnostic] = []
    spec = _load_spec(
        Path(path), list(overrides), sources, diags, text=text, assignments=assignments
    )
    return spec, diags, sources
