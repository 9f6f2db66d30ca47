"""The recipe language's vocabulary, for tools: keywords, blocks, terms, fields and choices.

Nothing here is written down twice. Keywords come from the grammar (``grammars/vkd.lark``:
every terminal that matches only fixed words) and, for the distill terms, from the registry of
kinds (:data:`vitkdl.terms.KINDS`: keywords, spec models, summaries, whether a kind pairs
taps), which the grammar does not know; blocks and fields come from the spec models
(:class:`~vitkdl.spec.RecipeSpec`, ``MODEL_FIELDS``, ``BLOCK_FIELDS``), choices from their
``Literal`` types. Where a term may start is asked of the grammar (:func:`term_may_start`).
The formatter, the highlighter, ``vitkdl init`` and the language server ask this module; none
of them spells a term keyword.

Imports lark and pydantic only (never torch).
"""

from __future__ import annotations

import functools
import re
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel

from vitkdl import spec as _spec
from vitkdl import syntax as _syntax
from vitkdl.errors import VkdError

_PROBE = "zqxv_probe"  # a word no keyword terminal matches


def term_models() -> dict[str, type[_spec.Node]]:
    """Distill term keyword -> its spec model, read off the registry (:mod:`vitkdl.terms`)."""
    from vitkdl.terms import KINDS

    return {keyword: kind.spec for keyword, kind in KINDS.items()}


def term_summary(keyword: str) -> str:
    """The one-line help of the term kind written ``keyword`` (empty for an unknown word)."""
    from vitkdl.terms import KINDS

    kind = KINDS.get(keyword)
    return kind.summary if kind is not None else ""


def term_kinds() -> tuple[str, ...]:
    """The distill term keywords, in registry order."""
    return tuple(term_models())


def feature_kinds() -> tuple[str, ...]:
    """Term keywords that pair taps (``KIND student.... -> teacher....``)."""
    from vitkdl.terms import KINDS

    return tuple(k for k in term_models() if KINDS[k].paired)


@functools.cache
def _terminal_words() -> dict[str, tuple[str, ...]]:
    """Grammar terminal -> the fixed words it matches, for terminals matching only such words
    (keywords, ``true``/``false``, the tap sides); identifier-like terminals are left out."""
    out: dict[str, tuple[str, ...]] = {}
    for term in _syntax.concrete_parser().terminals:
        pattern = term.pattern
        if pattern.type == "str":
            words = (pattern.value,) if re.fullmatch(r"[A-Za-z_]\w*", pattern.value) else ()
        else:
            regex = pattern.to_regexp()
            if re.fullmatch(regex, _PROBE):
                continue
            words = tuple(
                dict.fromkeys(
                    w
                    for w in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", pattern.value)
                    if re.fullmatch(regex, w)
                )
            )
        if words:
            out[term.name] = words
    return out


def terminal_words(name: str) -> tuple[str, ...]:
    """The fixed words grammar terminal ``name`` matches (empty for NAME, NUMBER, ...)."""
    return _terminal_words().get(name, ())


def keywords() -> tuple[str, ...]:
    """Every keyword of the language: the words the grammar reserves somewhere and the distill
    term keywords of the registry (keywords are contextual: most stay usable as field names and
    choice words elsewhere), constants included."""
    return tuple(sorted({*_grammar_words(), *term_kinds()}))


@functools.cache
def _grammar_words() -> frozenset[str]:
    return frozenset(w for ws in _terminal_words().values() for w in ws)


@functools.cache
def constants() -> tuple[str, ...]:
    """Reserved words that are values (``true``, ``false``)."""
    out = []
    for w in sorted(_grammar_words()):
        try:
            value = _syntax.parse_value(w)
        except VkdError:  # a keyword that is not a value
            continue
        if not isinstance(value, _syntax.Word):
            out.append(w)
    return tuple(out)


@functools.cache
def statement_keywords() -> tuple[str, ...]:
    """The words that may start a top-level statement (from the parser's start state)."""
    interactive = _syntax.concrete_parser().parse_interactive("", start="start")
    words: list[str] = []
    for name in sorted(interactive.accepts()):
        words.extend(terminal_words(name))
    return tuple(dict.fromkeys(words))


def expected_terminals(text: str) -> frozenset[str] | None:
    """The grammar terminals that may follow ``text`` (a recipe's beginning), or None when
    ``text`` already has a syntax error."""
    from lark.exceptions import UnexpectedInput

    interactive = _syntax.concrete_parser().parse_interactive(text, start="start")
    try:
        interactive.exhaust_lexer()
    except UnexpectedInput:
        return None
    return frozenset(interactive.accepts())


@functools.cache
def _side_terminals() -> frozenset[str]:
    """The grammar terminals that start a tap (they match exactly the tap sides)."""
    sides = set(tap_sides())
    return frozenset(t for t, words in _terminal_words().items() if set(words) == sides)


def term_may_start(text: str) -> bool:
    """Whether a distill term may start at the end of ``text`` (a recipe's beginning).

    The grammar knows no term keyword, so it is asked what a word there would be: a term's
    keyword is followed by taps, where a field name wants ``=`` and an alias nothing more.
    """
    accepts = expected_terminals(f"{text} {_PROBE}")
    return accepts is not None and bool(accepts & _side_terminals())


def expected_words(text: str) -> tuple[str, ...] | None:
    """The keywords that may follow ``text`` (a recipe's beginning): those of the grammar's
    terminals, and the term keywords where a term may start; None when ``text`` already has a
    syntax error."""
    accepts = expected_terminals(text)
    if accepts is None:
        return None
    words = [w for name in sorted(accepts) for w in terminal_words(name)]
    if "NAME" in accepts and term_may_start(text):
        words.extend(term_kinds())
    return tuple(dict.fromkeys(words))


@functools.cache
def terms_block() -> str | None:
    """The statement whose ``{ ... }`` holds the distill terms (asked of the grammar)."""
    for word in statement_keywords():
        if term_may_start(f"{word} {{"):
            return word
    return None


def tap_sides() -> tuple[str, ...]:
    """``student``, ``teacher``: the left part of a tap."""
    return literal_choices(_spec.TapSpec, "side")


def tap_points() -> tuple[str, ...]:
    """What a tap may name after ``student.``/``teacher.``."""
    return literal_choices(_spec.TapSpec, "point")


def tap_subpoints() -> tuple[str, ...]:
    """The points inside the blocks a tap may name after its index (``blocks[0:2].attn``)."""
    return tuple(_spec.TAP_SUBPOINTS)


# --------------------------------------------------------------------------------------------
# Blocks and fields


def _members(annotation: Any, bounds: tuple[Any, ...] = ()) -> list[tuple[Any, tuple[Any, ...]]]:
    """The member types of a (possibly optional, annotated, union) annotation, in order, each
    with the constraint metadata of its ``Annotated`` wrapper."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        inner, *meta = typing.get_args(annotation)
        flat = [x for m in meta for x in (getattr(m, "metadata", None) or [m])]
        return _members(inner, (*bounds, *flat))
    if origin in (typing.Union, types.UnionType):
        return [m for a in typing.get_args(annotation) for m in _members(a, bounds)]
    return [(annotation, bounds)]


def _unwrap(annotation: Any) -> list[Any]:
    return [a for a, _ in _members(annotation)]


def _node_type(annotation: Any) -> type[_spec.Node] | None:
    for a in _unwrap(annotation):
        if isinstance(a, type) and issubclass(a, _spec.Node):
            return a
    return None


@functools.cache
def block_models() -> dict[str, type[_spec.Node]]:
    """Top-level blocks with a body -> their spec model (``student``, ``teacher``, ``data``,
    ``train``), read off :class:`~vitkdl.spec.RecipeSpec`'s fields."""
    out: dict[str, type[_spec.Node]] = {}
    for name, info in _spec.RecipeSpec.model_fields.items():
        model = _node_type(info.annotation)
        if model is not None:
            out[name] = model
    return out


def _internal(model: type[BaseModel], name: str) -> bool:
    """Fields the syntax sets rather than a ``name = value``: spans, the keyword (``kind``),
    the alias (``name``), the taps, and catch-all dicts."""
    if name in _spec.Node.model_fields or name in ("kind", "name"):
        return True
    annotation = model.model_fields[name].annotation
    if typing.get_origin(annotation) is dict:
        return True
    return any(
        isinstance(a, type) and issubclass(a, _spec.TapSpec)
        for arg in _unwrap(annotation)
        for a in (arg, *typing.get_args(arg))
    )


def fields_of(model: type[BaseModel], block: str | None = None) -> tuple[str, ...]:
    """The fields a recipe author writes in ``model``'s body (``block`` names a top-level
    block, whose list the spec keeps in ``MODEL_FIELDS``/``BLOCK_FIELDS``)."""
    if block is not None:
        if block in _spec.BLOCK_FIELDS:
            return tuple(_spec.BLOCK_FIELDS[block])
        if model is _spec.ModelSpec:
            return tuple(_spec.MODEL_FIELDS)
    names = [n for n in model.model_fields if not _internal(model, n)]
    if issubclass(model, _spec.TermSpec):  # a term's own fields first, then every term's
        common = _spec.TermSpec.model_fields
        names = [n for n in names if n not in common] + [n for n in names if n in common]
    return tuple(names)


def block_argument(block: str) -> str | None:
    """The field a block's argument fills (``data SOURCE``: ``source``), when it is a choice."""
    model = block_models().get(block)
    if model is None or model is _spec.ModelSpec:
        return None
    written = set(fields_of(model, block))
    for name in model.model_fields:
        if name not in written and not _internal(model, name) and literal_choices(model, name):
            return name
    return None


def takes_model_name(block: str) -> bool:
    """Whether ``block``'s argument is a timm model name."""
    return block_models().get(block) is _spec.ModelSpec


def literal_choices(model: type[BaseModel], name: str) -> tuple[str, ...]:
    """The ``Literal`` choices of field ``name`` (empty when it is not a choice)."""
    if name not in model.model_fields:
        return ()
    out: list[str] = []
    for a in _unwrap(model.model_fields[name].annotation):
        if typing.get_origin(a) is Literal:
            out.extend(str(x) for x in typing.get_args(a))
    return tuple(out)


def nested_model(model: type[BaseModel], name: str) -> type[_spec.Node] | None:
    """The model a call value of field ``name`` builds (``optimizer = adamw(...)``)."""
    if name not in model.model_fields:
        return None
    return _node_type(model.model_fields[name].annotation)


def value_choices(model: type[BaseModel], name: str) -> tuple[str, ...]:
    """What may follow ``name =``: its choices, ``true``/``false``, or the call names."""
    choices = literal_choices(model, name)
    if choices:
        return choices
    nested = nested_model(model, name)
    if nested is not None:
        return literal_choices(nested, "name")
    if name in model.model_fields and bool in _unwrap(model.model_fields[name].annotation):
        return constants()
    return ()


def describe_type(model: type[BaseModel], name: str) -> str:
    """A field's type in words: ``a number > 0``, ``one of linear, identity, mlp``."""
    info = model.model_fields[name]
    choices = literal_choices(model, name)
    nested = nested_model(model, name)
    if nested is not None and not choices:
        return "a call: " + " | ".join(literal_choices(nested, "name")) + "(...)"
    words = []
    for a, meta in _members(info.annotation, tuple(info.metadata)):
        if a is type(None) or typing.get_origin(a) is typing.Literal:
            continue
        if a is bool:
            word = "true or false"
        elif a is int:
            word = "a whole number"
        elif a is float:
            word = "a number"
        elif a is str:
            word = 'a string "..."'
        elif typing.get_origin(a) in (list, tuple):
            word = "a list [...]"
        else:
            word = getattr(a, "__name__", str(a))
        bounds = [
            f"{sign} {format_number(getattr(m, attr))}"
            for m in meta
            for attr, sign in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))
            if getattr(m, attr, None) is not None
        ]
        words.append(word + (" " + " and ".join(bounds) if bounds else ""))
    if choices:  # a number or a word (`topk = 100`, `topk = all`)
        words = [w for w in words if w != 'a string "..."'] + ["one of " + ", ".join(choices)]
    return " or ".join(dict.fromkeys(words)) or "a value"


def format_number(value: float | int) -> str:
    """A number as a recipe writes it: ``3e-5``, ``0.5``, ``300``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    text = f"{value:g}"
    return re.sub(r"e([+-])0*(\d)", lambda m: "e" + m[1].replace("+", "") + m[2], text)


def field_default(model: type[BaseModel], name: str) -> str | None:
    """A field's default in recipe syntax, or None when it has none worth showing."""
    info = model.model_fields[name]
    if info.default_factory is not None:
        return None
    value = info.default
    if value is None or value is ... or isinstance(value, BaseModel):
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    return format_number(value) if isinstance(value, float) else str(value)


def doc_line(model: type[BaseModel]) -> str:
    """The first sentence of a model's docstring (what a term or block does)."""
    doc = (model.__doc__ or "").strip().split("\n\n")[0]
    return " ".join(doc.split())
