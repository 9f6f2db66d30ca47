"""The tables a run prints: what they say about runs that --max-steps stopped early."""

from __future__ import annotations

import io
import json
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


def test_a_torn_last_line_is_dropped_on_resume_with_a_note(tmp_path) -> None:
    from vitkdl.train.report import MetricsLog, read_metrics

    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
    # A crash mid-write: the last record without its end.
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 4, "lo')
    assert read_metrics(path) == records  # the curves skip it too
    log = MetricsLog(path, tensorboard=False, resume_step=2)
    assert log.note is not None and "line(s) (4;" in log.note and str(path) in log.note
    log.write({"step": 3, "loss": 0.5})
    assert read_metrics(path) == [*records[:2], {"step": 3, "loss": 0.5}]
    assert MetricsLog(path, tensorboard=False, resume_step=3).note is None  # nothing torn now
