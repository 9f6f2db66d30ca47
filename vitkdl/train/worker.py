"""One run of an experiment, in this process.

:mod:`vitkdl.train.jobs` runs each run of an experiment through :func:`execute`: in the
experiment's process for ``--jobs 1`` (a plain ``vitkdl run R`` through :func:`run_task`, its
output on the console and what ends it left to the command), as ``python -m
vitkdl.train.worker TASK`` for several at once (under torchrun when a run uses several
processes), or inside a SLURM job through submitit. The run is an ordinary
:func:`vitkdl.train.runner.run_recipe` of one recipe under its overrides (its dependencies, a
teacher's run or a baseline, are runs of the experiment of their own, already finished), an
unfinished run of the same recipe continued from its checkpoint. What it prints goes to
``OUT/NAME-HASH/log.txt``; while it trains, ``progress.json`` there says how far it is.

The exit status (:func:`execute`'s result) is the one ``vitkdl run`` would exit with
(:func:`vitkdl.exits.exit_of`): 0 finished, 1 failed (the last line of the log says why), 2
the recipe has errors, 70 a bug (the log holds the traceback), 74 a file could not be
written, 75 stopped by SIGTERM or SIGUSR1 with a checkpoint, 130 stopped by Ctrl-C with a
checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console

from vitkdl.exits import INTERNAL, INTERRUPTED, OK, exit_of
from vitkdl.runs import LOG, PROGRESS
from vitkdl.settings import RunRequest

#: The line a failed run's log ends with, before the reason.
FAILED = "vitkdl run: error:"


@dataclass(frozen=True, kw_only=True)
class Task(RunRequest):
    """What a launcher is asked to run (plain data: it travels as JSON or through pickle): the
    run as asked (:class:`vitkdl.settings.RunRequest`), its recipe and its folder."""

    path: str
    key: str  # the folder's name the run is expected in, NAME-HASH
    threads: int | None = None  # CPU threads for this run (None: as torch chooses)

    @property
    def folder(self) -> Path:
        return Path(self.out_root) / self.key

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "out_root": str(self.out_root)})

    @classmethod
    def from_json(cls, text: str) -> Task:
        data = json.loads(text)
        data["overrides"] = tuple(data.get("overrides", ()))
        data["out_root"] = Path(data.get("out_root", "runs"))
        return cls(**data)


class ProgressFile:
    """``progress.json`` in the run's folder, rewritten at most every ``interval`` seconds:
    how a run in another process (or on another machine) shows its progress."""

    def __init__(self, folder: Path, interval: float = 1.0) -> None:
        self.path = Path(folder) / PROGRESS
        self.interval = interval
        self.last = 0.0

    def __call__(self, step: int, total: int, epoch: int) -> None:
        now = time.monotonic()
        if now - self.last < self.interval and step < total:
            return
        self.last = now
        tmp = self.path.with_name(f".{PROGRESS}.{os.getpid()}")
        with contextlib.suppress(OSError):
            tmp.write_text(json.dumps({"step": step, "total": total, "epoch": epoch}))
            os.replace(tmp, self.path)

    def remove(self) -> None:
        """Remove the file this run wrote; a run that never trained (its folder held by
        another process) leaves the holder's file alone."""
        if not self.last:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()


def read_progress(folder: Path) -> dict[str, int] | None:
    """What :class:`ProgressFile` last wrote in ``folder``, or None."""
    try:
        data = json.loads((Path(folder) / PROGRESS).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@contextlib.contextmanager
def _fresh(count: int | None) -> Iterator[None]:
    """Run as a fresh process would, in one that may have run others: with ``count`` CPU
    threads (the process gets its count back after: a run may lower it for itself) and no
    compiled graphs or compile counters left from an earlier run."""
    import torch

    if "torch._dynamo" in sys.modules:
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_task(
    task: Task,
    console: Console,
    on_step: Callable[[int, int, int], None] | None = None,
) -> dict[str, Any]:
    """Run ``task`` in this process, printing to ``console``; returns its summary and raises
    what ended it otherwise (a run that is not in the folder the plan expects fails)."""
    from vitkdl.train.loop import TrainError
    from vitkdl.train.runner import run_recipe

    with _fresh(task.threads):
        summary = run_recipe(task.path, task, console, on_step)
    if summary.get("hash") and f"{summary['recipe']}-{summary['hash']}" != task.key:
        got = f"{summary['recipe']}-{summary['hash']}"
        raise TrainError(f"the run was expected in {task.key}, not {got}")
    return summary


def execute(
    task: Task,
    console: Console,
    on_step: Callable[[int, int, int], None] | None = None,
) -> tuple[int, str]:
    """Run ``task`` in this process, printing to ``console``, as one run of an experiment:
    what ended it is mapped to an exit status (:func:`vitkdl.exits.exit_of`) and said on
    ``console``. Returns (exit status, the reason when it did not finish)."""
    from vitkdl.diagnostics_print import print_diagnostics
    from vitkdl.errors import VkdError

    try:
        run_task(task, console, on_step)
    except Exception as exc:  # mapped by vitkdl.exits; a bug is reported, the others go on
        ended = exit_of(exc, in_experiment=True)
        if isinstance(exc, VkdError):
            print_diagnostics(console, exc.diagnostics, exc.sources)
        elif ended.status == INTERNAL:
            console.print(traceback.format_exc(), highlight=False, markup=False)
        head = "vitkdl run:" if ended.stopped else FAILED
        console.print(f"{head} {ended.message}", highlight=False, markup=False)
        return ended.status, ended.message
    return OK, ""


def log_file(task: Task) -> TextIO:
    """The run's log, opened for appending (a resumed run adds to it)."""
    task.folder.mkdir(parents=True, exist_ok=True)
    f = open(task.folder / LOG, "a", buffering=1)  # noqa: SIM115 (closed by the caller)
    f.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} vitkdl run {task.path} ====\n")
    return f


def failure_reason(folder: Path) -> str:
    """Why a run failed, from the end of its log (the line :func:`execute` ends it with)."""
    try:
        lines = (Path(folder) / LOG).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines[-200:]):
        if line.startswith(FAILED):
            return line[len(FAILED) :].strip()
        if line.startswith("vitkdl run: "):
            return line[len("vitkdl run: ") :].strip()
    return ""


@contextlib.contextmanager
def _output_to(log: TextIO) -> Iterator[None]:
    """This process's stdout and stderr (the file descriptors: C code's output too) go to
    ``log`` while inside."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def serve(result_fd: int) -> int:
    """``python -m vitkdl.train.worker --serve FD``: a worker that runs task after task (one
    JSON task per line on stdin) in this one process, so that torch is imported once per
    worker, not once per run. Each run's output goes to its log; a line ``{"key", "code",
    "message"}`` per run goes to file descriptor ``FD``. Ends at the end of its input.
    Between runs Ctrl-C and SIGTERM do not end it (the experiment ends it by closing its
    input); during a run they stop that run with a checkpoint."""
    import signal

    import torch  # noqa: F401 (once, before the first run)

    _stop_with_parent()
    results = os.fdopen(result_fd, "w", buffering=1)
    idle = {s: signal.SIG_IGN for s in (signal.SIGINT, signal.SIGTERM)}
    busy = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    for sig, handler in idle.items():
        signal.signal(sig, handler)
    for line in sys.stdin:
        if not line.strip():
            continue
        task = Task.from_json(line)
        progress = ProgressFile(task.folder)
        with log_file(task) as log, _output_to(log):
            for sig, handler in busy.items():
                signal.signal(sig, handler)
            try:
                console = Console(file=log, highlight=False, width=120, no_color=True)
                code, message = execute(task, console, progress)
            except KeyboardInterrupt:  # before or after the training loop
                code, message = INTERRUPTED, "interrupted"
            finally:
                for sig, handler in idle.items():
                    signal.signal(sig, handler)
                progress.remove()
        with contextlib.suppress(OSError):  # the experiment may be gone
            results.write(json.dumps({"key": task.key, "code": code, "message": message}) + "\n")
    return 0


def _stop_with_parent() -> None:
    """On Linux, have the kernel send this worker SIGTERM when the experiment that started it
    dies (even by SIGKILL): its run then saves a checkpoint and stops, instead of training on
    unseen while a rerun of the experiment starts the same run again."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


def main(argv: list[str] | None = None) -> int:
    """``python -m vitkdl.train.worker TASK_JSON``: run one task; output goes wherever this
    process's stdout and stderr go (the run's log). ``--serve FD``: see :func:`serve`."""
    from vitkdl.train import distributed

    args = sys.argv[1:] if argv is None else argv
    if args[0] == "--serve":
        return serve(int(args[1]))
    task = Task.from_json(args[0])
    job = distributed.init_from_env()
    console = Console(stderr=True, highlight=False, width=120, quiet=not job.is_main)
    progress = ProgressFile(task.folder) if job.is_main else None
    try:
        code, _ = execute(task, console, progress)
    finally:
        if progress is not None:
            progress.remove()
    return code


if __name__ == "__main__":
    sys.exit(main())
