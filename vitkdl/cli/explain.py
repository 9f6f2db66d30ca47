"""``vitkdl explain RECIPE``: the resolved plan, as tables or as JSON."""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from vitkdl.cli.common import add_recipe_options, consoles, print_diagnostics
from vitkdl.counts import count_words
from vitkdl.experiment import Grid, read_sweep
from vitkdl.optim import NO_DECAY_WORDS
from vitkdl.planner import COMPILE, PRECISION, ModelPlan, Plan, without_cache
from vitkdl.sources import source, teacher_affine
from vitkdl.terms import KINDS
from vitkdl.terms.base import adapter_words, points_words

HELP = """Print what the compiler will build after `extends`, overrides and defaults: models
(width, depth, heads, token grid, prefix tokens, parameters) and each model's timm.create_model
call with its arguments, each term with its absolute block indices, tensor shapes, adapter
modules and parameter counts, weight and per-element coefficient (a warning when it is
extreme), the total loss, data pipeline, optimizer and schedule, precision, compile mode, the
FLOPs per training image, and a sweep block's cells and seeds."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "explain",
        help="print the resolved plan of a recipe",
        description=HELP,
        epilog="examples:\n  vitkdl explain recipes/deit_base_vitkd_kd.vkd\n"
        "  vitkdl explain recipes/quickstart.vkd --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", metavar="RECIPE", help="a .vkd file")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument(
        "--world-size",
        type=int,
        default=1,
        metavar="N",
        help="plan for N devices (global batch = batch_size x N)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="also build the models (random weights) and trace the training step "
        "with torch._dynamo.explain: graphs, graph breaks, trace time",
    )
    p.add_argument(
        "--probe",
        action="store_true",
        help="also run the recipe's program (its weights loaded, eager, no optimizer step) on "
        "a few real batches of its training data: each term's value, its share of the loss "
        "and of the student's gradient, and the teacher's own top-1 on those batches",
    )
    p.add_argument(
        "--batches",
        type=int,
        default=2,
        metavar="N",
        help="batches the probe runs (default: 2)",
    )
    p.add_argument("--device", default=None, help="the probe's device (default: cuda if any)")
    p.add_argument(
        "--runs",
        default="runs",
        metavar="DIR",
        help="where a teacher `from` a recipe finds its run (default: runs)",
    )
    add_recipe_options(p)
    p.set_defaults(func=run)


_n = count_words  # short: it is in almost every line below


def _value(v: object) -> str:
    if isinstance(v, (list, tuple)):
        return "x".join(map(str, v))
    return str(v)


def _stats(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def _width(m: ModelPlan) -> str:
    if not m.vit:
        return f"{m.width} features, no ViT blocks (logit terms only)"
    return f"{m.width} x {m.depth} blocks, {m.heads} heads"


def _tokens(m: ModelPlan) -> str:
    if not m.vit:
        return "none (a classifier without patch tokens)"
    return f"{m.tokens} on a {m.grid[0]}x{m.grid[1]} grid (+{m.prefix_tokens} prefix)"


def _input(m: ModelPlan) -> str:
    h, w = m.input_size
    patch = f", patch {m.patch_size}" if m.vit else ""
    return f"{h}x{w}x{m.in_chans}{patch}, {m.interpolation}"


def _weights(m: ModelPlan) -> str:
    if m.from_recipe:
        return f"final student of {m.from_recipe}"
    if m.pretrained:
        where = f" (hub {m.hf_hub_id})" if m.hf_hub_id else ""
        return f"timm pretrained {m.arch}.{m.pretrained_tag}{where}"
    return m.weights or "random init"


def render_timm_calls(models: list[ModelPlan], out: Console) -> None:
    """How each model is created, with the arguments as they go to timm (``drop_path`` is
    ``drop_path_rate``; fields timm does not type, as written; no argument: the
    architecture's defaults): what a researcher checks first (drop_path, img_size, classes)."""
    for m in models:
        args = "".join(f", {k}={v!r}" for k, v in m.timm_kwargs.items())
        out.print(f"  {m.role}: timm.create_model({m.name!r}{escape(args)})", soft_wrap=True)


def _heads(m: ModelPlan, plan: Plan) -> str:
    if not m.distilled:
        return "one"
    if m.role == "student" and any(KINDS[t.kind].reads_dist_logits for t in plan.terms):
        return (
            "class + distillation: trained apart (class head <- labels, distillation "
            "head <- teacher), evaluated averaged"
        )
    return "class + distillation, averaged"


def _teacher_resize(plan: Plan) -> str | None:
    t = plan.teacher
    if t is None or not plan.teacher_used:
        return None
    size = t.input_size
    if tuple(size) == (plan.data.image_size, plan.data.image_size):
        return None
    return (
        f"the loader produces the student's {plan.data.image_size}x{plan.data.image_size}; "
        f"the step resizes the teacher's input to {size[0]}x{size[1]} ({t.interpolation}) "
        "in-graph"
    )


def _origins(origins: dict[str, str]) -> str:
    """``lr, weight_decay: base FILE; min_lr: default``: a call's arguments by origin."""
    groups: dict[str, list[str]] = {}
    for name, origin in origins.items():
        groups.setdefault(origin, []).append(name)
    return ", ".join(f"{', '.join(names)} ({origin})" for origin, names in groups.items())


def render_plan(plan: Plan, out: Console, origins: dict[str, dict[str, str]] | None = None) -> None:
    """Print a plan as tables (what ``vitkdl explain`` shows), section by section: the
    recipe, the models, the distillation terms, data and training, the cost."""
    _render_header(plan, out)
    _render_models(plan, out)
    _render_terms(plan, out)
    _render_setup(plan, out, origins)
    _render_cost(plan, out)


def _render_header(plan: Plan, out: Console) -> None:
    """The recipe, its file and hash, what it extends and the overrides."""
    out.print(f"[bold]recipe {escape(plan.recipe)}[/]  {escape(plan.file)}  hash {plan.hash}")
    if plan.extends:
        out.print(f"  extends: {escape(' -> '.join(plan.extends))}")
    for o in plan.overrides:
        out.print(f"  --set {escape(o)}")


def _render_models(plan: Plan, out: Console) -> None:
    """The teacher and the student side by side, how timm creates them and what the step
    does to the teacher's input."""
    models = Table(title="models", title_justify="left", show_edge=False)
    models.add_column("")
    shown = [m for m in (plan.teacher, plan.student) if m is not None]
    for m in shown:
        models.add_column(m.role)
    rows: list[tuple[str, Callable[[ModelPlan], str]]] = [
        ("model", lambda m: m.name),
        ("family", lambda m: m.family),
        ("width x depth", _width),
        ("tokens", _tokens),
        ("input", _input),
        ("input mean", lambda m: _stats(m.mean)),
        ("input std", lambda m: _stats(m.std)),
        ("classes", lambda m: str(m.num_classes)),
        ("parameters", lambda m: f"{_n(m.params)} ({m.params:,})"),
        ("forward FLOPs", lambda m: f"{_n(m.forward_flops)} per image"),
        ("weights", _weights),
        ("trains", lambda m: "yes" if m.trainable else "no (frozen, eval mode, no grad)"),
    ]
    if any(m.distilled for m in shown):
        rows.insert(4, ("heads", lambda m: _heads(m, plan)))
    for label, get in rows:
        models.add_row(label, *(escape(get(m)) for m in shown))
    out.print(models)
    render_timm_calls(shown, out)
    resize = _teacher_resize(plan)
    if resize is not None:
        out.print(f"  {escape(resize)}")
    if plan.teacher is not None:
        affine = teacher_affine(
            (plan.student.mean, plan.student.std), (plan.teacher.mean, plan.teacher.std)
        )
        if affine is not None:
            out.print(
                f"  the loader normalises for the student; the step re-normalises the "
                f"teacher's input in-graph: x * {_stats(affine[0])} + "
                f"{_stats(affine[1])}"
            )


def _render_terms(plan: Plan, out: Console) -> None:
    """Each distillation term in words (its kind's formula), then the total loss."""
    out.print("[bold]distill terms[/]")
    for t in plan.terms:
        kind = KINDS[t.kind]
        words = kind.words(t)
        out.print(
            f" [bold]{escape(t.name)}[/] ({t.kind})  weight {t.weight:g}, "
            f"coefficient {t.coefficient:.4g}"
        )
        if kind.paired:
            out.print(
                f"   {escape(', '.join(t.student_taps))} -> "
                f"{escape(', '.join(t.teacher_taps))}: "
                f"{points_words(t.student)} -> {points_words(t.teacher)}, "
                f"{'x'.join(map(str, t.student_shape))} -> "
                f"{'x'.join(map(str, t.teacher_shape))} per image per tap"
            )
        for a in t.adapters:
            out.print(f"   {escape(a.name)}: {escape(adapter_words(a))}  {_n(a.params)} params")
        if options := t.options.model_dump():
            opts = ", ".join(f"{k} {_value(v)}" for k, v in options.items() if v is not None)
            out.print(f"   {escape(opts)}")
        out.print(f"   {escape(words.formula)}  [dim]({escape(words.reduction)})[/]")
        for note in words.notes:
            out.print(f"   {escape(note)}")
    out.print(
        "   [dim]coefficient: weight x the elements a sum-reduced term sums over per "
        "image, i.e. its weight on the mean-reduced loss[/]"
    )
    out.print(
        f"[bold]loss[/] = {' + '.join(t.name for t in plan.terms)}  "
        f"[dim](adapters: {_n(sum(t.adapter_params for t in plan.terms))} params)[/]"
    )


def _render_setup(plan: Plan, out: Console, origins: dict[str, dict[str, str]] | None) -> None:
    """The data and training table."""
    setup = Table(
        title="data and training", title_justify="left", show_edge=False, show_header=False
    )
    setup.add_column("what")
    setup.add_column("value")
    _add_data_rows(plan, setup)
    _add_training_rows(plan, setup, origins)
    out.print(setup)


def _add_data_rows(plan: Plan, setup: Table) -> None:
    """Where the images come from, their size, the batch and the mixing."""
    d = plan.data
    sizes = (
        f", {d.train_images} train / {d.val_images} val images"
        if d.train_images is not None
        else ""
    )
    where = " ".join(
        x
        for x in (
            d.name,
            d.root,
            f"(split {d.split}, validation {d.val_split or 'validation'})"
            if d.source == "hfds"
            else None,
            f"(validation {d.val_root})" if d.val_root else None,
        )
        if x
    )
    setup.add_row(
        "data",
        escape(f"{d.source}{' ' + where if where else ''}{sizes}, {d.num_classes} classes"),
    )
    setup.add_row(
        "images",
        f"{d.image_size}x{d.image_size}, {d.in_chans} channel"
        f"{'s' * (d.in_chans != 1)}, augment: "
        f"{escape(source(d.source).augment[d.augment])}",
    )
    setup.add_row(
        "batch",
        f"{d.batch_size} per device x {plan.world_size} device"
        f"{'s' * (plan.world_size != 1)} = {d.global_batch} global, "
        f"{d.workers} workers",
    )
    setup.add_row(
        "mixing", f"mixup {d.mixup:g}, cutmix {d.cutmix:g}, label smoothing {d.smoothing:g}"
    )
    setup.add_row(
        "seeds",
        f"data {d.seed} (data.seed, else train.seed: order, augmentation, mixup/cutmix), "
        f"student {plan.seed} (train.seed: initialisation, drop path, masks)",
    )


def _add_training_rows(plan: Plan, setup: Table, origins: dict[str, dict[str, str]] | None) -> None:
    """Optimizer, schedule, the training loop's settings, precision, compile, sharding."""
    d = plan.data
    o = plan.optimizer
    kwargs = "".join(f", {k} = {v}" for k, v in o.kwargs.items())
    setup.add_row(
        "optimizer",
        f"{o.name}(lr = {o.lr:g}, weight_decay = {o.weight_decay:g}"
        f"{escape(kwargs)}) as written for global batch "
        f"{d.global_batch} (no automatic lr scaling), no decay on "
        f"{NO_DECAY_WORDS}; "
        f"{_n(o.trainable_params)} trainable parameters",
    )
    s = plan.schedule
    setup.add_row(
        "schedule",
        f"{s.name} per {s.per} over {s.epochs} epochs, warm-up "
        f"{s.warmup_epochs:g} epochs from {s.warmup_lr:g}, min lr "
        f"{s.min_lr:g}",
    )
    if origins is not None:
        setup.add_row(
            "arguments from",
            escape(
                f"optimizer {_origins(origins['optimizer'])}; "
                f"schedule {_origins(origins['schedule'])}"
            ),
        )
    setup.add_row(
        "training",
        f"clip_grad {plan.clip_grad if plan.clip_grad else 'off'}, "
        f"ema {plan.ema if plan.ema else 'off'}, eval "
        f"every {plan.eval_every}, checkpoint every "
        + (
            f"{plan.checkpoint_every} epoch(s)"
            if plan.checkpoint_unit == "epochs"
            else f"{plan.checkpoint_every:g} {plan.checkpoint_unit}"
        ),
    )
    setup.add_row("precision", PRECISION[plan.precision])
    setup.add_row("compile", COMPILE[plan.compile])
    setup.add_row(
        "sharding",
        "fsdp: student, adapters and teacher sharded per block (fully_shard) across devices"
        if plan.shard == "fsdp"
        else "none: DDP replicas of the student and adapters when on several devices",
    )


def _render_cost(plan: Plan, out: Console) -> None:
    """FLOPs per training image, part by part, and per global batch."""
    d = plan.data
    c = plan.cost
    cost = Table(
        title="cost per training image (FLOPs)",
        title_justify="left",
        show_edge=False,
        show_header=False,
    )
    cost.add_column("part")
    cost.add_column("FLOPs", justify="right")
    cached = " (cached: not run)" if plan.cache is not None else ""
    cost.add_row(f"teacher forward{cached}", _n(c.teacher_forward))
    cost.add_row("student forward + backward", _n(c.student_forward_backward))
    cost.add_row("adapters forward + backward", _n(c.adapters_forward_backward))
    cost.add_row("total", _n(c.total))
    cost.add_row("per global batch", _n(c.total * d.global_batch))
    out.print(cost)


def run(args: argparse.Namespace) -> int:
    import vitkdl
    from vitkdl.errors import VkdError

    out, err = consoles()
    spec, diags, sources = vitkdl.validate(args.recipe, args.overrides)
    print_diagnostics(err, diags, sources)
    if spec is None or any(d.is_error for d in diags):
        return 2
    try:
        if args.world_size < 1:
            err.print("vitkdl explain: error: --world-size must be at least 1")
            return 2
        plan = vitkdl.plan(spec, world_size=args.world_size)
    except VkdError as exc:
        print_diagnostics(err, exc.diagnostics, exc.sources)
        return 2
    grid, _ = read_sweep(args.recipe, sources)  # its problems were reported by validate
    report = compile_report(plan) if args.compile else None
    probed = None
    if args.probe:
        probed, code = _probe(plan, args, err)
        if probed is None:
            return code
    # Where each call argument came from: the spec's spans (the plan holds only values).
    origins = {
        "optimizer": spec.call_origins(spec.train.optimizer),
        "schedule": spec.call_origins(spec.train.schedule),
    }
    if args.json:
        data = plan.model_dump(mode="json")
        for name, by_arg in origins.items():
            data[name]["origins"] = by_arg
        for term, entry in zip(data["terms"], plan.terms, strict=True):  # the plan in words
            words = KINDS[entry.kind].words(entry)
            term["formula"], term["reduction"] = words.formula, words.reduction
            term["notes"] = list(words.notes)
        if not grid.empty:
            data["sweep"] = sweep_data(grid)
        if report is not None:
            data["compile_report"] = report
        if probed is not None:
            data["probe"] = probed.to_dict()
        out.print_json(data=data)
    else:
        render_plan(plan, out, origins)
        render_teacher_depth(plan, out)
        render_teacher_precision(plan, out)
        render_teacher_keep(plan, out)
        render_teacher_cache(plan, out)
        if not grid.empty:
            render_sweep(grid, out)
        if report is not None:
            out.print(
                "[bold]compile report[/] (torch._dynamo.explain of the training step, "
                f"batch {report['batch']}, random weights)"
            )
            for line in report["lines"]:
                out.print(f"  {escape(line)}")
        if probed is not None:
            render_probe(probed, out)
    return 0


def _probe(plan: Plan, args: argparse.Namespace, err: Console) -> tuple[Any, int]:
    """Run the probe (imports torch), or print why it cannot run: ``(report, 0)`` or
    ``(None, exit status)``."""
    from vitkdl.errors import VkdError
    from vitkdl.program import device_problem
    from vitkdl.train.data import DataError

    if args.batches < 1:
        err.print("vitkdl explain: error: --batches must be at least 1")
        return None, 2
    if args.device is not None and (problem := device_problem(args.device)) is not None:
        err.print(f"vitkdl explain: error: {escape(problem)}")
        return None, 2
    from vitkdl.probe import probe

    try:
        return probe(plan, args.batches, args.device, runs_dir=args.runs), 0
    except VkdError as exc:
        print_diagnostics(err, exc.diagnostics, exc.sources)
        return None, 2
    except DataError as exc:
        err.print(f"vitkdl explain: error: {escape(str(exc))}")
        return None, 2


def _share(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.1%}"


def render_probe(report: Any, out: Console) -> None:
    """The probe's table (:class:`vitkdl.probe.ProbeReport`): each term's value, its share of
    the loss and of the student's gradient, and the teacher's top-1 on the probed images."""
    table = Table(
        title=f"probe: {report.batches} batch{'es' * (report.batches != 1)}, "
        f"{report.images} training images on {report.device} (eager, before any step)",
        title_justify="left",
        show_edge=False,
    )
    for name, justify in (
        ("term", "left"),
        ("value", "right"),
        ("share of loss", "right"),
        ("|grad| (student)", "right"),
        ("share of grad", "right"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for t in report.terms:
        table.add_row(
            escape(f"{t.name} ({t.kind})"),
            f"{t.value:.4g}",
            _share(t.loss_share),
            f"{t.grad_norm:.4g}",
            _share(t.grad_share),
        )
    table.add_row("total", f"{report.loss:.4g}", "100%", f"{report.grad_norm:.4g}", "100%")
    out.print(table)
    out.print(
        "  [dim]share of grad: the term's gradient projected on the total's, "
        "<g_term, g> / |g|^2 (sums to 100%; negative: it pulls against the rest)[/]"
    )
    if report.teacher_top1 is not None:
        out.print(
            f"  teacher top-1 on these images: {report.teacher_top1:.1f}% "
            f"({report.teacher_correct}/{report.images}; before mixup, eval mode)"
        )
    if report.fidelity is not None:
        render_fidelity(dataclasses.asdict(report.fidelity), report.images, out)


def render_fidelity(f: dict[str, Any], images: int, out: Console, indent: str = "  ") -> None:
    """What holding the teacher in a lower precision changes (:class:`vitkdl.probe.Fidelity`
    as data): its top-1 agreement with the reference precision and each tap's cosine."""
    out.print(
        f"{indent}teacher in {f['held']} against {f['reference']} (the same weights, "
        f"{images} images):"
    )
    if f["top1_agreement"] is not None:
        out.print(f"{indent}  top-1 agreement {f['top1_agreement']:.1f}% ({f['agreed']}/{images})")
    for key, cos in f["cosine"].items():
        out.print(f"{indent}  cosine of teacher.{escape(key)}: {cos:.6f}")


#: How a teacher's ``precision`` holds its weights, in words.
TEACHER_PRECISION = {
    "fp32": "fp32 weights (as loaded), whatever the autocast",
    "bf16": "bf16 weights (its input cast to bf16), on every device",
    "fp8": "FP8 linear layers (torchao's float8 inference: dynamic scaling), the rest in "
    "bf16; needs torchao (the [fp8] extra) and a GPU with FP8",
}


def render_teacher_precision(plan: Plan, out: Console) -> None:
    """``teacher precision: ...``: printed only when the recipe writes one (``auto``, the
    default, holds it in bf16 under bf16 autocast on CUDA and as loaded elsewhere)."""
    t = plan.teacher
    if t is None or not plan.teacher_used or t.precision == "auto":
        return
    out.print(f"[bold]teacher precision[/]: {escape(TEACHER_PRECISION[t.precision])}")


def render_teacher_keep(plan: Plan, out: Console) -> None:
    """``teacher tokens: 98 of 196 patches ...``: printed only when the recipe writes ``keep``
    (MaskedKD): the tokens the teacher sees, how they are chosen, and its FLOPs saved."""
    t = plan.teacher
    if t is None or not plan.teacher_used or t.keep is None:
        return
    prefix = {0: "", 1: " plus its class token", 2: " plus its class and distillation tokens"}.get(
        t.prefix_tokens, f" plus its {t.prefix_tokens} prefix tokens"
    )
    if plan.teacher_keep is None:
        out.print(
            f"[bold]teacher tokens[/]: all {t.tokens} patches{prefix} (keep = {t.keep:g}: "
            "the full teacher)"
        )
        return
    saved = 1 - plan.cost.teacher_forward / t.forward_flops
    out.print(
        f"[bold]teacher tokens[/]: {plan.teacher_keep} of {t.tokens} patches{prefix} (keep = "
        f"{t.keep:g}, MaskedKD: each image's patches that the student's class token attends to "
        "most in its last block, mean over heads, no gradient through the choice; each patch "
        f"with its own position embedding), {_n(plan.cost.teacher_forward)} FLOPs per image "
        f"instead of {_n(t.forward_flops)} ({saved:.0%} of a full teacher forward saved)"
    )


def byte_words(n: int) -> str:
    """A byte count as people read it: ``4.0 KB``, ``16.1 GB`` (powers of 1000)."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def render_teacher_cache(plan: Plan, out: Console) -> None:
    """``teacher cache: PATH, ...``: where the teacher's logits are stored, what each sample
    keeps, the cache's size over the run, and what the step then skips."""
    c = plan.cache
    if c is None:
        return
    kept = (
        f"all {c.classes} logits in fp32 (exact)"
        if c.exact
        else f"the top {c.topk} of {c.classes} logits (fp16 values, int"
        f"{16 if c.classes <= 32767 else 32} indices; the rest of the distribution spread "
        "evenly, as TinyViT does)"
    )
    total = c.total_bytes
    size = (
        f"{byte_words(total)} for {c.epochs} epochs of {c.samples_per_epoch:,} samples"
        if total is not None
        else f"{c.epochs} epochs of the data's samples (its size is known once it is read)"
    )
    out.print(
        f"[bold]teacher cache[/]: {escape(c.path)}, {kept}: {c.bytes_per_sample:,} bytes per "
        f"sample, {size}; keyed by the teacher's weights, the data, the transforms, the "
        f"batch, the world size and data seed {plan.data.seed}. The step reads the teacher's "
        "logits from it and never runs (or builds) the teacher; `vitkdl cache` fills it "
        "(a run fills what is missing first)."
    )


def render_teacher_depth(plan: Plan, out: Console) -> None:
    """``teacher depth: 2 of 12 blocks ...``: printed only when the teacher stops early (no term
    reads its logits or any point after its deepest tapped block), with the FLOPs of the depth
    that runs against the full forward's."""
    t = plan.teacher
    if t is None or not plan.teacher_used or not 0 < plan.teacher_depth < t.depth:
        return
    out.print(
        f"[bold]teacher depth[/]: {plan.teacher_depth} of {t.depth} blocks run (no term reads "
        f"its logits or any point after block {plan.teacher_depth - 1}: no later block, final "
        f"norm or head), {_n(plan.cost.teacher_forward)} FLOPs per image instead of "
        f"{_n(t.forward_flops)} "
        f"({plan.cost.teacher_forward / t.forward_flops:.0%} of a full teacher forward)"
    )


def sweep_data(grid: Grid) -> dict[str, object]:
    """A recipe's ``sweep`` block as data: its axes, seeds, and the runs they make."""
    cells, seeds = len(grid.cells()), len(grid.seed_values)
    return {
        "axes": {a.path: list(a.texts) for a in grid.axes},
        "seeds": list(grid.seeds.texts) if grid.seeds is not None else None,
        "cells": cells,
        "runs": cells * seeds,
    }


def render_sweep(grid: Grid, out: Console) -> None:
    """``sweep: 3 cells x 3 seeds = 9 runs`` and each axis (the plan above is the recipe as
    written; ``vitkdl run`` runs it once per cell and seed)."""
    d = sweep_data(grid)
    cells, runs = d["cells"], d["runs"]
    seeds = (
        f"{len(grid.seed_values)} seed{'s' * (len(grid.seed_values) != 1)}"
        if grid.seeds is not None
        else "the recipe's seed"
    )
    out.print(
        f"[bold]sweep[/]: {cells} cell{'s' * (cells != 1)} x {seeds} = "
        f"{runs} run{'s' * (runs != 1)}  [dim](vitkdl run runs each; the plan above is the "
        "recipe as written)[/]"
    )
    for a in grid.axes:
        out.print(f"  {escape(a.path)} = [{escape(', '.join(a.texts))}]")
    if grid.seeds is not None:
        out.print(f"  seeds = [{escape(', '.join(grid.seeds.texts))}]")


def compile_report(plan: Plan) -> dict[str, object]:
    """Build the program with random weights and trace one step (imports torch)."""
    import dataclasses

    import torch

    from vitkdl.program import build

    program = build(without_cache(plan), "cpu", load=False)  # traced, never run compiled
    batch = 2
    images = torch.randn(batch, plan.student.in_chans, plan.data.image_size, plan.data.image_size)
    targets = torch.randint(0, plan.student.num_classes, (batch,))
    report = program.compile_report(images, targets)
    return {"batch": batch, "lines": report.lines(), **dataclasses.asdict(report)}
