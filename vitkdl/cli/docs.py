"""``vitkdl docs``: write the language reference, ``docs/language.md`` (``vitkdl.reference``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.markup import escape

from vitkdl.cli.common import consoles
from vitkdl.exits import IOERR

HELP = """Write the language reference (every statement, block, field with its type, range,
choices and default, and each loss kind's fields, formula and options), generated from the
grammar, the spec models and the registry of kinds. --check writes nothing and exits 1 when
the file differs from what would be generated (CI runs it)."""

EPILOG = """examples:
  vitkdl docs                         regenerate docs/language.md (run from the repository root)
  vitkdl docs --check                 exit 1 when docs/language.md is stale (CI)
  vitkdl docs --out -                 print the reference

exit status: 0 done (or up to date), 1 --check found the file stale, 2 errors."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    from vitkdl.reference import DEFAULT_PATH

    p = sub.add_parser(
        "docs",
        help="write the language reference (docs/language.md)",
        description=HELP,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--out",
        default=DEFAULT_PATH,
        metavar="PATH",
        help=f"where to write it (default {DEFAULT_PATH}; '-' prints it)",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 when the file is missing or stale",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vitkdl.reference import REGENERATE, generate

    _, err = consoles()
    text = generate()
    if args.out == "-":
        if args.check:
            err.print("vitkdl docs: error: --check needs a file (--out PATH), not -")
            return 2
        sys.stdout.write(text)
        return 0
    path = Path(args.out)
    try:
        current = path.read_text(encoding="utf-8") if path.is_file() else None
    except OSError as exc:
        err.print(
            f"vitkdl docs: error: cannot read {escape(str(path))}: {escape(exc.strerror or '')}"
        )
        return 2
    if args.check:
        if current == text:
            return 0
        what = "is missing" if current is None else "is stale"
        err.print(f"{escape(str(path))} {what}: regenerate it with `{REGENERATE}`", soft_wrap=True)
        return 1
    if current == text:
        return 0
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        err.print(
            f"vitkdl docs: error: cannot write {escape(str(path))}: {escape(exc.strerror or '')}"
        )
        return IOERR
    err.print(f"wrote {escape(str(path))}", soft_wrap=True)
    return 0
