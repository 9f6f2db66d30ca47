"""``vitkdl run RECIPE...``: train, evaluate, checkpoint and compare."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from rich.console import Console

from vitkdl.cli.common import add_recipe_options, consoles, print_diagnostics, print_exit
from vitkdl.exits import FAILED, INTERNAL, OK, PREEMPTED, USAGE, exit_of
from vitkdl.runs import IN_USE

if TYPE_CHECKING:
    from vitkdl.experiment import Experiment
    from vitkdl.train.jobs import JobOptions

#: The exit status of a run whose folder another process holds: sysexits' EX_TEMPFAIL,
#: like a preempted run (the same command succeeds later).
HELD = PREEMPTED

HELP = """Train each recipe's student: the teacher first when it is `from` another recipe whose
exported student is missing or stale, then the recipe itself, then (for a recipe that extends a
student-only baseline recipe, like the quickstart) the baseline, and a comparison table.
Each run has its own folder OUT/NAME-HASH/ (HASH: the resolved recipe's, overrides and seed
included; OUT/NAME links to the latest): recipe.json, plan.json, metrics.jsonl, curves.png,
last.pt, best.pt, student.safetensors, summary.json. A finished run is reused, never replaced
without --force; the baseline runs under the same student/data/train overrides."""

EPILOG = """examples:
  vitkdl run recipes/quickstart.vkd                      the main job: teacher, student, baseline
  vitkdl run recipes/deit_tiny_vitkd_kd.vkd --set data.root=/data/imagenet
  vitkdl run recipes/deit_base_vitkd_kd.vkd --smoke      a few steps on synthetic data
  vitkdl run recipes/quickstart.vkd --resume             continue a killed run
  vitkdl run recipes/quickstart.vkd --seeds 0-4          five seeds, means and paired intervals
  vitkdl run recipes/quickstart.vkd --seeds 0-2 --grid distill.generate.mask=0.25,0.5,0.75
  vitkdl run recipes/quickstart.vkd --seeds 0-3 --jobs 2 two runs at once

Experiments (--seeds, --grid, a recipe's sweep block, --jobs, --launcher): every run is an
ordinary run (reused when finished, continued from its checkpoint when unfinished); the report
(per seed, mean ± sd, the paired difference with the baseline and its 95% interval, wins) is
printed and written to OUT/experiments/. --max-steps N reaches every run the command starts
(teachers and baselines too); the same command again reuses those partial runs, --resume
with a larger N (or none) continues them. Final tables go to stdout, the rest to stderr.
Exit status: 0 all finished, 1 a run failed (the others went on), 2 bad input (or an
unfinished run that needs --resume or --force), 74 a file could not be written (disk full,
read-only folder), 75 stopped by SIGTERM/SIGUSR1 with checkpoints saved (run the same
command again) or the run folder is in use, 130 stopped by Ctrl-C (the same).
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="train recipes",
        description=HELP,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipes", nargs="+", metavar="RECIPE", help=".vkd files")
    add_recipe_options(p)
    p.add_argument(
        "--out", type=Path, default=Path("runs"), metavar="OUT", help="output root (default: runs)"
    )
    p.add_argument("--resume", action="store_true", help="continue from OUT/NAME/last.pt")
    p.add_argument(
        "--force",
        action="store_true",
        help="train a finished run again, start an unfinished one over, or (with "
        "--resume) continue a run of an earlier version of the recipe",
    )
    p.add_argument(
        "--max-steps",
        type=int,
        default=None,
        metavar="N",
        help="stop every run (teacher and baseline too) after N optimizer steps; the same "
        "command again reuses the partial runs",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="a few steps of the recipe's real models on synthetic data",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if any)")
    p.add_argument(
        "--no-baseline",
        dest="baseline",
        action="store_false",
        help="do not train the baseline a recipe extends for comparison",
    )
    p.add_argument("--quiet", action="store_true", help="only the final tables")
    p.add_argument(
        "--nproc-per-node",
        type=int,
        default=None,
        metavar="N",
        help="train on N processes of this machine (launches torchrun; one GPU "
        "each, or gloo on CPU). For several machines call torchrun yourself: "
        "torchrun --nnodes ... -m vitkdl run RECIPE",
    )
    p.add_argument(
        "--seeds",
        default=None,
        metavar="SEEDS",
        help="run each recipe (and its baseline) once per seed: 0,1,2 or 0-4; the report "
        "gives means, standard deviations and paired 95%% intervals",
    )
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="PATH=V1,V2,...",
        help="an axis of a sweep (repeatable: the cartesian product), e.g. "
        "--grid distill.generate.mask=0.25,0.5,0.75; values as in --set",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=None,
        metavar="N",
        help="runs at once, in dependency order (default: 1 on CPU, one per GPU); "
        "on CPU the cores are split between them",
    )
    p.add_argument(
        "--launcher",
        choices=("local", "submitit"),
        default="local",
        help="local processes (default) or one SLURM job per run through submitit "
        '(pip install -e ".[submitit]")',
    )
    p.add_argument(
        "--launcher-arg",
        dest="launcher_args",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a submitit parameter (repeatable): slurm_partition=gpu, timeout_min=600, "
        "cluster=local (local processes)",
    )
    p.set_defaults(func=run)


def is_experiment(args: argparse.Namespace) -> bool:
    """Whether the command is one experiment with a report (several seeds, a sweep, parallel
    runs, a launcher) rather than each recipe's experiment of one run (its teacher's and
    baseline's besides) with the recipe's table."""
    if args.seeds is not None or args.grid or args.jobs is not None:
        return True
    if args.launcher != "local" or args.launcher_args:
        return True
    from vitkdl.errors import Sources
    from vitkdl.experiment import read_sweep

    return any(not read_sweep(path, Sources())[0].empty for path in args.recipes)


_LAUNCHER_NOISE = re.compile(r"^(E|W)\d{4} .*(elastic|distributed)|^\*{5,}|^Setting OMP_NUM")


def _relay(stream: TextIO, shown: list[str]) -> None:
    """Pass torchrun's output on to stderr, up to its traceback or failure table."""
    hiding = False
    for line in stream:
        hiding = hiding or line.startswith(("Traceback (most recent call last):", "====="))
        if not hiding and not _LAUNCHER_NOISE.match(line):
            sys.stderr.write(line)
            shown.append(line)


def _abort_workers(torchrun: int) -> None:
    """A second Ctrl-C: a second SIGINT to each of torchrun's workers (its children), which
    aborts them at once (:func:`vitkdl.train.signals.interrupt_stops`); torchrun, in the middle
    of passing the first one on, would not pass this one."""
    try:
        children = Path(f"/proc/{torchrun}/task/{torchrun}/children").read_text().split()
    except OSError:  # not Linux: the workers stop at their step as asked
        return
    for pid in children:
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pid), signal.SIGINT)


def launch_torchrun(nproc: int) -> int:
    """Re-run this command under torchrun with ``nproc`` processes on this machine."""
    argv = sys.argv[1:]
    rest: list[str] = []
    skip = False
    for a in argv:  # drop --nproc-per-node N / --nproc-per-node=N
        if skip:
            skip = False
            continue
        if a == "--nproc-per-node":
            skip = True
            continue
        if a.startswith("--nproc-per-node="):
            continue
        rest.append(a)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "vitkdl",
        *rest,
    ]
    from vitkdl.train.signals import exit_status, interrupt_stops, stop_signals, stop_with_parent

    # The workers report their own errors; what the launcher prints after a failure (its
    # traceback and failure table) adds nothing for a user, so it is held back. torchrun runs
    # in a session of its own (its workers too, in theirs): a stop reaches it from this
    # process alone, once, whether it came from a terminal or was sent to this PID only.
    proc = subprocess.Popen(
        cmd,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=stop_with_parent,  # if this process is killed, torchrun saves and stops
    )
    assert proc.stderr is not None
    stopped: list[str] = []

    def forward(name: str) -> None:  # torchrun passes the signal on to its workers
        stopped.append(name)
        proc.send_signal(signal.SIGINT if name == "SIGINT" else signal.SIGTERM)

    shown: list[str] = []
    # The first Ctrl-C: the workers stop at the step they agree on, with a checkpoint (rank 0
    # prints the note); this process reads their output until they have saved. A second one
    # aborts them at once.
    with stop_signals(forward), interrupt_stops(forward, lambda note: None):
        try:
            _relay(proc.stderr, shown)
        except KeyboardInterrupt:
            _abort_workers(proc.pid)
            _relay(proc.stderr, shown)
        code = proc.wait()
    if stopped:  # the workers saved a checkpoint at their next step
        return exit_status(stopped[0])
    if code != 0 and IN_USE in " ".join("".join(shown).split()):  # rich wraps long lines
        return HELD  # the workers refused a held run folder: nothing failed
    if code != 0:
        sys.stderr.write(
            f"vitkdl run: a worker process failed (exit status {code}); its message is above\n"
        )
    return USAGE if code == USAGE else (FAILED if code else OK)


def run(args: argparse.Namespace) -> int:
    out, err = consoles()
    if args.max_steps is not None and args.max_steps < 1:
        err.print("vitkdl run: error: --max-steps must be at least 1")
        return USAGE
    if args.jobs is not None and args.jobs < 1:
        err.print("vitkdl run: error: --jobs must be at least 1")
        return USAGE
    if args.nproc_per_node is not None and args.nproc_per_node < 1:
        err.print("vitkdl run: error: --nproc-per-node must be at least 1")
        return USAGE
    bad = [a for a in args.launcher_args if "=" not in a]
    if bad:
        err.print(f"vitkdl run: error: --launcher-arg is KEY=VALUE, got '{bad[0]}'", markup=False)
        return USAGE
    if args.device is not None:  # before any run folder is made
        from vitkdl.program import device_problem

        problem = device_problem(args.device)
        if problem is not None:
            err.print(f"vitkdl run: error: {problem}", highlight=False, markup=False)
            return USAGE
    # A process of a torchrun job (--nproc-per-node) runs its recipes' runs with the others.
    launched = "WORLD_SIZE" in os.environ
    report = not launched and is_experiment(args)
    if not report and not launched and (args.nproc_per_node or 1) > 1:
        return launch_torchrun(args.nproc_per_node)
    from vitkdl.errors import VkdError
    from vitkdl.experiment import plan_experiment
    from vitkdl.train.jobs import JobOptions

    # An experiment plans every recipe together; a plain run is each recipe's experiment of
    # one cell and its own seed, one after the other.
    groups = [args.recipes] if report else [[path] for path in args.recipes]
    try:
        experiments = [
            plan_experiment(
                group,
                args.overrides,
                args.grid,
                args.seeds,
                max_steps=args.max_steps,
                smoke=args.smoke,
                baseline=args.baseline,
            )[0]
            for group in groups
        ]
    except VkdError as exc:
        print_diagnostics(err, exc.diagnostics, exc.sources)
        return USAGE
    opts = JobOptions(
        out_root=args.out,
        device=args.device,
        force=args.force,
        smoke=args.smoke,
        quiet=args.quiet,
        max_steps=args.max_steps,
        resume=args.resume,
        jobs=args.jobs,
        launcher=args.launcher,
        launcher_args=tuple(tuple(a.split("=", 1)) for a in args.launcher_args),  # type: ignore[misc]
        nproc=args.nproc_per_node,
    )
    if report:
        return _run_experiment(experiments[0], opts, out, err)
    return _run_plain(experiments, opts, out, err)


def _run_plain(experiments: list[Experiment], opts: JobOptions, out: Console, err: Console) -> int:
    """Each recipe's runs, here (:func:`vitkdl.train.jobs.run_plain`); what ended them mapped
    to the exit status (:mod:`vitkdl.exits`)."""
    from vitkdl.train import distributed
    from vitkdl.train.jobs import run_plain
    from vitkdl.train.runner import RunInUse

    try:
        run_plain(experiments, opts, err, out)  # tables on stdout, the rest on stderr
    except Exception as exc:  # mapped by vitkdl.exits; a bug goes on to main's last line
        ended = exit_of(exc)
        if ended.status == INTERNAL:
            raise
        # Every rank refuses a held folder; rank 0 says why.
        if not isinstance(exc, RunInUse) or os.environ.get("RANK", "0") == "0":
            print_exit(err, "vitkdl run", exc)
        return ended.status
    finally:
        distributed.shutdown()
    return OK


def _run_experiment(experiment: Experiment, opts: JobOptions, out: Console, err: Console) -> int:
    """``--seeds`` / ``--grid`` / a sweep block / ``--jobs`` / ``--launcher``: run what is
    missing, report (:func:`vitkdl.train.jobs.run_experiment`)."""
    from vitkdl.train.jobs import LaunchError, run_experiment

    try:
        code, _ = run_experiment(experiment, opts, out, err)
    except (LaunchError, OSError) as exc:  # OSError: a folder of --out cannot be written
        if exit_of(exc).status == INTERNAL:
            raise
        return print_exit(err, "vitkdl run", exc)
    return code
