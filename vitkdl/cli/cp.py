"""``vitkdl cp NAME DEST``: copy a shipped recipe out to edit, with the recipes it names."""

from __future__ import annotations

import argparse

from rich.markup import escape

from vitkdl.cli.common import consoles, print_exit
from vitkdl.exits import WriteError

HELP = """Copy the shipped recipe NAME (see `vitkdl ls`) to DEST, a file or a directory. The
recipes it names by relative path (`extends "base/..."`, `teacher from "..."`) are copied
beside it at the same relative places, so the copy validates and runs as the original does (into
a directory, all of them inside it, in the shipped layout below their common folder); an
existing dependency that differs from the shipped one is kept (and named), unless --force."""

EPILOG = """examples:
  vitkdl cp deit_tiny_vitkd_kd my_recipe.vkd      also writes base/deit_imagenet.vkd
  vitkdl cp quickstart experiments/               also the quickstart teacher and baseline
  vitkdl cp base/deit_imagenet my_base.vkd"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cp",
        help="copy a shipped recipe to edit",
        description=HELP,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", metavar="NAME", help="a shipped recipe, e.g. quickstart")
    p.add_argument("dest", metavar="DEST", help="a file, or a directory to copy into")
    p.add_argument("--force", action="store_true", help="overwrite DEST and differing dependencies")
    p.add_argument(
        "--no-deps",
        dest="deps",
        action="store_false",
        help="copy the recipe alone (its relative paths will not resolve)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vitkdl.shipped import ShippedError, copy, dependencies, find

    _, err = consoles()
    try:
        done = copy(args.name, args.dest, force=args.force, deps=args.deps)
    except ShippedError as exc:
        err.print(f"[bold red]vitkdl cp: error:[/] {escape(str(exc))}", soft_wrap=True)
        return 2
    except OSError as exc:  # cp only writes: a full disk, a read-only folder (exit status 74)
        return print_exit(err, "vitkdl cp", WriteError(exc.filename or args.dest, exc))
    for c in done:
        what = {
            "copied": "copied",
            "unchanged": "up to date",
            "kept": "kept yours (differs from the shipped one; --force replaces it)",
        }[c.status]
        err.print(f"{escape(c.source)} -> {escape(str(c.target))}: {what}", soft_wrap=True)
    if not args.deps:
        for rel in dependencies(find(args.name).text):
            err.print(
                f"[yellow]warning:[/] the copy names {escape(rel)} by relative path; "
                "copy it too (drop --no-deps)",
                soft_wrap=True,
            )
    return 0
