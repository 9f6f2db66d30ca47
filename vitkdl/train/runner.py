"""Running recipes: dependencies first (``teacher from``), then the recipe, then comparisons.

Every run has its own folder, ``OUT/NAME-HASH/`` (:mod:`vitkdl.runs`), keyed by the hash of
the resolved recipe, overrides and seed included; ``OUT/NAME`` links to the latest. A finished
run is reused, never trained again or replaced, unless ``--force``; an unfinished one is
continued with ``--resume`` (or started over with ``--force``), never overwritten silently.

``--max-steps N`` applies to every run the command starts, its teacher and baseline included,
so ``vitkdl run quickstart.vkd --max-steps 5`` is a quick pass over the whole graph. A run it
stopped early is *partial* (its summary says where it stopped); the same command again reuses
it, and ``--resume`` (without ``--max-steps``, or with a larger one) continues it. A student
whose teacher was partial says so in its summary and in the tables.

A recipe whose teacher is the final student of another recipe needs that recipe's run
(as written there: command-line overrides do not reach a dependency); when it is missing, that
recipe is trained first. A recipe that extends a complete student-only recipe (its baseline,
like ``quickstart.vkd`` extends ``quickstart_baseline.vkd``) is compared with it at the end,
the baseline run under the same student, data and training overrides, so the two sides differ
only in what the recipe adds.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from vitkdl import pipeline
from vitkdl.errors import VkdError
from vitkdl.experiment import BASELINE_ROOTS, baseline_of, baseline_overrides, smoke_overrides
from vitkdl.runs import (
    RunHeld,
    checkpoint_files,
    done,
    hold,
    latest_link,
    point_latest,
    read_summary,
    run_dir,
    stopped_early,
    write_atomic,
)
from vitkdl.settings import RunSettings
from vitkdl.spec import RecipeSpec, load_spec
from vitkdl.train import distributed
from vitkdl.train.loop import ResumeRefused, RunOptions, TrainError, check_writable, train

__all__ = [
    "BASELINE_ROOTS",
    "RunInUse",
    "RunRefused",
    "RunRequest",
    "Start",
    "baseline_overrides",
    "decide_start",
    "run_many",
    "run_recipe",
]

SMOKE_STEPS = 3


class RunRefused(TrainError):
    """The command would lose or mix work (an unfinished run without ``--resume`` or
    ``--force``, a ``--resume`` with nothing to resume): nothing failed, the command needs
    another flag (exit status 2)."""


class RunInUse(TrainError):
    """Another process holds the run's folder (it is training that run): nothing was done;
    the same command succeeds once it ends (exit status 75, like a stopped run)."""


def _hold(spec: RecipeSpec, out: Path, req: RunRequest, stack: ExitStack) -> None:
    """Hold ``out`` for this command until ``stack`` closes (rank 0 holds it for the whole
    job: the other ranks write nothing a second command could mix with). Raises
    :class:`RunInUse` on every rank when another process holds it, except for a finished
    run that this command only reuses (reading it is safe while another process reuses it
    too)."""
    job = distributed.current()
    refusal = ""
    if job.is_main:
        try:
            stack.enter_context(hold(out))
        except RunHeld as exc:
            if req.force or done(out, spec.hash(), req.max_steps) is None:
                refusal = str(exc)
    if job.enabled:  # every rank refuses together, or none waits forever at a barrier
        refusal = distributed.all_gather_states({"refusal": refusal})[0]["refusal"]
    if refusal:
        raise RunInUse(refusal)


@dataclass(frozen=True)
class RunRequest(RunSettings):
    """What ``vitkdl run`` was asked to do for each recipe: the settings
    (:class:`vitkdl.settings.RunSettings`) and what is a recipe's own."""

    overrides: tuple[str, ...] = ()
    resume: bool = False
    baseline: bool = True
    # Continue an unfinished run of the same recipe instead of refusing to start over (how
    # dependencies and baselines are run: the user did not ask for them by name).
    continue_unfinished: bool = False
    # Called after every optimizer step with (step, total steps, epoch) (a sweep's progress).
    on_step: Callable[[int, int, int], None] | None = None


def _ensure(
    path: str, overrides: Sequence[str], req: RunRequest, console: Console, why: str
) -> list[dict[str, Any]]:
    """The summaries of a run of ``path`` under ``overrides`` and ``req.max_steps``: a
    finished one (or one already as far as ``--max-steps`` asks) is reused, else it is trained
    now (an unfinished run of it is continued)."""
    spec = pipeline.load(path, list(overrides), strict=True)
    out = run_dir(req.out_root, spec.name, spec.hash())
    summary = done(out, spec.hash(), req.max_steps)
    if summary is not None:
        early = stopped_early(summary)
        note = f" ({early}, as far as --max-steps {req.max_steps} asks)" if early else ""
        console.print(
            f"{why}: {escape(str(out / 'student.safetensors'))} is up to date{note}; reusing it",
            highlight=False,
        )
        return [summary]
    limit = f" (--max-steps {req.max_steps} applies to it too)" if req.max_steps else ""
    console.print(f"{why}: missing or unfinished, training it first{limit}", highlight=False)
    dep_req = replace(
        req,
        overrides=tuple(overrides),
        resume=False,
        force=False,
        baseline=False,
        continue_unfinished=True,
    )
    return run_recipe(path, dep_req, console)[1]


class Start(Enum):
    """How a run starts."""

    REUSE = "reuse"  # finished (or as far as --max-steps asks): nothing to train
    RESUME = "resume"  # continued from a checkpoint
    FRESH = "fresh"  # trained from the start


def decide_start(spec: RecipeSpec, out: Path, req: RunRequest) -> tuple[Start, Path | None]:
    """How the run of ``spec`` in ``out`` starts, and the checkpoint it resumes from (None
    unless :attr:`Start.RESUME`); refuses (:class:`RunRefused`) where going on would lose or
    mix work. The one place that decides it."""
    ckpt = out / "last.pt"
    saved = bool(checkpoint_files(out))  # last.pt, or best.pt when last.pt is gone
    if done(out, spec.hash(), req.max_steps) is not None and not req.force:
        return Start.REUSE, None
    if req.resume:
        if saved:
            return Start.RESUME, ckpt
        latest = latest_link(req.out_root, spec.name)
        other = latest.resolve() / "last.pt" if latest.is_symlink() else None
        if other is not None and other.exists() and other.parent != out.resolve():
            if req.force:  # continue that run under the changed recipe, in this run's folder
                return Start.RESUME, other
            raise RunRefused(
                f"--resume: {out} holds no checkpoint of this recipe; the latest run of "
                f"{spec.name}, {other.parent}, is of a different version of the recipe "
                "(resuming it would mix two recipes). Pass --force to continue it under the "
                "recipe as it is now, or start without --resume."
            )
        raise RunRefused(f"--resume: no checkpoint at {ckpt}; start without --resume")
    if saved and not req.force and not req.smoke:
        if req.continue_unfinished:
            return Start.RESUME, ckpt
        summary = read_summary(out)
        where = ckpt.name
        if summary is not None and summary.get("hash") == spec.hash():
            where = stopped_early(summary) or where
        to = f" to step {req.max_steps}" if req.max_steps else " to the end"
        raise RunRefused(
            f"{out} holds an unfinished run of this recipe ({where}); "
            f"--resume continues it{to}, --force starts it over"
        )
    return Start.FRESH, None


def run_recipe(
    path: str | Path, req: RunRequest, console: Console
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run one recipe and what it depends on. Returns its own summary and the summaries of
    every run made or reused, in order (teacher, recipe, baseline)."""
    path = Path(path)
    overrides = list(req.overrides)
    if req.smoke:
        probe, diags, sources = load_spec(path, overrides)
        if probe is None:
            raise VkdError(diags, sources)
        overrides = smoke_overrides(probe, overrides) + overrides
    spec = pipeline.load(path, overrides, strict=not req.smoke)
    job = distributed.current()
    out = run_dir(req.out_root, spec.name, spec.hash())
    if job.is_main:
        check_writable(out)  # before any training, dependencies included
    distributed.barrier()
    with ExitStack() as stack:
        # Held from before the decision to its last write: a second command of the same run
        # neither trains it again nor decides from files this one is rewriting.
        _hold(spec, out, req, stack)
        return _run_held(spec, out, overrides, req, console)


def _run_held(
    spec: RecipeSpec, out: Path, overrides: list[str], req: RunRequest, console: Console
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """:func:`run_recipe` once its folder is held."""
    job = distributed.current()
    summaries: list[dict[str, Any]] = []

    # Decided before the teacher trains: a refusal (an unfinished run without --resume)
    # comes before any work.
    how, checkpoint = decide_start(spec, out, req)
    teacher = spec.teacher
    teacher_run: dict[str, Any] | None = None
    if teacher is not None and teacher.from_recipe is not None and not req.smoke:
        # --max-steps reaches the teacher too: a bounded command is a bounded smoke of the
        # whole graph (the student then says its teacher stopped early).
        summaries += _ensure(
            teacher.from_recipe,
            (),
            req,
            console,
            f"[bold]{spec.name}[/]: its teacher, the final student of "
            f"{escape(teacher.from_recipe)}",
        )
        teacher_run = summaries[-1]  # the teacher's own run comes after its dependencies

    if how is Start.REUSE:
        summary = done(out, spec.hash(), req.max_steps)
        assert summary is not None
        early = stopped_early(summary)
        state = (
            f"{out} ran as far as --max-steps {req.max_steps} asks ({early}); reusing it "
            "(--resume without --max-steps, or with a larger one, continues it; --force "
            "trains it again)"
            if early
            else f"{out} is finished; reusing it (--force trains it again)"
        )
        console.print(f"[bold]{spec.name}[/]: {escape(state)}", highlight=False)
    else:
        summary = _train(spec, out, how, checkpoint, req, console)
        if job.is_main:
            summary = _mark_teacher(out, summary, teacher_run)
    summaries.append(summary)

    # The baseline runs as far as this run did (--max-steps too): like is compared with like.
    baseline = baseline_of(spec) if req.baseline and not req.smoke else None
    if baseline is not None:
        summaries += _ensure(
            baseline,
            baseline_overrides(overrides),
            req,
            console,
            f"[bold]{spec.name}[/]: its baseline {escape(str(baseline))}",
        )
    return summary, summaries


def _mark_teacher(
    out: Path, summary: dict[str, Any], teacher_run: dict[str, Any] | None
) -> dict[str, Any]:
    """Record in the run's summary whether its teacher (a ``teacher from`` run) was partial:
    a student distilled from a teacher that ``--max-steps`` stopped early is no result."""
    early = stopped_early(teacher_run) if teacher_run is not None else None
    if early is None and "teacher_stopped_early" not in summary:
        return summary
    summary = {k: v for k, v in summary.items() if k != "teacher_stopped_early"}
    if early is not None:
        assert teacher_run is not None
        keys = ("recipe", "steps", "planned_steps")
        summary["teacher_stopped_early"] = {k: teacher_run.get(k) for k in keys}
    write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _train(
    spec: RecipeSpec,
    out: Path,
    how: Start,
    checkpoint: Path | None,
    req: RunRequest,
    console: Console,
) -> dict[str, Any]:
    job = distributed.current()
    plan = pipeline.plan(spec, world_size=job.world_size)
    resolved = spec.canonical()
    max_steps = SMOKE_STEPS if req.smoke and req.max_steps is None else req.max_steps
    opts = RunOptions(
        **replace(req.settings(), max_steps=max_steps).settings_dict(),
        out_dir=out,
        resume=how is Start.RESUME,
        resume_from=checkpoint if checkpoint != out / "last.pt" else None,
        max_eval_batches=2 if req.smoke else None,
        load_weights=not req.smoke,
        recipe=resolved,
        on_step=req.on_step,
    )
    link = latest_link(req.out_root, spec.name)
    before = link.resolve() if link.is_symlink() else None
    if job.is_main:
        write_atomic(out / "recipe.json", json.dumps(resolved, indent=2) + "\n")
        write_atomic(out / "plan.json", plan.model_dump_json(indent=2) + "\n")
        note = point_latest(req.out_root, spec.name, out)
        if note is not None and not req.quiet:
            console.print(note, highlight=False, markup=False)
    try:
        return train(plan, opts, console)
    except ResumeRefused:  # nothing trained: OUT/NAME stays on the run it named before
        if job.is_main and before is not None and before != out.resolve():
            point_latest(req.out_root, spec.name, before)
        raise


def run_many(
    paths: Sequence[str | Path], req: RunRequest, console: Console, tables: Console | None = None
) -> list[dict[str, Any]]:
    """Run each recipe; with several (or a recipe and its baseline), a comparison at the end.
    Progress and notes go to ``console`` (stderr), the final tables to ``tables`` (stdout;
    ``console`` when not given), so ``vitkdl run R > results.txt`` keeps just the results."""
    from vitkdl.train.report import (
        PLOTS_MISSING,
        comparison_table,
        print_summary,
        write_comparison,
    )

    job = distributed.init_from_env(req.device)
    if not job.is_main:
        console = Console(quiet=True)  # rank 0 alone reports
    tables = console if tables is None or not job.is_main else tables
    shown: dict[str, dict[str, Any]] = {}
    for path in paths:
        own, summaries = run_recipe(path, req, console)
        if not job.is_main:
            continue
        print_summary(tables, own)
        for s in summaries:
            shown[f"{s['recipe']}-{s.get('hash')}"] = s  # one row per run folder
    if len(shown) > 1:
        rows = list(shown.values())
        tables.print(comparison_table(rows))
        req.out_root.mkdir(parents=True, exist_ok=True)
        if not write_comparison(rows, req.out_root / "comparison.png"):
            console.print(f"comparison.png skipped: {PLOTS_MISSING}", highlight=False)
        write_atomic(req.out_root / "comparison.json", json.dumps(rows, indent=2) + "\n")
    return list(shown.values())
