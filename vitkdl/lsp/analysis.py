"""What the language server knows about one open recipe, and what it says about a position.

:func:`analyse` checks the editor's text with the code ``vitkdl validate`` runs
(:func:`vitkdl.validate`, with the unsaved text under the file's own path, so ``extends`` and
``teacher from`` resolve as on disk), then resolves the models (through the on-disk facts cache
of :mod:`vitkdl.models`: no torch once warm) and, when the recipe is clean, the plan that
``vitkdl explain`` prints. Hover texts are read off those: a model's shape, a tap's blocks and
shapes, a term's formula and per-element coefficient, a field's type and default.

Positions here are 1-based lines and columns in characters, as :class:`~vitkdl.errors.Span`;
the server converts to the protocol's 0-based UTF-16 positions.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitkdl import language
from vitkdl.counts import count_words
from vitkdl.errors import Diagnostic, Sources, Span
from vitkdl.lsp.complete import scan


@dataclass
class Analysis:
    """One check of one text: the spec, every diagnostic, the model facts and the plan."""

    path: Path
    text: str
    spec: Any = None
    diagnostics: tuple[Diagnostic, ...] = ()
    sources: Sources | None = None
    context: Any = None
    plan: Any = None

    def here(self, span: Span | None) -> bool:
        """Whether ``span`` points into this document (not a base recipe or a dependency)."""
        return span is not None and _same_file(span.file, self.path)


def _same_file(name: str, path: Path) -> bool:
    try:
        return Path(name).resolve() == path.resolve()
    except OSError:
        return False


def analyse(text: str, path: Path) -> Analysis:
    """Check ``text`` as the recipe at ``path`` (diagnostics, model facts, plan)."""
    from vitkdl.checks import make_context
    from vitkdl.errors import VkdError
    from vitkdl.pipeline import validate
    from vitkdl.planner import make_plan

    spec, diags, sources = validate(path, text=text)
    out = Analysis(path, text, spec, tuple(diags), sources)
    if spec is None or spec.student is None:
        return out
    out.context = make_context(spec)
    if not any(d.is_error for d in diags) and not out.context.model_errors:
        try:
            out.plan = make_plan(spec, out.context)
        except (VkdError, ValueError, KeyError, AssertionError):
            out.plan = None
    return out


# --------------------------------------------------------------------------------------------
# Hover


def _inside(span: Span | None, line: int, column: int) -> bool:
    if span is None:
        return False
    return (span.line, span.column) <= (line, column) <= (span.end_line, span.end_column)


def _model_text(role: str, facts: Any, from_recipe: str | None) -> str:
    origin = f", the final student of `{from_recipe}`" if from_recipe else ""
    grid = f"{facts.grid[0]}x{facts.grid[1]}"
    if not facts.vit:  # a classifier without ViT blocks: logit terms only
        return "\n".join(
            [
                f"**{facts.name}** ({facts.family}), the {role}{origin}",
                "",
                f"- {facts.embed_dim} features, no ViT blocks: logit terms only",
                f"- input: {facts.img_size[0]}x{facts.img_size[1]}x{facts.in_chans}; "
                f"{facts.num_classes} classes",
                f"- parameters: {count_words(facts.params)} ({facts.params:,}); forward "
                f"{count_words(facts.flops)}FLOPs per image",
            ]
        )
    return "\n".join(
        [
            f"**{facts.name}** ({facts.family}), the {role}{origin}",
            "",
            f"- width x depth: {facts.embed_dim} x {facts.depth} blocks, {facts.num_heads} heads",
            f"- tokens: {facts.num_patches} on a {grid} grid (+{facts.num_prefix_tokens} prefix)",
            f"- input: {facts.img_size[0]}x{facts.img_size[1]}x{facts.in_chans}, patch "
            f"{facts.patch_size[0]}; {facts.num_classes} classes",
            f"- parameters: {count_words(facts.params)} ({facts.params:,}); forward "
            f"{count_words(facts.flops)}FLOPs per image",
        ]
    )


def _term_plan(analysis: Analysis, name: str) -> Any:
    if analysis.plan is None:
        return None
    return next((t for t in analysis.plan.terms if t.name == name), None)


def _tap_text(analysis: Analysis, term: Any, side: str, tap: Any) -> str:
    facts = getattr(analysis.context, side, None) if analysis.context else None
    head = f"**{tap.text()}**"
    if facts is None:
        return head + f": the {side} model is not resolved"
    from vitkdl.checks import resolve_tap
    from vitkdl.terms.base import points_words

    points, _ = resolve_tap(tap, facts)
    if [p.point for p in points] == ["norm"] and points[0].identity:
        what = (
            f"the last block's output of the {side} ({facts.name}): its norm is an identity "
            "on this model"
        )
    elif [p.point for p in points] == ["norm"]:
        what = f"the final norm's output of the {side} ({facts.name}, {facts.depth} blocks)"
    elif [p.point for p in points] == ["fc_norm"]:
        what = f"the pooled, normalised feature of the {side} ({facts.name})"
    elif [p.point for p in points] == ["pre_logits"]:
        what = f"the pooled feature the classifier head of the {side} ({facts.name}) reads"
    else:
        what = (
            f"{points_words(points) or 'no blocks'} of the {side}'s {facts.depth} blocks "
            f"({facts.name})"
        )
    n = facts.num_patches
    if any(p.point == "attn_map" for p in points):
        shape = f"{facts.num_heads} x {n} x {n} (heads x queries x keys)"
    elif any(p.point == "fc_norm" for p in points):
        shape = f"1 x {facts.embed_dim} (one pooled token x channels)"
    elif any(p.point == "pre_logits" for p in points):
        shape = f"{facts.embed_dim} (channels)"
    else:
        shape = f"{n} x {facts.embed_dim} (tokens x channels)"
    lines = [f"{head}: {what}; {shape} per image per tap"]
    plan = _term_plan(analysis, term.name)
    if plan is not None:
        sb, tb = points_words(plan.student), points_words(plan.teacher)
        lines.append(
            f"\nterm `{plan.name}` pairs student {sb} -> teacher {tb}: "
            f"{'x'.join(map(str, plan.student_shape))} -> "
            f"{'x'.join(map(str, plan.teacher_shape))}"
        )
    return "\n".join(lines)


def _term_text(analysis: Analysis, term: Any) -> str:
    model = type(term)
    about = language.term_summary(term.kind) or language.doc_line(model)
    lines = [f"**{term.name}** (`{term.kind}`): {about}"]
    plan = _term_plan(analysis, term.name)
    if plan is None:
        lines.append("\n(the plan is shown once the recipe has no errors)")
        return "\n".join(lines)
    from vitkdl.terms import KINDS
    from vitkdl.terms.base import adapter_words, points_words

    words = KINDS[plan.kind].words(plan)
    lines += [
        "",
        f"`{words.formula}`",
        "",
        f"- weight {language.format_number(plan.weight)}, per-element coefficient "
        f"{plan.coefficient:.4g} ({words.reduction})",
    ]
    if plan.student:
        lines.append(
            f"- {points_words(plan.student)} -> {points_words(plan.teacher)}, "
            f"{'x'.join(map(str, plan.student_shape))} -> "
            f"{'x'.join(map(str, plan.teacher_shape))} per image per tap"
        )
    for a in plan.adapters:
        lines.append(f"- {a.name}: {adapter_words(a)}, {count_words(a.params)} parameters")
    return "\n".join(lines)


def _field_text(model: type, name: str, where: str) -> str:
    default = language.field_default(model, name)
    text = f"**{name}** ({where}): {language.describe_type(model, name)}"
    return text + (f"; default {default}" if default is not None else "")


def _node_fields(node: Any, line: int, column: int, where: str, analysis: Analysis) -> str | None:
    """Hover text for the written field of ``node`` (or of a call in it) at the position."""
    for name, span in node.spans.items():
        if not analysis.here(span) or not _inside(span, line, column):
            continue
        value = getattr(node, name, None)
        if isinstance(getattr(value, "spans", None), dict):
            inner = _node_fields(value, line, column, f"{name}(...)", analysis)
            if inner is not None:
                return inner
        if name in type(node).model_fields:
            return _field_text(type(node), name, where)
        return f"**{name}** ({where}): passed to timm as written"
    return None


def hover(analysis: Analysis, line: int, column: int) -> str | None:
    """Markdown about what is at (``line``, ``column``), or None."""
    spec = analysis.spec
    if spec is None:
        return None
    for role in ("student", "teacher"):
        model = getattr(spec, role)
        if model is None:
            continue
        span = model.spans.get("model")
        if analysis.here(span) and _inside(span, line, column):
            facts = getattr(analysis.context, role, None) if analysis.context else None
            if facts is None:
                return f"**{model.model}**: not a usable timm model (see the diagnostics)"
            return _model_text(role, facts, model.from_recipe)
        if analysis.here(model.span) and _inside(model.span, line, column):
            found = _node_fields(model, line, column, f"the {role} block", analysis)
            if found is not None:
                return found
    for term in spec.terms:
        if not analysis.here(term.span) or not _inside(term.span, line, column):
            continue
        for side in language.tap_sides():
            for tap in getattr(term, side, ()) or ():
                if _inside(tap.span, line, column):
                    return _tap_text(analysis, term, side, tap)
        found = _node_fields(term, line, column, f"{term.kind} term", analysis)
        return found if found is not None else _term_text(analysis, term)
    for block, node in (("data", spec.data), ("train", spec.train)):
        found = _node_fields(node, line, column, f"the {block} block", analysis)
        if found is not None:
            return found
    return None


# --------------------------------------------------------------------------------------------
# Go to definition, and where diagnostics of other files are shown


def path_strings(text: str) -> list[tuple[int, int, str]]:
    """``(start, end, value)`` of every string that names a recipe (``extends "..."``,
    ``teacher from "..."``): a string right after a keyword."""
    tokens = scan(text)
    keywords = set(language.keywords())
    out = []
    for prev, tok in itertools.pairwise(tokens):
        if tok.category == "string" and prev.category == "word" and prev.text in keywords:
            out.append((tok.start, tok.end, tok.text[1:-1]))
    return out


def definition(text: str, offset: int, path: Path) -> Path | None:
    """The recipe file named by the path string at ``offset``, when it exists."""
    for start, end, value in path_strings(text):
        if start <= offset <= end:
            target = path.parent / value
            return target if target.is_file() else None
    return None
