"""vitkdl: a declarative language and compiler for ViTKD knowledge distillation of ViTs.

The pipeline, one stage per module::

    source text --syntax--> syntax tree --spec--> RecipeSpec --checks--> diagnostics
                --planner--> Plan --program--> Program (compiled step) --train--> runs/NAME/

Each layer imports only the layers below it, lowest first: errors, syntax; the node types
(:mod:`vitkdl.nodes`) and the leaf facts (models, sources, hub, runs, ...); the loss kinds
(:mod:`vitkdl.terms`, their registry); spec; checks and the language's words; the planner;
the program; experiments; :mod:`vitkdl.pipeline` (the stages chained); train; bench and the
tools (lsp, scaffold, the reference); the CLI. This facade re-exports the pipeline, and
nothing below the CLI imports the facade. ``pyproject.toml`` states this as import-linter
contracts (``lint-imports``, run by CI), so it is checked, not only claimed.

Python API (every stage can be driven on its own as well)::

    spec = vitkdl.load("recipes/deit_tiny_vitkd_kd.vkd", overrides={"train.epochs": 1})
    plan = vitkdl.plan(spec)          # resolved, printable (what `vitkdl explain` shows)
    program = vitkdl.build(plan)      # real modules; program.step(images, labels) -> losses
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vitkdl.errors import Diagnostic, Span, VkdError
from vitkdl.pipeline import Overrides, format_value, load, override_list, plan, validate

if TYPE_CHECKING:
    from vitkdl.planner import Plan

__version__ = "0.1.0"
__all__ = [
    "Diagnostic",
    "Overrides",
    "Span",
    "VkdError",
    "__version__",
    "build",
    "format_value",
    "load",
    "override_list",
    "plan",
    "validate",
]


def build(plan: Plan, device: Any = None, **kwargs: Any) -> Any:
    """The :class:`~vitkdl.program.Program` of a plan (imports torch and timm)."""
    from vitkdl.program import build as _build

    return _build(plan, device, **kwargs)
