"""Highlighting of recipes: a Pygments lexer and the TextMate grammar of the VS Code extension.

Both are built from one table, :func:`rules`, made of the grammar's own token patterns and
keywords and of the term keywords of the registry of kinds (both through
:mod:`vitkdl.language`), so a new keyword or term needs no change here (the TextMate grammar is
regenerated). A word is coloured by its role, which the text around it shows: a name before
``=`` is a field, before ``(`` a call, ``student``/``teacher`` before ``.`` a tap side, a name
after ``.`` a member (a tap point, or a point inside the blocks such as ``attn``),
a word after a keyword the name that keyword introduces (a model, a data source, a recipe name,
an alias).

``python -m vitkdl.lexer`` prints the TextMate grammar; ``editors/vscode/syntaxes/`` holds its
output, and a test checks that it is current.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import ClassVar

from pygments.lexer import RegexLexer, bygroups
from pygments.token import (
    Comment,
    Keyword,
    Name,
    Number,
    Operator,
    Punctuation,
    String,
    Whitespace,
    _TokenType,
)

from vitkdl import language
from vitkdl.syntax import concrete_parser

__all__ = ["VkdLexer", "rules", "textmate_grammar"]


def _pattern(terminal: str) -> str:
    """A grammar terminal's regex with its groups made non-capturing."""
    regex = concrete_parser().get_terminal(terminal).pattern.to_regexp()
    out, i, in_class = [], 0, False
    while i < len(regex):
        c = regex[i]
        if c == "\\":
            out.append(regex[i : i + 2])
            i += 2
            continue
        if c == "[" and not in_class:
            in_class = True
        elif c == "]" and in_class:
            in_class = False
        elif c == "(" and not in_class and not regex.startswith("(?", i):
            c = "(?:"
        out.append(c)
        i += 1
    return "".join(out)


def _words(words: tuple[str, ...]) -> str:
    return "(?:" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + ")"


@dataclass(frozen=True)
class Rule:
    """One highlighting rule: a regex whose groups get Pygments tokens and TextMate scopes."""

    regex: str
    tokens: tuple[_TokenType, ...]
    scopes: tuple[str | None, ...]


@functools.cache
def rules() -> tuple[Rule, ...]:
    """The highlighting rules, in the order they are tried."""
    name = _pattern("NAME")
    word = rf"(?<![\w-]){name}"
    start = r"(?<![\w.-])"  # a keyword never follows a dot: after one is a member
    end = r"(?![\w-])"
    keywords = _words(tuple(w for w in language.keywords() if w not in language.constants()))
    not_keyword = rf"(?!{keywords}{end})"
    return (
        Rule(r"(#.*?)$", (Comment.Single,), ("comment.line.number-sign.vkd",)),
        Rule(rf"({_pattern('STRING')})", (String.Double,), ("string.quoted.double.vkd",)),
        Rule(r"(->)", (Operator,), ("keyword.operator.arrow.vkd",)),
        Rule(rf"(?<![\w.-])({_pattern('NUMBER')})(?![\w.])", (Number,), ("constant.numeric.vkd",)),
        Rule(
            rf"({word})(\s*)(?==)",
            (Name.Attribute, Whitespace),
            ("variable.other.property.vkd", None),
        ),
        Rule(
            rf"({word})(\s*)(?=\()", (Name.Function, Whitespace), ("entity.name.function.vkd", None)
        ),
        Rule(
            rf"{start}({_words(language.constants())}){end}",
            (Keyword.Constant,),
            ("constant.language.vkd",),
        ),
        Rule(
            rf"(=)(\s*)(?!{_words(language.constants())}{end})({word}){end}(?!\s*\()",
            (Operator, Whitespace, Name.Constant),
            ("keyword.operator.assignment.vkd", None, "constant.other.choice.vkd"),
        ),
        Rule(
            rf"{start}({_words(language.tap_sides())})(\s*)(?=\.)",
            (Name.Builtin, Whitespace),
            ("variable.language.tap.vkd", None),
        ),
        Rule(
            rf"{start}({keywords}){end}(\s+)({not_keyword}{name}(?:\s*\.\s*{name})*)"
            rf"{end}(?!\s*[=(])",
            (Keyword, Whitespace, Name.Class),
            ("keyword.control.vkd", None, "entity.name.type.vkd"),
        ),
        Rule(rf"{start}({keywords}){end}", (Keyword,), ("keyword.control.vkd",)),
        Rule(
            rf"(\.)(\s*)({name})",
            (Punctuation, Whitespace, Name.Variable),
            ("punctuation.vkd", None, "variable.other.member.vkd"),
        ),
        Rule(rf"({word})", (Name,), ("variable.other.vkd",)),
        Rule(r"(=)", (Operator,), ("keyword.operator.assignment.vkd",)),
        Rule(r"([{}()\[\],.:])", (Punctuation,), ("punctuation.vkd",)),
    )


def _pygments_rules() -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = [(r"\s+", Whitespace)]
    for rule in rules():
        flags = "(?m)" if rule.regex.endswith("$") else ""
        action = rule.tokens[0] if len(rule.tokens) == 1 else bygroups(*rule.tokens)
        out.append((flags + rule.regex, action))
    return out


class VkdLexer(RegexLexer):
    """Pygments lexer for ``.vkd`` recipes (``pygmentize -l vkd recipe.vkd``)."""

    name = "vitkdl recipe"
    aliases: ClassVar[list[str]] = ["vkd", "vitkdl"]
    filenames: ClassVar[list[str]] = ["*.vkd"]
    mimetypes: ClassVar[list[str]] = ["text/x-vkd"]

    tokens: ClassVar[dict[str, list[tuple[str, object]]]] = {"root": _pygments_rules()}


def textmate_grammar() -> dict[str, object]:
    """The TextMate grammar of ``.vkd`` files (VS Code's ``syntaxes/vkd.tmLanguage.json``)."""
    patterns: list[dict[str, object]] = []
    for rule in rules():
        captures = {str(i): {"name": scope} for i, scope in enumerate(rule.scopes, 1) if scope}
        patterns.append({"match": rule.regex, "captures": captures})
    return {
        "$schema": "https://raw.githubusercontent.com/martinring/tmlanguage/master/tmlanguage.json",
        "name": "vitkdl recipe",
        "scopeName": "source.vkd",
        "fileTypes": ["vkd"],
        "comment": "Generated by `python -m vitkdl.lexer` from the grammar; do not edit.",
        "patterns": patterns,
    }


def main() -> None:
    """Print the TextMate grammar as JSON."""
    print(json.dumps(textmate_grammar(), indent=2))


if __name__ == "__main__":
    main()
