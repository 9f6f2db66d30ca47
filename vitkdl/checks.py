"""Stage 3: checks. A tuple of small pure functions over a :class:`Context`.

The context holds the spec and the facts of both models, resolved on the meta device (through
the disk cache of :mod:`vitkdl.models`, so a warm ``validate`` never imports torch). Each check
yields diagnostics; :func:`run_checks` runs them all, so every problem is reported at once.
``strict`` is set by ``vitkdl run``: what is only a warning in ``validate`` (a data root or a
weights file that is not there yet) is an error there.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable, Iterable
from pathlib import Path

from vitkdl import hub
from vitkdl.errors import Diagnostic, Span, did_you_mean, error, one_of, warning
from vitkdl.models import ModelError, ModelFacts, model_facts
from vitkdl.sources import expand_braces, known_classes, source
from vitkdl.spec import MODEL_FIELDS, ModelSpec, PairedTermSpec, RecipeSpec, SliceSpec, TapSpec
from vitkdl.terms import KINDS, needs_teacher
from vitkdl.terms.base import Context as Context  # re-exported: it lives beside Kind
from vitkdl.terms.base import TapPoint


def default_classes(spec: RecipeSpec, model: ModelSpec) -> int | None:
    """``num_classes`` for a model: as written, else the data's class count when it is known
    before the data is read (digits: 10; synthetic: ``classes``), else the model's own."""
    if model.num_classes is not None:
        return model.num_classes
    return known_classes(spec.data.source, spec.data.classes)


def _facts(spec: RecipeSpec, model: ModelSpec | None) -> tuple[ModelFacts | None, list[Diagnostic]]:
    if model is None or not model.model:
        return None, []
    kwargs = model.timm_kwargs(default_classes(spec, model))
    try:
        return model_facts(model.model, kwargs), []
    except ModelError as exc:
        span = model.at("model")
        hint = None
        if exc.suggestions:
            hint = "did you mean " + " or ".join(f"'{s}'" for s in exc.suggestions[:2]) + "?"
        if exc.reason == "bad_argument" and exc.argument:
            name = "drop_path" if exc.argument == "drop_path_rate" else exc.argument
            span = model.at(name)
            return None, [
                error(
                    f"{model.model} takes no argument '{name}'",
                    span,
                    expected=one_of(exc.expected) if exc.expected else None,
                    hint=_argument_hint(name, exc.expected),
                )
            ]
        if exc.reason == "build_failed" and "divisible by num_heads" in exc.message:
            return None, [_heads_error(model)]
        return None, [error(exc.message, span, hint=hint)]


def _argument_hint(name: str, timm_names: list[str]) -> str | None:
    """Did-you-mean for a model field no one takes: among vitkdl's own model fields
    (``weights``) and the model class's arguments, as a recipe writes them (``drop_path``,
    not timm's ``drop_path_rate``)."""
    written = ["drop_path" if n == "drop_path_rate" else n for n in timm_names]
    return did_you_mean(name, dict.fromkeys([*MODEL_FIELDS, *written]), n=2)


def _heads_error(model: ModelSpec) -> Diagnostic:
    """timm's ``assert dim % num_heads == 0`` as the constraint, at the field that broke it:
    ``embed_dim`` when written (else ``num_heads``)."""
    dim, heads = model.embed_dim, model.num_heads
    field = "embed_dim" if dim is not None else "num_heads"
    dim_text = f"embed_dim = {dim}" if dim is not None else f"{model.model}'s embed_dim"
    heads_text = f"num_heads = {heads}" if heads is not None else f"{model.model}'s num_heads"
    hint = None
    if dim is not None:
        fits = [h for h in range(1, min(dim, 32) + 1) if dim % h == 0 and h > 1]
        if fits:
            some = fits[-4:]
            hint = "num_heads must divide embed_dim, e.g. num_heads = " + (
                f"{', '.join(map(str, some[:-1]))} or {some[-1]}" if len(some) > 1 else str(some[0])
            )
    return error(
        f"{dim_text} is not a multiple of {heads_text} (each head gets embed_dim / num_heads "
        "channels)",
        model.at(field),
        hint=hint,
    )


def resolve_tap(tap: TapSpec, facts: ModelFacts) -> tuple[list[TapPoint], list[Diagnostic]]:
    """A tap's absolute points: blocks (with the point inside them) or the final norm, with
    errors for indices out of range and points the model's blocks do not have."""
    if tap.point == "pre_logits":  # any classifier has one: no ViT blocks needed
        if facts.distilled and tap.side == "teacher":
            return [], [
                error(
                    f"{tap.text()}: {facts.name} has two heads (DeiT's class and distillation "
                    "tokens), each reading its own token: there is no one head to read it",
                    tap.span,
                    hint="use a teacher with one classifier head",
                )
            ]
        return [TapPoint(point="pre_logits")], []
    if not facts.vit:
        return [], [not_a_vit_tap(tap, facts)]
    if tap.point == "norm" and facts.norm_identity:
        # Derived from the module (nn.Identity on the meta-built model), not from a name list.
        better = f"{tap.side}.blocks[-1] for the same tensor"
        if facts.fc_norm:
            better += f", or {tap.side}.fc_norm for the pooled, normalised feature"
        return [TapPoint(point="norm", identity=True)], [
            warning(
                f"{tap.text()} is an identity on {facts.name} (it normalises after pooling, "
                "in fc_norm): this tap reads the last block's output, not normalised",
                tap.span,
                hint=f"write {better}",
            )
        ]
    if tap.point == "norm":
        return [TapPoint(point="norm")], []
    if tap.point == "fc_norm":
        if not facts.fc_norm:
            return [], [
                error(
                    f"{tap.text()} is an identity on {facts.name} (it has no pooled feature "
                    "norm): its final norm is norm",
                    tap.span,
                    hint=f"write {tap.side}.norm",
                )
            ]
        return [TapPoint(point="fc_norm")], []
    depth = facts.depth
    out: list[TapPoint] = []
    diags: list[Diagnostic] = []
    assert tap.index is not None
    point = tap.sub or "mlp"  # plain blocks[i] is the block output, after the FFN half
    if point != "mlp" and not facts.sub_taps:
        return [], [
            error(
                f"{tap.side}.blocks[...].{tap.sub}: {facts.name}'s blocks cannot be tapped inside "
                f"(vitkdl taps the halves of timm's ViT Block); its blocks have "
                f"{', '.join(facts.block_parts) or 'no named parts'}",
                tap.at("sub"),
                hint=f"tap {tap.side}.blocks[...] (the block output) or {tap.side}.norm",
            )
        ]
    for item in tap.index:
        if isinstance(item, SliceSpec):
            picked = list(range(depth))[slice(item.start, item.stop, item.step)]
            if not picked:
                diags.append(
                    error(
                        f"the slice selects no blocks of {tap.side}'s {depth}",
                        item.span,
                        expected=f"indices in 0..{depth - 1}",
                    )
                )
            out.extend(TapPoint(block=i, point=point) for i in picked)
        elif -depth <= item < depth:
            out.append(TapPoint(block=item % depth, point=point))
        else:
            diags.append(
                error(
                    f"block index {item} is out of range: the {tap.side} has {depth} blocks",
                    tap.span,
                    expected=f"0..{depth - 1}, or -{depth}..-1 from the end",
                )
            )
    return out, diags


def not_a_vit_tap(tap: TapSpec, facts: ModelFacts) -> Diagnostic:
    """A tap on a model without ViT blocks: which models support taps, and what it can do."""
    logit = ", ".join(k for k, kind in KINDS.items() if not kind.paired)
    return error(
        f"{tap.text()}: {facts.name} ({facts.family}) cannot be tapped: it has "
        f"{facts.not_vit or 'no ViT blocks'}",
        tap.span,
        expected="a timm Vision Transformer with blocks on one patch grid (ViT, DeiT, "
        "DeiT III, EVA, BEiT, DINOv2, ...) on this side of the tap",
        hint=f"a model without ViT blocks takes part in logit terms only ({logit})",
    )


def make_context(spec: RecipeSpec, strict: bool = False) -> Context:
    """Resolve both models on the meta device (cached) and every tap."""
    student, d1 = _facts(spec, spec.student)
    teacher, d2 = _facts(spec, spec.teacher)
    taps: dict[tuple[str, str], list[TapPoint] | None] = {}
    diags = [*d1, *d2]
    for term in _paired(spec):
        for side, facts in (("student", student), ("teacher", teacher)):
            if facts is None:
                taps[(term.name, side)] = None
                continue
            points: list[TapPoint] | None = []
            for tap in getattr(term, side):
                got, errs = resolve_tap(tap, facts)
                diags.extend(errs)
                if any(d.is_error for d in errs) or points is None:
                    points = None
                else:
                    points.extend(got)
            taps[(term.name, side)] = points
    errors = tuple(d for d in diags if d.is_error)
    warnings = tuple(d for d in diags if not d.is_error)
    return Context(spec, student, teacher, errors, warnings, strict, taps)


Check = Callable[[Context], Iterable[Diagnostic]]


def _paired(spec: RecipeSpec) -> list[PairedTermSpec]:
    return [t for t in spec.terms if isinstance(t, PairedTermSpec)]


def check_models(ctx: Context) -> Iterable[Diagnostic]:
    """Unknown timm names, tags and arguments, models that are not ViTs, taps out of range or
    inside blocks that cannot be tapped."""
    yield from ctx.model_errors
    yield from ctx.tap_warnings


def check_teacher(ctx: Context) -> Iterable[Diagnostic]:
    """Terms that need a teacher need one; a teacher that no term uses is wasted compute."""
    needs = [t for t in ctx.spec.terms if KINDS[t.kind].needs_teacher]
    if ctx.spec.teacher is None and "teacher" in ctx.spec.spans:
        return  # declared but broken: its own errors say why, the terms are not at fault
    if ctx.spec.teacher is None:
        for t in needs:
            yield error(
                f"the {t.kind} term '{t.name}' needs a teacher, and the recipe has none",
                t.span,
                hint='add `teacher MODEL { weights = "..." }` or `teacher from "RECIPE"`',
            )
    elif not needs:
        yield warning(
            "the recipe has a teacher but no distill term uses it",
            ctx.spec.teacher.span,
            hint="add terms to `distill { ... }`, e.g. kd { temperature = 1.0 }",
        )


def check_cache(ctx: Context) -> Iterable[Diagnostic]:
    """A teacher cache (``cache``, ``topk``) stores the teacher's logits alone: a teacher's
    field, for recipes whose terms read only those logits, over a stream that replays."""
    spec = ctx.spec
    if spec.student is not None:
        for name in ("cache", "topk"):
            if getattr(spec.student, name) is not None:
                yield error(
                    f"{name} says how the teacher's outputs are stored; the student has none",
                    spec.student.at(name),
                    hint=f"move {name} to the teacher block",
                )
    t = spec.teacher
    if t is None:
        return
    if t.cache is None:
        if t.topk is not None:
            yield error(
                "topk is how many of the teacher's logits a cache keeps, and there is no cache",
                t.at("topk"),
                hint='add cache = "path/to/cache" to the teacher block, or remove topk',
            )
        return
    live = [x for x in spec.terms if x.weight > 0 and KINDS[x.kind].needs_teacher]
    for x in live:
        kind = KINDS[x.kind]
        if kind.paired or not kind.reads_teacher_logits:
            yield error(
                f"the {x.kind} term '{x.name}' reads the teacher's features, and a cache "
                "stores only its logits",
                t.at("cache"),
                expected="terms that read only the teacher's logits (kd, nkd, token, ...)",
                hint=f"remove cache from the teacher, or the {x.kind} term",
            )
    if not live:
        yield error(
            "no term reads the teacher's logits: there is nothing to cache",
            t.at("cache"),
            hint="remove cache from the teacher block",
        )
    if source(spec.data.source).streamed:
        yield error(
            f"a {spec.data.source} stream is read in the order its shards arrive, which a "
            "cache cannot replay",
            t.at("cache"),
            hint="use a map-style source (imagefolder, hfds), or remove cache",
        )
    classes = ctx.teacher.num_classes if ctx.teacher is not None else None
    if isinstance(t.topk, int) and classes is not None and t.topk > classes:
        yield error(
            f"topk = {t.topk} is more than the teacher's {classes} classes",
            t.at("topk"),
            hint="topk = all keeps every class",
        )


def check_tap_counts(ctx: Context) -> Iterable[Diagnostic]:
    """Both sides of ``->`` name the same number of taps (checked once both resolved)."""
    for t in _paired(ctx.spec):
        s, te = ctx.taps.get((t.name, "student")), ctx.taps.get((t.name, "teacher"))
        if s is None or te is None:
            continue
        if len(s) != len(te):
            yield error(
                f"{t.kind} '{t.name}' pairs {len(s)} student taps with {len(te)} teacher taps",
                t.span,
                expected="the same number of taps on both sides of ->",
            )


def check_pooled_taps(ctx: Context) -> Iterable[Diagnostic]:
    """``fc_norm`` is the pooled, normalised feature, one token per image: only a kind that
    compares features without a grid reads it (:meth:`Kind.reads_pooled`), and with fc_norm
    on both sides of ``->`` (patch tokens have a grid, it none). ``pre_logits``, the feature
    the classifier head reads, is read only by a kind that says so
    (:meth:`Kind.reads_pre_logits`)."""
    for t in _paired(ctx.spec):
        taps = (*t.student, *t.teacher)
        head = [x for x in taps if x.point == "pre_logits"]
        if head and not KINDS[t.kind].reads_pre_logits(t):
            readers = ", ".join(k for k, kind in KINDS.items() if kind.reads_pre_logits(None))
            yield error(
                f"{head[0].text()} is the pooled feature the classifier head reads, and "
                f"{t.kind} '{t.name}' does not read it",
                head[0].span,
                expected=f"pre_logits in a term that reads the head's feature ({readers})",
                hint=f"tap {head[0].side}.norm or {head[0].side}.blocks[-1] here",
            )
        pooled = [x for x in taps if x.point == "fc_norm"]
        resolved = all(ctx.taps.get((t.name, side)) is not None for side in ("student", "teacher"))
        if not pooled or not resolved:  # a tap that did not resolve has its own error
            continue
        if not KINDS[t.kind].reads_pooled(t):
            yield error(
                f"{pooled[0].text()} is one pooled vector per image, and {t.kind} "
                f"'{t.name}' compares patch tokens on a grid",
                pooled[0].span,
                expected="fc_norm in a term that compares features without a token grid",
                hint=f"tap {pooled[0].side}.blocks[-1] (the patch tokens) here",
            )
        elif len(pooled) != len(taps):
            other = next(x for x in taps if x.point != "fc_norm")
            yield error(
                f"{t.kind} '{t.name}' pairs the pooled fc_norm with patch tokens ({other.text()})",
                other.span,
                expected="fc_norm on both sides of ->",
                hint="the student's fc_norm needs a model that pools and then normalises "
                "(global_pool = avg on a timm ViT)",
            )


def check_sharded_taps(ctx: Context) -> Iterable[Diagnostic]:
    """Under FSDP, blocks run whole (each gathers its shards in its own forward): taps inside
    blocks need ``shard = none``."""
    if ctx.spec.train.shard != "fsdp":
        return
    for role in ("student", "teacher"):  # sharded per ViT block
        facts, model = ctx.facts(role), getattr(ctx.spec, role)
        if facts is not None and model is not None and not facts.vit:
            yield error(
                f"shard = fsdp shards per ViT block, and the {role} {facts.name} "
                f"({facts.family}) has none",
                ctx.spec.train.at("shard"),
                hint="train with shard = none (DDP)",
            )
    for term in _paired(ctx.spec):
        for tap in (*term.student, *term.teacher):
            if tap.sub in ("attn", "attn_map"):
                yield error(
                    f"{tap.text()}: taps inside blocks are not supported with shard = fsdp yet",
                    tap.at("sub"),
                    hint="tap whole blocks, or train with shard = none (DDP)",
                )


def check_terms(ctx: Context) -> Iterable[Diagnostic]:
    """Every term's weight is >= 0; then each kind's own checks."""
    for term in ctx.spec.terms:
        if term.weight < 0:
            yield error(
                f"weight must be >= 0, got {term.weight}",
                term.at("weight"),
                hint="a negative weight would push the student away from the target",
            )
        yield from KINDS[term.kind].check(term, ctx)


def check_classes(ctx: Context) -> Iterable[Diagnostic]:
    """Logit terms compare class distributions: the teacher's head comes from its weights (or
    the recipe says it is random), both heads have the same classes, and the data's class
    count (when known now) matches the student's head."""
    s, t, spec = ctx.student, ctx.teacher, ctx.spec
    logit = logit_terms(spec)
    missing = teacher_head_missing(ctx) if logit else None
    if missing is not None and spec.teacher is not None:
        why, span = missing
        yield error(
            f"{logit[0].kind} reads the teacher's logits, but {why}",
            span,
            hint='give a teacher trained on your classes (`teacher from "RECIPE"` or '
            'weights = "..."), distil features with taps (mimic, generate), or write '
            "head = random in the teacher block if a random head is meant (a test)",
        )
    elif s is not None and t is not None and logit and s.num_classes != t.num_classes:
        yield error(
            f"{logit[0].kind} compares logits, but the student has {s.num_classes} "
            f"classes and the teacher {t.num_classes}",
            logit[0].span,
            hint="give both models the same classes (num_classes)",
        )
    known = known_classes(spec.data.source, spec.data.classes)
    if known is not None and s is not None and s.num_classes != known and spec.student:
        yield error(
            f"the {spec.data.source} data has {known} classes, the student's head {s.num_classes}",
            spec.student.at("num_classes"),
            hint=f"set num_classes = {known}",
        )
    if spec.student is not None and spec.student.head is not None:
        yield error(
            "head says where the teacher's head comes from; the student's is trained",
            spec.student.at("head"),
            hint="remove head from the student block",
        )
    if spec.student is not None and spec.student.precision != "auto":
        yield error(
            "precision says how the frozen teacher's weights are held; the student trains "
            "under train.precision",
            spec.student.at("precision"),
            hint=f"remove precision from the student block (train {{ precision = "
            f"{'bf16' if spec.student.precision == 'fp8' else spec.student.precision} }})",
        )


def check_masked_teacher(ctx: Context) -> Iterable[Diagnostic]:
    """MaskedKD (``teacher { keep = 0.5 }``): a share of the patch tokens of a ViT teacher,
    chosen by the attention of a ViT student's class token in its last block, on the same
    patch grid; only terms that read the teacher's logits (a feature term's target would
    change with the tokens the teacher saw); written on the teacher only."""
    spec = ctx.spec
    if spec.student is not None and spec.student.keep is not None:
        yield error(
            "keep says which patch tokens the frozen teacher sees (MaskedKD); the student "
            "always sees the whole image",
            spec.student.at("keep"),
            hint="move keep into the teacher block",
        )
    teacher = spec.teacher
    if teacher is None or teacher.keep is None:
        return
    at = teacher.at("keep")  # its range, (0, 1], is the spec's (a positioned error there)
    if teacher.cache is not None:
        yield error(
            "keep masks the teacher's input at every step, and a cached teacher never runs: "
            "its logits come from the cache, computed on whole images",
            at,
            hint="remove keep, or cache: a masked teacher is cheaper, a cached one is free",
        )
    t, s = ctx.teacher, ctx.student
    if t is not None and not t.sub_taps:
        why = t.not_vit or "blocks vitkdl cannot run on a subset of the tokens"
        yield error(
            f"keep feeds the teacher a subset of its patch tokens, and the teacher {t.name} "
            f"({t.family}) has {why}",
            at,
            expected="a timm Vision Transformer teacher (ViT, DeiT, DeiT III) with plain blocks",
            hint="remove keep: a teacher without patch tokens runs whole",
        )
    if s is not None and (not s.sub_taps or s.num_prefix_tokens < 1):
        why = "no class token" if s.sub_taps else (s.not_vit or "blocks vitkdl cannot run")
        yield error(
            f"keep ranks the patches by the student's class-token attention in its last block, "
            f"and the student {s.name} ({s.family}) has {why}",
            at,
            expected="a timm Vision Transformer student with a class token",
            hint="remove keep from the teacher block",
        )
    if (
        t is not None
        and s is not None
        and t.sub_taps
        and s.sub_taps
        and tuple(t.grid) != tuple(s.grid)
    ):
        yield error(
            f"keep picks the teacher's patches by the student's attention to the same patches, "
            f"and their patch grids differ (student {s.grid[0]}x{s.grid[1]}, teacher "
            f"{t.grid[0]}x{t.grid[1]})",
            at,
            hint="give both models the same patch grid (img_size / patch_size), or remove keep",
        )
    for term in _paired(spec):
        if term.weight > 0 and term.teacher:
            yield error(
                f"the {term.kind} term '{term.name}' reads the teacher's features "
                f"({term.teacher[0].text()}), and with keep the teacher sees only some patch "
                "tokens: its targets would change",
                term.span,
                expected="with keep, only terms that read the teacher's logits ("
                + ", ".join(k for k, kind in KINDS.items() if kind.reads_teacher_logits)
                + ")",
                hint=f"remove keep from the teacher block, or the {term.kind} term",
            )
    if spec.train.shard == "fsdp":
        yield error(
            "keep reads the attention inside the student's last block, which is not supported "
            "with shard = fsdp yet",
            at,
            hint="train with shard = none (DDP), or remove keep",
        )


def logit_terms(spec: RecipeSpec) -> list:
    """The recipe's terms that read the teacher's logits (every logit kind, one rule)."""
    return [x for x in spec.terms if KINDS[x.kind].reads_teacher_logits]


def teacher_head_missing(ctx: Context) -> tuple[str, Span] | None:
    """Why the teacher's classifier head is not one its weights provide, and where, or None
    when they provide it, the recipe says ``head = random``, or it cannot be known before
    the run (hub weights not in the cache yet, a file that is not there yet or not
    safetensors).

    The one rule every logit kind is held to (:func:`check_classes`): a head that starts
    random makes the student learn noise, and it validates silently otherwise."""
    m, t = ctx.spec.teacher, ctx.teacher
    if m is None or t is None or m.head == "random" or m.from_recipe is not None:
        return None
    if m.pretrained:
        if t.pretrained_classes is None:
            return None
        tag = f"{t.arch}.{t.pretrained_tag}" if t.pretrained_tag else t.name
        if t.pretrained_classes == 0:
            return f"the pretrained {tag} has no classifier head", m.at("pretrained")
        if t.pretrained_classes != t.num_classes:
            return (
                f"the pretrained {tag} has a {t.pretrained_classes}-output head and the "
                f"teacher is built with {t.num_classes} classes: that head would start random",
                m.at("num_classes") if m.num_classes is not None else m.at("pretrained"),
            )
        return None
    if m.weights is not None:
        if t.head_key is None:
            return None
        path: Path | None = Path(m.weights)
        if hub.is_hub_name(m.weights):  # known only once in the hub cache (no network here)
            try:
                path = hub.cached(m.weights)
            except ImportError:
                path = None
        shapes = safetensors_shapes(path) if path is not None else None
        if shapes is None:
            return None
        shape = shapes.get(t.head_key)
        if shape is None:
            what = "weights" if hub.is_hub_name(m.weights) else "weights file"
            return f"the {what} {m.weights} has no head ({t.head_key})", m.at("weights")
        if shape[0] != t.num_classes:
            return (
                f"the head in {m.weights} ({t.head_key}) has {shape[0]} outputs and the teacher "
                f"is built with {t.num_classes} classes: that head would start random",
                m.at("weights"),
            )
        return None
    return "the teacher has no weights: its head would be random", m.at("model")


def safetensors_shapes(path: Path) -> dict[str, list[int]] | None:
    """The tensor shapes in a safetensors file, from its JSON header alone (no tensor is
    read, torch is not imported), or None when the file is missing or not safetensors."""
    if path.suffix != ".safetensors":
        return None
    try:
        with path.open("rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            if not 0 < size < 100_000_000:
                return None
            header = json.loads(fh.read(size))
    except (OSError, ValueError, UnicodeError):
        return None
    if not isinstance(header, dict):
        return None
    return {
        k: list(v["shape"])
        for k, v in header.items()
        if isinstance(v, dict) and isinstance(v.get("shape"), list)
    }


def check_image_size(ctx: Context) -> Iterable[Diagnostic]:
    """The data's image size is what the student's ViT was built for (the loader produces the
    student's resolution; the teacher's input is resized to its own inside the step, and a
    model without ViT blocks takes any size)."""
    spec = ctx.spec
    size = spec.data.image_size
    if size is None:
        return
    for role, facts in (("student", ctx.student),):
        model = getattr(spec, role)
        if facts is not None and model is not None and facts.vit and facts.img_size != (size, size):
            yield error(
                f"data.image_size is {size} but the {role} takes "
                f"{facts.img_size[0]}x{facts.img_size[1]} images",
                spec.data.at("image_size"),
                hint=f"set img_size = {size} on the {role} (timm resizes the position "
                "embedding) or change data.image_size",
            )


def check_channels(ctx: Context) -> Iterable[Diagnostic]:
    """Teacher and student read the same images: the same number of channels."""
    s, t, spec = ctx.student, ctx.teacher, ctx.spec
    if s is None or t is None or spec.teacher is None or s.in_chans == t.in_chans:
        return
    if not needs_teacher(x.kind for x in spec.terms):
        return
    yield error(
        f"the teacher reads {t.in_chans}-channel images and the student "
        f"{s.in_chans}-channel ones; both see the same batch",
        spec.teacher.at("in_chans"),
        hint=f"set in_chans = {s.in_chans} on the teacher",
    )


def check_data(ctx: Context) -> Iterable[Diagnostic]:
    """An imagefolder root exists and has train/ and val/ (a warning until ``run``)."""
    data = ctx.spec.data
    report = error if ctx.strict else warning
    if source(data.source).package is not None:
        yield from _check_reader_data(ctx)
        return
    if data.source != "imagefolder":
        if data.root is not None:
            yield warning(f"data.root is not used by the {data.source} data", data.at("root"))
        return
    if data.root is None:
        yield report(
            "data imagefolder has no root",
            data.at("source"),
            hint="pass --set data.root=/path/to/imagenet (a folder with train/ and val/)",
        )
        return
    root = Path(data.root)
    if not root.is_dir():
        yield report(
            f"data root {data.root} does not exist",
            data.at("root"),
            hint="pass --set data.root=/path/to/imagenet",
        )
        return
    for split in ("train", "val"):
        if not (root / split).is_dir():
            yield report(
                f"data root {data.root} has no {split}/ folder",
                data.at("root"),
                expected=f"{data.root}/{split}/<class>/<images>",
            )


def _check_reader_data(ctx: Context) -> Iterable[Diagnostic]:
    """``hfds`` and ``wds``: the optional package, where the data is, that it is there."""
    data = ctx.spec.data
    facts = source(data.source)
    report = error if ctx.strict else warning
    if importlib.util.find_spec(facts.package or "") is None:
        yield report(
            f"data {data.source} needs the {facts.package} package, which is not installed",
            data.at("source"),
            hint=f'pip install -e ".[{facts.extra}]" (or pip install {facts.package})',
        )
    if data.source == "hfds":
        if data.name is not None and data.root is not None:
            yield error(
                "data hfds takes a hub name or a local directory, not both",
                data.at("root"),
                hint='keep name = "org/dataset" or root = "DIR" (written by save_to_disk)',
            )
        elif data.name is None and data.root is None:
            yield report(
                "data hfds has neither name nor root",
                data.at("source"),
                hint='set name = "org/dataset" (the hub, through the datasets cache) or '
                "--set data.root=DIR (a directory written by save_to_disk)",
            )
        elif data.root is not None and not Path(data.root).is_dir():
            yield report(
                f"data root {data.root} does not exist",
                data.at("root"),
                expected="a directory written by datasets' save_to_disk",
            )
        return
    for field_name in ("root", "val_root"):
        pattern = getattr(data, field_name)
        if pattern is None:
            yield report(
                f"data wds has no {field_name}",
                data.at("source"),
                hint=f"pass --set data.{field_name}=shards/"
                f"{'train' if field_name == 'root' else 'val'}-{{0000..0099}}.tar",
            )
            continue
        shards = expand_braces(pattern)
        missing = [x for x in shards if not Path(x).is_file()]
        if missing:
            yield report(
                f"{len(missing)} of the {len(shards)} shards of data.{field_name} do not exist "
                f"({', '.join(missing[:2])}{', ...' if len(missing) > 2 else ''})",
                data.at(field_name),
                hint=f"pass --set data.{field_name}=... (paths are relative to the working "
                "directory)",
            )


def check_source_fields(ctx: Context) -> Iterable[Diagnostic]:
    """Fields of a data block that its source does not read."""
    data = ctx.spec.data
    users = {
        "name": ("hfds",),
        "split": ("hfds",),
        "val_split": ("hfds",),
        "val_root": ("wds",),
        "image_key": ("hfds", "wds"),
        "label_key": ("hfds", "wds"),
    }
    for name, sources in users.items():
        if name in data.spans and data.source not in sources:
            yield warning(
                f"data.{name} is not used by the {data.source} data",
                data.at(name),
                hint=f"it applies to data {' and '.join(sources)}",
            )


def check_weights(ctx: Context) -> Iterable[Diagnostic]:
    """Local weight files exist (a warning until ``run``); a teacher without weights is
    random."""
    report = error if ctx.strict else warning
    for role in ("student", "teacher"):
        model: ModelSpec | None = getattr(ctx.spec, role)
        if model is None:
            continue
        yield from _hub_weights(ctx, role, model)
        if model.weights is not None and hub.is_hub_name(model.weights):
            pass
        elif model.weights is not None and not Path(model.weights).is_file():
            yield report(
                f"weights file {model.weights} does not exist",
                model.at("weights"),
                hint="paths are relative to the working directory",
            )
        if (
            role == "teacher"
            and model.weights is None
            and model.from_recipe is None
            and not model.pretrained
            and not (logit_terms(ctx.spec) and model.head is None)  # an error there
        ):
            yield warning(
                "the teacher has no weights and would teach from random features",
                model.at("model"),
                hint='set weights = "path/to/teacher.safetensors"',
            )


def _hub_weights(ctx: Context, role: str, model: ModelSpec) -> Iterable[Diagnostic]:
    """Weights by name (``pretrained = true``, ``weights = "hf-hub:..."``): one source at a
    time, in the hub cache or downloadable (offline and not cached: an error in ``run``, a
    warning in ``validate``), and a pretrained head that fits."""
    facts = ctx.facts(role)
    if model.pretrained and model.weights is not None:
        yield error(
            f"the {role} has both pretrained = true and weights",
            model.at("pretrained"),
            hint="keep one: pretrained = true loads timm's tag, weights a file or hf-hub:org/repo",
        )
        return
    if model.pretrained and model.from_recipe is not None:
        return  # a teacher `from` a recipe is that recipe's student, not a timm tag
    repo, files, span = None, hub.DEFAULT_FILES, model.at("weights")
    if model.pretrained and facts is not None:
        if facts.hf_hub_id is None:
            yield error(
                f"{facts.name} has no pretrained weights on the Hugging Face hub in timm",
                model.at("pretrained"),
                hint='set weights = "path/to/weights.safetensors"',
            )
            return
        repo, files = facts.hf_hub_id, hub.weight_files(facts.hf_hub_filename)
        span = model.at("pretrained")
    elif hub.is_hub_name(model.weights):
        repo = model.weights
    if repo is None:
        return
    try:
        found = hub.cached(repo, files)
    except ImportError:
        found = None
    if found is not None:
        return
    name = hub.split_repo(repo)[0]
    if hub.offline():
        yield (error if ctx.strict else warning)(
            f"{name} is not in the Hugging Face hub cache {hub.cache_dir()}, and "
            "HF_HUB_OFFLINE is set",
            span,
            hint='run once online, or set weights = "path/to/weights.safetensors"',
        )
    elif not ctx.strict:
        yield warning(
            f"{name} is not in the Hugging Face hub cache {hub.cache_dir()}: "
            "`vitkdl run` downloads it",
            span,
        )


def check_schedule(ctx: Context) -> Iterable[Diagnostic]:
    """Warm-up shorter than training; mixup needs an even batch."""
    train, data = ctx.spec.train, ctx.spec.data
    if train.schedule.warmup_epochs >= train.epochs:
        yield warning(
            f"warm-up ({train.schedule.warmup_epochs:g} epochs) is not shorter than "
            f"training ({train.epochs} epochs): the lr never leaves warm-up",
            train.schedule.at("warmup_epochs") or train.at("epochs"),
        )
    if (data.mixup > 0 or data.cutmix > 0) and data.batch_size % 2:
        yield error(
            f"mixup/cutmix need an even batch size, got {data.batch_size}",
            data.at("batch_size"),
            hint=f"batch_size = {data.batch_size + 1}",
        )
    if train.shard == "fsdp" and train.ema is not None:
        yield error(
            "ema is not supported with shard = fsdp yet",
            train.at("ema"),
            hint="remove ema, or shard = none (DDP)",
        )
    opt = train.optimizer
    if (
        opt.name not in ("adamw", "adam", "nadamw", "lamb", "adan", "lion", "adopt", "laprop")
        and "betas" in opt.kwargs
    ):
        yield error(f"{opt.name} takes no betas", opt.at("betas"))


def check_unused_fields(ctx: Context) -> Iterable[Diagnostic]:
    """Fields that the chosen data source ignores."""
    data = ctx.spec.data
    if data.source != "synthetic":
        for name in ("size", "classes"):
            if name in data.spans:
                yield warning(f"data.{name} only applies to synthetic data", data.at(name))


CHECKS: tuple[Check, ...] = (
    check_models,
    check_teacher,
    check_cache,
    check_tap_counts,
    check_pooled_taps,
    check_sharded_taps,
    check_terms,
    check_classes,
    check_masked_teacher,
    check_image_size,
    check_channels,
    check_data,
    check_weights,
    check_schedule,
    check_unused_fields,
    check_source_fields,
)


def run_checks(
    spec: RecipeSpec, strict: bool = False, checks: tuple[Check, ...] = CHECKS
) -> tuple[Context, list[Diagnostic]]:
    """Run every check; returns the context (with model facts) and all diagnostics."""
    ctx = make_context(spec, strict)
    diags: list[Diagnostic] = []
    for check in checks:
        diags.extend(check(ctx))
    return ctx, diags
