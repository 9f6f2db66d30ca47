"""``vitkdl run RECIPE...``: train, evaluate, checkpoint and compare."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

from vitkdl.cli.common import add_recipe_options, consoles, print_diagnostics

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
        "--max-steps", type=int, default=None, metavar="N", help="stop after N optimizer steps"
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
    p.set_defaults(func=run)


_LAUNCHER_NOISE = re.compile(r"^(E|W)\d{4} .*(elastic|distributed)|^\*{5,}|^Setting OMP_NUM")


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
    # The workers report their own errors; what the launcher prints after a failure (its
    # traceback and failure table) adds nothing for a user, so it is held back.
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    hiding = False
    for line in proc.stderr:
        hiding = hiding or line.startswith(("Traceback (most recent call last):", "====="))
        if not hiding and not _LAUNCHER_NOISE.match(line):
            sys.stderr.write(line)
    code = proc.wait()
    if code != 0:
        sys.stderr.write(
            f"vitkdl run: a worker process failed (exit status {code}); its message is above\n"
        )
    return 2 if code == 2 else (1 if code else 0)


def run(args: argparse.Namespace) -> int:
    from vitkdl.errors import VkdError
    from vitkdl.train.checkpoint import CheckpointError
    from vitkdl.train.data import DataError
    from vitkdl.train.loop import TrainError
    from vitkdl.train.runner import RunRequest, run_many

    _, err = consoles()
    if args.max_steps is not None and args.max_steps < 1:
        err.print("vitkdl run: error: --max-steps must be at least 1")
        return 2
    if args.nproc_per_node is not None:
        if args.nproc_per_node < 1:
            err.print("vitkdl run: error: --nproc-per-node must be at least 1")
            return 2
        if args.nproc_per_node > 1 and "WORLD_SIZE" not in os.environ:
            return launch_torchrun(args.nproc_per_node)
    req = RunRequest(
        out_root=args.out,
        overrides=tuple(args.overrides),
        resume=args.resume,
        force=args.force,
        max_steps=args.max_steps,
        smoke=args.smoke,
        quiet=args.quiet,
        device=args.device,
        baseline=args.baseline,
    )
    try:
        run_many(args.recipes, req, err)
    except VkdError as exc:
        print_diagnostics(err, exc.diagnostics, exc.sources)
        return 2
    except (TrainError, DataError, CheckpointError) as exc:
        err.print(f"[bold red]vitkdl run: error:[/] {exc}", highlight=False)
        return 1
    finally:
        from vitkdl.train import distributed

        distributed.shutdown()
    return 0
