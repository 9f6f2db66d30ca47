"""Running one run: how it starts (reuse, resume, fresh), its folder held, its training.

Every run has its own folder, ``OUT/NAME-HASH/`` (:mod:`vitkdl.runs`), keyed by the hash of
the resolved recipe, overrides and seed included; ``OUT/NAME`` links to the latest. A finished
run is reused, never trained again or replaced, unless ``--force``; an unfinished one is
continued with ``--resume`` (or started over with ``--force``), never overwritten silently.
:func:`decide_start` is where that is decided, once, with the folder held
(:func:`vitkdl.runs.hold`) until the run's last write.

What runs, in what order, is the experiment's plan (:func:`vitkdl.experiment.plan_experiment`):
a ``vitkdl run R`` is an experiment of one cell and the recipe's seed, whose dependencies (the
run of a ``teacher from`` recipe, trained first when missing) and baseline (the student-only
recipe it extends, compared with it at the end) are runs of their own
(:func:`vitkdl.train.jobs.run_plain`).

``--max-steps N`` applies to every run the command starts, its teacher and baseline included.
A run it stopped early is *partial* (its summary says where it stopped); the same command
again reuses it, and ``--resume`` (without ``--max-steps``, or with a larger one) continues it.
A student whose teacher was partial says so in its summary and in the tables.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from enum import Enum
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from vitkdl import pipeline
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
from vitkdl.settings import RunRequest
from vitkdl.spec import RecipeSpec
from vitkdl.train import distributed
from vitkdl.train.loop import ResumeRefused, RunOptions, TrainError, check_writable, train

__all__ = [
    "RunInUse",
    "RunRefused",
    "RunRequest",
    "Start",
    "check_start",
    "decide_start",
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


def load(path: str | Path, req: RunRequest) -> RecipeSpec:
    """The recipe of a run as asked (a smoke run's missing data root or weights are no
    error: it reads neither)."""
    return pipeline.load(path, list(req.overrides), strict=not req.smoke)


@contextmanager
def _started(
    path: str | Path, req: RunRequest
) -> Iterator[tuple[RecipeSpec, Path, Start, Path | None]]:
    """Inside: the run's recipe, its folder (writable, held by this process) and how it
    starts (:func:`decide_start`)."""
    spec = load(path, req)
    job = distributed.current()
    out = run_dir(req.out_root, spec.name, spec.hash())
    if job.is_main:
        check_writable(out)
    distributed.barrier()
    with ExitStack() as stack:
        # Held from before the decision to its last write: a second command of the same run
        # neither trains it again nor decides from files this one is rewriting.
        _hold(spec, out, req, stack)
        how, checkpoint = decide_start(spec, out, req)
        yield spec, out, how, checkpoint


def check_start(path: str | Path, req: RunRequest) -> None:
    """What would keep the run from starting, raised now: its folder not writable, held by
    another process, or a refusal (:class:`RunRefused`). Asked before its dependencies run,
    so that such a run costs no work; the run asks again when its turn comes."""
    with _started(path, req):
        pass


def run_recipe(
    path: str | Path,
    req: RunRequest,
    console: Console,
    on_step: Callable[[int, int, int], None] | None = None,
) -> dict[str, Any]:
    """Run one recipe under ``req`` (its dependencies already run): reuse, resume or train
    it. Returns its summary. ``on_step`` is called after every optimizer step with (step,
    total steps, epoch) (an experiment's progress)."""
    with _started(path, req) as (spec, out, how, checkpoint):
        if how is Start.REUSE:
            summary = done(out, spec.hash(), req.max_steps)
            assert summary is not None
            _say_reused(spec, out, summary, req, console)
            return summary
        if req.why:
            limit = f" (--max-steps {req.max_steps} applies to it too)" if req.max_steps else ""
            console.print(
                f"{req.why}: missing or unfinished, training it first{limit}", highlight=False
            )
        summary = _train(spec, out, how, checkpoint, req, console, on_step)
        if distributed.current().is_main:
            summary = _mark_teacher(out, summary, _teacher_run(spec, req))
        return summary


def _say_reused(
    spec: RecipeSpec, out: Path, summary: dict[str, Any], req: RunRequest, console: Console
) -> None:
    """Say that the run is reused: a dependency by its exported student, a named recipe by
    its folder and how to train it further."""
    early = stopped_early(summary)
    if req.why:
        note = f" ({early}, as far as --max-steps {req.max_steps} asks)" if early else ""
        file = escape(str(out / "student.safetensors"))
        console.print(f"{req.why}: {file} is up to date{note}; reusing it", highlight=False)
        return
    state = (
        f"{out} ran as far as --max-steps {req.max_steps} asks ({early}); reusing it "
        "(--resume without --max-steps, or with a larger one, continues it; --force "
        "trains it again)"
        if early
        else f"{out} is finished; reusing it (--force trains it again)"
    )
    console.print(f"[bold]{spec.name}[/]: {escape(state)}", highlight=False)


def _teacher_run(spec: RecipeSpec, req: RunRequest) -> dict[str, Any] | None:
    """The summary of the run the recipe's teacher is the final student of (``teacher
    from``), which the experiment ran before this one; None for any other teacher."""
    t = spec.teacher
    if t is None or t.from_recipe is None or req.smoke or not t.from_name or not t.from_hash:
        return None
    return read_summary(run_dir(req.out_root, t.from_name, t.from_hash))


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
    on_step: Callable[[int, int, int], None] | None,
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
        on_step=on_step,
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
