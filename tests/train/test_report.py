"""The tables a run prints: what they say about runs that --max-steps stopped early."""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console

from vitkdl.runs import stopped_early
from vitkdl.train.report import comparison_table, experiment_notes, summary_table


def text(renderable: Any) -> str:
    buf = io.StringIO()
    Console(file=buf, width=200, no_color=True).print(renderable)
    return " ".join(buf.getvalue().split())


def run(recipe: str, steps: int, **extra: Any) -> dict[str, Any]:
    return {
        "recipe": recipe,
        "top1": 50.0,
        "epochs": 1,
        "steps": steps,
        "planned_steps": 22,
        "complete": steps >= 22,
        **extra,
    }


def test_stopped_early_names_the_step_and_the_plan() -> None:
    assert stopped_early(run("a", 3)) == "stopped early at step 3 of 22"
    assert stopped_early(run("a", 22)) is None
    # A summary from before planned_steps was recorded still says where it stopped.
    old = {"recipe": "a", "steps": 7, "complete": False}
    assert stopped_early(old) == "stopped early at step 7"


def test_tables_say_which_runs_stopped_early() -> None:
    teacher = {"recipe": "t", "steps": 3, "planned_steps": 22}
    partial = run("student", 3, teacher_stopped_early=teacher)
    full = run("base", 22)
    own = text(summary_table(partial))
    assert "stopped early │ at step 3 of 22; teacher at step 3 of 22 │" in own
    assert "stopped early" not in text(summary_table(full))
    table = text(comparison_table([partial, full]))
    assert "stopped early" in table and "│ at step 3 of 22; teacher at step 3 of 22 │" in table
    assert "│ - │" in table  # the full run's entry
    assert "stopped early" not in text(comparison_table([full, run("other", 22)]))


def test_an_experiment_report_notes_its_partial_runs() -> None:
    report = {
        "arms": [{"stats": {"n": 2}, "vs_baseline": None}],
        "stopped_early": [
            {"run": "student seed 0", "note": "stopped early at step 3 of 22"},
            {"run": "student seed 1", "note": "stopped early at step 3 of 22"},
        ],
    }
    notes = " ".join(experiment_notes(report))
    assert "stopped early by --max-steps (at step 3 of 22): 2 of the runs" in notes
    assert "stopped early" not in " ".join(experiment_notes({**report, "stopped_early": []}))
