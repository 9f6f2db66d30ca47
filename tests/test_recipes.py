"""Every shipped recipe validates and explains; every header says how to run it."""

from __future__ import annotations

import pytest

import vitkdl
from tests.conftest import RECIPES, shipped_recipes
from vitkdl.spec import load_spec


@pytest.mark.parametrize("path", shipped_recipes(), ids=lambda p: p.stem)
def test_shipped_recipe_validates_and_plans(path) -> None:
    spec = vitkdl.load(path)
    plan = vitkdl.plan(spec)
    # runs/ablation_NAME-HASH, runs/method_NAME-HASH: each folder's recipes grouped together
    folder = path.parent.relative_to(RECIPES).as_posix()
    prefix = {".": "", "ablations": "ablation_", "methods": "method_"}.get(
        folder, "method_imagenet_"
    )
    assert plan.recipe == prefix + path.stem
    header = path.read_text().splitlines()[:6]
    assert any(line.startswith("# run: vitkdl run ") for line in header), header


@pytest.mark.parametrize("path", shipped_recipes(), ids=lambda p: p.stem)
def test_paper_recipes_quote_the_papers_top1(path) -> None:
    if path.stem.startswith("deit_"):
        assert "top-1" in path.read_text().splitlines()[0]


def test_base_recipe_parses_on_its_own() -> None:
    spec, diags, _ = load_spec(RECIPES / "base" / "deit_imagenet.vkd")
    assert [d.message for d in diags] == [
        "a base recipe (only data and train blocks, no student), not a runnable one"
    ]
    assert spec.data.mixup == 0.8 and spec.train.clip_grad == 5.0


@pytest.mark.parametrize("path", sorted(RECIPES.glob("ablations/*.vkd")), ids=lambda p: p.stem)
def test_each_ablation_changes_one_thing_of_the_paper_recipe(path) -> None:
    header = path.read_text().splitlines()[:8]
    assert header[0].startswith("# Ablation") and any("Isolates:" in x for x in header)
    spec = vitkdl.load(path)
    assert spec.extends == ("recipes/deit_tiny_vitkd.vkd", "recipes/base/deit_imagenet.vkd")
    paper = vitkdl.load(RECIPES / "deit_tiny_vitkd.vkd")
    assert (spec.student, spec.teacher, spec.data, spec.train) == (
        paper.student,
        paper.teacher,
        paper.data,
        paper.train,
    )


@pytest.mark.parametrize("name", ["srrl", "manifold", "kd", "dkd", "dist", "wsld"])
def test_each_method_runs_on_the_quickstart_pair_and_on_imagenet(name) -> None:
    """A method's quickstart recipe is the quickstart baseline plus its one term, taught by the
    quickstart teacher; its ImageNet twin is the paper pair (DeiT-Tiny <- DeiT III-Small) on
    DeiT's recipe, with the same term."""
    spec = vitkdl.load(RECIPES / "methods" / f"{name}.vkd")
    baseline = vitkdl.load(RECIPES / "quickstart_baseline.vkd")

    def dump(*nodes) -> list:
        return [n.model_dump() for n in nodes]

    assert dump(spec.student, spec.data, spec.train) == dump(
        baseline.student, baseline.data, baseline.train
    )
    assert spec.teacher.from_recipe.endswith("quickstart_teacher.vkd")
    twin = vitkdl.load(RECIPES / "methods" / "imagenet" / f"{name}.vkd")
    paper = vitkdl.load(RECIPES / "deit_tiny_vitkd.vkd")
    assert dump(twin.teacher, twin.data, twin.train) == dump(paper.teacher, paper.data, paper.train)
    assert twin.student.model == paper.student.model
    kinds = [[t.kind for t in s.terms if t.kind != "labels"] for s in (spec, twin)]
    assert kinds[0] == kinds[1] == [{"manifold": "mimic"}.get(name, name)]
