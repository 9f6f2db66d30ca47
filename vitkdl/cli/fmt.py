"""``vitkdl fmt FILE|DIR...``: rewrite recipes in the canonical layout (``vitkdl.fmt``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.markup import escape

from vitkdl.cli.common import consoles, print_diagnostics
from vitkdl.exits import writing

HELP = """Rewrite recipes in the one canonical layout: one statement or field per line, 4-space
indentation, one space around '=' and '->', comments kept where they are, blank lines
collapsed. Formatting never changes a recipe's meaning (the same tokens and comments; the
recipe hash is unchanged) and a second run changes nothing. Directories are searched for *.vkd
files; '-' formats standard input to standard output. A recipe with a syntax error is reported
and left alone."""

EPILOG = """examples:
  vitkdl fmt recipes                      rewrite every recipe under recipes/ in place
  vitkdl fmt --check recipes              exit 1 naming the files fmt would change (CI)
  vitkdl fmt --diff my.vkd                show the changes without writing them
  cat my.vkd | vitkdl fmt -               standard input to standard output

exit status: 0 done (or nothing to change), 1 --check found files to change, 2 errors."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fmt",
        help="rewrite recipes in the canonical layout",
        description=HELP,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("paths", nargs="+", metavar="FILE|DIR", help=".vkd files, directories or -")
    p.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 when a file is not in the canonical layout",
    )
    p.add_argument(
        "--diff", action="store_true", help="write nothing; print a unified diff of each change"
    )
    p.set_defaults(func=run)


def _files(paths: list[str]) -> list[str]:
    out: list[str] = []
    for p in paths:
        path = Path(p)
        if p != "-" and path.is_dir():
            out.extend(
                str(f)
                for f in sorted(path.rglob("*.vkd"))
                if not any(part.startswith(".") for part in f.relative_to(path).parts)
            )
        else:
            out.append(p)
    return out


def run(args: argparse.Namespace) -> int:
    from vitkdl.errors import VkdError
    from vitkdl.fmt import diff, format_text
    from vitkdl.syntax import read_source

    _, err = consoles()
    write = not (args.check or args.diff)
    changed: list[str] = []
    failed = 0
    files = _files(args.paths)
    for name in files:
        try:
            if name == "-":
                text = sys.stdin.read()
                new = format_text(text, "<stdin>")
            else:
                text = read_source(name)
                new = format_text(text, name)
        except VkdError as exc:
            print_diagnostics(err, exc.diagnostics, exc.sources)
            failed += 1
            continue
        if name == "-" and write:
            sys.stdout.write(new)
            continue
        if new == text:
            continue
        changed.append(name)
        if args.diff:
            sys.stdout.write(diff(text, new, name))
        if args.check and not args.diff:
            err.print(f"would reformat {escape(name)}", soft_wrap=True)
        if write:
            with writing(name):  # a failure: exit status 74, naming the file (vitkdl.exits)
                Path(name).write_text(new, encoding="utf-8")
            err.print(f"reformatted {escape(name)}", soft_wrap=True)
    if failed:
        err.print(f"[bold red]{failed} file{'s' * (failed != 1)} could not be formatted[/]")
        return 2
    if args.check and changed:
        err.print(
            f"{len(changed)} of {len(files)} file{'s' * (len(files) != 1)} would be reformatted"
        )
        return 1
    return 0
