"""Diagnostics printed for a person: errors red, warnings yellow, the quoted source line
syntax-highlighted on a colour terminal. Used by the CLI and by an experiment's worker
process (which prints into its run's log), so it lives below both."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.markup import escape
from rich.text import Text

from vitkdl.errors import Diagnostic, Sources, render

__all__ = ["print_diagnostics"]


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
