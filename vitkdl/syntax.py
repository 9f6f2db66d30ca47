"""Stage 1: source text -> syntax tree.

The grammar lives in ``grammars/vkd.lark`` (LALR, positions propagated). A lark ``Transformer``
turns the parse tree into small typed nodes that all carry their :class:`~vitkdl.errors.Span`.
Nothing here knows what a field means: that is the spec stage's job.

Syntax errors are reported with position, the expected tokens in words and a did-you-mean for
misspelt keywords. After an error the parser blanks the offending line and tries again, so one
run reports every broken line rather than only the first.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from vitkdl.errors import Diagnostic, Sources, Span, VkdError, did_you_mean, error, one_of

MAX_SOURCE_BYTES = 1_000_000

# --------------------------------------------------------------------------------------------
# Typed nodes


@dataclass(frozen=True)
class Number:
    value: int | float
    span: Span


@dataclass(frozen=True)
class String:
    value: str
    span: Span


@dataclass(frozen=True)
class Bool:
    value: bool
    span: Span


@dataclass(frozen=True)
class Word:
    """A bare word: a choice such as ``linear`` or ``bf16``."""

    value: str
    span: Span


@dataclass(frozen=True)
class Call:
    """A parameterised choice: ``adamw(lr = 1e-3, weight_decay = 0.05)``."""

    name: str
    kwargs: tuple[Field, ...]
    span: Span
    name_span: Span


@dataclass(frozen=True)
class List:
    items: tuple[Value, ...]
    span: Span


Value = Number | String | Bool | Word | Call | List


@dataclass(frozen=True)
class Field:
    """``name = value`` inside a block (or a keyword argument of a call)."""

    name: str
    value: Value
    name_span: Span
    span: Span


@dataclass(frozen=True)
class Slice:
    start: int | None
    stop: int | None
    step: int | None
    span: Span


@dataclass(frozen=True)
class Index:
    value: int
    span: Span


@dataclass(frozen=True)
class Tap:
    """``student.blocks[0, 1]``, ``student.blocks[0].attn`` or ``teacher.norm``."""

    side: str
    point: str
    index: tuple[Index | Slice, ...] | None
    span: Span
    point_span: Span
    sub: str | None = None
    sub_span: Span | None = None


@dataclass(frozen=True)
class Term:
    """One term of ``distill``: its kind's keyword as written, the taps it pairs (empty for
    kinds that read logits), its alias and fields."""

    kind: str
    students: tuple[Tap, ...]
    teachers: tuple[Tap, ...]
    alias: str | None
    alias_span: Span | None
    fields: tuple[Field, ...]
    span: Span
    kind_span: Span


@dataclass(frozen=True)
class Statement:
    """A top-level statement: ``recipe``, ``extends``, ``teacher``, ``student``, ``data``,
    ``distill``, ``train`` or ``sweep`` (whose fields are named by dotted paths). ``arg`` is
    the model name, data source, name or path."""

    keyword: str
    arg: str | None
    arg_span: Span | None
    fields: tuple[Field, ...]
    terms: tuple[Term, ...]
    span: Span
    from_path: bool = False


@dataclass(frozen=True)
class SyntaxTree:
    file: str
    statements: tuple[Statement, ...]


# --------------------------------------------------------------------------------------------
# Parser


@functools.cache
def _parser() -> Lark:
    text = resources.files("vitkdl.grammars").joinpath("vkd.lark").read_text(encoding="utf-8")
    return Lark(
        text,
        parser="lalr",
        start=["start", "value_only"],
        propagate_positions=True,
        maybe_placeholders=True,
    )


@functools.cache
def concrete_parser() -> Lark:
    """The recipe parser keeping every token (keywords and punctuation too), for tools that
    work on the text as written: the formatter, the highlighter, the language server."""
    text = resources.files("vitkdl.grammars").joinpath("vkd.lark").read_text(encoding="utf-8")
    return Lark(
        text,
        parser="lalr",
        start=["start", "value_only"],
        propagate_positions=True,
        maybe_placeholders=True,
        keep_all_tokens=True,
    )


def _span(file: str, meta: Any) -> Span:
    return Span(
        file=file,
        line=meta.line,
        column=meta.column,
        end_line=meta.end_line,
        end_column=meta.end_column,
    )


_ESCAPES = {'"': '"', "\\": "\\", "n": "\n", "t": "\t"}


def _unquote(token: str) -> str:
    """A string literal's text: ``\\"``, ``\\\\``, ``\\n`` and ``\\t`` are escapes; any other
    backslash stays as written (``"C:\\data"`` is a path)."""
    body = token[1:-1]
    if "\\" not in body:
        return body
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(0)), body)


class _Build(Transformer):
    """Parse tree -> typed nodes."""

    def __init__(self, file: str) -> None:
        super().__init__()
        self.file = file

    def _s(self, item: Any) -> Span:
        return _span(self.file, item)

    # values
    def number(self, items: list[Token]) -> Number:
        (tok,) = items
        text = str(tok)
        value: int | float = int(text) if tok.type == "INT" else float(text)
        return Number(value, self._s(tok))

    def string(self, items: list[Token]) -> String:
        (tok,) = items
        return String(_unquote(str(tok)), self._s(tok))

    @v_args(meta=True)
    def true(self, meta: Any, items: list[Any]) -> Bool:
        return Bool(True, self._s(meta))

    @v_args(meta=True)
    def false(self, meta: Any, items: list[Any]) -> Bool:
        return Bool(False, self._s(meta))

    def word(self, items: list[Token]) -> Word:
        (tok,) = items
        return Word(str(tok), self._s(tok))

    @v_args(meta=True)
    def call(self, meta: Any, items: list[Any]) -> Call:
        name, *kwargs = items
        return Call(
            str(name), tuple(k for k in kwargs if k is not None), self._s(meta), self._s(name)
        )

    @v_args(meta=True)
    def kwarg(self, meta: Any, items: list[Any]) -> Field:
        name, value = items
        return Field(str(name), value, self._s(name), self._s(meta))

    field = kwarg

    @v_args(meta=True)
    def list(self, meta: Any, items: list[Any]) -> List:
        return List(tuple(i for i in items if i is not None), self._s(meta))

    def value_only(self, items: list[Any]) -> Value:
        return items[0]

    def body(self, items: list[Field]) -> tuple[Field, ...]:
        return tuple(items)

    # taps
    def index_int(self, items: list[Token]) -> Index:
        (tok,) = items
        return Index(int(str(tok)), self._s(tok))

    @v_args(meta=True)
    def slice(self, meta: Any, items: list[Token | None]) -> Slice:
        start, stop, step = (int(str(t)) if t is not None else None for t in items)
        return Slice(start, stop, step, self._s(meta))

    def index(self, items: list[Any]) -> tuple[Index | Slice, ...]:
        return tuple(items)

    @v_args(meta=True)
    def tap(self, meta: Any, items: list[Any]) -> Tap:
        side, point, index, sub = items
        return Tap(
            str(side),
            str(point),
            index,
            self._s(meta),
            self._s(point),
            str(sub) if sub is not None else None,
            self._s(sub) if sub is not None else None,
        )

    def taps(self, items: list[Tap]) -> tuple[Tap, ...]:
        return tuple(items)

    def alias(self, items: list[Token]) -> Token:
        return items[0]

    # terms
    @v_args(meta=True)
    def term(self, meta: Any, items: list[Any]) -> Term:
        kind, students, teachers, alias, body = items
        return Term(
            str(kind),
            students or (),
            teachers or (),
            str(alias) if alias else None,
            self._s(alias) if alias else None,
            body or (),
            self._s(meta),
            self._s(kind),
        )

    # statements
    def model_name(self, items: list[Token | None]) -> tuple[str, Span]:
        arch, tag = items
        span = self._s(arch)
        if tag is None:
            return str(arch), span
        end = self._s(tag)
        return f"{arch}.{tag}", span.model_copy(
            update={"end_line": end.end_line, "end_column": end.end_column}
        )

    def _statement(
        self,
        keyword: str,
        meta: Any,
        arg: Any,
        body: Any,
        *,
        from_path: bool = False,
        terms: tuple[Term, ...] = (),
    ) -> Statement:
        if isinstance(arg, tuple):
            name, arg_span = arg
        elif isinstance(arg, Token):
            name = _unquote(str(arg)) if arg.type == "STRING" else str(arg)
            arg_span = self._s(arg)
        else:
            name, arg_span = None, None
        body = tuple(body or ())
        return Statement(keyword, name, arg_span, body, terms, self._s(meta), from_path)

    @v_args(meta=True)
    def recipe_name(self, meta: Any, items: list[Any]) -> Statement:
        return self._statement("recipe", meta, items[0], None)

    @v_args(meta=True)
    def extends(self, meta: Any, items: list[Any]) -> Statement:
        return self._statement("extends", meta, items[0], None)

    @v_args(meta=True)
    def teacher(self, meta: Any, items: list[Any]) -> Statement:
        return self._statement("teacher", meta, items[0], items[1])

    @v_args(meta=True)
    def teacher_from(self, meta: Any, items: list[Any]) -> Statement:
        return self._statement("teacher", meta, items[0], items[1], from_path=True)

    @v_args(meta=True)
    def student(self, meta: Any, items: list[Any]) -> Statement:
        return self._statement("student", meta, items[0], items[1])

    @v_args(meta=True)
    def data(self, meta: Any, items: list[Any]) -> Statement:
        return self._statement("data", meta, items[0], items[1])

    @v_args(meta=True)
    def distill(self, meta: Any, items: list[Any]) -> Statement:
        return self._statement("distill", meta, None, None, terms=tuple(items))

    @v_args(meta=True)
    def train(self, meta: Any, items: list[Any]) -> Statement:
        return self._statement("train", meta, None, items[0])

    @v_args(meta=True)
    def sweep_item(self, meta: Any, items: list[Any]) -> Field:
        *names, value = items
        first, last = self._s(names[0]), self._s(names[-1])
        path_span = first.model_copy(
            update={"end_line": last.end_line, "end_column": last.end_column}
        )
        return Field(".".join(str(n) for n in names), value, path_span, self._s(meta))

    @v_args(meta=True)
    def sweep(self, meta: Any, items: list[Any]) -> Statement:
        return self._statement("sweep", meta, None, tuple(items))

    def start(self, items: list[Statement]) -> tuple[Statement, ...]:
        return tuple(items)


# --------------------------------------------------------------------------------------------
# Errors in words

_TOKEN_WORDS = {
    "NAME": "a name",
    "STRING": 'a string "..."',
    "NUMBER": "a number",
    "INT": "an integer",
    "LBRACE": "'{'",
    "RBRACE": "'}'",
    "LSQB": "'['",
    "RSQB": "']'",
    "LPAR": "'('",
    "RPAR": "')'",
    "EQUAL": "'='",
    "COMMA": "','",
    "DOT": "'.'",
    "COLON": "':'",
    "__ANON_0": "'->'",
    "SIDE": "student or teacher",
    "$END": "end of file",
}

_BLOCKS = ("recipe", "extends", "teacher", "student", "data", "distill", "train", "sweep")


def _word_for(name: str, parser: Lark) -> str:
    if name in _TOKEN_WORDS:
        return _TOKEN_WORDS[name]
    try:
        pattern = parser.get_terminal(name).pattern
    except KeyError:
        return name
    if pattern.type == "str":
        return f"'{pattern.value}'"
    if name.startswith("_"):  # a keyword: /mimic(?![\\w-])/
        return f"'{name[1:].lower()}'"
    return name.lower()


def _expected_words(expected: set[str], parser: Lark) -> list[str]:
    words = sorted({_word_for(e, parser) for e in expected})
    return words


def _describe(tok: Token) -> str:
    if tok.type == "$END":
        return "end of file"
    return f"'{tok}'"


def _syntax_diagnostic(exc: UnexpectedInput, file: str, text: str, parser: Lark) -> Diagnostic:
    if isinstance(exc, UnexpectedCharacters):
        char = text[exc.pos_in_stream] if exc.pos_in_stream < len(text) else "?"
        span = Span.point(file, exc.line, exc.column)
        allowed = _expected_words(set(exc.allowed or ()), parser)
        return error(
            f"unexpected character {char!r}",
            span,
            expected=one_of(allowed) if allowed else None,
            hint="strings are written in double quotes" if char == "'" else None,
        )
    assert isinstance(exc, (UnexpectedToken, UnexpectedEOF))
    expected = (
        set(exc.expected) if isinstance(exc, UnexpectedEOF) else set(exc.accepts or exc.expected)
    )
    words = _expected_words(expected, parser)
    tok = exc.token
    if isinstance(exc, UnexpectedEOF) or tok.type == "$END":
        lines = text.splitlines() or [""]
        span = Span.point(file, len(lines), len(lines[-1]) + 1)
        hint = "a '{' is not closed" if "RBRACE" in expected else None
        return error("unexpected end of file", span, expected=one_of(words), hint=hint)
    span = Span(
        file=file,
        line=tok.line,
        column=tok.column,
        end_line=tok.end_line or tok.line,
        end_column=tok.end_column or tok.column + len(str(tok)),
    )
    value = str(tok)
    keywords = {_word_for(e, parser).strip("'") for e in expected}
    if tok.type in ("NAME", "SIDE") or value.isidentifier():
        if keywords & {"teacher", "distill", "train"}:
            return error(
                f"unknown block '{value}'",
                span,
                expected=one_of(_BLOCKS),
                hint=did_you_mean(value, _BLOCKS),
            )
        if "student or teacher" in keywords and "'{'" not in keywords:
            return error(
                f"a tap starts with student. or teacher., not '{value}'",
                span,
                expected="student.blocks[...], student.norm, teacher.blocks[...] or teacher.norm",
                hint=did_you_mean(value, ("student", "teacher")),
            )
    hint = None
    lines = text.splitlines()
    first_word = (
        lines[tok.line - 1].split()[0]
        if 0 < tok.line <= len(lines) and lines[tok.line - 1].split()
        else ""
    )
    if "'='" in words and (first_word in _BLOCKS or tok.type in ("SIDE", "LBRACE")):
        # a block header or a term (`KIND student.... -> ...`, `KIND {`) inside a body
        hint = f"is a '}}' missing before '{first_word}'?"
    elif "'='" in words and tok.type in ("NUMBER", "INT", "STRING", "NAME"):
        hint = "fields are written as name = value"
    return error(f"unexpected {_describe(tok)}", span, expected=one_of(words), hint=hint)


def _skip_line(text: str, line: int) -> str:
    """Blank ``line`` and, when it opens more braces than it closes, everything up to the
    matching ``}``: a broken block header takes its block with it."""
    lines = text.split("\n")
    if not 1 <= line <= len(lines):
        return text
    depth = lines[line - 1].count("{") - lines[line - 1].count("}")
    lines[line - 1] = " " * len(lines[line - 1])
    i = line
    while depth > 0 and i < len(lines):
        out = []
        for c in lines[i]:
            if depth > 0:
                depth += (c == "{") - (c == "}")
                out.append(" ")
            else:
                out.append(c)
        lines[i] = "".join(out)
        i += 1
    return "\n".join(lines)


def _skip_token(text: str, line: int, column: int) -> str:
    lines = text.split("\n")
    row = lines[line - 1]
    lines[line - 1] = row[: column - 1] + " " + row[column:]
    return "\n".join(lines)


def read_source(path: str | Path, sources: Sources | None = None, at: Span | None = None) -> str:
    """Read a recipe file as UTF-8 text; any problem becomes a one-line :class:`VkdError`.

    ``at`` is where the file was named (an ``extends``), used as the error position.
    """
    p = Path(path)
    name = str(path)

    def fail(message: str, hint: str | None = None) -> VkdError:
        return VkdError([error(message, at or Span.point(name), hint=hint)], sources)

    if not p.exists():
        raise fail(f"no such file: {name}")
    if p.is_dir():
        raise fail(
            f"{name} is a directory, not a recipe file",
            hint=f"name a .vkd file, e.g. {name.rstrip('/')}/*.vkd",
        )
    try:
        size = p.stat().st_size
        if size > MAX_SOURCE_BYTES:
            raise fail(
                f"{name} is {size / 1e6:.1f} MB; a recipe is at most "
                f"{MAX_SOURCE_BYTES // 1_000_000} MB of text"
            )
        raw = p.read_bytes()
    except OSError as exc:
        raise fail(f"cannot read {name}: {exc.strerror or exc}") from None
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise fail(f"{name} is UTF-16 text; save it as UTF-8")
    if b"\x00" in raw:
        raise fail(f"{name} is a binary file, not a recipe")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise fail(
            f"{name} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})",
            hint="save the recipe as UTF-8",
        ) from None
    if not text.strip():
        raise fail(
            f"{name} is empty", hint="a recipe names at least a student: student MODEL { ... }"
        )
    return text


def parse(text: str, file: str = "<recipe>", max_errors: int = 20) -> SyntaxTree:
    """Parse recipe text into a :class:`SyntaxTree`; raise :class:`VkdError` with every
    syntax error found."""
    parser = _parser()
    diagnostics: list[Diagnostic] = []
    attempt = text
    tree = None
    skipped_brace = False
    while len(diagnostics) < max_errors:
        try:
            tree = parser.parse(attempt, start="start")
            break
        except UnexpectedInput as exc:
            tok = exc.token if isinstance(exc, UnexpectedToken) else None
            at_end = isinstance(exc, UnexpectedEOF) or (tok is not None and tok.type == "$END")
            if not (at_end and skipped_brace):  # an end-of-file error after a skipped '}'
                diagnostics.append(_syntax_diagnostic(exc, file, text, parser))
            if at_end:
                break
            skipped_brace = tok is not None and tok.type == "RBRACE"
            if skipped_brace:
                attempt = _skip_token(attempt, exc.line, exc.column)  # a stray or early '}'
            else:
                attempt = _skip_line(attempt, exc.line)
    if diagnostics or tree is None:
        sources = Sources()
        sources.add(file, text)
        raise VkdError(diagnostics, sources)
    return SyntaxTree(file, _Build(file).transform(tree))


def parse_value(text: str, file: str = "<--set>", column: int = 1) -> Value:
    """Parse one value with the recipe's own value syntax (for ``--set PATH=VALUE``)."""
    parser = _parser()
    try:
        tree = parser.parse(text, start="value_only")
    except UnexpectedInput as exc:
        diag = _syntax_diagnostic(exc, file, text, parser)
        if diag.span is not None:
            diag = Diagnostic(
                diag.severity,
                diag.message,
                diag.span.model_copy(
                    update={
                        "column": diag.span.column + column - 1,
                        "end_column": diag.span.end_column + column - 1,
                    }
                ),
                diag.expected,
                diag.hint,
            )
        raise VkdError([diag]) from None
    value = _Build(file).transform(tree)
    return move(value, columns=column - 1)


def move(value: Any, *, line: int | None = None, columns: int = 0) -> Any:
    """A copy of a syntax node with every span put on ``line`` and shifted right by
    ``columns`` (values parsed out of ``--set`` arguments)."""
    import dataclasses

    def span(v: Span) -> Span:
        update: dict[str, int] = {
            "column": v.column + columns,
            "end_column": v.end_column + columns,
        }
        if line is not None:
            update.update(line=line, end_line=line)
        return v.model_copy(update=update)

    changes: dict[str, Any] = {}
    for f in dataclasses.fields(value):
        v = getattr(value, f.name)
        if isinstance(v, Span):
            changes[f.name] = span(v)
        elif isinstance(v, tuple):
            changes[f.name] = tuple(
                move(x, line=line, columns=columns) if dataclasses.is_dataclass(x) else x for x in v
            )
        elif dataclasses.is_dataclass(v):
            changes[f.name] = move(v, line=line, columns=columns)
    return dataclasses.replace(value, **changes)
