"""The stages chained, for the modules that drive them (the runner, ``bench``, the editor
tooling): load and check a recipe (:func:`validate`, :func:`load`), plan it (:func:`plan`).
The package facade (:mod:`vitkdl`) re-exports these; nothing below the facade imports it.
Every stage is imported when called, so importing this module stays cheap.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitkdl.errors import Diagnostic, VkdError

if TYPE_CHECKING:
    from vitkdl.planner import Plan
    from vitkdl.spec import RecipeSpec

__all__ = ["Overrides", "format_value", "load", "override_list", "plan", "validate"]

Overrides = Mapping[str, Any] | Sequence[str] | None


def format_value(value: Any) -> str:
    """A Python value in recipe value syntax (for overrides given as a mapping)."""
    import re

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    text = str(value)
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(-[A-Za-z0-9_]+)*", text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def override_list(overrides: Overrides) -> list[str]:
    """``{"train.epochs": 1}`` or ``["train.epochs=1"]`` as ``PATH=VALUE`` strings."""
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        return [f"{k}={format_value(v)}" for k, v in overrides.items()]
    return list(overrides)


def validate(
    path: str | Path,
    overrides: Overrides = None,
    *,
    strict: bool = False,
    text: str | None = None,
    sweep: bool = True,
) -> tuple[RecipeSpec | None, list[Diagnostic], Any]:
    """Load and check a recipe without raising: ``(spec, diagnostics, sources)``.

    ``text``: the recipe's unsaved text (an editor buffer); ``path`` still names it.
    ``sweep``: check the recipe's ``sweep`` block too, every cell and seed of it.
    """
    from vitkdl.checks import run_checks
    from vitkdl.spec import load_spec

    spec, diags, sources = load_spec(path, override_list(overrides), text=text)
    if spec is not None and spec.student is not None:
        ctx, more = run_checks(spec, strict=strict)
        diags = diags + more
        if not any(d.is_error for d in diags):  # the terms resolve: weigh their coefficients
            from vitkdl.planner import coefficient_warnings, term_plans

            diags = diags + coefficient_warnings(spec, term_plans(spec, ctx))
    if sweep and spec is not None:
        from vitkdl.experiment import check_sweep

        diags = diags + check_sweep(
            path, override_list(overrides), sources, strict=strict, text=text, known=diags
        )
    return spec, diags, sources


def load(path: str | Path, overrides: Overrides = None, *, strict: bool = False) -> RecipeSpec:
    """Load a recipe (``extends`` and overrides resolved) and check it.

    Raises :class:`VkdError` carrying every diagnostic when any is an error. ``strict`` turns
    what ``validate`` only warns about (missing data root or weight files) into errors.
    """
    spec, diags, sources = validate(path, overrides, strict=strict, sweep=False)
    if spec is None or any(d.is_error for d in diags):
        raise VkdError(diags, sources)
    return spec


def plan(spec: RecipeSpec, world_size: int = 1) -> Plan:
    """The resolved :class:`~vitkdl.planner.Plan` of a loaded spec."""
    from vitkdl.checks import make_context
    from vitkdl.planner import make_plan

    ctx = make_context(spec)
    if ctx.model_errors:
        raise VkdError(list(ctx.model_errors))
    return make_plan(spec, ctx, world_size=world_size)
