"""Stage 2: specs, `extends`, `teacher from`, overrides and typed fields."""

from __future__ import annotations

from pathlib import Path

import pytest

import vitkdl
from tests.conftest import RECIPES
from vitkdl.errors import VkdError
from vitkdl.spec import load_spec
from vitkdl.terms.generate import GenerateSpec
from vitkdl.terms.mimic import MimicSpec


def write(tmp: Path, name: str, text: str) -> Path:
    path = tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_extends_merges_field_by_field_and_terms_by_name(tmp_path) -> None:
    write(
        tmp_path,
        "base/b.vkd",
        """
        student deit_tiny_patch16_224 { drop_path = 0.1 num_classes = 10 }
        data digits { batch_size = 16 augment = basic }
        distill { kd { temperature = 4.0 } nkd }
        train { epochs = 5 optimizer = adamw(lr = 1e-3) }""",
    )
    child = write(
        tmp_path,
        "c.vkd",
        """
        extends "base/b.vkd"
        teacher deit_small_patch16_224 { num_classes = 10 }
        student deit_tiny_patch16_224 { drop_path = 0.0 }
        data digits { batch_size = 8 }
        distill { kd { weight = 0.5 } }
        train { epochs = 7 }""",
    )
    spec, diags, _ = load_spec(child)
    assert not [d for d in diags if d.is_error]
    assert spec.student.drop_path == 0.0 and spec.student.num_classes == 10
    assert spec.data.batch_size == 8 and spec.data.augment == "basic"
    kd = spec.term("kd")
    assert kd.weight == 0.5 and kd.temperature == 1.0  # a term written again replaces the base's
    assert spec.term("nkd") is not None
    assert spec.train.epochs == 7 and spec.train.optimizer.lr == 1e-3
    assert spec.extends == (str(tmp_path / "base/b.vkd"),)
    assert spec.student.at("drop_path").file.endswith("c.vkd")
    assert spec.student.at("num_classes").file.endswith("b.vkd")


def test_repeated_terms_get_numbered_names_and_aliases(tmp_path) -> None:
    path = write(
        tmp_path,
        "r.vkd",
        """
        teacher deit_small_patch16_224
        student deit_tiny_patch16_224
        distill {
            mimic student.blocks[0] -> teacher.blocks[0]
            mimic student.blocks[1] -> teacher.blocks[1]
            generate student.norm -> teacher.norm as deep
        }""",
    )
    spec, _, _ = load_spec(path)
    assert [t.name for t in spec.terms] == ["mimic", "mimic_2", "deep", "labels"]
    assert isinstance(spec.term("deep"), GenerateSpec)


def test_overrides_reach_every_kind_of_field() -> None:
    spec = vitkdl.load(
        RECIPES / "deit_tiny_vitkd_kd.vkd",
        overrides=[
            "train.epochs=1",
            "data.root=/data/imagenet",
            "distill.generate.mask=0.75",
            "student.drop_path=0",
            "train.optimizer.lr=5e-4",
            "distill.nkd.gamma=1.5",
            "train.precision=bf16",
            "distill.kd.temperature=4",
        ],
    )
    assert spec.train.epochs == 1 and spec.data.root == "/data/imagenet"
    assert spec.term("generate").mask == 0.75 and spec.student.drop_path == 0
    assert spec.train.optimizer.lr == 5e-4 and spec.train.optimizer.weight_decay == 0.05
    assert spec.term("nkd").gamma == 1.5 and spec.train.precision == "bf16"
    assert spec.term("kd").temperature == 4  # logit terms can be added by override
    assert spec.train.at("epochs").file == "--set"


def test_overrides_by_mapping_and_by_alias(tmp_path) -> None:
    path = write(
        tmp_path,
        "r.vkd",
        """
        teacher deit_small_patch16_224
        student deit_tiny_patch16_224
        distill { generate student.norm -> teacher.norm as deep }""",
    )
    spec = vitkdl.load(
        path, overrides={"distill.deep.weight": 1e-5, "data.root": "/x y", "train.compile": "off"}
    )
    assert spec.term("deep").weight == 1e-5
    assert spec.data.root == "/x y" and spec.train.compile == "off"


def test_bad_overrides_are_positioned() -> None:
    with pytest.raises(VkdError) as info:
        vitkdl.load(
            RECIPES / "deit_tiny_vitkd_kd.vkd",
            overrides=[
                "train.epoch=1",
                "distill.gen.mask=0.5",
                "trian.epochs=1",
                "train.epochs=(",
                "nothing",
            ],
        )
    messages = [d.message for d in info.value.errors]
    assert "unknown field 'epoch' in the train block" in messages
    assert "no distill term named 'gen'" in messages
    assert "unknown override path 'trian.epochs'" in messages
    assert "an override is PATH=VALUE, got 'nothing'" in messages
    assert any(d.span.file == "--set" and d.span.line == 4 for d in info.value.errors)
    rendered = info.value.render()
    assert "--set:1:1: error: unknown field 'epoch'" in rendered
    assert "  1 | train.epoch=1" in rendered


def test_teacher_from_takes_the_other_recipes_student() -> None:
    spec = vitkdl.load(RECIPES / "quickstart.vkd")
    teacher = spec.teacher
    assert teacher.from_name == "quickstart_teacher"
    assert teacher.model == "vit_small_patch16_224" and teacher.embed_dim == 128
    assert teacher.from_hash == vitkdl.load(RECIPES / "quickstart_teacher.vkd").hash()
    # overrides on the command line do not reach the dependency
    spec2 = vitkdl.load(RECIPES / "quickstart.vkd", overrides=["train.epochs=1"])
    assert spec2.teacher.from_hash == teacher.from_hash


def test_hash_follows_the_resolved_recipe_not_the_text() -> None:
    a = vitkdl.load(RECIPES / "deit_tiny_vitkd.vkd")
    b = vitkdl.load(RECIPES / "deit_tiny_vitkd.vkd", overrides=["train.epochs=300"])
    c = vitkdl.load(RECIPES / "deit_tiny_vitkd.vkd", overrides=["train.epochs=3"])
    assert a.hash() == b.hash() != c.hash()


def test_specs_are_frozen_and_forbid_unknown_fields() -> None:
    spec = vitkdl.load(RECIPES / "deit_tiny_vitkd.vkd")
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen-instance error
        spec.train.epochs = 3  # type: ignore[misc]
    with pytest.raises(Exception):  # noqa: B017
        MimicSpec(name="m", student=(), teacher=(), bogus=1)  # type: ignore[call-arg]


def test_misspelt_term_kinds_get_the_registrys_suggestion(tmp_path) -> None:
    path = tmp_path / "r.vkd"
    path.write_text(
        "student deit_tiny_patch16_224\n"
        "distill {\n  generat student.norm -> teacher.norm\n  mimick\n}\n"
    )
    _, diags, _ = load_spec(path)
    errors = [(d.span.line, d.message, d.hint) for d in diags if d.is_error]
    assert errors == [
        (3, "unknown distill term 'generat'", "did you mean 'generate'?"),
        (4, "unknown distill term 'mimick'", "did you mean 'mimic'?"),
    ]


def test_a_teacher_from_a_recipe_is_its_finished_run_not_its_initialisation(tmp_path) -> None:
    """The dependency's student started from a weights file; the teacher is what it became."""
    (tmp_path / "first.vkd").write_text(
        'student deit_tiny_patch16_224 { weights = "init.safetensors"  pretrained = false }\n'
    )
    (tmp_path / "second.vkd").write_text(
        'teacher from "first.vkd"\nstudent deit_tiny_patch16_224\ndistill { kd }\n'
    )
    spec, _, _ = load_spec(tmp_path / "second.vkd")
    assert spec.teacher.weights is None and spec.teacher.from_name == "first"


def test_an_error_in_a_teacher_from_recipe_is_at_its_own_line_without_a_cascade(tmp_path) -> None:
    """The dependency's own error, at its file and line, names the student's `teacher from`
    line; no "has errors" echo and no "the term needs a teacher"."""
    (tmp_path / "t.vkd").write_text(
        "student vit_tiny_patch16_224\ndata digits {}\ntrain {\n  epochs = 1\n  lr = 0.1\n}\n"
    )
    (tmp_path / "s.vkd").write_text(
        'student vit_tiny_patch16_224\nteacher from "t.vkd"\ndata digits {}\ndistill { nkd {} }\n'
    )
    _, diags, _ = vitkdl.validate(tmp_path / "s.vkd")
    errors = [d for d in diags if d.is_error]
    assert [(Path(d.span.file).name, d.span.line, d.message) for d in errors] == [
        ("t.vkd", 5, "unknown field 'lr' in the train block")
    ]
    assert errors[0].hint is not None
    assert 'teacher from "t.vkd"' in errors[0].hint and "s.vkd:2:14" in errors[0].hint


def test_a_missing_teacher_from_recipe_is_one_error(tmp_path) -> None:
    (tmp_path / "s.vkd").write_text(
        'student vit_tiny_patch16_224\nteacher from "nope.vkd"\ndistill { kd {} }\n'
    )
    _, diags, _ = vitkdl.validate(tmp_path / "s.vkd")
    errors = [d.message for d in diags if d.is_error]
    assert len(errors) == 1 and errors[0].startswith("no such recipe:")
    assert errors[0].endswith("nope.vkd")


def test_a_base_recipe_is_named_as_such_not_missing_a_student() -> None:
    _, diags, _ = vitkdl.validate(RECIPES / "base" / "deit_imagenet.vkd")
    errors = [d for d in diags if d.is_error]
    assert len(errors) == 1
    assert errors[0].message.startswith("a base recipe (only data and train blocks")
    assert errors[0].hint is not None and 'extends "deit_imagenet.vkd"' in errors[0].hint


def test_a_recipe_with_terms_but_no_student_still_misses_its_student(tmp_path) -> None:
    (tmp_path / "r.vkd").write_text("teacher deit_tiny_patch16_224\ndata digits {}\n")
    _, diags, _ = vitkdl.validate(tmp_path / "r.vkd")
    assert [d.message for d in diags if d.is_error] == ["the recipe has no student"]
