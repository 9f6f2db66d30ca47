"""The logit methods' shipped recipes (issue 19): ``recipes/methods/{kd,dkd,dist,wsld}.vkd``
on the quickstart pair and their ``recipes/methods/imagenet/`` twins (DeiT-Tiny <- DeiT
III-Small on DeiT's recipe): each validates and plans, changes only the distillation of its
pair, and ``explain`` prints its formula and coefficients (golden)."""

from __future__ import annotations

import pytest

import vitkdl
from tests.cli import run
from tests.conftest import GOLDEN, RECIPES, check_golden

METHODS = ["kd", "dkd", "dist", "wsld"]


def _dump(*nodes: object) -> list:
    return [n.model_dump() for n in nodes]  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", METHODS)
def test_each_logit_method_on_the_quickstart_pair_and_on_imagenet(name: str) -> None:
    quick = RECIPES / "methods" / f"{name}.vkd"
    twin = RECIPES / "methods" / "imagenet" / f"{name}.vkd"
    for path, recipe in ((quick, f"method_{name}"), (twin, f"method_imagenet_{name}")):
        spec, diags, _ = vitkdl.validate(path)
        assert spec is not None and not [d for d in diags if d.is_error], diags
        assert vitkdl.plan(spec).recipe == recipe
        header = path.read_text().splitlines()[:6]
        assert any(line.startswith("# run: vitkdl run ") for line in header), header
    spec = vitkdl.load(quick)
    baseline = vitkdl.load(RECIPES / "quickstart_baseline.vkd")
    assert _dump(spec.student, spec.data, spec.train) == _dump(
        baseline.student, baseline.data, baseline.train
    )
    assert spec.teacher.from_recipe.endswith("quickstart_teacher.vkd")
    imagenet = vitkdl.load(twin)
    paper = vitkdl.load(RECIPES / "deit_tiny_vitkd.vkd")
    assert _dump(imagenet.teacher, imagenet.data, imagenet.train) == _dump(
        paper.teacher, paper.data, paper.train
    )
    assert imagenet.student.model == paper.student.model
    for s in (spec, imagenet):
        assert [t.kind for t in s.terms if t.kind != "labels"] == [name]


@pytest.mark.parametrize("name", [*METHODS, *(f"imagenet/{m}" for m in METHODS)])
def test_logit_methods_explain_golden(capsys, monkeypatch, name: str) -> None:
    """Each method's formula and coefficients as ``explain`` prints them."""
    monkeypatch.setenv("COLUMNS", "100")
    code, out, err = run(capsys, "explain", f"recipes/methods/{name}.vkd")
    assert code == 0, err
    check_golden(GOLDEN / "explain" / "methods" / f"{name.replace('/', '_')}.txt", out)
