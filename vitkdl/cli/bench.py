"""``vitkdl bench RECIPE``: images/s and peak memory of the compiled step against the eager
step, a hook-based implementation and the student-only floor."""

from __future__ import annotations

import argparse
import os
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from vitkdl.bench_options import (
    BACKENDS,
    CONFIGURATIONS,
    DEFAULT_STEPS,
    DEFAULT_WARMUP,
    FLOOR_MODES,
    LABELS,
    TEACHER_CONFIGURATIONS,
)
from vitkdl.cli.common import add_recipe_options, consoles, print_diagnostics
from vitkdl.cli.explain import render_fidelity

HELP = """Measure, in one process on the recipe's real models (random weights) and synthetic
batches of its shapes: (a) vitkdl's compiled step, (b) the same step eager, (c) a plain eager
implementation with forward hooks, two full forwards and a hand-written loss module, (d) the
floor: a student-only training step plus teacher inference, (e) for recipes timm can express
(kd or token with the labels), timm's own LogitDistillationTask / TokenDistillationTask;
then the teacher's options, each the compiled step with one option on, where the recipe and
the machine allow it: (f) the plain teacher (whole, fp32 weights, every token) they are
compared with, (g) early exit, (h) bf16, (i) fp8, (j) cached logits (the teacher's logits an
input of the step), (k) the masked teacher (keep, MaskedKD). Prints images/s, ms/step, peak
memory, the ratios a/b, a/c and the overhead of a over d, each option's speed-up over (f), the
teacher's share of the step, (j) against the student-only step, a breakdown of the compiled
step and the data loader's own images/s. Each configuration is warmed up (--warmup steps; the first
compiles, its extra time is shown as compile time), then all are timed in --steps interleaved
rounds, one step of each per round; medians are shown. Weight files and the data root are not
needed (a missing root only skips the loader measurement)."""

EPILOG = """examples:
  vitkdl bench recipes/quickstart.vkd
  vitkdl bench recipes/deit_tiny_vitkd_kd.vkd --steps 5 --set student.depth=4 \\
      --set teacher.depth=4 --batch 16
  vitkdl bench recipes/deit_base_vitkd_kd.vkd --batch 128 --json > bench.json
  vitkdl bench recipes/quickstart.vkd --set '~distill.mimic' --set '~distill.generate' \
      --configs cached_logits,masked --floor best

On CPU, inductor compiles each graph in about a minute the first time (cached afterwards);
--backend aot_eager or eager (for tests and debugging) skip code generation."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="measure the compiled step against what it replaces",
        description=HELP,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", metavar="RECIPE", help="a .vkd file")
    add_recipe_options(p)
    p.add_argument("--json", action="store_true", help="print every figure as JSON")
    p.add_argument(
        "--steps",
        type=int,
        default=DEFAULT_STEPS,
        metavar="N",
        help=f"timed steps per figure (default {DEFAULT_STEPS}; medians are reported)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=DEFAULT_WARMUP,
        metavar="N",
        help=f"untimed steps before timing (default {DEFAULT_WARMUP})",
    )
    p.add_argument(
        "--batch",
        type=int,
        default=None,
        metavar="B",
        help="batch size (default: the recipe's data.batch_size)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if any)")
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default=os.environ.get("VITKDL_BENCH_BACKEND", "inductor"),
        help="torch.compile backend of the compiled figures (default inductor, as "
        "training; aot_eager/eager are for testing and debugging; env "
        "VITKDL_BENCH_BACKEND)",
    )
    p.add_argument(
        "--compile-mode",
        default="default",
        metavar="MODE",
        help="inductor mode: default, max-autotune, ... (default: default)",
    )
    p.add_argument(
        "--floor",
        choices=FLOOR_MODES,
        default="auto",
        help="the floor's student step and teacher inference: auto (compiled on "
        "CUDA, eager on CPU), eager, compiled, best (both, the faster)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="CPU threads (default: the trainer's rule, 1 for small steps)",
    )
    p.add_argument(
        "--no-breakdown",
        dest="breakdown",
        action="store_false",
        help="skip timing the compiled step's parts",
    )
    p.add_argument(
        "--no-loader", dest="loader", action="store_false", help="skip timing the data loader"
    )
    p.add_argument(
        "--configs",
        type=lambda text: [n.strip() for n in text.split(",") if n.strip()],
        default=None,
        metavar="NAME,...",
        help="the configurations to measure (default all: "
        f"{', '.join(CONFIGURATIONS)}); compiled and floor always",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import vitkdl
    from vitkdl.bench import BenchError, bench_plan
    from vitkdl.errors import VkdError

    out, err = consoles()
    if args.device is not None:
        from vitkdl.program import device_problem

        problem = device_problem(args.device)
        if problem is not None:
            err.print(f"vitkdl bench: error: {problem}", highlight=False)
            return 2
    overrides = list(args.overrides)
    if args.batch is not None:
        if args.batch < 1:
            err.print("vitkdl bench: error: --batch must be at least 1")
            return 2
        overrides.append(f"data.batch_size={args.batch}")
    spec, diags, sources = vitkdl.validate(args.recipe, overrides)
    # Only errors: the bench builds random weights and synthetic batches, so the warnings
    # about missing weight files or a missing data root do not apply (the loader reports).
    errors = [d for d in diags if d.is_error]
    print_diagnostics(err, errors, sources)
    if spec is None or errors:
        return 2
    try:
        plan = vitkdl.plan(spec)
    except VkdError as exc:
        print_diagnostics(err, exc.diagnostics, exc.sources)
        return 2
    progress = None if args.json else (lambda line: err.print(f"[dim]{escape(line)}[/]"))
    try:
        result = bench_plan(
            plan,
            steps=args.steps,
            warmup=args.warmup,
            device=args.device,
            compile_backend=args.backend,
            compile_mode=args.compile_mode,
            floor=args.floor,
            breakdown=args.breakdown,
            loader=args.loader,
            threads=args.threads,
            progress=progress,
            configs=args.configs,
        )
    except BenchError as exc:
        err.print(f"[bold red]vitkdl bench: error:[/] {escape(str(exc))}")
        return 2
    except VkdError as exc:
        print_diagnostics(err, exc.diagnostics, exc.sources)
        return 2
    if args.json:
        out.print_json(data=result.to_dict())
    else:
        render(result.to_dict(), out)
    return 0


def _f(x: float | None, fmt: str = ".1f") -> str:
    return "-" if x is None else format(x, fmt)


def _pct(x: float | None) -> float | None:
    return None if x is None else 100 * x


def render(r: dict[str, Any], out: Console) -> None:
    """The bench result (``BenchResult.to_dict()``) as rich tables and lines."""
    _render_header(r, out)
    _render_configs(r["configs"], out, r["batch"])
    _render_ratios(r["ratios"], out)
    if r["breakdown"]:
        _render_breakdown(r["breakdown"], out)
    if r["loader"]:
        _render_loader(r["loader"], out)
    out.print(f"[dim]memory: {escape(r['memory_kind'])}[/]")
    for note in r["notes"]:
        out.print(f"[dim]{escape(note)}[/]")
    out.print(f"[dim]bench wall time {_f(r['wall_seconds'])} s[/]")


def _render_header(r: dict[str, Any], out: Console) -> None:
    """The recipe, the models and what ran them."""
    teacher = f" <- {r['teacher']}" if r["teacher"] else ""
    threads = f", {r['threads']} thread(s)" if r["threads"] else ""
    mode = f" mode={r['compile_mode']}" if r["compile_mode"] else ""
    out.print(f"[bold]{escape(r['recipe'])}[/]: {escape(r['student'] + teacher)}")
    out.print(
        f"  {escape(r['device_name'])} ({r['device']}{threads}), batch {r['batch']}, "
        f"{r['precision']}, compile backend {r['backend']}{mode}, median of "
        f"{r['steps']} steps after {r['warmup']} warm-up"
    )


def _render_configs(c: dict[str, Any], out: Console, batch: int) -> None:
    """One row per configuration measured (in the order measured), then the floor's parts."""
    a_ms = c["compiled"]["ms_per_step"]
    table = Table(title="training step", title_justify="left")
    table.add_column("configuration")
    for column in ("images/s", "ms/step", "speed vs (a)", "peak MiB", "compile s"):
        table.add_column(column, justify="right")
    with_mfu = any(v.get("mfu") is not None for v in c.values())
    if with_mfu:
        table.add_column("MFU", justify="right")
    for key, v in c.items():
        row = [
            LABELS.get(key, key),
            _f(v["images_per_second"]),
            _f(v["ms_per_step"], ".2f"),
            f"{a_ms / v['ms_per_step']:.2f}x" if v["ms_per_step"] else "-",
            _f(v["peak_memory_mb"], ".0f"),
            _f(v["compile_seconds"]),
        ]
        if with_mfu:
            row.append("-" if v.get("mfu") is None else f"{100 * v['mfu']:.1f}%")
        table.add_row(*row)
    out.print(table)
    d = c["floor"]["details"]
    out.print(
        f"  floor: student step {_f(d['student_step_ms'], '.2f')} ms "
        f"({d['student_mode']}) + teacher inference "
        f"{_f(d['teacher_inference_ms'], '.2f')} ms ({d['teacher_mode'] or 'no teacher'})"
    )
    for key, v in c.items():
        if v["details"].get("fidelity") is not None:
            out.print(f"  {LABELS.get(key, key)}, on the bench batch:")
            render_fidelity(v["details"]["fidelity"], batch, out, indent="    ")


def _render_ratios(q: dict[str, Any], out: Console) -> None:
    """The speed-ups over the other configurations and the overhead over the floor."""
    out.print(
        f"[bold]ratios[/] (speed-up = the other's ms / compiled ms): compiled vs eager "
        f"{_f(q['compiled_vs_eager'], '.2f')}x, compiled vs hooks "
        f"{_f(q['compiled_vs_hooks'], '.2f')}x, overhead over the floor "
        f"{_f(_pct(q['overhead_vs_floor']))}% (the adapters' FLOPs alone add "
        f"{_f(_pct(q.get('overhead_vs_floor_from_flops')))}%: work the floor leaves out)"
    )
    if q.get("compiled_vs_timm") is not None:
        out.print(
            f"  compiled vs timm's own task (what timm users run today): "
            f"{_f(q['compiled_vs_timm'], '.2f')}x"
        )
    if q.get("overhead_vs_floor_plus_losses") is not None:
        out.print(
            f"  overhead over the floor plus the measured adapters and losses: "
            f"{_f(_pct(q['overhead_vs_floor_plus_losses']))}%"
        )
    _render_teacher_ratios(q, out)


def _render_teacher_ratios(q: dict[str, Any], out: Console) -> None:
    """The teacher's share of the step and each teacher option's speed-up over (f)."""
    shares = []
    if q.get("teacher_share") is not None:
        shares.append(f"{_f(_pct(q['teacher_share']))}% of the compiled step's parts")
    if q.get("teacher_share_of_plain") is not None:
        shares.append(f"{_f(_pct(q['teacher_share_of_plain']))}% of (f)'s step (f against j)")
    if shares:
        out.print(f"[bold]the teacher[/]: {'; '.join(shares)}")
    options = [
        f"{LABELS[n].split(' ', 1)[1]} {_f(q[f'{n}_vs_plain'], '.2f')}x"
        for n in TEACHER_CONFIGURATIONS[1:]
        if q.get(f"{n}_vs_plain") is not None
    ]
    if options:
        out.print(f"  speed-up over (f) the plain teacher: {', '.join(options)}")
    if q.get("cached_vs_student_only") is not None:
        out.print(
            "  cached logits against the student-only step (the floor's): "
            f"{_f(q['cached_vs_student_only'], '.3f')}x"
        )


_PARTS = {
    "teacher_forward": "teacher forward",
    "student_forward_backward": "student forward + backward",
    "adapters_losses": "adapters + losses (fwd + bwd)",
    "optimizer": "optimizer (clip, AdamW, zero)",
}


def _render_breakdown(b: dict[str, Any], out: Console) -> None:
    """The compiled step part by part, with each part's share."""
    bt = Table(
        title="compiled step, part by part (each compiled alone, synchronised)",
        title_justify="left",
    )
    bt.add_column("part")
    bt.add_column("ms", justify="right")
    bt.add_column("share", justify="right")
    for key, label in _PARTS.items():
        share = b["share"].get(f"{key}_ms")
        bt.add_row(
            label, _f(b[f"{key}_ms"], ".2f"), "-" if share is None else f"{100 * share:.0f}%"
        )
    bt.add_row("sum of parts", _f(b["sum_of_parts_ms"], ".2f"), "")
    bt.add_row("whole compiled step", _f(b["step_ms"], ".2f"), "")
    out.print(bt)


def _render_loader(ld: dict[str, Any], out: Console) -> None:
    """The data loader's own images/s against the compiled step's, or why it was skipped."""
    if "skipped" in ld:
        out.print(
            f"[bold]data loader[/] ({escape(ld['source'])}): not measured: {escape(ld['skipped'])}"
        )
        return
    verdict = (
        "keeps up" if ld["keeps_up"] else "[yellow]slower than the step: raise data.workers[/]"
    )
    out.print(
        f"[bold]data loader[/] ({escape(ld['source'])}, {ld['workers']} workers): "
        f"{_f(ld['images_per_second'])} images/s = "
        f"{_f(ld['vs_step'], '.2f')}x the compiled step's; {verdict} "
        f"(first batch {_f(ld['first_batch_seconds'], '.2f')} s)"
    )
