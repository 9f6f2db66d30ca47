"""The generated language reference: current in the repository, complete, and checked."""

from __future__ import annotations

import pytest

from tests.conftest import ROOT
from vitkdl import language as lang
from vitkdl.cli import main
from vitkdl.reference import DEFAULT_PATH, REGENERATE, generate
from vitkdl.terms import KINDS


def _section(text: str, heading: str) -> str:
    """The text under a ``###`` heading, up to the next heading of that level or higher."""
    start = text.index(heading + "\n")
    rest = text[start + len(heading) + 1 :]
    ends = [i for i in (rest.find("\n### "), rest.find("\n## ")) if i >= 0]
    return rest[: min(ends)] if ends else rest


def test_committed_reference_is_current() -> None:
    committed = (ROOT / DEFAULT_PATH).read_text(encoding="utf-8")
    assert committed == generate(), (
        f"{DEFAULT_PATH} is stale (a field, choice, default or kind changed): "
        f"regenerate it with `{REGENERATE}` from the repository root and commit it"
    )


def test_every_block_field_with_its_type_and_default() -> None:
    text = generate()
    for block, model in lang.block_models().items():
        heads = [line for line in text.splitlines() if line.startswith(f"### `{block} ")]
        assert heads, block
        section = _section(text, heads[0])
        for name in lang.fields_of(model, block):
            row = next(r for r in section.splitlines() if r.startswith(f"| `{name}` |"))
            assert lang.describe_type(model, name).replace("|", "\\|") in row
            default = lang.field_default(model, name)
            if default is not None and lang.nested_model(model, name) is None:
                assert f"`{default}`" in row
    # ranges come from the Field bounds: drop_path is >= 0 and < 1
    assert "| `drop_path` | a number >= 0 and < 1 |" in text


def test_every_kind_with_its_fields_summary_and_formula() -> None:
    text = generate()
    for keyword, kind in KINDS.items():
        section = _section(text, f"### `{keyword}`")
        assert kind.summary[1:] in section
        for name in lang.fields_of(kind.spec):
            assert f"| `{name}` |" in section, (keyword, name)
        for choice in (
            c for n in lang.fields_of(kind.spec) for c in lang.literal_choices(kind.spec, n)
        ):
            assert choice in section
    # each kind module's description of its formula, e.g. nkd's non-target term
    assert "gamma * T^2" in _section(text, "### `nkd`")


def test_every_statement_keyword_is_listed() -> None:
    text = generate()
    for word in lang.statement_keywords():
        assert f"`{word}`" in text


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NO_COLOR", "1")
    return tmp_path


def test_docs_command_writes_then_checks(in_tmp, capsys) -> None:
    assert main(["docs", "--check"]) == 1
    err = capsys.readouterr().err
    assert DEFAULT_PATH in err and "missing" in err and REGENERATE in err
    assert main(["docs"]) == 0
    assert (in_tmp / DEFAULT_PATH).read_text(encoding="utf-8") == generate()
    assert main(["docs", "--check"]) == 0


def test_docs_check_names_a_stale_file(in_tmp, capsys) -> None:
    path = in_tmp / "lang.md"
    path.write_text(generate().replace("| `drop_path` |", "| `drop_pth` |"), encoding="utf-8")
    assert main(["docs", "--check", "--out", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path} is stale" in err and REGENERATE in err
    assert "drop_pth" in path.read_text(encoding="utf-8")  # --check writes nothing


def test_docs_to_stdout(capsys) -> None:
    assert main(["docs", "--out", "-"]) == 0
    assert capsys.readouterr().out == generate()
