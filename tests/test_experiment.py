"""Experiments on the language side: sweep blocks, --grid and --seeds, positioned errors, the
plan of runs (dependencies shared, baselines under the same seeds) and the report's numbers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

import vitkdl
from vitkdl.errors import Sources, VkdError, render
from vitkdl.experiment import (
    Outcome,
    assemble_report,
    parse_grid,
    parse_seeds,
    plan_experiment,
    read_sweep,
    smoke_overrides,
)
from vitkdl.stats import paired, t_quantile

MODEL = """student vit_tiny_patch16_224 {{
    img_size = 8  patch_size = 2  in_chans = 1  depth = {depth}  embed_dim = {width}
    num_heads = 2  num_classes = 10
}}"""

BASE = f"""recipe base
{MODEL.format(depth=1, width=8)}
data digits {{ batch_size = 64 }}
train {{ epochs = 1  log_every = 5  precision = fp32  compile = off }}
"""

TEACHER = BASE.replace("recipe base", "recipe teacher").replace("embed_dim = 8", "embed_dim = 16")

STUDENT = """recipe student
extends "base.vkd"
teacher from "teacher.vkd"
distill {
    mimic student.blocks[0] -> teacher.blocks[0] { weight = 1e-3 }
    nkd
}
"""

SWEEP = """recipe ablation
extends "student.vkd"
sweep {
    distill.mimic.weight = [1e-3, 1e-2]
    seeds = [0, 1, 2]
}
"""


@pytest.fixture
def recipes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name, text in (
        ("base", BASE),
        ("teacher", TEACHER),
        ("student", STUDENT),
        ("ablation", SWEEP),
    ):
        (tmp_path / f"{name}.vkd").write_text(text)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def messages(exc: VkdError) -> list[str]:
    return [render(d, exc.sources).splitlines()[0] for d in exc.diagnostics]


def test_the_sweep_block_is_read_with_positions(recipes: Path) -> None:
    sources = Sources()
    grid, diags = read_sweep("ablation.vkd", sources)
    assert diags == []
    (axis,) = grid.axes
    assert axis.path == "distill.mimic.weight" and axis.texts == ("1e-3", "1e-2")
    assert axis.values[1].value.span.line == 4 and axis.values[1].override == (
        "distill.mimic.weight=1e-2"
    )
    assert grid.seeds is not None and grid.seeds.texts == ("0", "1", "2")
    assert [c.label for c in grid.cells()] == ["mimic.weight=1e-3", "mimic.weight=1e-2"]
    # A sweep is the file's own: a recipe that extends it runs once.
    (recipes / "child.vkd").write_text('extends "ablation.vkd"\n')
    assert read_sweep("child.vkd", Sources())[0].empty


def test_a_sweep_block_changes_neither_the_recipe_nor_its_hash(recipes: Path) -> None:
    plain = vitkdl.load("student.vkd")
    swept = vitkdl.load(recipes / "ablation.vkd", ["recipe.name=student"])
    assert swept.hash() == plain.hash() and swept.canonical() == plain.canonical()


def test_grid_and_seed_arguments(recipes: Path) -> None:
    sources = Sources()
    axes, diags = parse_grid(
        [
            "distill.mimic.weight=1e-3, 2e-3",
            'data.root="a,b",/c',
            "train.optimizer=sgd(lr = 1),adamw",
        ],
        sources,
    )
    assert diags == []
    assert [a.texts for a in axes] == [
        ("1e-3", "2e-3"),
        ('"a,b"', "/c"),
        ("sgd(lr = 1)", "adamw"),
    ]
    assert axes[0].values[1].value.span.column == len("distill.mimic.weight=1e-3, ") + 1
    seeds, diags = parse_seeds("0-2, 7", sources)
    assert diags == [] and seeds is not None and seeds.texts == ("0", "1", "2", "7")
    for bad, message in (
        ("0-x", "seeds are whole numbers or ranges"),
        ("3-1", "runs backwards"),
        ("0,1,1", "seed 1 is listed twice"),
    ):
        _, diags = parse_seeds(bad, Sources())
        assert [message in d.message for d in diags] == [True], bad


def test_bad_values_point_at_the_sweep_block_and_the_command_line(recipes: Path) -> None:
    (recipes / "bad.vkd").write_text(
        'extends "student.vkd"\nsweep {\n    distill.nkd.gamma = [1, -1]\n    seeds = [0, -3]\n}\n'
    )
    with pytest.raises(VkdError) as info:
        plan_experiment(["bad.vkd"])
    assert messages(info.value) == [
        "bad.vkd:3:29: error: gamma must be >= 0, got -1.0",
        "bad.vkd:4:17: error: seed must be >= 0, got -3",
    ]
    with pytest.raises(VkdError) as info:
        plan_experiment(["student.vkd"], grid=["distill.mimic.weight=1e-3,-1", "distill.x.y=1"])
    assert messages(info.value) == [
        "--grid:1:27: error: weight must be >= 0, got -1.0",
        "--grid:2:1: error: no distill term named 'x'",
    ]
    with pytest.raises(VkdError) as info:
        plan_experiment(["ablation.vkd"], overrides=["distill.mimic.weight=1"])
    assert messages(info.value) == ["--set:1:1: error: distill.mimic.weight is swept"]
    # `vitkdl validate` checks the block as well, every cell and seed.
    _, diags, _ = vitkdl.validate("bad.vkd")
    assert sorted(d.message for d in diags if d.is_error) == [
        "gamma must be >= 0, got -1.0",
        "seed must be >= 0, got -3",
    ]


def test_the_plan_shares_the_teacher_and_pairs_baselines_by_seed(recipes: Path) -> None:
    experiment, _ = plan_experiment(["ablation.vkd"], grid=["train.epochs=1,2"], seeds="0-1")
    roles = [r.role for r in experiment.runs]
    assert roles.count("teacher") == 1 and experiment.runs[0].role == "teacher"  # first
    recipe_runs = [r for r in experiment.runs if r.role == "recipe"]
    assert len(recipe_runs) == 2 * 2 * 2  # weights x epochs x seeds
    assert all(r.deps == (experiment.runs[0].key,) for r in recipe_runs)
    # The baseline runs under what reaches it (epochs, seed), not the distill values: once
    # per (epochs, seed), shared by both weights.
    baselines = [r for r in experiment.runs if r.role == "baseline"]
    assert sorted(r.overrides for r in baselines) == sorted(
        (f"train.epochs={e}", f"train.seed={s}") for e in (1, 2) for s in (0, 1)
    )
    assert len({r.key for r in experiment.runs}) == len(experiment.runs)
    arms = experiment.arms
    assert [a.label for a in arms if a.role == "recipe"] == [
        "ablation mimic.weight=1e-3 epochs=1",
        "ablation mimic.weight=1e-3 epochs=2",
        "ablation mimic.weight=1e-2 epochs=1",
        "ablation mimic.weight=1e-2 epochs=2",
    ]
    for arm in arms:
        if arm.role == "recipe":
            base = arms[arm.baseline or 0]
            assert base.role == "baseline" and base.cell == arm.cell.split(" ")[1]
            assert [s for s, _ in base.runs] == [s for s, _ in arm.runs] == [0, 1]
    assert experiment.seeds == (0, 1) and experiment.label == "ablation"
    # Seed 0 of a cell is the run `vitkdl run --set ...` makes: the same folder.
    same = vitkdl.load(
        "ablation.vkd", ["distill.mimic.weight=1e-3", "train.epochs=1", "train.seed=0"]
    )
    assert recipe_runs[0].key == f"ablation-{same.hash()}"


def test_a_recipe_named_with_its_baseline_is_one_arm(recipes: Path) -> None:
    experiment, _ = plan_experiment(["base.vkd", "student.vkd"], seeds="0-2")
    assert [(a.recipe, a.role, a.baseline) for a in experiment.arms] == [
        ("base", "baseline", None),
        ("student", "recipe", 0),
    ]
    assert len(experiment.runs) == 1 + 3 + 3  # teacher, 3 baselines, 3 students


def _summary(top1: float) -> dict:
    return {"top1": top1, "best_top1": top1, "steps": 10, "wall_seconds": 1.0}


def test_the_report_pairs_seeds_and_counts_wins(recipes: Path) -> None:
    experiment, _ = plan_experiment(["student.vkd"], seeds="0-4")
    base = [86.39, 82.50, 85.83, 86.94, 86.94]
    ours = [89.72, 87.78, 89.72, 85.56, 88.61]
    arms = {a.role: a for a in experiment.arms}
    summaries = {}
    for arm, values in ((arms["baseline"], base), (arms["recipe"], ours)):
        for (_, key), v in zip(arm.runs, values, strict=True):
            summaries[key] = _summary(v)
    outcomes = {r.key: Outcome(r.key, "done") for r in experiment.runs}
    report = assemble_report(experiment, summaries, outcomes, recipes / "runs")
    student = next(a for a in report["arms"] if a["role"] == "recipe")
    vs = student["vs_baseline"]
    want = paired(ours, base)
    assert vs["n"] == 5 and vs["mean"] == pytest.approx(want.mean)
    assert (vs["wins"], vs["ties"], vs["losses"]) == (4, 0, 1)
    half = t_quantile(0.975, 4) * want.sd / math.sqrt(5)
    assert vs["interval"] == pytest.approx([want.mean - half, want.mean + half])
    assert student["stats"]["mean"] == pytest.approx(sum(ours) / 5)
    assert [r["seed"] for r in student["runs"]] == [0, 1, 2, 3, 4]
    assert all(r["folder"].startswith(str(recipes / "runs")) for r in student["runs"])

    # A failed run leaves its seed out of the pairs (n says so) and is listed.
    failed_key = arms["recipe"].runs[3][1]
    outcomes[failed_key] = Outcome(failed_key, "failed", "the loss became NaN")
    report = assemble_report(experiment, summaries, outcomes, recipes / "runs")
    student = next(a for a in report["arms"] if a["role"] == "recipe")
    assert student["vs_baseline"]["n"] == 4 and student["vs_baseline"]["wins"] == 4
    assert student["runs"][3]["status"] == "failed" and student["runs"][3]["top1"] is None
    assert [f["message"] for f in report["not_ok"]] == ["the loss became NaN"]


def test_max_steps_reaches_a_teacher_as_in_a_single_run(recipes: Path) -> None:
    experiment, _ = plan_experiment(["teacher.vkd", "student.vkd"], max_steps=3)
    teacher = next(r for r in experiment.runs if r.recipe == "teacher")
    assert teacher.max_steps == 3  # the whole graph, as `vitkdl run` without --seeds
    assert experiment.runs[0] == teacher and experiment.teachers == (teacher.key,)
    student = next(r for r in experiment.runs if r.recipe == "student")
    assert student.max_steps == 3 and student.deps == (teacher.key,)


def test_the_command_line_adds_and_replaces_axes_of_a_sweep_block(recipes: Path) -> None:
    experiment, _ = plan_experiment(
        ["ablation.vkd"],
        grid=["distill.mimic.weight=5e-3", "distill.nkd.gamma=1,2"],
        seeds="4",
    )
    assert experiment.axes == (
        ("distill.mimic.weight", ("5e-3",)),  # replaced
        ("distill.nkd.gamma", ("1", "2")),  # added
    )
    assert experiment.seeds == (4,)  # replaced the block's 0, 1, 2
    recipe_runs = [r for r in experiment.runs if r.role == "recipe"]
    assert [r.overrides for r in recipe_runs] == [
        ("distill.mimic.weight=5e-3", "distill.nkd.gamma=1", "train.seed=4"),
        ("distill.mimic.weight=5e-3", "distill.nkd.gamma=2", "train.seed=4"),
    ]


def test_grid_paths_follow_the_override_rules(recipes: Path) -> None:
    # A plain path changes only what the recipe has; + adds (each cell adds the term).
    with pytest.raises(VkdError) as info:
        plan_experiment(["student.vkd"], grid=["distill.kd.weight=0.5,1"])
    assert messages(info.value) == ["--grid:1:1: error: no distill term named 'kd'"]
    experiment, _ = plan_experiment(["student.vkd"], grid=["+distill.kd.weight=0.5,1"])
    recipe_runs = [r for r in experiment.runs if r.role == "recipe"]
    assert [r.overrides for r in recipe_runs] == [
        ("+distill.kd.weight=0.5",),
        ("+distill.kd.weight=1",),
    ]
    spec = vitkdl.load("student.vkd", recipe_runs[0].overrides)
    assert spec.term("kd").weight == 0.5
    # ~ is not a value to sweep; the same path twice is an error naming both.
    _, diags = parse_grid(["~distill.nkd=1", "train.epochs=1,2", "train.epochs=3"], Sources())
    assert [d.message for d in diags] == [
        "a grid axis sets values; ~PATH (remove) is not one",
        "train.epochs is given twice: --grid train.epochs=1,2 and --grid train.epochs=3",
    ]
    assert [d.span.line for d in diags] == [1, 3]
    # A --set of a swept path is the same path twice, with or without +.
    with pytest.raises(VkdError) as info:
        plan_experiment(
            ["student.vkd"], grid=["+distill.kd.weight=0.5,1"], overrides=["+distill.kd.weight=2"]
        )
    assert messages(info.value) == ["--set:1:1: error: distill.kd.weight is swept"]


def test_smoke_settings_leave_the_users_own_paths_alone(recipes: Path) -> None:
    spec = vitkdl.load("student.vkd")
    smoke = smoke_overrides(spec, ["train.epochs=2", "+data.workers=1"])
    assert not any(o.startswith(("train.epochs=", "data.workers=")) for o in smoke)
    assert "data.source=synthetic" in smoke
    # The user's value is the one used, and is not "given twice".
    experiment, _ = plan_experiment(["base.vkd"], overrides=["train.epochs=2"], smoke=True)
    assert [vitkdl.load("base.vkd", r.overrides).train.epochs for r in experiment.runs] == [2]
