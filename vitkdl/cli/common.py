"""What the subcommands share: consoles (errors on stderr, NO_COLOR honoured) and the
loading of a recipe into printed diagnostics."""

from __future__ import annotations

import argparse
import os
import sys

from rich.console import Console
from rich.markup import escape

from vitkdl.diagnostics_print import print_diagnostics as print_diagnostics
from vitkdl.errors import VkdError
from vitkdl.exits import exit_of


def consoles() -> tuple[Console, Console]:
    """(stdout, stderr) consoles; rich honours NO_COLOR and non-terminal output itself."""
    width = None if sys.stdout.isatty() else int(os.environ.get("COLUMNS", "110"))
    return Console(width=width, highlight=False), Console(stderr=True, highlight=False, width=width)


def add_recipe_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help="override a field after `extends` is resolved (repeatable), e.g. --set train.epochs=1",
    )


def print_exit(err: Console, prog: str, exc: BaseException) -> int:
    """Report what ended a command (:func:`vitkdl.exits.exit_of`): a recipe's diagnostics,
    ``PROG: error: MESSAGE`` in red, or ``PROG: MESSAGE`` in yellow for a stop by a signal.
    The message is escaped: a path may hold ``[...]``, which rich would take for markup.
    Returns the exit status."""
    ended = exit_of(exc)
    if isinstance(exc, VkdError):
        print_diagnostics(err, exc.diagnostics, exc.sources)
    elif ended.stopped:
        err.print(f"[bold yellow]{prog}:[/] {escape(ended.message)}", highlight=False)
    else:
        err.print(f"[bold red]{prog}: error:[/] {escape(ended.message)}", highlight=False)
    return ended.status
