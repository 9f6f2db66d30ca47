"""Highlighting: the Pygments lexer and the VS Code extension's TextMate grammar."""

from __future__ import annotations

import json
import re

import pytest
from pygments.token import Comment, Error, Keyword, Name, Number, String

from tests.conftest import RECIPES, ROOT
from vitkdl import language
from vitkdl.lexer import VkdLexer, rules, textmate_grammar

VSCODE = ROOT / "editors" / "vscode"
ALL_SHIPPED = sorted(RECIPES.rglob("*.vkd"))


def _tokens(text: str) -> list[tuple[object, str]]:
    return list(VkdLexer(stripnl=False, ensurenl=False).get_tokens(text))


@pytest.mark.parametrize("path", ALL_SHIPPED, ids=lambda p: str(p.relative_to(RECIPES)))
def test_every_token_of_every_shipped_recipe_gets_a_scope(path) -> None:
    text = path.read_text()
    tokens = _tokens(text)
    assert "".join(v for _, v in tokens) == text
    assert not [(t, v) for t, v in tokens if t in Error]


def test_tokens_are_coloured_by_their_role() -> None:
    text = (
        "recipe demo  # the name\nteacher deit3_small_patch16_224.fb_in22k_ft_in1k {\n"
        '    weights = "w.safetensors"\n    pretrained = false\n}\n'
        "distill {\n    mimic student.blocks[0, -1] -> teacher.norm as m {\n"
        "        align = linear\n        weight = 3e-5\n    }\n    nkd\n"
        "    mimic student.blocks[0:2].attn_map -> teacher.blocks[0:2] . attn\n}\n"
        "train {\n    optimizer = adamw(lr = 1e-3)\n    data = 1\n}\n"
    )
    got = {(v, t) for t, v in _tokens(text) if v.strip()}
    for value, token in [
        ("recipe", Keyword),
        ("demo", Name.Class),
        ("# the name", Comment.Single),
        ("deit3_small_patch16_224.fb_in22k_ft_in1k", Name.Class),
        ("weights", Name.Attribute),
        ('"w.safetensors"', String.Double),
        ("false", Keyword.Constant),
        ("mimic", Keyword),
        ("student", Name.Builtin),
        ("blocks", Name.Variable),
        ("-1", Number),
        ("norm", Name.Variable),
        ("as", Keyword),
        ("m", Name.Class),
        ("linear", Name.Constant),
        ("3e-5", Number),
        ("nkd", Keyword),
        ("attn_map", Name.Variable),  # a point inside the blocks
        ("attn", Name.Variable),
        ("adamw", Name.Function),
        ("lr", Name.Attribute),
        ("data", Name.Attribute),  # a keyword written as a field name is a field
    ]:
        assert (value, token) in got, (value, token)


def test_keywords_come_from_the_grammar_and_the_term_registry() -> None:
    words = set(language.keywords())
    assert set(language.term_kinds()) <= words
    assert set(language.statement_keywords()) <= words
    assert {"from", "as", "true", "false"} <= words
    keyword_rule = next(r for r in rules() if r.scopes == ("keyword.control.vkd",))
    for word in language.term_kinds():
        assert re.search(keyword_rule.regex, f" {word} "), word


def test_textmate_grammar_is_generated_and_current() -> None:
    committed = json.loads((VSCODE / "syntaxes" / "vkd.tmLanguage.json").read_text())
    assert committed == textmate_grammar(), (
        "regenerate: python -m vitkdl.lexer > editors/vscode/syntaxes/vkd.tmLanguage.json"
    )
    for pattern in committed["patterns"]:
        re.compile(pattern["match"])


def test_vscode_extension_declares_the_language_grammar_and_server() -> None:
    package = json.loads((VSCODE / "package.json").read_text())
    (lang,) = package["contributes"]["languages"]
    (grammar,) = package["contributes"]["grammars"]
    assert lang["id"] == grammar["language"] == "vkd" and ".vkd" in lang["extensions"]
    assert grammar["scopeName"] == textmate_grammar()["scopeName"]
    assert (VSCODE / grammar["path"]).is_file() and (VSCODE / lang["configuration"]).is_file()
    config = json.loads((VSCODE / lang["configuration"]).read_text())
    assert config["comments"]["lineComment"] == "#"
    assert "vscode-languageclient" in package["dependencies"]
    extension = (VSCODE / package["main"]).read_text()
    assert "vscode-languageclient/node" in extension and '"lsp"' in extension
