"""``vitkdl explain``'s additions for a researcher: the arguments each model goes to timm
with, a sweep's cells and seeds, and the warning for an extreme per-element coefficient."""

from __future__ import annotations

import json

import pytest

import vitkdl
from tests.cli import run
from tests.conftest import RECIPES
from vitkdl.planner import COEFFICIENT_RANGE


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # one line per row, whatever the table holds


def test_model_arguments_as_they_go_to_timm(capsys, tmp_path) -> None:
    recipe = tmp_path / "args.vkd"
    recipe.write_text(
        f'extends "{RECIPES / "quickstart.vkd"}"\n'
        "student vit_tiny_patch16_224 { drop_path = 0.1  qkv_bias = false }\n"
    )
    code, out, err = run(capsys, "explain", str(recipe))
    assert code == 0, err
    student = next(line for line in out.splitlines() if line.startswith("  student: timm."))
    teacher = next(line for line in out.splitlines() if line.startswith("  teacher: timm."))
    assert "create_model('vit_tiny_patch16_224', " in student
    assert "drop_path_rate=0.1" in student and "qkv_bias=False" in student
    assert "drop_path_rate" not in teacher  # the teacher's are its own
    code, out, _ = run(capsys, "explain", str(recipe), "--json")
    kwargs = json.loads(out)["student"]["timm_kwargs"]
    assert kwargs["drop_path_rate"] == 0.1 and kwargs["qkv_bias"] is False
    assert f"num_classes={kwargs['num_classes']}" in student


def test_sweep_cells_and_seeds(capsys, tmp_path) -> None:
    recipe = tmp_path / "sweep.vkd"
    recipe.write_text(
        f'extends "{RECIPES / "quickstart.vkd"}"\n'
        "sweep {\n"
        "    distill.generate.mask = [0.25, 0.5, 0.75]\n"
        "    train.optimizer.lr = [1e-3, 5e-4]\n"
        "    seeds = [0, 1]\n"
        "}\n"
    )
    code, out, err = run(capsys, "explain", str(recipe))
    assert code == 0, err
    assert "sweep: 6 cells x 2 seeds = 12 runs" in out
    assert "distill.generate.mask = [0.25, 0.5, 0.75]" in out
    assert "train.optimizer.lr = [1e-3, 5e-4]" in out and "seeds = [0, 1]" in out
    code, out, _ = run(capsys, "explain", str(recipe), "--json")
    sweep = json.loads(out)["sweep"]
    assert sweep["cells"] == 6 and sweep["runs"] == 12 and sweep["seeds"] == ["0", "1"]
    assert sweep["axes"]["train.optimizer.lr"] == ["1e-3", "5e-4"]


def test_no_sweep_no_sweep_line(capsys) -> None:
    code, out, _ = run(capsys, "explain", "recipes/quickstart.vkd")
    assert code == 0 and "sweep:" not in out
    code, out, _ = run(capsys, "explain", "recipes/quickstart.vkd", "--json")
    assert "sweep" not in json.loads(out)


RELATION = (
    'extends "{base}"\n'
    "distill {{\n"
    "    mimic student.blocks[0] -> teacher.blocks[0] as rel {{ loss = relation  weight = 1 }}\n"
    "}}\n"
)


def test_extreme_coefficient_warns_at_the_weight(capsys, tmp_path) -> None:
    recipe = tmp_path / "rel.vkd"
    recipe.write_text(RELATION.format(base=RECIPES / "deit_tiny_vitkd.vkd"))
    spec, diags, _ = vitkdl.validate(recipe)
    entry = next(t for t in vitkdl.plan(spec).terms if t.name == "rel")
    assert entry.coefficient > COEFFICIENT_RANGE[1]  # 196 x 196 token pairs at weight 1
    (warn,) = [d for d in diags if "coefficient" in d.message]
    assert not warn.is_error and "mimic 'rel'" in warn.message and "very large" in warn.message
    assert warn.span is not None and warn.span.file.endswith("rel.vkd")
    assert (warn.span.line, warn.span.column) == (3, 76)  # `weight = 1`
    assert "weight = 2.6e-5 gives coefficient 1" in (warn.hint or "")
    # explain prints it too (through the same diagnostics), and still succeeds
    code, _, err = run(capsys, "explain", str(recipe))
    assert code == 0 and "per-element coefficient 38400" in err


def test_tiny_coefficient_warns(tmp_path) -> None:
    # the paper's 3e-5 (for the sum-reduced mse) left on the mean-reduced mse_mean
    _, diags, _ = vitkdl.validate(RECIPES / "deit_tiny_vitkd.vkd", ["distill.mimic.loss=mse_mean"])
    (warn,) = [d for d in diags if "coefficient" in d.message]
    assert "very small" in warn.message and warn.span is not None and warn.span.line == 15


def test_shipped_recipes_do_not_warn() -> None:
    from tests.conftest import shipped_recipes

    for path in shipped_recipes():
        _, diags, _ = vitkdl.validate(path, sweep=False)
        assert not [d for d in diags if "coefficient" in d.message], path


def test_render_plan_is_its_sections_in_order() -> None:
    """``explain`` prints one section after the other, each from its own renderer."""
    from rich.console import Console

    from vitkdl.cli import explain

    plan = vitkdl.plan(vitkdl.load(RECIPES / "deit_base_vitkd_kd.vkd"))

    def text(render, *args) -> str:
        console = Console(record=True, width=400)
        render(plan, console, *args)
        return console.export_text()

    sections = {
        "recipe ": text(explain._render_header),
        "models": text(explain._render_models),
        "distill terms": text(explain._render_terms),
        "data and training": text(explain._render_setup, None),
        "cost per training image": text(explain._render_cost),
    }
    assert text(explain.render_plan, None) == "".join(sections.values())
    for title, section in sections.items():
        assert section.startswith(title), (title, section[:80])


METHODS = ["srrl", "manifold", "kd", "dkd", "dist", "wsld"]


@pytest.mark.parametrize("name", [*METHODS, *(f"imagenet/{m}" for m in METHODS)])
def test_methods_explain_golden(capsys, name) -> None:
    """Each method's formula and coefficients as ``explain`` prints them (issue 19)."""
    from tests.conftest import GOLDEN, check_golden

    code, out, err = run(capsys, "explain", f"recipes/methods/{name}.vkd")
    assert code == 0, err
    check_golden(GOLDEN / "explain" / "methods" / f"{name.replace('/', '_')}.txt", out)
