"""Completion: what may be written at a position of a recipe that is being typed.

The text before the cursor is rarely a whole recipe, so it is read twice, both times without
giving up on errors: a tolerant scan (the highlighter's tokens) finds the enclosing brackets
and the block or term that opened each ``{``, and the grammar's own parser, fed only the
statement (or distill term) being written, says which keywords may come next; where it says
a term may start, the term keywords of the registry (the grammar knows none) come too, and a
term's kind says whether taps follow it. What a name means there (a field, a choice, a tap
point, a point inside the blocks, a timm model, a data source) comes from
:mod:`vitkdl.language`, never from a list kept here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from pygments.token import Comment, Error, Literal, Name, Number, Operator, Punctuation, String

from vitkdl import language
from vitkdl.lexer import VkdLexer

MAX_ITEMS = 300

_PARTIAL = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:-[A-Za-z0-9_]*)*\Z")
_PATH_PREFIX = re.compile(r"(?<![\w-])(?P<keyword>[A-Za-z_]+)\s+\"(?P<path>[^\"\n]*)\Z")


@dataclass(frozen=True)
class Item:
    """One completion: ``category`` is keyword, field, choice, model, tap, function or file
    (the server maps it to the protocol's completion item kind)."""

    label: str
    category: str
    detail: str = ""
    documentation: str = ""


@dataclass(frozen=True)
class Tok:
    """A token of the tolerant scan: ``category`` is word, string, number or punct."""

    category: str
    text: str
    start: int
    end: int


def scan(text: str) -> list[Tok]:
    """The tokens of ``text`` without comments and whitespace; never fails."""
    out: list[Tok] = []
    lexer = VkdLexer(stripnl=False, ensurenl=False)
    for start, token, value in lexer.get_tokens_unprocessed(text):
        if not value.strip() or token in Comment:
            continue
        if token in String:
            category = "string"
        elif token in Number:
            category = "number"
        elif token in Punctuation or token in Operator or token in Error:
            category = "punct"
        elif token in Name or token in Literal or str(token).startswith("Token.Keyword"):
            category = "word"
        else:
            category = "punct"
        out.append(Tok(category, value, start, start + len(value)))
    return out


_PAIRS = {"}": "{", ")": "(", "]": "["}


def open_brackets(tokens: list[Tok]) -> list[int]:
    """Indices of the brackets still open at the end of ``tokens``, outermost first."""
    stack: list[int] = []
    for i, t in enumerate(tokens):
        if t.text in ("{", "(", "["):
            stack.append(i)
        elif t.text in _PAIRS:
            for j in range(len(stack) - 1, -1, -1):
                if tokens[stack[j]].text == _PAIRS[t.text]:
                    del stack[j:]
                    break
    return stack


def _same_level(tokens: list[Tok], lo: int, hi: int) -> list[int]:
    """Indices in ``[lo, hi)`` not inside a bracket opened in that range."""
    out: list[int] = []
    depth = 0
    for i in range(lo, hi):
        t = tokens[i].text
        if t in _PAIRS:
            depth = max(0, depth - 1)
            if depth == 0:
                out.append(i)
            continue
        if depth == 0:
            out.append(i)
        if t in ("{", "(", "["):
            depth += 1
    return out


def _opener(tokens: list[Tok], at: int, lo: int) -> int | None:
    """The keyword that opened the ``{`` at ``at``: the nearest statement or term keyword
    before it on its level that is not a tap side (``student.``)."""
    words = set(language.statement_keywords()) | set(language.term_kinds())
    for i in reversed(_same_level(tokens, lo, at)):
        t = tokens[i]
        if t.category != "word" or t.text not in words:
            continue
        if i + 1 < len(tokens) and tokens[i + 1].text == ".":
            continue
        if i > 0 and tokens[i - 1].text in ("=", "as"):
            continue
        return i
    return None


def _line_start(text: str, offset: int) -> bool:
    return not text[text.rfind("\n", 0, offset) + 1 : offset].strip()


def _keyword_items(words: tuple[str, ...] | None) -> list[Item]:
    """Keywords as items (a term keyword with its kind's one-line help)."""
    return [
        Item(w, "keyword", language.term_summary(w))
        for w in words or ()
        if w not in language.constants()
    ]


def _field_items(model: type, names: tuple[str, ...]) -> list[Item]:
    out = []
    for n in names:
        default = language.field_default(model, n)
        detail = language.describe_type(model, n) + (f" (default {default})" if default else "")
        out.append(Item(n, "field", detail, language.doc_line(model)))
    return out


def _choice_items(model: type, field: str) -> list[Item]:
    nested = language.nested_model(model, field)
    category = "function" if nested is not None else "choice"
    return [Item(c, category, f"{field} = {c}") for c in language.value_choices(model, field)]


def _model_items(prefix: str) -> tuple[list[Item], bool]:
    from vitkdl.models import model_names

    names = [n for n in model_names() if n.startswith(prefix)]
    return [Item(n, "model", "timm model") for n in names[:MAX_ITEMS]], len(names) > MAX_ITEMS


def _file_items(keyword: str, typed: str, path: Path | None) -> list[Item]:
    if path is None or keyword not in language.keywords():
        return []
    base = path.parent
    folder = (base / typed).parent if "/" in typed else base
    if not folder.is_dir():
        return []
    out = []
    for f in sorted(folder.rglob("*.vkd")):
        if f.resolve() == path.resolve() or any(p.startswith(".") for p in f.parts):
            continue
        try:
            rel = f.relative_to(base).as_posix()
        except ValueError:
            continue
        if rel.startswith(typed):
            out.append(Item(rel, "file", "recipe"))
    return out[:MAX_ITEMS]


def _body(tokens: list[Tok], open_at: int, model: type, block: str | None) -> list[Item]:
    """Inside a ``{ ... }`` body: a field's choices after ``name =``, else the fields."""
    level = _same_level(tokens, open_at + 1, len(tokens))
    if len(level) >= 2 and tokens[level[-1]].text == "=" and tokens[level[-2]].category == "word":
        return _choice_items(model, tokens[level[-2]].text)
    return _field_items(model, language.fields_of(model, block))


def _call(tokens: list[Tok], open_at: int, outer: list[int]) -> list[Item]:
    """Inside ``name(...)``, the value of a field (``optimizer = adamw(``)."""
    if open_at < 3 or tokens[open_at - 2].text != "=" or not outer:
        return []
    field = tokens[open_at - 3].text
    parent = _block_model(tokens, outer[-1], outer[:-1])
    if parent is None:
        return []
    model = language.nested_model(parent[0], field)
    if model is None:
        return []
    level = _same_level(tokens, open_at + 1, len(tokens))
    if len(level) >= 2 and tokens[level[-1]].text == "=" and tokens[level[-2]].category == "word":
        return _choice_items(model, tokens[level[-2]].text)
    names = tuple(n for n in language.fields_of(model) if not language.literal_choices(model, n))
    return _field_items(model, names)


def _block_model(
    tokens: list[Tok], open_at: int, outer: list[int]
) -> tuple[type, str | None] | None:
    lo = outer[-1] + 1 if outer else 0
    at = _opener(tokens, open_at, lo)
    if at is None:
        return None
    word = tokens[at].text
    if outer and tokens[outer[-1]].text == "{" and word in language.term_models():
        return language.term_models()[word], None
    if not outer and word in language.block_models():
        return language.block_models()[word], word
    return None


def _statement_start(tokens: list[Tok], lo: int, hi: int, text: str) -> int:
    """Where the statement (or term) being written at the end of ``[lo, hi)`` starts."""
    words = set(language.statement_keywords()) | set(language.term_kinds())
    level = _same_level(tokens, lo, hi)
    for i in reversed(level):
        t = tokens[i]
        side = i + 1 < len(tokens) and tokens[i + 1].text == "."
        starts = i == lo or _line_start(text, t.start) or tokens[i - 1].text in ("{", "}")
        if t.category == "word" and t.text in words and not side and starts:
            return i
    return lo


def _for_kind(keyword: str, words: tuple[str, ...], written: int) -> tuple[str, ...]:
    """The keywords that may follow the head of a ``keyword`` term of ``written`` tokens: a
    kind that pairs taps takes them first, the others take none (the grammar allows both)."""
    if keyword not in language.term_kinds():
        return words
    sides = set(language.tap_sides())
    if keyword in language.feature_kinds():
        return tuple(w for w in words if w in sides) if written == 1 else words
    return tuple(w for w in words if w not in sides)


def _header(
    text: str, tokens: list[Tok], before: int, partial: str, outer: list[int]
) -> tuple[list[Item], bool]:
    """Top level, or between the terms of the distill block."""
    in_terms = bool(outer)
    lo = outer[-1] + 1 if outer else 0
    start = _statement_start(tokens, lo, len(tokens), text)
    prefix = ""
    if in_terms:
        opener = _opener(tokens, outer[-1], outer[-2] + 1 if len(outer) > 1 else 0)
        prefix = (
            tokens[opener].text if opener is not None else language.terms_block() or ""
        ) + " { "
    begin = tokens[start].start if start < len(tokens) else before
    head = prefix + text[begin:before]
    accepts = language.expected_terminals(head)
    level = _same_level(tokens, start, len(tokens))
    last = tokens[level[-1]] if level else None
    if in_terms and last is not None and last.text == "." and len(level) >= 2:
        after = tokens[level[-2]].text
        if after in language.tap_sides():  # student.|
            return [Item(p, "tap", "tap point") for p in language.tap_points()], False
        if after == "]" and accepts is not None and "NAME" in accepts:  # blocks[0:2].|
            subpoints = language.tap_subpoints()
            return [Item(p, "tap", "point inside the blocks") for p in subpoints], False
    words = language.expected_words(head)
    if in_terms and words is not None and start < len(tokens):
        words = _for_kind(tokens[start].text, words, len(level))
    items = _keyword_items(words)
    if accepts is not None and "NAME" in accepts and last is not None and last.category == "word":
        if not in_terms and language.takes_model_name(last.text):
            models, more = _model_items(partial)
            return items + models, more
        argument = language.block_argument(last.text) if not in_terms else None
        if argument is not None:
            model = language.block_models()[last.text]
            return items + [
                Item(c, "choice", f"{last.text} {c}")
                for c in language.literal_choices(model, argument)
            ], False
    if accepts is None and _line_start(text, before):  # an error earlier: what may start one
        words = language.term_kinds() if in_terms else language.statement_keywords()
        items = _keyword_items(words)
    return items, False


def complete(text: str, offset: int, path: Path | None = None) -> tuple[list[Item], bool]:
    """Completions at character ``offset`` of ``text`` (the recipe at ``path``), and whether
    the list was cut short (more would match a longer prefix)."""
    head = text[:offset]
    line = head[head.rfind("\n") + 1 :]
    quoted = _PATH_PREFIX.search(line)
    if quoted is not None and line.count('"') % 2 == 1:
        return _file_items(quoted["keyword"], quoted["path"], path), False
    m = _PARTIAL.search(head)
    partial = m.group() if m else ""
    before = offset - len(partial)
    tokens = scan(text[:before])
    last = tokens[-1] if tokens else None
    if _in_comment_or_string(text[:offset]) or (
        last is not None and last.category == "number" and last.end == before
    ):
        return [], False
    frames = open_brackets(tokens)
    if not frames:
        items, more = _header(text, tokens, before, partial, [])
    else:
        inner = tokens[frames[-1]].text
        outer = frames[:-1]
        if inner == "[":
            return [], False
        if inner == "(":
            items, more = _call(tokens, frames[-1], outer), False
        else:
            opener = _opener(tokens, frames[-1], outer[-1] + 1 if outer else 0)
            word = tokens[opener].text if opener is not None else None
            if word is not None and word == language.terms_block() and not outer:
                items, more = _header(text, tokens, before, partial, frames)
            else:
                block = _block_model(tokens, frames[-1], outer)
                items = _body(tokens, frames[-1], *block) if block else []
                more = False
    return [i for i in items if i.label.startswith(partial)], more


def _in_comment_or_string(head: str) -> bool:
    line = head[head.rfind("\n") + 1 :]
    in_string = False
    i = 0
    while i < len(line):
        c = line[i]
        if in_string:
            if c == "\\":
                i += 1
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c == "#":
            return True
        i += 1
    return in_string
