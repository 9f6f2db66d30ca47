"""The layering is a check, not a claim: pyproject's import-linter contracts (the stages in
layers, nothing below the package facade importing it, the kinds independent of each other,
no import cycle between siblings) hold for the package as it is."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_import_contracts_hold(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    cli = pytest.importorskip("importlinter.cli")
    monkeypatch.chdir(ROOT)  # import-linter reads the contracts from ./pyproject.toml
    code = cli.lint_imports(no_cache=True, no_logo=True)
    out = capsys.readouterr().out
    assert " kept, 0 broken." in out and "BROKEN" not in out, out
    assert code == cli.EXIT_STATUS_SUCCESS


def test_the_kinds_import_neither_the_spec_nor_the_stages_above_it() -> None:
    """The cycle the layering removed: spec <-> the kinds (TYPE_CHECKING imports included)."""
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("vitkdl")
    above = ("vitkdl.spec", "vitkdl.checks", "vitkdl.planner", "vitkdl.program")
    for module in sorted(graph.find_descendants("vitkdl.terms") | {"vitkdl.terms"}):
        for stage in above:
            assert not graph.chain_exists(importer=module, imported=stage), (module, stage)
