"""Running recipes: dependencies first (``teacher from``), then the recipe, then comparisons.

A recipe whose teacher is the final student of another recipe needs that recipe's exported
``student.safetensors`` under ``OUT/<its name>/``, written by a run of exactly the recipe it
names (checked by the hash in its ``summary.json``); when it is missing or stale, that recipe is
trained first, as written (command-line overrides do not reach it). A recipe that extends a
complete student-only recipe (its baseline, like ``quickstart.vkd`` extends
``quickstart_baseline.vkd``) is compared with it at the end.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rich.console import Console

import vitkdl
from vitkdl.errors import VkdError
from vitkdl.spec import RecipeSpec, load_spec
from vitkdl.train import distributed
from vitkdl.train.loop import RunOptions, check_writable, train

SMOKE_STEPS = 3


@dataclass(frozen=True)
class RunRequest:
    """What ``vitkdl run`` was asked to do for each recipe."""

    out_root: Path = Path("runs")
    overrides: tuple[str, ...] = ()
    resume: bool = False
    force: bool = False
    max_steps: int | None = None
    smoke: bool = False
    quiet: bool = False
    device: str | None = None
    baseline: bool = True


def smoke_overrides(spec: RecipeSpec) -> list[str]:
    """Synthetic data of the recipe's own shapes, a small batch, a few steps."""
    batch = min(spec.data.batch_size, 8)
    return ["data.source=synthetic", f"data.batch_size={batch}", f"data.size={batch * 4}",
            "data.workers=0", "train.epochs=1", "train.eval_every=1"]


def _previous_summary(out: Path) -> dict[str, Any] | None:
    path = out / "summary.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _fresh(out: Path, recipe_hash: str) -> bool:
    summary = _previous_summary(out)
    return (summary is not None and summary.get("hash") == recipe_hash
            and (out / "student.safetensors").is_file())


def _ensure(path: str, req: RunRequest, console: Console, why: str) -> list[dict[str, Any]]:
    """The summaries of a run of ``path`` as written: reused when ``OUT/<name>/`` holds an
    export of exactly that recipe (same hash), else trained now (command-line overrides do
    not apply to it)."""
    spec = vitkdl.load(path)
    out = req.out_root / spec.name
    if _fresh(out, spec.hash()):
        reused = _previous_summary(out)
        assert reused is not None
        console.print(f"{why}: {out / 'student.safetensors'} is up to date", highlight=False)
        return [reused]
    console.print(f"{why}: missing or stale, training it first", highlight=False)
    dep_req = replace(req, overrides=(), resume=False, max_steps=None, baseline=False)
    return run_recipe(path, dep_req, console)[1]


def run_recipe(path: str | Path, req: RunRequest, console: Console
               ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run one recipe and what it depends on. Returns its own summary and the summaries of
    every run made or reused, in order (teacher, recipe, baseline)."""
    path = Path(path)
    overrides = list(req.overrides)
    if req.smoke:
        probe, diags, sources = load_spec(path, overrides)
        if probe is None:
            raise VkdError(diags, sources)
        overrides = smoke_overrides(probe) + overrides
    spec = vitkdl.load(path, overrides, strict=not req.smoke)
    job = distributed.current()
    if job.is_main:
        check_writable(req.out_root / spec.name)  # before any training, dependencies included
    distributed.barrier()
    summaries: list[dict[str, Any]] = []

    teacher = spec.teacher
    if teacher is not None and teacher.from_recipe is not None and not req.smoke:
        summaries += _ensure(teacher.from_recipe, req, console,
                             f"[bold]{spec.name}[/]: its teacher, the final student of "
                             f"{teacher.from_recipe}")

    plan = vitkdl.plan(spec, world_size=job.world_size)
    out = req.out_root / spec.name
    resolved = spec.canonical()
    opts = RunOptions(out_dir=out, device=req.device, resume=req.resume, force=req.force,
                      max_steps=SMOKE_STEPS if req.smoke and req.max_steps is None
                      else req.max_steps,
                      max_eval_batches=2 if req.smoke else None, quiet=req.quiet,
                      load_weights=not req.smoke, runs_dir=req.out_root, recipe=resolved)
    if job.is_main:
        (out / "recipe.json").write_text(json.dumps(resolved, indent=2) + "\n")
        (out / "plan.json").write_text(plan.model_dump_json(indent=2) + "\n")
    summary = train(plan, opts, console)
    summaries.append(summary)

    baseline = _baseline_of(spec) if req.baseline and not req.smoke else None
    if baseline is not None:
        summaries += _ensure(baseline, req, console,
                             f"[bold]{spec.name}[/]: its baseline {baseline}")
    return summary, summaries


def _baseline_of(spec: RecipeSpec) -> str | None:
    """The recipe ``spec`` extends directly, when it is a complete student-only recipe."""
    if not spec.extends or spec.teacher is None:
        return None
    base, diags, _ = load_spec(spec.extends[0])
    if base is None or base.student is None or base.teacher is not None:
        return None
    if any(d.is_error for d in diags):
        return None
    return spec.extends[0]


def run_many(paths: Sequence[str | Path], req: RunRequest, console: Console
             ) -> list[dict[str, Any]]:
    """Run each recipe; with several (or a recipe and its baseline), a comparison at the end."""
    from vitkdl.train.report import comparison_table, print_summary, write_comparison

    job = distributed.init_from_env()
    if not job.is_main:
        console = Console(quiet=True)  # rank 0 alone reports
    shown: dict[str, dict[str, Any]] = {}
    for path in paths:
        own, summaries = run_recipe(path, req, console)
        if not job.is_main:
            continue
        print_summary(console, own)
        for s in summaries:
            shown[s["recipe"]] = s
    if len(shown) > 1:
        rows = list(shown.values())
        console.print(comparison_table(rows))
        req.out_root.mkdir(parents=True, exist_ok=True)
        write_comparison(rows, req.out_root / "comparison.png")
        (req.out_root / "comparison.json").write_text(json.dumps(rows, indent=2) + "\n")
    return list(shown.values())
