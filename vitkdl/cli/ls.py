"""``vitkdl ls``: the shipped recipes, one line each."""

from __future__ import annotations

import argparse

from rich.markup import escape

from vitkdl.cli.common import consoles

HELP = """List the recipes shipped with vitkdl (the paper's settings and the quickstart) with the
first line of each one's header. Copy one to edit with `vitkdl cp NAME DEST`."""

EPILOG = """examples:
  vitkdl ls
  vitkdl cp deit_tiny_vitkd_kd my_recipe.vkd"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ls",
        help="list the shipped recipes",
        description=HELP,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vitkdl.shipped import shipped

    out, _ = consoles()
    recipes = shipped()
    width = max((len(r.name) for r in recipes), default=0)
    for r in recipes:
        out.print(f"{escape(r.name.ljust(width))}  {escape(r.description)}", soft_wrap=True)
    return 0
