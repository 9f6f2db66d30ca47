"""What the subcommands share: consoles (errors on stderr, NO_COLOR honoured) and the
loading of a recipe into printed diagnostics."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.markup import escape
from rich.text import Text

from vitkdl.errors import Diagnostic, Sources, VkdError, render
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


def print_diagnostics(err: Console, diags: Sequence[Diagnostic], sources: Sources) -> None:
    """Every diagnostic, errors red and warnings yellow, with the quoted source line (syntax
    highlighted on a colour terminal; the text is the same either way)."""
    colour = err.is_terminal and err.color_system is not None and not err.no_color
    for d in sorted(diags, key=Diagnostic.sort_key):
        text = render(d, sources)
        head, _, rest = text.partition("\n")
        style = "bold red" if d.is_error else "yellow"
        quoted = _highlighted(d, rest, sources, style) if colour and rest else None
        if quoted is not None:
            err.print(Text.assemble((head, style), "\n", quoted), soft_wrap=True)
            continue
        err.print(
            f"[{style}]{escape(head)}[/]" + (f"\n{escape(rest)}" if rest else ""), soft_wrap=True
        )


def _highlighted(d: Diagnostic, rest: str, sources: Sources, style: str) -> Text | None:
    """The lines under a diagnostic's head with the quoted source line highlighted and the
    caret coloured, or None when they hold no quoted line."""
    line = sources.line(d.span.file, d.span.line) if d.span is not None else None
    if line is None or d.span is None:
        return None
    quote, _, after = rest.partition("\n")
    gutter = f"  {d.span.line} | "
    code = line.expandtabs(1)
    if quote != gutter + code:
        return None
    from rich.syntax import Syntax

    from vitkdl.lexer import VkdLexer

    caret, _, tail = after.partition("\n")
    marks = caret.rstrip("^")
    highlighted = Syntax("", VkdLexer(), theme="ansi_dark", background_color="default")
    code_text = highlighted.highlight(code)
    code_text.rstrip()
    out = Text.assemble(
        (gutter, "dim"), code_text, "\n", (marks, "dim"), (caret[len(marks) :], style)
    )
    if tail:
        out.append("\n" + tail)
    return out
