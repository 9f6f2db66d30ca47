"""What the subcommands share: consoles (errors on stderr, NO_COLOR honoured) and the
loading of a recipe into printed diagnostics."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.markup import escape

from vitkdl.errors import Diagnostic, Sources, render


def consoles() -> tuple[Console, Console]:
    """(stdout, stderr) consoles; rich honours NO_COLOR and non-terminal output itself."""
    width = None if sys.stdout.isatty() else int(os.environ.get("COLUMNS", "110"))
    return Console(width=width, highlight=False), Console(stderr=True, highlight=False,
                                                          width=width)


def add_recipe_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="PATH=VALUE",
                   help="override a field after `extends` is resolved (repeatable), "
                        "e.g. --set train.epochs=1")


def print_diagnostics(err: Console, diags: Sequence[Diagnostic], sources: Sources) -> None:
    """Every diagnostic, errors red and warnings yellow, with the quoted source line."""
    for d in sorted(diags, key=Diagnostic.sort_key):
        text = render(d, sources)
        head, _, rest = text.partition("\n")
        style = "bold red" if d.is_error else "yellow"
        err.print(f"[{style}]{escape(head)}[/]" + (f"\n{escape(rest)}" if rest else ""),
                  soft_wrap=True)
