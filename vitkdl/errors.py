"""Source spans, diagnostics and the project's one error type.

Every stage reports problems as :class:`Diagnostic` values that point into a source file (a
recipe, or a ``--set`` argument). A stage collects all of them and raises one :class:`VkdError`,
which renders them like a compiler does::

    recipes/x.vkd:12:5: error: unknown field 'weigth' in mimic
       12 |         weigth = 3e-5
          |         ^^^^^^
      expected: align, loss, weight
      help: did you mean 'weight'?
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict

Severity = Literal["error", "warning"]


class Span(BaseModel):
    """A region of a source: 1-based line and column; the end column is exclusive."""

    model_config = ConfigDict(frozen=True)

    file: str
    line: int
    column: int
    end_line: int
    end_column: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"

    @classmethod
    def point(cls, file: str, line: int = 1, column: int = 1) -> Span:
        """A one-character span."""
        return cls(file=file, line=line, column=column, end_line=line, end_column=column + 1)


@dataclass(frozen=True)
class Diagnostic:
    """One problem found in a recipe: where, what, what was expected and a likely fix."""

    severity: Severity
    message: str
    span: Span | None = None
    expected: str | None = None
    hint: str | None = None

    @property
    def is_error(self) -> bool:
        return self.severity == "error"

    def sort_key(self) -> tuple[str, int, int]:
        if self.span is None:
            return ("", 0, 0)
        return (self.span.file, self.span.line, self.span.column)


def error(
    message: str, span: Span | None = None, *, expected: str | None = None, hint: str | None = None
) -> Diagnostic:
    """An error diagnostic."""
    return Diagnostic("error", message, span, expected, hint)


def warning(
    message: str, span: Span | None = None, *, expected: str | None = None, hint: str | None = None
) -> Diagnostic:
    """A warning diagnostic (``validate`` still passes)."""
    return Diagnostic("warning", message, span, expected, hint)


def did_you_mean(word: str, choices: Iterable[str], n: int = 1) -> str | None:
    """``"did you mean 'x'?"`` for the closest choice, or None when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=n, cutoff=0.6)
    if not close:
        return None
    return "did you mean " + " or ".join(f"'{c}'" for c in close) + "?"


def one_of(choices: Iterable[str]) -> str:
    """Choices as a short, readable list."""
    items = list(choices)
    if len(items) > 12:
        items = [*items[:12], "..."]
    return ", ".join(items)


@dataclass
class Sources:
    """The text of every source seen while loading, so diagnostics can quote their lines."""

    texts: dict[str, str] = field(default_factory=dict)

    def add(self, name: str, text: str) -> None:
        self.texts[name] = text

    def line(self, name: str, line: int) -> str | None:
        text = self.texts.get(name)
        if text is None:
            return None
        lines = text.splitlines()
        if 1 <= line <= len(lines):
            return lines[line - 1]
        return None


def render(diagnostic: Diagnostic, sources: Sources | Mapping[str, str] | None = None) -> str:
    """Format one diagnostic: ``file:line:col: severity: message``, the line, a caret, help."""
    if isinstance(sources, Mapping):
        sources = Sources(dict(sources))
    d = diagnostic
    head = f"{d.span}: " if d.span else ""
    out = [f"{head}{d.severity}: {d.message}"]
    if d.span is not None and sources is not None:
        text = sources.line(d.span.file, d.span.line)
        if text is not None:
            text = text.expandtabs(1)
            gutter = str(d.span.line)
            width = (
                d.span.end_column - d.span.column
                if d.span.end_line == d.span.line
                else len(text) - d.span.column + 1
            )
            width = max(1, min(width, max(1, len(text) - d.span.column + 1)))
            pad = " " * len(gutter)
            out.append(f"  {gutter} | {text}")
            out.append(f"  {pad} | {' ' * (d.span.column - 1)}{'^' * width}")
    if d.expected:
        out.append(f"  expected: {d.expected}")
    if d.hint:
        out.append(f"  help: {d.hint}")
    return "\n".join(out)


class VkdError(Exception):
    """Raised by every stage with all the diagnostics it found (errors and warnings)."""

    def __init__(self, diagnostics: Sequence[Diagnostic], sources: Sources | None = None) -> None:
        self.diagnostics = sorted(diagnostics, key=Diagnostic.sort_key)
        self.sources = sources or Sources()
        super().__init__(self.render())

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.is_error]

    def render(self) -> str:
        return "\n".join(render(d, self.sources) for d in self.diagnostics)
