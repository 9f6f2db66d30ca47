"""Runs as a researcher meets them: one folder per resolved recipe, overrides carried to the
baseline, finished runs reused and never replaced without --force."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vitkdl.cli import main
from vitkdl.runs import run_dir
from vitkdl.train import runner

MODEL = """student vit_tiny_patch16_224 {
    img_size = 8  patch_size = 2  in_chans = 1  depth = 1  embed_dim = 8  num_heads = 2
    num_classes = 10
}"""

BASE = f"""recipe base
{MODEL}
data digits {{ batch_size = 64 }}
train {{ epochs = 1  log_every = 50  precision = fp32  compile = off }}
"""

TEACHER = BASE.replace("recipe base", "recipe teacher").replace("embed_dim = 8", "embed_dim = 16")

STUDENT = """recipe student
extends "base.vkd"
teacher from "teacher.vkd"
distill { nkd }
"""


@pytest.fixture
def recipes(tmp_path: Path) -> Path:
    for name, text in (("base", BASE), ("teacher", TEACHER), ("student", STUDENT)):
        (tmp_path / f"{name}.vkd").write_text(text)
    return tmp_path


@pytest.fixture
def trained(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, tuple[str, ...]]]:
    """Every training that actually happens: (recipe, hash, overrides)."""
    calls: list[tuple[str, str, tuple[str, ...]]] = []
    real = runner.train

    def counting(plan, opts, console):  # type: ignore[no-untyped-def]
        calls.append((plan.recipe, plan.hash, tuple(plan.overrides)))
        return real(plan, opts, console)

    monkeypatch.setattr(runner, "train", counting)
    return calls


def summary(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


@pytest.mark.slow
def test_overrides_reach_the_baseline_and_each_run_trains_once(
    recipes: Path, trained, capsys
) -> None:
    runs = recipes / "runs"
    code = main(
        [
            "run",
            str(recipes / "base.vkd"),
            str(recipes / "student.vkd"),
            "--out",
            str(runs),
            "--set",
            "train.seed=1",
            "--quiet",
        ]
    )
    assert code == 0, capsys.readouterr().err
    names = [name for name, _, _ in trained]
    assert sorted(names) == ["base", "student", "teacher"]  # the baseline is not retrained
    base = next(c for c in trained if c[0] == "base")
    assert base[2] == ("train.seed=1",)
    teacher = next(c for c in trained if c[0] == "teacher")
    assert teacher[2] == ()  # a dependency runs as written
    # The comparison: the student and the baseline it was compared with ran with seed 1.
    rows = json.loads((runs / "comparison.json").read_text())
    assert {r["recipe"] for r in rows} == {"base", "student", "teacher"}
    assert all(r["overrides"] == ["train.seed=1"] for r in rows if r["recipe"] != "teacher")
    err = " ".join(capsys.readouterr().err.split())
    assert "its baseline" in err and "is up to date" in err

    # Seed 0 is another run in another folder; the seed-1 runs stay as they were.
    seed1 = summary(run_dir(runs, "base", base[1]))
    trained.clear()
    assert main(["run", str(recipes / "student.vkd"), "--out", str(runs), "--quiet"]) == 0
    assert sorted(name for name, _, _ in trained) == ["base", "student"]
    assert summary(run_dir(runs, "base", base[1])) == seed1
    seed0 = next(c for c in trained if c[0] == "base")
    assert seed0[1] != base[1] and seed0[2] == ()
    assert (runs / "base").resolve() == run_dir(runs, "base", seed0[1]).resolve()  # latest


@pytest.mark.slow
def test_distill_overrides_do_not_reach_the_baseline(recipes: Path, trained) -> None:
    runs = recipes / "runs"
    assert (
        main(
            [
                "run",
                str(recipes / "student.vkd"),
                "--out",
                str(runs),
                "--quiet",
                "--set",
                "distill.nkd.gamma=2",
                "--set",
                "data.batch_size=32",
            ]
        )
        == 0
    )
    base = next(c for c in trained if c[0] == "base")
    assert base[2] == ("data.batch_size=32",)


def test_a_finished_run_is_reused_and_replaced_only_with_force(
    recipes: Path, trained, capsys
) -> None:
    runs = recipes / "runs"
    args = ["run", str(recipes / "base.vkd"), "--out", str(runs), "--quiet"]
    assert main(args) == 0
    folder = run_dir(runs, "base", trained[0][1])
    first = summary(folder)
    assert first["complete"] and (runs / "base" / "summary.json").is_file()
    capsys.readouterr()
    assert main(args) == 0  # reused: nothing trained, nothing written
    assert len(trained) == 1 and summary(folder) == first
    assert "reusing it" in " ".join(capsys.readouterr().err.split())
    (folder / "summary.json").write_text(json.dumps({**first, "top1": -1.0}))  # marked
    assert main([*args, "--force"]) == 0
    assert len(trained) == 2 and summary(folder)["top1"] == first["top1"]  # trained again


def test_an_unfinished_run_is_never_overwritten(recipes: Path, trained, capsys) -> None:
    runs = recipes / "runs"
    args = ["run", str(recipes / "base.vkd"), "--out", str(runs), "--quiet"]
    assert main([*args, "--max-steps", "3"]) == 0
    folder = run_dir(runs, "base", trained[0][1])
    assert not summary(folder)["complete"]
    capsys.readouterr()
    # Nothing failed: the command needs --resume or --force (exit status 2, nothing trained).
    assert main(args) == 2 and len(trained) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "holds an unfinished run" in err and "stopped early at step 3 of 22" in err
    assert "--resume continues it to the end" in err and "--force" in err
    assert main([*args, "--max-steps", "5"]) == 2  # a longer request: --resume continues it
    assert "--resume continues it to step 5" in " ".join(capsys.readouterr().err.split())
    assert main([*args, "--resume"]) == 0  # continues to the end of the epoch
    assert summary(folder)["complete"] and summary(folder)["steps"] == 1437 // 64


def test_max_steps_reaches_the_whole_graph_and_the_same_command_reuses_it(
    recipes: Path, trained, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "250")  # table cells on one line each
    runs = recipes / "runs"
    args = ["run", str(recipes / "student.vkd"), "--out", str(runs), "--max-steps", "3"]
    assert main(args) == 0, capsys.readouterr().err
    assert sorted(name for name, _, _ in trained) == ["base", "student", "teacher"]
    folders = {name: run_dir(runs, name, h) for name, h, _ in trained}
    for name, folder in folders.items():  # the teacher too: a quick pass over the graph
        s = summary(folder)
        assert (s["steps"], s["planned_steps"], s["max_steps"]) == (3, 22, 3), name
        assert not s["complete"]
    teacher = summary(folders["student"])["teacher_stopped_early"]
    assert teacher == {"recipe": "teacher", "steps": 3, "planned_steps": 22}
    out = capsys.readouterr().out
    # The run's table and the comparison: each run's own entry, and the student's teacher's.
    assert out.count("at step 3 of 22") == 6 and out.count("teacher at step 3 of 22") == 2

    assert main(args) == 0  # the same command again: every partial run is reused
    assert len(trained) == 3
    captured = capsys.readouterr()
    err = " ".join(captured.err.split())
    assert err.count("reusing it") == 3 and "as far as --max-steps 3 asks" in err
    assert captured.out.count("at step 3 of 22") == 6


def test_tables_go_to_stdout_and_the_rest_to_stderr(recipes: Path, trained, capsys) -> None:
    args = ["run", str(recipes / "base.vkd"), "--out", str(recipes / "runs")]
    assert main([*args, "--max-steps", "2"]) == 0
    captured = capsys.readouterr()
    assert "student top-1" in captured.out and "epochs / steps" in captured.out
    assert "student top-1" not in captured.err  # the table is not on stderr
    assert "22 steps/epoch" in captured.err and "22 steps/epoch" not in captured.out


def test_a_run_held_by_another_process_is_refused_naming_its_pid(
    recipes: Path, trained, capsys
) -> None:
    import os

    import vitkdl
    from vitkdl.runs import hold

    runs = recipes / "runs"
    folder = run_dir(runs, "base", vitkdl.load(recipes / "base.vkd").hash())
    folder.mkdir(parents=True)
    # The test holds the folder with the lock API itself (as a training `vitkdl run` does):
    # deterministic, and nothing trains.
    with hold(folder):
        code = main(["run", str(recipes / "base.vkd"), "--out", str(runs), "--quiet"])
    assert code == 75 and trained == []
    err = " ".join(capsys.readouterr().err.split())
    assert f"in use by process {os.getpid()}" in err and "Traceback" not in err
    assert not (folder / "metrics.jsonl").exists()  # nothing of the holder's was touched


@pytest.mark.slow
def test_a_held_run_that_needs_no_training_is_reused_but_not_forced(
    recipes: Path, trained, capsys
) -> None:
    from vitkdl.runs import hold

    runs = recipes / "runs"
    args = ["run", str(recipes / "base.vkd"), "--out", str(runs), "--quiet", "--max-steps", "3"]
    assert main(args) == 0 and len(trained) == 1
    folder = run_dir(runs, "base", trained[0][1])
    with hold(folder):  # another process reusing (or retraining) it
        assert main(args) == 0 and len(trained) == 1  # reading a done run is safe
        assert main([*args, "--force"]) == 75 and len(trained) == 1  # retraining is not
    assert main([*args, "--force"]) == 0 and len(trained) == 2


def test_a_plain_run_after_seeds_shows_its_own_overrides(recipes: Path, trained, capsys) -> None:
    """The folders `--seeds 0` trained are reused by `vitkdl run R`; its tables show what this
    command gave (nothing), not the `train.seed=0` the seeds experiment recorded."""
    args = ["run", str(recipes / "student.vkd"), "--out", str(recipes / "runs"), "--max-steps", "3"]
    assert main([*args, "--seeds", "0", "--quiet"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    trained.clear()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert trained == [] and "comparison" in out
    assert "train.seed" not in out


def test_a_run_is_an_experiment_of_one_cell_and_one_seed(recipes: Path, trained, capsys) -> None:
    """`vitkdl run R` and `vitkdl run R --seeds S` (S the recipe's seed) are one experiment:
    the same runs in the same folders (the second trains nothing), and every run is planned
    and checked before any trains (a bad second recipe: nothing trains, in either)."""
    (recipes / "bad.vkd").write_text(
        BASE.replace("recipe base", "recipe bad").replace("epochs = 1", "epochs = 0")
    )
    runs = recipes / "runs"
    for extra in ([], ["--seeds", "0"]):
        code = main(
            ["run", str(recipes / "base.vkd"), str(recipes / "bad.vkd"), "--out", str(runs), *extra]
        )
        # base.vkd is not trained before bad.vkd's error is found (the plain run did that)
        assert code == 2 and trained == [], extra
        assert "epochs must be > 0, got 0" in capsys.readouterr().err
    assert not runs.exists() or not any(runs.glob("base-*"))

    args = ["run", str(recipes / "student.vkd"), "--out", str(runs), "--max-steps", "3"]
    assert main([*args, "--quiet"]) == 0, capsys.readouterr().err
    assert sorted(name for name, _, _ in trained) == ["base", "student", "teacher"]
    folders = sorted(p.name for p in runs.glob("*-*"))
    trained.clear()
    capsys.readouterr()
    assert main([*args, "--seeds", "0"]) == 0  # seed 0: the recipe's own
    assert (
        trained == []
        and sorted(p.name for p in runs.glob("*-*") if p.name != "experiments") == folders
    )
    assert "3 runs, 3 finished already (reused), 0 to run" in " ".join(
        capsys.readouterr().err.split()
    )
    report = json.loads((runs / "experiments" / "student" / "report.json").read_text())
    planned = {Path(r["folder"]).name for a in report["arms"] for r in a["runs"]}
    assert planned | {Path(t["folder"]).name for t in report["teachers"]} == set(folders)
