"""Mutated recipes: whatever the damage, only the project's own positioned error escapes."""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vitkdl
from tests.conftest import RECIPES
from vitkdl.errors import Diagnostic

SOURCES = {p.name: p.read_text() for p in sorted(RECIPES.glob("*.vkd"))}
TOKENS = [
    "{",
    "}",
    "[",
    "]",
    "(",
    ")",
    "=",
    ",",
    ".",
    ":",
    "->",
    "as",
    "mimic",
    "generate",
    "student",
    "teacher",
    "blocks",
    "norm",
    "kd",
    "nkd",
    "labels",
    "distill",
    "train",
    "data",
    "extends",
    '"',
    '"x"',
    "-1",
    "1e9",
    "0",
    "true",
    "#",
    "\n",
    "\x00",
    "é",
    "\\",
    "from",
    "recipe",
    "999999999999999999999",
    "nan",
    "inf",
    "-",
    ":::",
    "[-0]",
]


@st.composite
def mutated(draw: st.DrawFn) -> str:
    text = SOURCES[draw(st.sampled_from(sorted(SOURCES)))]
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["delete", "insert_char", "insert_token", "swap", "duplicate"]))
        if op == "delete":
            n = draw(st.integers(1, 12))
            text = text[:pos] + text[pos + n :]
        elif op == "insert_char":
            text = text[:pos] + draw(st.characters()) + text[pos:]
        elif op == "insert_token":
            text = text[:pos] + draw(st.sampled_from(TOKENS)) + text[pos:]
        elif op == "swap" and pos + 1 < len(text):
            text = text[:pos] + text[pos + 1] + text[pos] + text[pos + 2 :]
        elif op == "duplicate":
            n = draw(st.integers(1, 40))
            text = text[:pos] + text[pos : pos + n] * 2 + text[pos + n :]
    return text


def _positioned(d: Diagnostic) -> bool:
    return d.span is not None and d.span.line >= 1 and d.span.column >= 1


@settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(text=mutated())
def test_mutated_recipes_fail_only_with_positioned_diagnostics(tmp_path: Path, text: str) -> None:
    # Mutants live beside the shipped recipes' relative targets (base/, quickstart_*.vkd).
    path = RECIPES / ".fuzz_mutant.vkd"
    try:
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        spec, diags, _sources = vitkdl.validate(path)  # must never raise
        for d in diags:
            assert _positioned(d), d
            assert d.message
        if spec is not None and not any(d.is_error for d in diags):
            vitkdl.plan(spec)
    finally:
        path.unlink(missing_ok=True)
