"""Running an experiment: its runs in dependency order, several at once, then its report.

A plain ``vitkdl run R...`` is run here too (:func:`run_plain`): each recipe an experiment of
one cell and its own seed (:func:`vitkdl.experiment.plan_experiment`), whose runs (the run of
a ``teacher from`` recipe, the recipe's, its baseline's) the inline launcher runs one after the
other in this process, printing to the console; the first that fails ends the command. At
the end each recipe's table and a comparison of every run (``OUT/comparison.json``).

:func:`run_experiment` takes the plan of :func:`vitkdl.experiment.plan_experiment`. A run that
is already finished (same hash, so same seed and values) is reused and never trained again;
the others run once their dependencies have finished (a run whose teacher failed is skipped,
and said so), each through :mod:`vitkdl.train.worker`:

- ``--jobs 1`` (the default on CPU): one run after the other, in this process;
- ``--jobs N``: N runs at once, each a process of its own (``python -m vitkdl.train.worker``,
  or torchrun when a run uses several processes), its output in its folder's ``log.txt``. On
  CPU the cores are split between them (``OMP_NUM_THREADS``); on GPUs each gets its own
  device(s) (``CUDA_VISIBLE_DEVICES``; the default is one run per device);
- ``--launcher submitit``: each run a job of its own (SLURM through submitit; ``cluster=local``
  runs them as local processes), submitted once its dependencies have finished.

One live line per running run (on a terminal); a run that fails is reported with the reason
and the others go on. An unfinished run (killed, preempted) is continued from its checkpoint
when the experiment is run again. SIGTERM or SIGUSR1 asks every running run to stop at its next
step with a checkpoint; Ctrl-C does the same (the first one; a second one aborts the runs at
once). The worker processes run in sessions of their own, so that a stop reaches them from the
experiment alone, once, whether it came from a terminal or was sent to the experiment's process
only: SIGINT is passed on as SIGINT, SIGTERM and SIGUSR1 as SIGTERM. The report says what each
run did: a run that finished before the stop reached it is done, with its accuracy. At the
end the report (:mod:`vitkdl.experiment`, :mod:`vitkdl.train.report`) is printed and written
to ``OUT/experiments/LABEL-HASH/``: ``report.json``, ``report.txt`` and ``report.png``.

Exit status: 0 every run finished; 1 some run failed or was skipped (the others finished and
the report says which); 75 stopped by SIGTERM / SIGUSR1 (checkpoints saved: run the same
command again to continue); 130 stopped by Ctrl-C (the same).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console
from rich.markup import escape

from vitkdl.exits import FAILED, OK
from vitkdl.experiment import Experiment, Outcome, PlannedRun, assemble_report
from vitkdl.runs import LOG, done, experiment_dir, point_latest, read_summary, write_atomic
from vitkdl.settings import RunSettings
from vitkdl.train.signals import (
    INTERRUPTED,
    PREEMPTED,
    exit_status,
    interrupt_stops,
    stop_signals,
    stop_with_parent,
)
from vitkdl.train.worker import (
    Task,
    execute,
    failure_reason,
    log_file,
    read_progress,
    run_task,
)


@dataclass(frozen=True)
class JobOptions(RunSettings):
    """How to run the runs of an experiment: the settings (:class:`vitkdl.settings.
    RunSettings`; ``force`` trains the named recipes' runs again, ``quiet`` is the experiment's
    own output) and how the runs are launched."""

    resume: bool = False  # --resume: the named recipes' runs of a plain `vitkdl run R`
    jobs: int | None = None  # runs at once (None: 1 on CPU, one per GPU)
    launcher: str = "local"  # or "submitit"
    launcher_args: tuple[tuple[str, str], ...] = ()  # submitit parameters, KEY=VALUE
    nproc: int | None = None  # processes per run (torchrun)
    poll_seconds: float = 0.25


# --------------------------------------------------------------------------------------------
# Launchers: how one run is started


class Handle(Protocol):
    """A started run."""

    run: PlannedRun
    started: float

    def poll(self) -> int | None:
        """Its exit status once it has ended, else None."""

    def stop(self, name: str = "SIGTERM") -> None:
        """Ask it to stop at its next step with a checkpoint: ``name`` is the signal the
        experiment had (SIGINT is passed on as SIGINT, the others as SIGTERM)."""

    def reason(self) -> str:
        """Why it failed (after it ended)."""


def worker_command(task: Task, nproc: int | None) -> list[str]:
    """The command that runs ``task``: the worker, under torchrun for several processes."""
    worker = ["-m", "vitkdl.train.worker", task.to_json()]
    if nproc is not None and nproc > 1:
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            *worker,
        ]
    return [sys.executable, *worker]


@dataclass
class _Ended:
    """A run that ran in this process (already over when ``start`` returns)."""

    run: PlannedRun
    started: float
    code: int
    message: str

    def poll(self) -> int | None:
        return self.code

    def stop(self, name: str = "SIGTERM") -> None:
        pass

    def reason(self) -> str:
        return self.message


class InlineLauncher:
    """One run at a time, in this process: no start-up cost per run. An experiment's run
    (:meth:`start`) prints to its log and ends with an exit status; a plain ``vitkdl run``'s
    (:meth:`run`) prints to the console, and what ends it goes up to the command."""

    def __init__(self, opts: JobOptions, board: Board | None = None) -> None:
        self.opts, self.board = opts, board

    def run(self, task: Task, console: Console) -> dict[str, Any]:
        """Run ``task`` here, printing to ``console``; returns its summary."""
        return run_task(task, console)

    def start(self, run: PlannedRun, task: Task, slot: int) -> Handle:
        started = time.monotonic()
        log = log_file(task)
        console = Console(file=log, width=120, highlight=False, no_color=True)

        def on_step(step: int, total: int, epoch: int) -> None:
            if self.board is not None:
                self.board.progress(run.key, step, total, epoch)

        try:
            with contextlib.redirect_stderr(log):  # warnings of the run go to its log too
                code, message = execute(task, console, on_step)
        finally:
            log.close()
        return _Ended(run, started, code, message)


@dataclass
class _Process:
    run: PlannedRun
    started: float
    proc: subprocess.Popen[bytes]
    folder: Path

    stopped: str | None = None

    def poll(self) -> int | None:
        code = self.proc.poll()
        if code and self.stopped is not None and failure_reason(self.folder).startswith("stopped"):
            # torchrun ends with an error of its own after passing a signal on; its workers
            # saved and stopped as asked
            return exit_status(self.stopped)
        return code

    def stop(self, name: str = "SIGTERM") -> None:
        self.stopped = self.stopped or name
        with contextlib.suppress(OSError):
            self.proc.send_signal(_passed_on(name))

    def reason(self) -> str:
        return failure_reason(self.folder)


def _passed_on(name: str) -> signal.Signals:
    """The signal a worker gets for the experiment's ``name``: SIGINT stays SIGINT (the run
    says it was interrupted, and a second one aborts it), the rest become SIGTERM."""
    return signal.SIGINT if name == "SIGINT" else signal.SIGTERM


def visible_gpus(device: str | None) -> list[str]:
    """The GPUs runs may use (none when the device is the CPU)."""
    if device is not None and not device.startswith("cuda"):
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip() and g.strip() != "-1"]
    if sys.platform.startswith("linux") and not Path("/proc/driver/nvidia/gpus").is_dir():
        return []  # no NVIDIA driver: no need to import torch to count nothing
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:
        return []


class _Worker:
    """A worker process that runs task after task (``python -m vitkdl.train.worker --serve``):
    torch is imported once per worker, not once per run."""

    def __init__(self, env: dict[str, str]) -> None:
        read, write = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vitkdl.train.worker", "--serve", str(write)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            env=env,
            pass_fds=(write,),
            text=True,
            start_new_session=True,  # a terminal's Ctrl-C reaches it from the experiment, once
        )
        os.close(write)
        os.set_blocking(read, False)
        self.results = read
        self.buffer = b""

    def send(self, task: Task) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(task.to_json() + "\n")
        self.proc.stdin.flush()

    def result(self) -> dict[str, Any] | None:
        """The next result line, if one has arrived."""
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self.results, 65536):
                self.buffer += chunk
        if b"\n" not in self.buffer:
            return None
        line, _, self.buffer = self.buffer.partition(b"\n")
        return json.loads(line)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self.results)


@dataclass
class _Served:
    """A run on a persistent worker."""

    run: PlannedRun
    started: float
    worker: _Worker
    folder: Path
    message: str = ""

    def poll(self) -> int | None:
        result = self.worker.result()
        if result is not None:
            self.message = result.get("message", "")
            return int(result["code"])
        if self.worker.alive():
            return None
        result = self.worker.result()  # written just before it ended
        if result is not None:
            self.message = result.get("message", "")
            return int(result["code"])
        code = self.worker.proc.returncode
        self.message = f"its worker process ended (exit status {code})"
        return code if code else FAILED

    def stop(self, name: str = "SIGTERM") -> None:
        with contextlib.suppress(OSError):
            self.worker.proc.send_signal(_passed_on(name))

    def reason(self) -> str:
        return self.message or failure_reason(self.folder)


class LocalLauncher:
    """Runs as processes of this machine, ``jobs`` at once: the CPU cores split between them,
    or each its own GPU(s). A run of one process goes to the slot's worker (started once,
    restarted if it dies); a run of several processes is a torchrun of its own."""

    def __init__(self, opts: JobOptions, jobs: int, gpus: list[str]) -> None:
        self.opts, self.jobs, self.gpus = opts, jobs, gpus
        per = opts.nproc or 1
        self.threads = None if gpus else max(1, (os.cpu_count() or 1) // (jobs * per))
        self.workers: dict[int, _Worker] = {}

    def env(self, slot: int) -> dict[str, str]:
        env = dict(os.environ)
        if self.threads is not None:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(self.threads)
        if self.gpus:
            per = self.opts.nproc or 1
            mine = [self.gpus[(slot * per + i) % len(self.gpus)] for i in range(per)]
            env["CUDA_VISIBLE_DEVICES"] = ",".join(mine)
        return env

    def start(self, run: PlannedRun, task: Task, slot: int) -> Handle:
        if (self.opts.nproc or 1) == 1:
            worker = self.workers.get(slot)
            if worker is None or not worker.alive():
                worker = self.workers[slot] = _Worker(self.env(slot))
            worker.send(task)
            return _Served(run, time.monotonic(), worker, task.folder)
        log = log_file(task)
        try:
            proc = subprocess.Popen(
                worker_command(task, self.opts.nproc),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env(slot),
                start_new_session=True,  # stops reach it from the experiment, once
                preexec_fn=stop_with_parent,  # and if the experiment is killed, it stops too
            )
        finally:
            log.close()
        return _Process(run, time.monotonic(), proc, task.folder)

    def close(self) -> None:
        for worker in self.workers.values():
            worker.close()
        self.workers.clear()


class SubmititRun:
    """What a submitit job runs: the worker command, its output to the run's log. On
    preemption or time-out (submitit's signal) the run is asked to save a checkpoint and the
    job is requeued; the requeued job continues it."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None

    def __call__(self, task_json: str, nproc: int | None) -> int:
        task = Task.from_json(task_json)
        with log_file(task) as log:
            self.proc = subprocess.Popen(
                worker_command(task, nproc), stdout=log, stderr=subprocess.STDOUT
            )
            return self.proc.wait()

    def checkpoint(self, task_json: str, nproc: int | None) -> Any:
        import submitit

        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR1)  # saves at its next step
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=120)
        self.proc = None
        return submitit.helpers.DelayedSubmission(SubmititRun(), task_json, nproc)


def _launcher_value(text: str) -> Any:
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text, text)


@dataclass
class _Job:
    run: PlannedRun
    started: float
    job: Any
    folder: Path

    def poll(self) -> int | None:
        if not self.job.done():
            return None
        try:
            return int(self.job.result())
        except Exception:
            return FAILED

    def stop(self, name: str = "SIGTERM") -> None:
        with contextlib.suppress(Exception):
            self.job.cancel()  # SLURM sends SIGTERM first: the run saves a checkpoint

    def reason(self) -> str:
        why = failure_reason(self.folder)
        if why:
            return why
        with contextlib.suppress(Exception):
            return str(self.job.exception() or "")
        return ""


class SubmititLauncher:
    """Each run a job through submitit (SLURM; ``cluster=local`` for local processes).
    ``--launcher-arg KEY=VALUE`` sets submitit parameters (``slurm_partition=gpu``,
    ``timeout_min=600``, ...); a run of several processes asks for that many GPUs on one node
    and starts torchrun there."""

    def __init__(self, opts: JobOptions) -> None:
        try:
            import submitit
        except ImportError:
            raise LaunchError(
                '--launcher submitit needs submitit: pip install -e ".[submitit]" '
                "(or pip install submitit)"
            ) from None
        params = {k: _launcher_value(v) for k, v in opts.launcher_args}
        cluster = params.pop("cluster", None)
        self.folder = opts.out_root / "submitit"
        self.executor = submitit.AutoExecutor(folder=self.folder, cluster=cluster)
        if opts.nproc and opts.nproc > 1:
            params.setdefault("gpus_per_node", opts.nproc)
            params.setdefault("tasks_per_node", 1)
        params.setdefault("name", "vitkdl")
        try:
            self.executor.update_parameters(**params)
        except Exception as exc:
            raise LaunchError(f"--launcher-arg: {exc}") from None
        self.opts = opts

    def start(self, run: PlannedRun, task: Task, slot: int) -> Handle:
        job = self.executor.submit(SubmititRun(), task.to_json(), self.opts.nproc)
        return _Job(run, time.monotonic(), job, task.folder)


class LaunchError(Exception):
    """The launcher cannot start (a missing optional package, bad parameters)."""


# --------------------------------------------------------------------------------------------
# The live board: one line per running run


class Board:
    """What the experiment shows while it runs: one live line per running run on a terminal
    (rich), one line per start and end otherwise."""

    def __init__(self, console: Console, total: int, quiet: bool) -> None:
        self.console, self.quiet = console, quiet
        self.live = console.is_terminal and not quiet
        self.tasks: dict[str, Any] = {}
        self.bar: Any = None
        if self.live:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                console=console,
                transient=True,
            )
            self.overall = self.bar.add_task("[bold]runs[/]", total=total, info="")
            self.bar.start()

    def note(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text, highlight=False)

    def started(self, run: PlannedRun, slot: int, folder: Path) -> None:
        if self.bar is not None:
            self.tasks[run.key] = self.bar.add_task(
                escape(f"[{slot + 1}] {run.label}"), total=None, info=""
            )
        else:
            self.note(escape(f"started {run.label} in {folder}"))

    def progress(self, key: str, step: int, total: int, epoch: int) -> None:
        task = self.tasks.get(key)
        if task is not None and self.bar is not None:
            self.bar.update(task, completed=step, total=total, info=f"epoch {epoch + 1}")

    def finished(self, run: PlannedRun, outcome: Outcome, summary: dict[str, Any] | None) -> None:
        task = self.tasks.pop(run.key, None)
        if task is not None and self.bar is not None:
            self.bar.remove_task(task)
            self.bar.advance(self.overall)
        took = f" in {outcome.seconds:.0f} s" if outcome.seconds is not None else ""
        if outcome.ok:
            top1 = (summary or {}).get("top1")
            value = f": top-1 {top1:.2f}" if isinstance(top1, (int, float)) else ""
            self.note(f"[green]done[/] {escape(run.label)}{value}{took}")
        else:
            why = f": {outcome.message}" if outcome.message else ""
            log = f" (log: {outcome.log})" if outcome.log else ""
            self.console.print(
                f"[bold red]{outcome.status}[/] " + escape(f"{run.label}{why}{took}{log}"),
                highlight=False,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


# --------------------------------------------------------------------------------------------
# The scheduler


def task_of(
    run: PlannedRun,
    opts: JobOptions,
    *,
    threads: int | None = None,
    plain: bool = False,
    why: str = "",
) -> Task:
    """The task of one planned run: the settings as given, its own step limit (planned per
    run, teachers and baselines too), ``--force`` for the named recipes' runs alone. In an
    experiment every unfinished run is continued and the run's log says everything; in a
    ``plain`` ``vitkdl run R`` the named recipe's run is as asked (``--resume``; an unfinished
    one is refused without it or ``--force``) and its teacher's and baseline's are continued,
    introduced on the console by ``why``."""
    named = run.role == "recipe"
    settings = replace(
        opts.settings(),
        max_steps=run.max_steps,
        force=opts.force and named,
        quiet=opts.quiet and plain,
    )
    return Task(
        **settings.settings_dict(),
        path=run.path,
        key=run.key,
        overrides=run.overrides,
        threads=threads,
        resume=plain and named and opts.resume,
        continue_unfinished=not (plain and named),
        why=why,
    )


def _status(code: int) -> str:
    if code == OK:
        return "done"
    if code in (PREEMPTED, -signal.SIGTERM, 128 + signal.SIGTERM):
        return "preempted"
    if code in (INTERRUPTED, -signal.SIGINT):
        return "interrupted"
    return "failed"


class _Scheduler:
    def __init__(
        self,
        experiment: Experiment,
        opts: JobOptions,
        pending: list[PlannedRun],
        board: Board,
        outcomes: dict[str, Outcome],
    ) -> None:
        self.experiment, self.opts, self.board = experiment, opts, board
        self.waiting = list(pending)
        self.outcomes = outcomes
        self.running: dict[int, Handle] = {}
        self.stop_reason: str | None = None

    def stop(self, name: str) -> None:
        """A stop signal: start nothing more, and ask every running run to save and stop."""
        self.stop_reason = name
        for handle in list(self.running.values()):
            handle.stop(name)

    def run(self, launcher: Any, slots: int) -> None:
        threads = getattr(launcher, "threads", None)
        while self.waiting or self.running:
            if self.stop_reason is None:
                self._start_ready(launcher, slots, threads)
            for slot, handle in list(self.running.items()):
                code = handle.poll()
                if code is None:
                    self._show_progress(handle)
                    continue
                del self.running[slot]
                self._end(handle, code)
            if self.stop_reason is not None and not self.running:
                break
            if self.running:
                time.sleep(self.opts.poll_seconds)

    def _start_ready(self, launcher: Any, slots: int, threads: int | None) -> None:
        for run in list(self.waiting):
            if self.stop_reason is not None:
                return
            failed = [d for d in run.deps if d in self.outcomes and not self.outcomes[d].ok]
            if failed:
                self.waiting.remove(run)
                dep = self.experiment.run(failed[0])
                self._record(
                    run, Outcome(run.key, "skipped", f"it needs {dep.label}, which did not finish")
                )
                continue
            if any(d not in self.outcomes for d in run.deps):
                continue  # its dependency is still running or waiting
            free = [s for s in range(slots) if s not in self.running]
            if not free:
                return
            slot = free[0]
            self.waiting.remove(run)
            task = task_of(run, self.opts, threads=threads)
            self.board.started(run, slot, task.folder)
            handle = launcher.start(run, task, slot)
            self.running[slot] = handle
            if isinstance(handle, _Ended):  # it ran here: take its end now
                del self.running[slot]
                self._end(handle, handle.code)

    def _show_progress(self, handle: Handle) -> None:
        info = read_progress(handle.run.folder(self.opts.out_root))
        if info:
            self.board.progress(
                handle.run.key, info.get("step", 0), info.get("total", 0), info.get("epoch", 0)
            )

    def _end(self, handle: Handle, code: int) -> None:
        run = handle.run
        status = _status(code)
        folder = run.folder(self.opts.out_root)
        message = ""
        if status != "done":
            message = handle.reason() or f"exit status {code}"
        if status in ("preempted", "interrupted"):
            message = continue_hint(message)
            if self.stop_reason is None:
                self.stop_reason = "SIGINT" if status == "interrupted" else "SIGTERM"
                for other in self.running.values():
                    other.stop(self.stop_reason)
        outcome = Outcome(
            run.key,
            status,  # type: ignore[arg-type]
            message,
            time.monotonic() - handle.started,
            str(folder / LOG) if status != "done" else None,
        )
        self._record(run, outcome)

    def _record(self, run: PlannedRun, outcome: Outcome) -> None:
        self.outcomes[run.key] = outcome
        folder = run.folder(self.opts.out_root)
        summary = read_summary(folder) if outcome.ok else None
        self.board.finished(run, outcome, summary)


_RESUME_HINT = re.compile(r"[Cc]ontinue with --resume\b")


def continue_hint(message: str) -> str:
    """A stopped run's message as an experiment says it: the experiment is continued by
    running the same command again, not by ``--resume``."""
    return _RESUME_HINT.sub("Run the same command again to continue", message)


def drain(scheduler: _Scheduler, timeout: float = 120.0) -> None:
    """After the experiment was interrupted: wait (``timeout`` seconds in all) for the running
    runs to end, and record what each did (a run that finished is done, with its accuracy; one
    still running when the time is up is interrupted)."""
    deadline = time.monotonic() + timeout
    for handle in list(scheduler.running.values()):
        code = handle.poll()
        while code is None and time.monotonic() < deadline:
            time.sleep(0.2)
            code = handle.poll()
        scheduler._end(handle, INTERRUPTED if code is None else code)
    scheduler.running.clear()


def _jobs(opts: JobOptions, gpus: list[str]) -> int:
    if opts.jobs is not None:
        return opts.jobs
    if gpus:
        return max(1, len(gpus) // (opts.nproc or 1))
    return 1


def run_experiment(
    experiment: Experiment, opts: JobOptions, out: Console, err: Console
) -> tuple[int, dict[str, Any]]:
    """Run what the experiment still needs, then print and write its report. Returns the
    exit status and the report's data."""
    outcomes: dict[str, Outcome] = {}
    pending: list[PlannedRun] = []
    for run in experiment.runs:
        forced = opts.force and run.role == "recipe"
        summary = done(run.folder(opts.out_root), run.hash, run.max_steps)
        if summary is not None and not forced:
            outcomes[run.key] = Outcome(run.key, "reused")
        else:
            pending.append(run)
    reused = len(outcomes)
    if not opts.quiet:
        err.print(
            f"[bold]{experiment.label}[/]: {len(experiment.runs)} runs, {reused} finished "
            f"already (reused), {len(pending)} to run",
            highlight=False,
        )
    stopped: str | None = None
    if pending:
        stopped = _run_pending(experiment, opts, pending, outcomes, err)
    report = _report(experiment, opts, outcomes, out, err)
    if stopped is not None:
        code = INTERRUPTED if stopped == "SIGINT" else PREEMPTED
        err.print(
            f"[bold yellow]stopped by {stopped}[/]: the running runs saved checkpoints; run the "
            "same command again to continue (finished runs are kept)",
            highlight=False,
        )
        return code, report
    return (OK if all(o.ok for o in outcomes.values()) else FAILED), report


def _run_pending(
    experiment: Experiment,
    opts: JobOptions,
    pending: list[PlannedRun],
    outcomes: dict[str, Outcome],
    err: Console,
) -> str | None:
    """Run the pending runs; returns the name of the signal that stopped them, if one did."""
    gpus = [] if opts.launcher == "submitit" else visible_gpus(opts.device)
    slots = _jobs(opts, gpus)
    board = Board(err, len(pending), opts.quiet)
    launcher: Any
    if opts.launcher == "submitit":
        launcher = SubmititLauncher(opts)
        slots = opts.jobs or len(pending)
    elif slots == 1 and (opts.nproc or 1) == 1:
        launcher = InlineLauncher(opts, board)
    else:
        launcher = LocalLauncher(opts, slots, gpus)
    scheduler = _Scheduler(experiment, opts, pending, board, outcomes)
    # A run of this process (InlineLauncher) has Ctrl-C handled by its own training loop; runs
    # in other processes have it passed on by this one, the first one as a stop at the next
    # step, a second one (KeyboardInterrupt) as an abort.
    inline = isinstance(launcher, InlineLauncher)
    interrupts = contextlib.nullcontext() if inline else interrupt_stops(scheduler.stop, board.note)
    try:
        with stop_signals(scheduler.stop), interrupts:
            scheduler.run(launcher, slots)
    except KeyboardInterrupt:
        scheduler.stop_reason = "SIGINT"
        for handle in scheduler.running.values():
            handle.stop("SIGINT")  # a second Ctrl-C: theirs aborts them at once
        drain(scheduler)
    finally:
        board.close()
        if hasattr(launcher, "close"):
            launcher.close()
    for run in scheduler.waiting:  # never started: stopped before their turn
        outcomes.setdefault(run.key, Outcome(run.key, "missing", "not started"))
    return scheduler.stop_reason


def _report(
    experiment: Experiment,
    opts: JobOptions,
    outcomes: dict[str, Outcome],
    out: Console,
    err: Console,
) -> dict[str, Any]:
    """Assemble, print and write the report (``report.json``, ``.txt``, ``.png``)."""
    from vitkdl.train.report import (
        PLOTS_MISSING,
        experiment_notes,
        experiment_tables,
        write_experiment_plot,
    )

    summaries = {}
    for run in experiment.runs:
        summary = read_summary(run.folder(opts.out_root))
        summaries[run.key] = summary if summary and summary.get("hash") == run.hash else None
    report = assemble_report(experiment, summaries, outcomes, opts.out_root)
    folder = experiment_dir(opts.out_root, experiment.label, experiment.hash())
    tables = experiment_tables(report)
    notes = experiment_notes(report)
    for table in tables:
        out.print(table)
    for line in notes:
        out.print(line, highlight=False, markup=False)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        text = io.StringIO()
        plain = Console(file=text, width=160, no_color=True, highlight=False)
        for table in tables:
            plain.print(table)
        for line in notes:
            plain.print(line, soft_wrap=True, markup=False)
        (folder / "report.txt").write_text(text.getvalue())
        plotted = write_experiment_plot(report, folder / "report.png")
        point_latest(folder.parent, experiment.label, folder)
    except OSError as exc:
        err.print(f"[yellow]warning:[/] the report could not be written to {folder}: {exc}")
        return report
    files = "report.json, report.txt" + (", report.png" if plotted else "")
    out.print(f"report: {folder}/ ({files})", highlight=False, soft_wrap=True)
    if not plotted:
        out.print(f"report.png skipped: {PLOTS_MISSING}", highlight=False, soft_wrap=True)
    return report


# --------------------------------------------------------------------------------------------
# A plain `vitkdl run R...`


def _why(experiment: Experiment, run: PlannedRun) -> str:
    """How the console introduces a run that another run of ``experiment`` needs (rich
    markup): a teacher by the run it teaches, a baseline by the recipe compared with it."""
    if run.role == "teacher":
        needs = next(r for r in experiment.runs if run.key in r.deps)
        return f"[bold]{needs.recipe}[/]: its teacher, the final student of {escape(run.path)}"
    if run.role == "baseline":
        arm = next(
            a
            for a in experiment.arms
            if a.baseline is not None and run.key in dict(experiment.arms[a.baseline].runs).values()
        )
        return f"[bold]{arm.recipe}[/]: its baseline {escape(run.path)}"
    return ""


def run_plain(
    experiments: Sequence[Experiment], opts: JobOptions, console: Console, tables: Console
) -> list[dict[str, Any]]:
    """``vitkdl run R...`` without seeds, a grid or parallel runs: each recipe's experiment (one
    cell, its own seed) run by the inline launcher, in this process, one run after the other
    (the teacher's run, the recipe's, its baseline's), progress and notes on ``console``
    (stderr). After each recipe its table, and with several runs a comparison at the end
    (also ``OUT/comparison.json`` and ``.png``), on ``tables`` (stdout), so that
    ``vitkdl run R > results.txt`` keeps just the results. What ends a run (a failure, a
    refusal, a stop) ends the command: it goes up to the caller. Returns the runs' summaries,
    one per run folder."""
    from vitkdl.train import distributed
    from vitkdl.train.report import (
        PLOTS_MISSING,
        comparison_table,
        print_summary,
        write_comparison,
    )
    from vitkdl.train.runner import check_start

    job = distributed.init_from_env(opts.device)
    if not job.is_main:
        console = tables = Console(quiet=True)  # rank 0 alone reports
    launcher = InlineLauncher(opts)
    shown: dict[str, dict[str, Any]] = {}
    for experiment in experiments:
        tasks = [
            (run, task_of(run, opts, plain=True, why=_why(experiment, run)))
            for run in experiment.runs
        ]
        for run, task in tasks:  # a refusal comes before any work (its teacher's included)
            if run.role == "recipe":
                check_start(task.path, task)
        # Shown with this command's overrides: a folder trained first by another command
        # (`--seeds`, a sweep) records that command's (`train.seed=0`).
        summaries = {
            run.key: {**launcher.run(task, console), "overrides": list(run.overrides)}
            for run, task in tasks
        }
        if not job.is_main:
            continue
        for run, _ in tasks:
            if run.role == "recipe":
                print_summary(tables, summaries[run.key])
        for summary in summaries.values():
            shown[f"{summary['recipe']}-{summary.get('hash')}"] = summary  # one row per folder
    if len(shown) > 1:
        rows = list(shown.values())
        tables.print(comparison_table(rows))
        opts.out_root.mkdir(parents=True, exist_ok=True)
        if not write_comparison(rows, opts.out_root / "comparison.png"):
            console.print(f"comparison.png skipped: {PLOTS_MISSING}", highlight=False)
        write_atomic(opts.out_root / "comparison.json", json.dumps(rows, indent=2) + "\n")
    return list(shown.values())
