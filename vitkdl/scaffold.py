"""``vitkdl init``: a recipe with the paper's layout, resolved for any teacher/student pair.

The layout is the shipped recipe of the paper's reference pair, ``deit_tiny_vitkd_kd.vkd``
(DeiT-Tiny taught by DeiT III-Small on ImageNet at 196 tokens: mimic the first two blocks,
generate the final norm's tokens, NKD on the logits), with the training recipe it extends,
``base/deit_imagenet.vkd``. Its distill block is copied term by term, so the terms, their
options and their order are the paper's, whatever they are called.

**The weight rule.** A feature term's loss is a sum over tokens and channels, so the same weight
means a different strength for another pair. What is kept is each term's *per-element
coefficient* (weight x the elements its sum runs over per image; ``vitkdl explain`` shows it,
:mod:`vitkdl.planner` computes it): the new pair's weight is the paper's weight times the
reference pair's coefficient over the new pair's coefficient at that weight, rounded to two
significant digits. For DeiT-Tiny <- DeiT III-Small this gives the paper's weights back
(coefficients 4.516 and 0.2258); for a teacher twice as wide it halves them. Terms whose
coefficient is their weight (the logit terms) keep the paper's weight. The paper itself kept
3e-5 and 3e-6 for its two wider pairs (coefficients 2x and 2.7x the reference's); the written
recipe says so next to each weight.

The paper's layout pairs tokens one to one: two models with different token grids are refused
with a clear message (a recipe of one's own may resample a teacher's grid), and so are models
without ViT blocks.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitkdl import language
from vitkdl.errors import Diagnostic
from vitkdl.fmt import format_text
from vitkdl.shipped import find
from vitkdl.terms.base import points_words

REFERENCE = "deit_tiny_vitkd_kd"
TRAINING = "base/deit_imagenet"
SIGNIFICANT = 2


class InitError(Exception):
    """Why no recipe can be written for a pair (unknown model, different grids, ...)."""


@dataclass
class _Resolved:
    spec: Any
    context: Any
    plan: Any
    diagnostics: list[Diagnostic]


def _resolve(text: str, path: Path, *, check: bool = True) -> _Resolved:
    """Validate and plan ``text``; with ``check``, any error is an :class:`InitError`."""
    from vitkdl.checks import make_context
    from vitkdl.pipeline import validate
    from vitkdl.planner import make_plan

    spec, diags, _ = validate(path, text=text)
    errors = [d for d in diags if d.is_error]
    if spec is None or (errors and check):
        raise InitError("\n".join(_brief(d) for d in errors or diags))
    ctx = make_context(spec)
    plan = None if errors or ctx.model_errors else make_plan(spec, ctx)
    return _Resolved(spec, ctx, plan, diags)


def _brief(d: Diagnostic) -> str:
    """A diagnostic without the position in a text the user has not seen."""
    return f"  {d.message}" + (f" ({d.hint})" if d.hint else "")


def _round(x: float) -> float:
    return float(f"{x:.{SIGNIFICANT}g}")


def _statement_text(text: str, keyword: str) -> str:
    """The text of the top-level statement ``keyword`` of a recipe (comments inside kept)."""
    from vitkdl.syntax import parse

    for st in parse(text).statements:
        if st.keyword == keyword:
            return _cut(text, st.span)
    raise InitError(f"the shipped layout has no {keyword} statement")  # pragma: no cover


def _cut(text: str, span: Any) -> str:
    lines = text.split("\n")
    start = sum(len(x) + 1 for x in lines[: span.line - 1]) + span.column - 1
    end = sum(len(x) + 1 for x in lines[: span.end_line - 1]) + span.end_column - 1
    return text[start:end]


def _doc_phrase(model: type) -> str:
    """``shallow feature mimicking`` from ``"``mimic ...``: shallow feature mimicking."``."""
    doc = language.doc_line(model)
    return doc.split("``: ", 1)[-1].rstrip(".") if "``: " in doc else doc.rstrip(".")


def _facts_line(facts: Any) -> str:
    return (
        f"{facts.embed_dim} wide x {facts.depth} blocks, {facts.num_heads} heads, "
        f"{facts.grid[0]}x{facts.grid[1]} = {facts.num_patches} tokens, "
        f"{facts.params / 1e6:.1f}M parameters"
    )


def _distill(
    reference: _Resolved, ref_text: str, weights: dict[str, float], pair: _Resolved | None
) -> str:
    """The reference's distill statement with new weights and a comment on each choice."""
    block = _statement_text(ref_text, language.terms_block() or "")
    lines_before = ref_text[: ref_text.index(block)].count("\n")
    edits: list[tuple[int, int, str]] = []
    for term in reference.spec.terms:
        if term.span is None or term.span.file != reference.spec.file:
            continue
        ref_plan = next((t for t in reference.plan.terms if t.name == term.name), None)
        plan = next((t for t in pair.plan.terms if t.name == term.name), None) if pair else None
        comment = f"# {_doc_phrase(type(term))}"
        if plan is not None and plan.student:
            comment += (
                f": {points_words(plan.student)} -> "
                f"{points_words(plan.teacher)}, tokens x channels "
                f"{'x'.join(map(str, plan.student_shape))} -> "
                f"{'x'.join(map(str, plan.teacher_shape))}"
            )
        start = _offset(block, term.span.line - lines_before, term.span.column)
        indent = re.search(r"[ \t]*$", block[:start]).group()  # type: ignore[union-attr]
        edits.append((start, start, f"{comment}\n{indent}"))
        new = weights.get(term.name, term.weight)
        if ref_plan is None or ref_plan.coefficient == ref_plan.weight:
            continue  # the coefficient is the weight: nothing to scale or explain
        note = ""
        if plan is not None:
            note = (
                f"  # {plan.coefficient:.4g} per element, as the paper's "
                f"{language.format_number(term.weight)} on its reference pair"
            )
        field = f"weight = {language.format_number(new)}{note}\n"
        span = term.spans.get("weight")
        if span is not None and span.file == reference.spec.file:
            a = _offset(block, span.line - lines_before, span.column)
            b = _offset(block, span.end_line - lines_before, span.end_column)
            edits.append((a, b, field))
        else:
            end = _offset(block, term.span.end_line - lines_before, term.span.end_column)
            if block[end - 1] == "}":
                edits.append((end - 1, end - 1, field))
            else:
                edits.append((end, end, f" {{\n{field}}}"))
    for a, b, new_text in sorted(edits, reverse=True):
        block = block[:a] + new_text + block[b:]
    return block


def _offset(text: str, line: int, column: int) -> int:
    lines = text.split("\n")
    return sum(len(x) + 1 for x in lines[: line - 1]) + column - 1


def _header_title(text: str) -> str:
    first = text.splitlines()[0].lstrip("#").strip()
    return first.split(":", 1)[0] if ":" in first else "ViTKD"


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _data_block(training_text: str, source: str, root: str | None, image_size: int | None) -> str:
    """The paper's data block for its source (its image size set to the models'), else a
    minimal block for another source."""
    from vitkdl.syntax import parse

    (paper,) = [st for st in parse(training_text).statements if st.keyword == "data"]
    fields = [f"root = {_quote(root)}"] if root is not None else []
    if source != paper.arg:
        return (
            f"# {source} data for a quick run (the paper's pipeline: `vitkdl cp "
            f"{TRAINING}`)\ndata {source} {{\n" + "\n".join([*fields, "batch_size = 64"]) + "\n}"
        )
    for f in paper.fields:
        value = image_size if f.name == "image_size" else _cut(training_text, f.value.span)
        if value is not None:
            fields.append(f"{f.name} = {value}")
    return (
        "# the paper's data pipeline (ImageNet layout: ROOT/train/<class>/*, "
        f"ROOT/val/<class>/*)\ndata {source} {{\n" + "\n".join(fields) + "\n}"
    )


# What `init --data digits|synthetic` promises: a quick run, minutes on a CPU, not the paper's
# 300 epochs. The optimizer is the paper's; no warmup in so short a schedule.
QUICK_EPOCHS = 2
_QUICK_TRAIN = f"""train {{
    epochs = {QUICK_EPOCHS}
    optimizer = adamw(lr = 1e-3, weight_decay = 0.05)
    schedule = cosine(min_lr = 1e-5)
    clip_grad = 5.0
    eval_every = 1
}}"""


def _train_block(training_text: str, source: str, paper_source: str) -> list[str]:
    """The paper's DeiT training recipe for its own data; for another source (digits,
    synthetic: "for a quick run") a short schedule, the paper's named for the real thing."""
    if source == paper_source:
        return [
            "# the paper's DeiT training recipe: timm's AdamW and cosine schedule, per iteration",
            _statement_text(training_text, "train"),
        ]
    return [
        f"# a quick run: {QUICK_EPOCHS} epochs (the paper's 300: `vitkdl cp {TRAINING}`)",
        _QUICK_TRAIN,
    ]


def _wrap(text: str) -> str:
    return "\n".join("# " + line for line in textwrap.wrap(text, 96))


def _default_name(student: str, teacher: str) -> str:
    arch = [m.split(".")[0] for m in (student, teacher)]
    return f"{arch[0]}_from_{arch[1]}"


@dataclass(frozen=True)
class _Layout:
    """What ``init`` writes a recipe from: the pair, where the recipe goes, its data, and
    the paper's recipes it follows (the reference recipe resolved, the training recipe)."""

    teacher: str
    student: str
    name: str
    where: Path
    source: str
    root: str | None
    reference: _Resolved
    ref_text: str
    training_text: str

    @property
    def paper_source(self) -> str:
        return self.reference.spec.data.source


def _layout(
    teacher: str, student: str, data: str | None, name: str | None, path: Path | None
) -> _Layout:
    """The paper's recipes and the pair's options resolved: data as a source or a root
    (default: the paper's source), the name (default: the file stem or STUDENT_from_TEACHER)."""
    from vitkdl.spec import DataSpec

    reference_recipe = find(REFERENCE)
    ref_text = reference_recipe.text
    reference = _resolve(ref_text, Path(str(reference_recipe.file)))
    sources = language.literal_choices(DataSpec, "source")
    paper_source = reference.spec.data.source
    source, root = (data, None) if data in sources else (paper_source, data)
    if data is None:
        source, root = paper_source, None
    if name is None:
        name = re.sub(r"[^A-Za-z0-9_]", "_", path.stem) if path else _default_name(student, teacher)
    return _Layout(
        teacher=teacher,
        student=student,
        name=name,
        where=Path(path or f"{name}.vkd"),
        source=source,
        root=root,
        reference=reference,
        ref_text=ref_text,
        training_text=find(TRAINING).text,
    )


def _preamble(layout: _Layout) -> list[str]:
    """The recipe's opening comments (title, how to run it, where its weights come from) and
    its ``recipe`` line."""
    reference = layout.reference
    run = f"vitkdl run {layout.where}" + (
        " --set data.root=/path/to/imagenet"
        if layout.source == layout.paper_source and layout.root is None
        else ""
    )
    features = {p.name for p in reference.plan.terms if p.coefficient != p.weight}
    scaled = ", ".join(
        f"{t.name} {language.format_number(t.weight)}"
        for t in reference.spec.terms
        if t.name in features
    )
    ref_pair = f"{reference.spec.student.model} <- {reference.spec.teacher.model.split('.')[0]}"
    return [
        f"# {_header_title(layout.ref_text)}: {layout.student} taught by {layout.teacher}",
        f"# run: {run}",
        _wrap(
            f"Written by `vitkdl init`: the layout of the ViTKD paper (recipes/{REFERENCE}"
            f".vkd, {ref_pair}) resolved for this pair. Feature weights keep the "
            "paper's per-element coefficient (weight x the elements a term sums over "
            "per image; `vitkdl explain` shows it): weight = the paper's weight x its "
            "coefficient / this pair's, to 2 significant digits (the paper: "
            f"{scaled}). The paper itself kept those weights for its wider pairs, "
            "2-2.7x the coefficient; on a tiny grid a tenth of it did better (README)."
        ),
        f"recipe {layout.name}",
        "",
    ]


def _compose(
    layout: _Layout, weights: dict[str, float], pair: _Resolved | None, image_size: int | None
) -> str:
    """The recipe's text with these term ``weights``; ``pair`` (the pair resolved, for the
    models' comments) and ``image_size`` once known."""
    parts = _preamble(layout)
    if pair is not None:
        parts.append(
            _wrap(
                f"The teacher (frozen): {_facts_line(pair.context.teacher)}. "
                "weights: a local .safetensors/.pth file of it, or pretrained "
                "= true for the timm hub tag (online)."
            )
        )
    weights_file = _quote(f"checkpoints/{layout.teacher}.safetensors")
    parts += [f"teacher {layout.teacher} {{", f"weights = {weights_file}", "}", ""]
    if pair is not None:
        parts.append(_wrap(f"The student: {_facts_line(pair.context.student)}."))
    parts += [
        f"student {layout.student}",
        "",
        _data_block(layout.training_text, layout.source, layout.root, image_size),
        "",
        _distill(layout.reference, layout.ref_text, weights, pair),
        "",
        *_train_block(layout.training_text, layout.source, layout.paper_source),
    ]
    return format_text("\n".join(parts) + "\n")


def _check_pair(layout: _Layout, draft: _Resolved) -> None:
    """:class:`InitError` when the paper's layout does not fit the pair: a model without ViT
    blocks, token grids that differ, or any other error in the draft recipe."""
    teacher, student = layout.teacher, layout.student
    s, t = draft.context.student, draft.context.teacher
    for model, facts in ((teacher, t), (student, s)):
        if facts is not None and not facts.vit:
            raise InitError(
                f"{model} ({facts.family}) is not usable for ViTKD's layout: it has "
                f"{facts.not_vit}; a model without ViT blocks takes part in logit terms only "
                "(write a recipe with kd or token yourself)"
            )
    if s is not None and t is not None and (s.grid != t.grid or s.img_size != t.img_size):
        raise InitError(
            f"{student} sees a {s.grid[0]}x{s.grid[1]} token grid ({s.img_size[0]} px, patch "
            f"{s.patch_size[0]}) and {teacher} a {t.grid[0]}x{t.grid[1]} grid ({t.img_size[0]} "
            f"px, patch {t.patch_size[0]}): the paper's layout pairs the tokens one to one, "
            "so init needs the same image and patch size. Pick a pair with equal grids, or "
            "write a recipe of your own (feature terms resample a teacher's grid to the "
            "student's: resample = bilinear)."
        )
    errors = [d for d in draft.diagnostics if d.is_error]
    if errors or draft.plan is None:
        raise InitError(
            f"cannot distil {teacher} into {student}:\n" + "\n".join(_brief(d) for d in errors)
        )


def _pair_weights(reference: _Resolved, pair: _Resolved) -> dict[str, float]:
    """Each term's weight for the pair: the paper's weight x its per-element coefficient /
    the pair's, to 2 significant digits (terms without a coefficient keep the default)."""
    assert reference.plan is not None and pair.plan is not None
    weights: dict[str, float] = {}
    for term in reference.spec.terms:
        ref_plan = next((p for p in reference.plan.terms if p.name == term.name), None)
        plan = next((p for p in pair.plan.terms if p.name == term.name), None)
        if plan is None or ref_plan is None or not plan.coefficient:
            continue
        weights[term.name] = _round(term.weight * ref_plan.coefficient / plan.coefficient)
    return weights


def init_recipe(
    teacher: str,
    student: str,
    *,
    data: str | None = None,
    name: str | None = None,
    path: Path | None = None,
) -> str:
    """The text of a recipe distilling ``teacher`` into ``student`` with the paper's layout.

    ``data`` is a data source (``imagefolder``, the default, ``digits``, ``synthetic``) or the
    root folder of an ImageNet-layout dataset; ``name`` the recipe name (default: the file
    stem, or STUDENT_from_TEACHER); ``path`` where it will be written (``teacher from`` and
    ``extends`` would resolve from there). Raises :class:`InitError`.
    """
    layout = _layout(teacher, student, data, name, path)
    paper_weights = {t.name: t.weight for t in layout.reference.spec.terms}
    # A draft with the paper's weights gives the pair's own sizes and coefficients.
    draft = _resolve(_compose(layout, paper_weights, None, None), layout.where, check=False)
    _check_pair(layout, draft)
    assert draft.context.student is not None
    image_size = draft.context.student.img_size[0]
    weights = _pair_weights(layout.reference, draft)
    final = _resolve(_compose(layout, weights, draft, image_size), layout.where)
    return _compose(layout, weights, final, image_size)
