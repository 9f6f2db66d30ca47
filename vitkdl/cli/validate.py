"""``vitkdl validate RECIPE...``: check recipes, build nothing, report every problem."""

from __future__ import annotations

import argparse

from rich.markup import escape

from vitkdl.cli.common import add_recipe_options, consoles, print_diagnostics

HELP = """Check recipes without building anything: syntax, fields, choices, timm model names,
layer indices, token grids, weights and data paths. Model shapes are resolved on the meta
device (no weights allocated, nothing downloaded) and cached. Every problem of every recipe is
reported, with file:line:column; exit status 2 when any recipe has an error."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "validate",
        help="check recipes and report every error",
        description=HELP,
        epilog="example: vitkdl validate recipes/*.vkd",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipes", nargs="+", metavar="RECIPE", help=".vkd files")
    p.add_argument(
        "--strict",
        action="store_true",
        help="treat a missing data root or weight file as an error, as `run` does",
    )
    add_recipe_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vitkdl import validate

    out, err = consoles()
    failed = 0
    shown: set[tuple[object, str]] = set()  # a base recipe's warning is shown once, not per user
    for path in args.recipes:
        spec, diags, sources = validate(path, args.overrides, strict=args.strict)
        fresh = [d for d in diags if (d.span, d.message) not in shown]
        shown.update((d.span, d.message) for d in diags)
        print_diagnostics(err, fresh, sources)
        errors = sum(d.is_error for d in diags)
        warnings = len(diags) - errors
        if errors or spec is None:
            failed += 1
            continue
        student = spec.student.model if spec.student else "?"
        teacher = f" <- {spec.teacher.model}" if spec.teacher else ""
        terms = ", ".join(t.name for t in spec.terms)
        note = f", {warnings} warning{'s' * (warnings != 1)}" if warnings else ""
        out.print(
            f"[green]ok[/] {escape(path)}: {escape(student + teacher)} \\[{escape(terms)}]{note}",
            soft_wrap=True,
        )
    if failed:
        err.print(
            f"[bold red]{failed} of {len(args.recipes)} recipe"
            f"{'s' * (len(args.recipes) != 1)} failed validation[/]"
        )
        return 2
    return 0
