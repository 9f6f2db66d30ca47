"""``vitkdl cache RECIPE``: fill a recipe's teacher cache (``teacher { cache = ... }``) alone."""

from __future__ import annotations

import argparse
from pathlib import Path

from vitkdl.cli.common import add_recipe_options, consoles, print_diagnostics, print_exit
from vitkdl.exits import INTERNAL, OK, USAGE, exit_of

HELP = """Run the recipe's teacher over every epoch's augmented batches (the order, each sample's
crop, flip, RandAugment and random erasing, each batch's mixup/cutmix, as the run will see
them under data.seed) and store its logits in the folder `teacher { cache = "PATH" }` names.
Epochs already there are kept: a killed pass continues from the first missing epoch. A cache
built for another teacher, data, transform, batch, world size or data seed is refused, naming
what differs. `vitkdl run` fills what is missing itself before training."""

EPILOG = """examples:
  vitkdl cache my_kd.vkd                         every epoch of the recipe
  vitkdl cache my_kd.vkd --epochs 2              the first two epochs only
  vitkdl cache my_kd.vkd --set data.seed=3       the stream of another data seed
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cache",
        help="fill a recipe's teacher cache",
        description=HELP,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", metavar="RECIPE", help="a .vkd file with teacher { cache = ... }")
    add_recipe_options(p)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if any)")
    p.add_argument("--epochs", type=int, default=None, metavar="N", help="only the first N epochs")
    p.add_argument(
        "--world-size",
        type=int,
        default=1,
        metavar="N",
        help="the number of devices the run will train on (each rank's batches are stored)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("runs"),
        metavar="OUT",
        help="output root where a teacher `from` a recipe is found (default: runs)",
    )
    p.add_argument("--quiet", action="store_true", help="only the summary line")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import vitkdl
    from vitkdl.errors import VkdError

    out, err = consoles()
    for name in ("epochs", "world_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            err.print(f"vitkdl cache: error: --{name.replace('_', '-')} must be at least 1")
            return USAGE
    if args.device is not None:
        from vitkdl.program import device_problem

        problem = device_problem(args.device)
        if problem is not None:
            err.print(f"vitkdl cache: error: {problem}", highlight=False, markup=False)
            return USAGE
    spec, diags, sources = vitkdl.validate(args.recipe, args.overrides, strict=True)
    print_diagnostics(err, diags, sources)
    if spec is None or any(d.is_error for d in diags):
        return USAGE
    try:
        plan = vitkdl.plan(spec, world_size=args.world_size)
    except VkdError as exc:
        print_diagnostics(err, exc.diagnostics, exc.sources)
        return USAGE
    if plan.cache is None:
        err.print(
            f"vitkdl cache: error: {args.recipe} has no teacher cache; add "
            'cache = "path/to/cache" to its teacher block',
            markup=False,
            highlight=False,
        )
        return USAGE
    try:
        from vitkdl.program import resolve_device
        from vitkdl.train.cache import CacheError
        from vitkdl.train.loop import fill_cache

        device = resolve_device(args.device)

        def note(text: str) -> None:
            if not args.quiet:
                err.print(text, markup=False, highlight=False)

        try:
            report = fill_cache(plan, device, runs_dir=args.out, epochs=args.epochs, note=note)
        except CacheError as exc:
            err.print(f"vitkdl cache: error: {exc}", markup=False, highlight=False)
            return USAGE
    except Exception as exc:
        if exit_of(exc).status == INTERNAL and not isinstance(exc, VkdError):
            raise
        return print_exit(err, "vitkdl cache", exc)
    kept = f", {len(report.kept)} already there" if report.kept else ""
    top1 = f", teacher top-1 {report.teacher_top1:.2f}%" if report.teacher_top1 is not None else ""
    out.print(
        f"{report.path}: {len(report.computed)} epoch(s) computed in {report.seconds:.1f} s"
        f"{kept}{top1}",
        markup=False,
        highlight=False,
    )
    return OK
