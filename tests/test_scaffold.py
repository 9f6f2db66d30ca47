"""``vitkdl init``: the paper's layout for any two timm ViTs with equal grids."""

from __future__ import annotations

from pathlib import Path

import pytest

import vitkdl
from tests.conftest import RECIPES
from vitkdl.cli import main
from vitkdl.fmt import format_text
from vitkdl.scaffold import QUICK_EPOCHS, InitError, init_recipe


def _plan(text: str, path):
    spec, diags, _ = vitkdl.validate(path, text=text)
    errors = [d for d in diags if d.is_error]
    assert spec is not None and not errors, errors
    return vitkdl.plan(spec)


def _coefficients(plan) -> dict[str, float]:
    return {t.name: t.coefficient for t in plan.terms}


@pytest.fixture(scope="module")
def reference():
    return vitkdl.plan(vitkdl.load(RECIPES / "deit_tiny_vitkd_kd.vkd"))


def test_the_papers_pair_gets_the_papers_recipe(tmp_path, reference) -> None:
    text = init_recipe(
        "deit3_small_patch16_224.fb_in22k_ft_in1k",
        "deit_tiny_patch16_224",
        path=tmp_path / "tiny.vkd",
    )
    plan = _plan(text, tmp_path / "tiny.vkd")
    shipped = {t.name: (t.weight, t.coefficient, t.student, t.teacher) for t in reference.terms}
    assert {t.name: (t.weight, t.coefficient, t.student, t.teacher) for t in plan.terms} == shipped
    assert plan.data == reference.data and plan.optimizer == reference.optimizer
    assert plan.schedule == reference.schedule
    assert text.startswith("# ViTKD + NKD: deit_tiny_patch16_224 taught by deit3_small")
    assert "recipe tiny\n" in text
    assert "weight = 3e-5  # 4.516 per element, as the paper's 3e-5" in text
    assert format_text(text) == text


@pytest.mark.slow
@pytest.mark.parametrize(
    "teacher, student, data",
    [
        ("vit_base_patch16_224", "vit_small_patch16_224", None),
        ("deit3_base_patch16_224", "deit_tiny_patch16_224", "digits"),
        ("vit_base_patch16_384", "deit_base_patch16_384", "synthetic"),
    ],
)
def test_other_pairs_keep_the_papers_per_element_coefficients(
    tmp_path, monkeypatch, reference, teacher, student, data
) -> None:
    monkeypatch.chdir(tmp_path)
    text = init_recipe(teacher, student, data=data, path=tmp_path / "pair.vkd")
    (tmp_path / "pair.vkd").write_text(text)
    plan = _plan(text, tmp_path / "pair.vkd")
    assert (plan.teacher.name, plan.student.name) == (teacher, student)
    ref = _coefficients(reference)
    for term in plan.terms:
        if term.coefficient != term.weight:  # a feature term: the coefficient is kept
            assert term.coefficient == pytest.approx(ref[term.name], rel=0.05)
        else:
            assert term.weight == next(t.weight for t in reference.terms if t.name == term.name)
    assert plan.data.source == (data or "imagefolder")
    assert plan.data.image_size == plan.student.img_size
    assert main(["explain", str(tmp_path / "pair.vkd")]) == 0


def test_a_data_folder_becomes_the_root(tmp_path) -> None:
    text = init_recipe(
        "deit3_small_patch16_224",
        "deit_tiny_patch16_224",
        data="/data/imagenet",
        path=tmp_path / "r.vkd",
    )
    assert 'root = "/data/imagenet"' in text and "data imagefolder {" in text
    assert "--set data.root" not in text


def test_digits_data_gets_the_quick_run_its_comment_promises(tmp_path, reference) -> None:
    """`--data digits` says "for a quick run": a short schedule, not the paper's 300 epochs
    (which stay what the default source gets)."""
    text = init_recipe(
        "deit3_small_patch16_224",
        "deit_tiny_patch16_224",
        data="digits",
        path=tmp_path / "r.vkd",
    )
    assert "data digits {" in text and "quick run" in text
    plan = _plan(text, tmp_path / "r.vkd")
    assert plan.epochs == QUICK_EPOCHS < reference.epochs == 300
    assert plan.schedule.warmup_epochs == 0
    assert (plan.optimizer.name, plan.optimizer.lr) == (
        reference.optimizer.name,
        reference.optimizer.lr,
    )
    assert format_text(text) == text


def test_different_grids_are_refused_with_the_reason(tmp_path) -> None:
    with pytest.raises(
        InitError,
        match=r"14x14 token grid .* 7x7 grid .* same image and "
        r"patch size",
    ):
        init_recipe("vit_base_patch32_224", "deit_tiny_patch16_224", path=tmp_path / "x.vkd")


@pytest.mark.parametrize(
    "teacher, message",
    [
        ("deit3_smal_patch16_224", "did you mean 'deit3_small_patch16_224'"),
        ("resnet50", r"resnet50 \(ResNet\) is not usable for ViTKD's layout: it has no ViT"),
    ],
)
def test_unusable_models_are_refused(tmp_path, teacher, message) -> None:
    with pytest.raises(InitError, match=message):
        init_recipe(teacher, "deit_tiny_patch16_224", path=tmp_path / "x.vkd")


def test_the_layout_resolves_name_place_and_data_before_any_text() -> None:
    """init's options are resolved once (no closure over them): the name from the file stem
    (made a valid identifier) or the pair, a data folder as the root of the paper's source."""
    from vitkdl.scaffold import _layout

    pair = ("deit_small_patch16_224", "deit_tiny_patch16_224")
    at_path = _layout(*pair, data="/data/imnet", name=None, path=Path("out/my-recipe.vkd"))
    assert at_path.name == "my_recipe" and at_path.where == Path("out/my-recipe.vkd")
    assert at_path.source == at_path.paper_source and at_path.root == "/data/imnet"
    default = _layout(*pair, data="digits", name=None, path=None)
    assert default.name == "deit_tiny_patch16_224_from_deit_small_patch16_224"
    assert default.where == Path(f"{default.name}.vkd")
    assert default.source == "digits" and default.root is None
