"""``vitkdl fmt``: the one canonical layout of a recipe.

The formatter re-emits the tokens of the recipe's concrete parse tree (every keyword and
punctuation mark kept, see :func:`vitkdl.syntax.concrete_parser`) with canonical whitespace,
and puts every comment back. It knows the grammar's shape, not its words: a line starts at each
top-level statement and at each item between ``{`` and ``}``, whatever the statement, term or
field, so new keywords, taps or blocks need no change here.

The canonical layout:

- one top-level statement per line at column 0; every item of a ``{ ... }`` body (a field, a
  term) on its own line, indented 4 spaces per level; ``}`` on its own line at the level of
  the line that opened it; an empty body is written ``{}``;
- within a line, tokens are separated by one space, except none after ``(``, ``[`` and ``.``,
  none before ``)``, ``]``, ``,``, ``.`` and ``:``, none around ``:`` (slices) and none
  between a name and the ``(`` of a call or the ``[`` of an index (``blocks[0, 1]``,
  ``adamw(lr = 1e-3)``); ``=`` and ``->`` have a space on each side;
- a trailing comma before ``)`` or ``]`` is dropped; numbers, strings and names are kept as
  written (``3e-5`` stays ``3e-5``); lines are never wrapped;
- comments are kept verbatim (trailing spaces removed): a comment on its own line stays on its
  own line, indented like the item that follows it (or like the body's items, before ``}``);
  a trailing comment stays after its token, two spaces after the code. A trailing comment
  after a token that is not the last of its line in the layout above ends the line there, and
  the item continues on the next line, indented one more level;
- blank lines: runs of blank lines become one; none at the start or end of the file, after a
  ``{`` or before a ``}``; two top-level statements are separated by a blank line when either
  spans several lines, and otherwise as written;
- the file ends with one newline; line endings are ``\\n``.

Formatting never changes meaning: the output has the same tokens in the same order (less
dropped trailing commas) and the same comments, which :func:`format_text` checks on every call.
"""

from __future__ import annotations

import difflib
import itertools
from dataclasses import dataclass, field

from lark import Token, Tree
from lark.exceptions import UnexpectedInput

from vitkdl import syntax
from vitkdl.errors import VkdError, error

INDENT = "    "
TRAILING_COMMENT_GAP = "  "

_OPEN = "{"
_CLOSE = "}"
_NO_SPACE_AFTER = frozenset({"(", "[", "."})
_NO_SPACE_BEFORE = frozenset({")", "]", ",", ".", ":"})
_CLOSERS = frozenset({")", "]"})


@dataclass
class _Tok:
    text: str
    start: int
    end: int
    depth: int  # indentation level of the line this token would start
    item: bool  # first token of a statement or of a body item
    stmt: int  # index of the top-level statement it belongs to
    close: bool = False  # a '}' ending a body
    comments: list[tuple[str, bool]] = field(default_factory=list)  # own-line, before it
    trailing: str | None = None  # comment after it on its line
    blank: bool = False  # a blank line before it in the source


@dataclass
class _Line:
    depth: int
    text: str
    category: str  # "item", "close", "cont" (an item continued after a comment), "comment"
    stmt: int
    blank: bool  # the source had a blank line before it
    opens: bool = False  # ends with '{'


def _flatten(tree: Tree) -> list[_Tok]:
    """The significant tokens of a concrete tree with their layout roles."""
    out: list[_Tok] = []

    def walk(node: Tree | Token, depth: int, stmt: int, item: bool) -> None:
        if isinstance(node, Token):
            out.append(_Tok(str(node), node.start_pos, node.end_pos, depth, item, stmt))
            return
        children = [c for c in node.children if c is not None]
        opens = [i for i, c in enumerate(children) if isinstance(c, Token) and c == _OPEN]
        closes = [i for i, c in enumerate(children) if isinstance(c, Token) and c == _CLOSE]
        lo = opens[0] if opens else None
        hi = closes[-1] if closes else None
        for i, child in enumerate(children):
            inside = lo is not None and hi is not None and lo < i < hi
            first = item and i == 0
            walk(child, depth + 1 if inside else depth, stmt, first or inside)
            if i == hi and lo is not None:
                out[-1].close = True

    for index, statement in enumerate(c for c in tree.children if c is not None):
        walk(statement, 0, index, True)
    return out


def _drop_trailing_commas(tokens: list[_Tok]) -> list[_Tok]:
    return [
        t
        for i, t in enumerate(tokens)
        if not (t.text == "," and i + 1 < len(tokens) and tokens[i + 1].text in _CLOSERS)
    ]


def _comment(segment: str) -> str | None:
    at = segment.find("#")
    return segment[at:].rstrip() if at >= 0 else None


def _attach_comments(text: str, tokens: list[_Tok]) -> list[tuple[str, bool]]:
    """Attach each comment of the gaps between tokens (gaps hold only whitespace and comments)
    to a token: trailing, or own-line before the next token. Returns the comments after the
    last token."""
    prev: _Tok | None = None
    for tok in [*tokens, None]:
        start = prev.end if prev is not None else 0
        end = tok.start if tok is not None else len(text)
        segments = text[start:end].split("\n")
        if prev is not None:
            prev.trailing = _comment(segments[0])
            middle = segments[1:-1] if tok is not None else segments[1:]
        else:
            middle = segments[:-1] if tok is not None else segments
        own: list[tuple[str, bool]] = []
        blank = False
        for seg in middle:
            c = _comment(seg)
            if c is None:
                blank = blank or not seg.strip()
                continue
            own.append((c, blank))
            blank = False
        if tok is None:
            return own
        tok.comments = own
        tok.blank = blank
        prev = tok
    return []


def _move_comments_past_braces(tokens: list[_Tok]) -> None:
    """``... # c`` followed by ``{`` on the next line: the comment goes after the ``{``, so the
    body opens on the item's line (the comment stays a trailing comment, in order)."""
    for tok, nxt in itertools.pairwise(tokens):
        if (
            tok.trailing is not None
            and nxt.text == _OPEN
            and not nxt.comments
            and nxt.trailing is None
        ):
            nxt.trailing, tok.trailing = tok.trailing, None


def _space(prev: str, cur: str) -> str:
    if prev in _NO_SPACE_AFTER or cur in _NO_SPACE_BEFORE or prev == ":":
        return ""
    if cur in ("(", "[") and (prev[-1].isalnum() or prev[-1] in "_]"):
        return ""
    if prev == _OPEN and cur == _CLOSE:
        return ""
    return " "


def _lines(tokens: list[_Tok], tail: list[tuple[str, bool]]) -> list[_Line]:
    lines: list[_Line] = []
    cur: _Line | None = None
    item_depth = 0
    pending_break = False
    prev: _Tok | None = None
    for tok in tokens:
        empty_close = tok.close and prev is not None and prev.text == _OPEN
        starts = tok.item or (tok.close and not empty_close)
        if tok.comments:
            if tok.item:
                depth, category = tok.depth, "comment"
            elif tok.close:
                depth, category = tok.depth + 1, "comment"
            else:
                depth, category = item_depth + 1, "cont"
            for text, blank in tok.comments:
                lines.append(_Line(depth, text, category, tok.stmt, blank))
            cur = None
        if starts or pending_break or cur is None:
            if tok.item:
                category, depth = "item", tok.depth
                item_depth = tok.depth
            elif tok.close:
                category, depth = "close", tok.depth
            else:
                category, depth = "cont", item_depth + 1
            cur = _Line(depth, tok.text, category, tok.stmt, tok.blank)
            lines.append(cur)
        else:
            assert prev is not None
            cur.text += _space(prev.text, tok.text) + tok.text
        cur.opens = tok.text == _OPEN
        pending_break = tok.trailing is not None
        if tok.trailing is not None:
            cur.text += TRAILING_COMMENT_GAP + tok.trailing
        prev = tok
    stmt = (tokens[-1].stmt + 1) if tokens else 0
    for text, blank in tail:
        lines.append(_Line(0, text, "comment", stmt, blank))
    return lines


def _render(lines: list[_Line]) -> str:
    spans: dict[int, int] = {}
    for line in lines:
        if line.category != "comment" or line.depth > 0:
            spans[line.stmt] = spans.get(line.stmt, 0) + 1
    out: list[str] = []
    for i, line in enumerate(lines):
        if i > 0:
            prev = lines[i - 1]
            if prev.opens or line.category in ("close", "cont"):
                blank = False
            elif line.depth == 0 and line.stmt != prev.stmt:
                blank = line.blank or spans.get(line.stmt, 0) > 1 or spans.get(prev.stmt, 0) > 1
            else:
                blank = line.blank
            if blank:
                out.append("")
        out.append(INDENT * line.depth + line.text)
    return "\n".join(out) + "\n" if out else ""


def _parse(text: str, file: str) -> Tree:
    syntax.parse(text, file)  # every syntax error, in the project's words
    try:
        return syntax.concrete_parser().parse(text, start="start")
    except UnexpectedInput as exc:  # pragma: no cover - parse() above already failed
        raise VkdError([error(f"cannot parse {file}: {exc}")]) from None


def _signature(text: str, file: str) -> tuple[list[str], list[str]]:
    """What formatting must keep: the tokens (less trailing commas) and the comments."""
    tokens = _drop_trailing_commas(_flatten(_parse(text, file)))
    tail = _attach_comments(text, tokens)
    comments = [
        c
        for t in tokens
        for c in [*(x for x, _ in t.comments), *([t.trailing] if t.trailing else [])]
    ]
    return [t.text for t in tokens], comments + [c for c, _ in tail]


def format_text(text: str, file: str = "<recipe>") -> str:
    """The canonical layout of recipe ``text``.

    Raises :class:`~vitkdl.errors.VkdError` with every syntax error when the text does not
    parse (nothing is formatted then).
    """
    text = text.removeprefix("\ufeff")
    tokens = _drop_trailing_commas(_flatten(_parse(text, file)))
    tail = _attach_comments(text, tokens)
    _move_comments_past_braces(tokens)
    out = _render(_lines(tokens, tail))
    if _signature(out, file) != _signature(text, file):  # pragma: no cover - a formatter bug
        raise RuntimeError(
            f"vitkdl fmt would change the tokens or comments of {file}; please report this recipe"
        )
    return out


def diff(old: str, new: str, name: str) -> str:
    """A unified diff from ``old`` to ``new`` (empty when equal)."""
    return "".join(
        difflib.unified_diff(
            old.splitlines(True), new.splitlines(True), f"{name} (original)", f"{name} (formatted)"
        )
    )
