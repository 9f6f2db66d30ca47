"""Stage 3: a catalogue of broken recipes, one per check, with golden diagnostics.

Each ``tests/golden/broken/NAME.vkd`` has its expected ``vitkdl validate`` report in
``NAME.txt``. ``UPDATE_GOLDEN=1 pytest tests/test_checks.py`` rewrites them after a deliberate
change; review the diff.
"""

from __future__ import annotations

from typing import get_args

import pytest

import vitkdl
from tests.conftest import GOLDEN, check_golden
from vitkdl.checks import CHECKS, resolve_tap
from vitkdl.errors import render
from vitkdl.models import model_facts
from vitkdl.nodes import TAP_SUBPOINTS, SliceSpec, TapSpec
from vitkdl.terms.base import Point, points_words

BROKEN = sorted((GOLDEN / "broken").glob("*.vkd"))


def report(name: str) -> tuple[str, int]:
    _spec, diags, sources = vitkdl.validate(name)
    text = "\n".join(render(d, sources) for d in sorted(diags, key=lambda d: d.sort_key()))
    return text + "\n", sum(d.is_error for d in diags)


def test_catalogue_is_large() -> None:
    assert len(BROKEN) >= 20


@pytest.mark.parametrize("path", BROKEN, ids=lambda p: p.stem)
def test_broken_recipe_diagnostics(path, monkeypatch) -> None:
    monkeypatch.chdir(path.parent)
    text, errors = report(path.name)
    check_golden(path.with_suffix(".txt"), text)
    # Every catalogue entry but the data-root one (a warning until `run`) is an error.
    if path.stem == "missing_data_root":
        assert errors == 0 and "warning: data root" in text
    else:
        assert errors >= 1
    for line in text.splitlines():
        if ": error: " in line or ": warning: " in line:
            _file, lineno, col = line.split(":")[:3]
            assert lineno.isdigit() and col.isdigit(), line


def test_many_errors_are_reported_in_one_run(monkeypatch) -> None:
    monkeypatch.chdir(GOLDEN / "broken")
    _text, errors = report("many_errors.vkd")
    assert errors >= 7


def test_strict_turns_missing_paths_into_errors(monkeypatch) -> None:
    monkeypatch.chdir(GOLDEN / "broken")
    _, diags, _ = vitkdl.validate("missing_data_root.vkd", strict=True)
    assert [d.message for d in diags if d.is_error] == ["data root no/such/imagenet does not exist"]


def test_checks_are_small_pure_functions() -> None:
    assert len(CHECKS) >= 10
    assert all(callable(c) and c.__doc__ for c in CHECKS)


def test_resolve_tap_indices() -> None:
    facts = model_facts("deit_tiny_patch16_224", {"depth": 12})
    tap = TapSpec(
        side="student", point="blocks", index=(0, -1, SliceSpec(start=2, stop=12, step=3))
    )
    got, errs = resolve_tap(tap, facts)
    assert [p.block for p in got] == [0, 11, 2, 5, 8, 11] and not errs
    assert {p.point for p in got} == {"mlp"}
    got, errs = resolve_tap(TapSpec(side="student", point="blocks", index=(12,)), facts)
    assert got == [] and "out of range" in errs[0].message
    assert resolve_tap(TapSpec(side="teacher", point="norm"), facts)[0][0].key == "norm"
    attn, _ = resolve_tap(TapSpec(side="student", point="blocks", index=(1,), sub="attn"), facts)
    assert attn[0].key == "blocks.1.attn"


def test_one_tap_vocabulary_from_recipe_to_plan() -> None:
    """A resolved point is spelt as the recipe spells it: ``blocks[1].mlp`` and plain
    ``blocks[1]`` are both the point ``mlp``, and every point a recipe can write inside a
    block is a plan point."""
    facts = model_facts("deit_tiny_patch16_224", {"depth": 2})
    assert set(TAP_SUBPOINTS) <= set(get_args(Point))
    for sub in TAP_SUBPOINTS:
        tap = TapSpec(side="student", point="blocks", index=(1,), sub=sub)
        assert [p.point for p in resolve_tap(tap, facts)[0]] == [sub]
    plain = resolve_tap(TapSpec(side="student", point="blocks", index=(1,)), facts)[0]
    assert (
        plain
        == resolve_tap(TapSpec(side="student", point="blocks", index=(1,), sub="mlp"), facts)[0]
    )


def test_one_error_per_cause(tmp_path) -> None:
    """An index out of range is one error: no 'pairs 1 student taps with 0 teacher taps'
    after it. A misspelt schedule speaks of the schedule, as the user wrote it."""
    path = tmp_path / "r.vkd"
    path.write_text(
        "teacher deit3_small_patch16_224\nstudent deit_tiny_patch16_224\n"
        "distill { mimic student.blocks[0] -> teacher.blocks[12] }\n"
        "train { schedule = cosin(min_lr = 1e-5) }\n"
    )
    _, diags, _ = vitkdl.validate(path)
    errors = [d.message for d in diags if d.is_error]
    assert errors == [
        "unknown choice 'cosin' for schedule",
        "block index 12 is out of range: the teacher has 12 blocks",
    ]


def test_embed_dim_not_a_multiple_of_num_heads_is_one_error_at_the_field(tmp_path) -> None:
    """timm asserts ``dim % num_heads == 0`` while building; the error states the constraint
    at the field written, not as an AssertionError at the model name."""
    path = tmp_path / "r.vkd"
    path.write_text(
        "student vit_tiny_patch16_224 {\n  num_heads = 6\n  embed_dim = 200\n}\ndata digits {}\n"
    )
    _, diags, _ = vitkdl.validate(path)
    errors = [d for d in diags if d.is_error]
    assert [d.message for d in errors] == [
        "embed_dim = 200 is not a multiple of num_heads = 6 (each head gets embed_dim / "
        "num_heads channels)"
    ]
    assert errors[0].span is not None and errors[0].span.line == 3
    assert errors[0].hint is not None and "num_heads = " in errors[0].hint


@pytest.mark.parametrize(
    ("field", "suggestion"),
    [("wieghts", "did you mean 'weights'?"), ("drop_pth", "did you mean 'drop_path'")],
)
def test_a_misspelt_model_field_suggests_the_name_a_recipe_writes(
    tmp_path, field, suggestion
) -> None:
    """Unknown model fields go to timm; when timm refuses one, the suggestion is among
    vitkdl's own fields too (`weights`) and in the recipe's spelling (`drop_path`, not
    timm's `drop_path_rate`)."""
    path = tmp_path / "r.vkd"
    path.write_text(f"student vit_tiny_patch16_224 {{\n  {field} = 0.1\n}}\ndata digits {{}}\n")
    _, diags, _ = vitkdl.validate(path)
    errors = [d for d in diags if d.is_error]
    assert [d.message for d in errors] == [f"vit_tiny_patch16_224 takes no argument '{field}'"]
    assert errors[0].span is not None and errors[0].span.line == 2
    assert errors[0].hint is not None and errors[0].hint.startswith(suggestion)
    assert "drop_path_rate" not in errors[0].hint


# A teacher head the weights do not provide (issue 16, item 4)

TINY = "img_size = 16  patch_size = 4  depth = 1  embed_dim = 16  num_heads = 2  num_classes = 10"


def _validate(tmp_path, monkeypatch, teacher: str, term: str = "kd { }") -> list:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.vkd").write_text(
        f"teacher {teacher}\n"
        f"student deit_tiny_patch16_224 {{ {TINY} }}\n"
        "data synthetic { image_size = 16 }\n"
        f"distill {{ {term} }}\n"
    )
    _spec, diags, _ = vitkdl.validate("r.vkd")
    return diags


def _safetensors(path, shapes: dict[str, list[int]]) -> None:
    """A safetensors file with zero-filled float32 tensors of these shapes."""
    import json
    import math

    header, offset = {}, 0
    for key, shape in shapes.items():
        size = 4 * math.prod(shape)
        header[key] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(offset))


@pytest.mark.parametrize("term", ["kd { }", "nkd { }", "token { }"])
def test_a_logit_term_on_a_teacher_without_weights_is_an_error(tmp_path, monkeypatch, term) -> None:
    diags = _validate(tmp_path, monkeypatch, f"deit_small_patch16_224 {{ {TINY} }}", term)
    errors = [d.message for d in diags if d.is_error]
    kind = term.split()[0]
    assert (
        f"{kind} reads the teacher's logits, but the teacher has no weights: "
        "its head would be random" in errors
    )
    head = next(d for d in diags if "its head would be random" in d.message)
    assert "head = random" in (head.hint or "")
    # one error for the cause: no warning about random features beside it
    assert not any("random features" in d.message for d in diags)


def test_head_random_says_a_random_teacher_head_is_meant(tmp_path, monkeypatch) -> None:
    diags = _validate(tmp_path, monkeypatch, f"deit_small_patch16_224 {{ {TINY}  head = random }}")
    assert not [d for d in diags if d.is_error]


def test_a_feature_term_needs_no_teacher_head(tmp_path, monkeypatch) -> None:
    diags = _validate(
        tmp_path,
        monkeypatch,
        f"deit_small_patch16_224 {{ {TINY} }}",
        "mimic student.blocks[0] -> teacher.blocks[0]",
    )
    assert not [d for d in diags if d.is_error]


def test_a_weights_file_must_hold_the_head(tmp_path, monkeypatch) -> None:
    teacher = f'deit_small_patch16_224 {{ {TINY}  weights = "t.safetensors" }}'
    _safetensors(tmp_path / "t.safetensors", {"head.weight": [10, 16], "head.bias": [10]})
    assert not [d for d in _validate(tmp_path, monkeypatch, teacher) if d.is_error]

    _safetensors(tmp_path / "t.safetensors", {"head.weight": [512, 16]})
    errors = [d for d in _validate(tmp_path, monkeypatch, teacher) if d.is_error]
    assert [d.message for d in errors] == [
        "kd reads the teacher's logits, but the head in t.safetensors (head.weight) has 512 "
        "outputs and the teacher is built with 10 classes: that head would start random"
    ]
    assert "train on data with" not in (errors[0].hint or "")

    _safetensors(tmp_path / "t.safetensors", {"norm.weight": [16]})
    errors = [d.message for d in _validate(tmp_path, monkeypatch, teacher) if d.is_error]
    assert errors == [
        "kd reads the teacher's logits, but the weights file t.safetensors has no head "
        "(head.weight)"
    ]


def test_a_pretrained_tag_without_a_head_is_an_error(tmp_path, monkeypatch) -> None:
    # EVA-02's MIM tag has no classifier; num_classes would only add a random one
    for extra in ("", "num_classes = 10"):
        diags = _validate(
            tmp_path,
            monkeypatch,
            f"eva02_tiny_patch14_224.mim_in22k {{ pretrained = true  {extra} }}",
        )
        errors = [d.message for d in diags if d.is_error]
        assert any(
            "reads the teacher's logits" in m and "eva02_tiny_patch14_224.mim_in22k" in m
            for m in errors
        ), errors
        assert not any("classes and the teacher" in m for m in errors)  # one error per cause


def test_a_num_classes_unlike_the_pretrained_head_is_an_error(tmp_path, monkeypatch) -> None:
    diags = _validate(
        tmp_path,
        monkeypatch,
        "deit_small_patch16_224.fb_in1k { pretrained = true  num_classes = 10 }",
    )
    error = next(d for d in diags if "reads the teacher's logits" in d.message)
    assert "1000-output head" in error.message and "built with 10 classes" in error.message
    assert "train on data with" not in (error.hint or "")
    assert not any("train on data with" in (d.hint or "") for d in diags)


def test_head_is_a_teacher_field(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.vkd").write_text(
        f"student deit_tiny_patch16_224 {{ {TINY}  head = random }}\n"
        "data synthetic { image_size = 16 }\n"
    )
    _spec, diags, _ = vitkdl.validate("r.vkd")
    assert [d.message for d in diags if d.is_error] == [
        "head says where the teacher's head comes from; the student's is trained"
    ]


# Taps that are identities on the model (issue 16, item 3)

AVG = f'{TINY}  global_pool = "avg"'


def _distil(tmp_path, monkeypatch, teacher: str, student: str, distill: str):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.vkd").write_text(
        f"teacher vit_small_patch16_224 {{ {teacher}  head = random }}\n"
        f"student deit_tiny_patch16_224 {{ {student} }}\n"
        "data synthetic { image_size = 16 }\n"
        f"distill {{ {distill} }}\n"
    )
    return vitkdl.validate("r.vkd")


def test_norm_on_an_avg_pool_model_is_an_identity(tmp_path, monkeypatch) -> None:
    spec, diags, _ = _distil(
        tmp_path, monkeypatch, AVG, TINY, "generate student.norm -> teacher.norm"
    )
    assert not [d for d in diags if d.is_error]
    (warn,) = [d for d in diags if "identity" in d.message]
    assert warn.message.startswith("teacher.norm is an identity on vit_small_patch16_224")
    assert "teacher.blocks[-1]" in warn.hint and "teacher.fc_norm" in warn.hint
    assert warn.span == spec.terms[0].teacher[0].span  # at the tap
    plan = vitkdl.plan(spec)
    (s,), (t,) = plan.terms[0].student, plan.terms[0].teacher
    assert t.identity and not s.identity  # the JSON says it too
    assert points_words([t]) == "norm (identity on this model: the last block's output)"
    assert points_words([s]) == "norm"


def test_fc_norm_where_the_model_has_none_is_an_error_naming_norm(tmp_path, monkeypatch) -> None:
    _, diags, _ = _distil(
        tmp_path, monkeypatch, TINY, TINY, "mimic student.blocks[0] -> teacher.fc_norm"
    )
    errors = [d for d in diags if d.is_error]
    assert [d.message for d in errors] == [
        "teacher.fc_norm is an identity on vit_small_patch16_224 (it has no pooled feature "
        "norm): its final norm is norm"
    ]
    assert errors[0].hint == "write teacher.norm"


@pytest.mark.parametrize(
    ("distill", "message"),
    [
        (
            "generate student.blocks[0] -> teacher.fc_norm",
            "teacher.fc_norm is one pooled vector per image, and generate 'generate' compares "
            "patch tokens on a grid",
        ),
        (
            "mimic student.blocks[0] -> teacher.fc_norm",
            "mimic 'mimic' pairs the pooled fc_norm with patch tokens (student.blocks[0])",
        ),
        (
            "mimic student.blocks[0] -> teacher.fc_norm { loss = relation }",
            "teacher.fc_norm is one pooled vector per image, and mimic 'mimic' compares patch "
            "tokens on a grid",
        ),
    ],
)
def test_fc_norm_pairs_only_with_fc_norm_in_a_feature_mimic(
    tmp_path, monkeypatch, distill, message
) -> None:
    _, diags, _ = _distil(tmp_path, monkeypatch, AVG, TINY, distill)
    assert [d.message for d in diags if d.is_error] == [message]


def test_hub_weights_in_the_cache_must_hold_the_head(tmp_path, monkeypatch) -> None:
    from vitkdl import hub

    _safetensors(tmp_path / "model.safetensors", {"norm.weight": [16]})
    monkeypatch.setattr(hub, "cached", lambda repo, files=(): tmp_path / "model.safetensors")
    teacher = f'deit_small_patch16_224 {{ {TINY}  weights = "hf-hub:org/mim" }}'
    errors = [d.message for d in _validate(tmp_path, monkeypatch, teacher) if d.is_error]
    assert errors == [
        "kd reads the teacher's logits, but the weights hf-hub:org/mim has no head (head.weight)"
    ]
    monkeypatch.setattr(hub, "cached", lambda repo, files=(): None)  # not cached: unknown yet
    assert not [d for d in _validate(tmp_path, monkeypatch, teacher) if d.is_error]
