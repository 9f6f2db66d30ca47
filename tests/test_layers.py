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


def test_every_module_and_every_kind_has_its_place_in_the_contracts() -> None:
    """A module left out of the layers is checked by nothing (probe and srrl once were)."""
    import tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    by_name = {c["name"]: c for c in contracts["contracts"]}

    def named(layers: list[str]) -> set[str]:
        return {part.strip() for layer in layers for part in layer.split("|")}

    package = ROOT / "vitkdl"
    modules = {p.stem for p in package.glob("*.py") if p.stem != "__init__"}
    modules |= {p.name for p in package.iterdir() if (p / "__init__.py").is_file()}
    stages = by_name["the stages, each importing only the layers below it"]["layers"]
    assert modules - {"grammars", "recipes"} == named(stages)
    kinds = {p.name for p in (package / "terms").iterdir() if (p / "__init__.py").is_file()}
    kind_layers = by_name["the kinds, independent of each other, above what they share"]
    assert kinds == named(kind_layers["layers"][:1])
