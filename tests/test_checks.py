"""Stage 3: a catalogue of broken recipes, one per check, with golden diagnostics.

Each ``tests/golden/broken/NAME.vkd`` has its expected ``vitkdl validate`` report in
``NAME.txt``. ``UPDATE_GOLDEN=1 pytest tests/test_checks.py`` rewrites them after a deliberate
change; review the diff.
"""

from __future__ import annotations

import pytest

import vitkdl
from tests.conftest import GOLDEN, check_golden
from vitkdl.checks import CHECKS, resolve_tap
from vitkdl.errors import render
from vitkdl.models import model_facts
from vitkdl.spec import SliceSpec, TapSpec

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
    assert {p.point for p in got} == {"out"}
    got, errs = resolve_tap(TapSpec(side="student", point="blocks", index=(12,)), facts)
    assert got == [] and "out of range" in errs[0].message
    assert resolve_tap(TapSpec(side="teacher", point="norm"), facts)[0][0].key == "norm"
    attn, _ = resolve_tap(TapSpec(side="student", point="blocks", index=(1,), sub="attn"), facts)
    assert attn[0].key == "blocks.1.attn"


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
