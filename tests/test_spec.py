"""Stage 2: specs, `extends`, `teacher from`, overrides and typed fields."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

import vitkdl
from tests.conftest import RECIPES
from vitkdl.errors import VkdError, render
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
            "+distill.kd.temperature=4",
        ],
    )
    assert spec.train.epochs == 1 and spec.data.root == "/data/imagenet"
    assert spec.term("generate").mask == 0.75 and spec.student.drop_path == 0
    assert spec.train.optimizer.lr == 5e-4 and spec.train.optimizer.weight_decay == 0.05
    assert spec.term("nkd").gamma == 1.5 and spec.train.precision == "bf16"
    assert spec.term("kd").temperature == 4  # +: logit terms can be added by override
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
    with pytest.raises(ValidationError, match="frozen"):
        spec.train.epochs = 3  # type: ignore[misc]
    assert spec.train.epochs != 3
    with pytest.raises(ValidationError, match="bogus"):
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


# --------------------------------------------------------------------------------------------
# Overrides: Hydra's rules (a plain path changes, +PATH adds, ~PATH removes)

KD = RECIPES / "deit_tiny_vitkd_kd.vkd"  # mimic, generate, nkd (and labels by default)


def errors_of(path: Path, overrides: list[str]) -> list:
    return [d for d in load_spec(path, overrides)[1] if d.is_error]


def test_a_plain_set_changes_only_what_the_recipe_has() -> None:
    (err,) = errors_of(KD, ["distill.kd.temperature=4"])
    assert err.message == "no distill term named 'kd'" and err.span.file == "--set"
    assert "mimic, generate, nkd, labels" in err.expected
    assert "+distill.kd.temperature=... adds a kd term" in err.hint
    # Schema fields exist with their defaults: a recipe need not write them to set them.
    spec, diags, _ = load_spec(
        RECIPES / "quickstart_baseline.vkd",
        ["student.drop_path=0.1", "distill.labels.weight=0.5", "train.ema=0.9"],
    )
    assert not [d for d in diags if d.is_error]
    assert spec.student.drop_path == 0.1 and spec.term("labels").weight == 0.5
    # An unknown model field would silently become a timm argument: it takes +.
    (err,) = errors_of(KD, ["student.qkv_bais=false"])
    assert "student block has no field qkv_bais" in err.message
    assert "+student.qkv_bais=..." in err.hint
    (err,) = errors_of(KD, ["train.optimizer.momentum=0.9"])
    assert "has no argument momentum" in err.message


def test_plus_adds_and_refuses_what_exists() -> None:
    spec, diags, _ = load_spec(
        KD,
        [
            "+distill.kd.temperature=4",
            "+student.qkv_bias=false",
            "+train.optimizer.momentum=0.9",
        ],
    )
    assert not [d for d in diags if d.is_error]
    assert spec.term("kd").temperature == 4 and spec.term("kd").weight == 1
    assert spec.student.extra == {"qkv_bias": False}
    assert spec.train.optimizer.kwargs == {"momentum": 0.9}
    errs = errors_of(
        KD,
        [
            "+distill.nkd.weight=2",
            "+train.epochs=3",
            "+distill.mimic2.weight=1",
            "+student.drop_path=0.1",
        ],
    )
    messages = [e.message for e in errs]
    assert "cannot add distill.nkd.weight: the recipe already has a distill term 'nkd'" in (
        messages
    )
    assert any(m.startswith("cannot add train.epochs") for m in messages)
    assert "cannot add a distill term 'mimic2' from an override" in messages
    assert any(m.startswith("cannot add student.drop_path") for m in messages)
    assert [e.span.line for e in errs] == [1, 2, 3, 4]
    # ++ sets whether or not the recipe has it.
    spec = load_spec(KD, ["++distill.kd.weight=0.5", "++train.epochs=3"])[0]
    assert spec.term("kd").weight == 0.5 and spec.train.epochs == 3


def test_a_teacher_is_added_with_plus_only() -> None:
    base = RECIPES / "quickstart_baseline.vkd"
    (err,) = errors_of(base, ["teacher.drop_path=0.1"])
    assert "the recipe has no teacher" in err.message and "+teacher.model=NAME" in err.hint
    spec = load_spec(base, ["+teacher.model=deit_small_patch16_224"])[0]
    assert spec.teacher is not None and spec.teacher.model == "deit_small_patch16_224"


def test_tilde_removes_a_term_or_a_written_field() -> None:
    spec, diags, _ = load_spec(KD, ["~distill.nkd", "~distill.labels"])
    assert not [d for d in diags if d.is_error]
    assert [t.name for t in spec.terms] == ["mimic", "generate"]  # labels not added back
    spec, diags, _ = load_spec(
        RECIPES / "quickstart_baseline.vkd", ["~train.optimizer.weight_decay"]
    )
    assert not [d for d in diags if d.is_error]
    assert spec.train.optimizer.weight_decay == 0.0  # the optimizer's own default
    errs = errors_of(KD, ["~distill.kd", "~student.drop_path", "~train.clip_grad=3"])
    assert [e.message for e in errs] == [
        "no distill term named 'kd'",
        "cannot remove student.drop_path: the student block does not set drop_path",
        "~PATH removes and takes no value, got '~train.clip_grad=3'",
    ]
    # Nothing left to learn from is an error at the ~, not an empty loss.
    (err,) = errors_of(RECIPES / "quickstart_baseline.vkd", ["~distill.labels"])
    assert "leaves the recipe without a loss term" in err.message and err.span.file == "--set"


def test_the_same_path_twice_is_an_error_naming_both() -> None:
    errs = errors_of(KD, ["train.epochs=1", "data.workers=0", "train.epochs=5"])
    assert len(errs) == 1
    assert errs[0].message == (
        "train.epochs is given twice: --set train.epochs=1 and --set train.epochs=5"
    )
    assert errs[0].span.line == 3 and "argument 1" in errs[0].hint
    (err,) = errors_of(KD, ["+distill.kd.weight=1", "distill.kd.weight=2"])
    assert "distill.kd.weight is given twice" in err.message


def test_a_written_call_replaces_the_whole_call(tmp_path) -> None:
    write(
        tmp_path,
        "base.vkd",
        """
        student deit_tiny_patch16_224
        train { optimizer = adamw(lr = 1e-3, weight_decay = 0.1) }""",
    )
    child = write(
        tmp_path,
        "child.vkd",
        """
        extends "base.vkd"
        train { optimizer = sgd(lr = 0.1) }""",
    )
    spec = load_spec(child)[0]
    assert spec.train.optimizer.name == "sgd" and spec.train.optimizer.weight_decay == 0.0
    origins = spec.call_origins(spec.train.optimizer)
    assert origins["lr"] == "this file" and origins["weight_decay"] == "default"
    base = tmp_path / "base.vkd"
    spec = load_spec(base, ["train.optimizer=sgd(lr=0.1)"])[0]
    assert spec.train.optimizer.weight_decay == 0.0
    assert spec.call_origins(spec.train.optimizer)["lr"] == "--set"
    # One argument changed: the others are the call's as written.
    spec = load_spec(base, ["train.optimizer.lr=0.5"])[0]
    assert (spec.train.optimizer.lr, spec.train.optimizer.weight_decay) == (0.5, 0.1)
    assert load_spec(child)[0].call_origins(load_spec(child)[0].train.schedule)["min_lr"] == (
        "default"
    )
    # No optimizer written: the default call (DeiT's AdamW), one argument changed.
    bare = write(tmp_path, "bare.vkd", "student deit_tiny_patch16_224")
    spec = load_spec(bare, ["train.optimizer.lr=0.5"])[0]
    assert (spec.train.optimizer.lr, spec.train.optimizer.weight_decay) == (0.5, 0.05)
    spec = load_spec(RECIPES / "deit_tiny_vitkd_kd.vkd")[0]
    assert spec.call_origins(spec.train.optimizer)["lr"] == "base recipes/base/deit_imagenet.vkd"


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


SECRET = "".join(f"token_{i}: hunter{i}\n" for i in range(24))


@pytest.mark.parametrize("keyword", ["extends", "teacher from"])
def test_extends_and_teacher_from_never_echo_a_file_that_is_not_a_recipe(tmp_path, keyword) -> None:
    """A readable file that is not a .vkd recipe is refused by its name, at the path string,
    without being read: its lines never reach the diagnostics (or a CI log)."""
    (tmp_path / "secrets.env").write_text(SECRET)
    line = f'{keyword} "secrets.env"'
    distill = "distill { kd {} }\n" if keyword == "teacher from" else ""
    (tmp_path / "r.vkd").write_text(f"{line}\nstudent vit_tiny_patch16_224\n{distill}")
    _, diags, sources = vitkdl.validate(tmp_path / "r.vkd")
    errors = [d for d in diags if d.is_error]
    assert len(errors) == 1
    assert errors[0].message.startswith(f"`{keyword}` names ")
    assert errors[0].message.endswith("secrets.env, not a .vkd recipe")
    assert errors[0].span is not None
    assert (Path(errors[0].span.file).name, errors[0].span.line) == ("r.vkd", 1)
    assert errors[0].span.column == len(keyword) + 2  # the opening quote of the path
    shown = "\n".join(render(d, sources) for d in diags)
    assert "hunter" not in shown and "token_" not in shown
    assert not any("secrets" in name for name in sources.texts)


def test_a_link_named_vkd_to_another_file_is_refused_too(tmp_path) -> None:
    (tmp_path / "secrets.env").write_text(SECRET)
    (tmp_path / "base.vkd").symlink_to(tmp_path / "secrets.env")
    (tmp_path / "r.vkd").write_text('extends "base.vkd"\nstudent vit_tiny_patch16_224\n')
    _, diags, sources = vitkdl.validate(tmp_path / "r.vkd")
    errors = [d for d in diags if d.is_error]
    assert [d.message.split(", ", 1)[-1] for d in errors] == [
        "a link to a file that is not a .vkd recipe"
    ]
    assert "hunter" not in "\n".join(render(d, sources) for d in diags)


def test_a_base_vkd_with_syntax_errors_shows_them_as_a_recipe(tmp_path) -> None:
    """An included .vkd is a recipe: its syntax errors keep their file, line and snippet."""
    (tmp_path / "base.vkd").write_text("train {\n  epochs = = 3\n}\n")
    (tmp_path / "r.vkd").write_text('extends "base.vkd"\nstudent vit_tiny_patch16_224\n')
    _, diags, sources = vitkdl.validate(tmp_path / "r.vkd")
    errors = [d for d in diags if d.is_error]
    assert errors and all(Path(d.span.file).name == "base.vkd" for d in errors if d.span)
    assert "epochs = = 3" in render(errors[0], sources)


def test_every_override_root_the_error_lists_is_applied() -> None:
    from vitkdl.spec import _OVERRIDE_HANDLERS

    """An unknown root lists the roots; each listed root goes to its own handler (its errors
    are about the path below it, never an unknown root)."""
    recipe = RECIPES / "deit_tiny_vitkd_kd.vkd"
    with pytest.raises(VkdError) as info:
        vitkdl.load(recipe, overrides=["trian.epochs=1"])
    (unknown,) = info.value.errors
    roots = unknown.expected.split(", ")
    assert roots == list(_OVERRIDE_HANDLERS)  # the table's keys, in its order
    assert roots == ["teacher", "student", "data", "train", "distill", "recipe"]
    for root in roots:
        with pytest.raises(VkdError) as info:
            vitkdl.load(recipe, overrides=[f"{root}.nosuch=1"])
        messages = [d.message for d in info.value.errors]
        assert messages and not any("unknown override path" in m for m in messages), messages
