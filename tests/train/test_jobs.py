"""Experiments end to end: seeds and grids as ordinary runs, reused when finished, failures
reported while the rest go on, killed sweeps continued, runs in parallel processes and
through submitit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from vitkdl.cli import main
from vitkdl.train import runner

MODEL = """student vit_tiny_patch16_224 {{
    img_size = 8  patch_size = 2  in_chans = 1  depth = 1  embed_dim = {width}  num_heads = 2
    num_classes = 10
}}"""

BASE = f"""recipe base
{MODEL.format(width=8)}
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


@pytest.fixture
def recipes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name, text in (("base", BASE), ("teacher", TEACHER), ("student", STUDENT)):
        (tmp_path / f"{name}.vkd").write_text(text)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(autouse=True)
def no_curves(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each run's curves.png costs more than its training here (tested with the loop)."""
    from vitkdl.train import loop

    monkeypatch.setattr(loop, "write_curves", lambda *args, **kwargs: True)


@pytest.fixture
def trained(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, tuple[str, ...]]]:
    """Every training that actually happens: (recipe, overrides)."""
    calls: list[tuple[str, tuple[str, ...]]] = []
    real = runner.train

    def counting(plan, opts, console):  # type: ignore[no-untyped-def]
        calls.append((plan.recipe, tuple(plan.overrides)))
        return real(plan, opts, console)

    monkeypatch.setattr(runner, "train", counting)
    return calls


def report(runs: Path, label: str) -> dict:
    return json.loads((runs / "experiments" / label / "report.json").read_text())


def test_seeds_train_each_run_once_and_a_rerun_trains_nothing(
    recipes: Path, trained, capsys
) -> None:
    args = ["run", "student.vkd", "--seeds", "0-1", "--max-steps", "3", "--out", "runs"]
    assert main(args) == 0, capsys.readouterr().err
    assert sorted(trained) == [
        ("base", ("train.seed=0",)),
        ("base", ("train.seed=1",)),
        ("student", ("train.seed=0",)),
        ("student", ("train.seed=1",)),
        ("teacher", ()),  # once, shared by both seeds, as written (and --max-steps too)
    ]
    first = capsys.readouterr().out
    data = report(recipes / "runs", "student")
    assert data["seeds"] == [0, 1] and [a["role"] for a in data["arms"]] == [
        "baseline",
        "recipe",
    ]
    student = data["arms"][1]
    assert student["vs_baseline"]["n"] == 2 and student["stats"]["n"] == 2
    for run in student["runs"]:  # each seed its own folder, with its own log
        folder = Path(run["folder"])
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["steps"] == 3 and (folder / "log.txt").is_file()
        assert summary["teacher_stopped_early"]["steps"] == 3  # its teacher stopped too
        assert f"train.seed={run['seed']}" in summary["overrides"]
    assert data["teachers"][0]["recipe"] == "teacher"
    folder = recipes / "runs" / "experiments" / "student"
    assert (folder / "report.txt").read_text().startswith("student: top-1 (%) per seed\n")
    assert (folder / "report.png").is_file()
    assert "seed 0" in first and "vs baseline" in first and "report: runs/experiments/" in first
    assert len(data["stopped_early"]) == 5  # two seeds of two arms, and the teacher
    assert "stopped early by --max-steps (at step 3 of 22): 5 of the runs" in " ".join(
        first.split()
    )

    trained.clear()
    assert main(args) == 0
    assert trained == []  # everything reused
    assert capsys.readouterr().out == first  # the same report
    assert report(recipes / "runs", "student") == data


def test_a_grid_puts_every_cell_against_its_baseline(recipes: Path, trained, capsys) -> None:
    args = ["run", "student.vkd", "--grid", "distill.mimic.weight=1e-3,1e-2", "--seeds", "0-1"]
    assert main([*args, "--max-steps", "2", "--out", "runs", "--quiet"]) == 0
    # The baseline does not see the distill values: one run per seed serves both cells.
    assert sorted(name for name, _ in trained) == ["base"] * 2 + ["student"] * 4 + ["teacher"]
    data = report(recipes / "runs", "student")
    assert data["axes"] == {"distill.mimic.weight": ["1e-3", "1e-2"]}
    cells = [a for a in data["arms"] if a["role"] == "recipe"]
    assert [a["cell"] for a in cells] == [
        {"distill.mimic.weight": "1e-3"},
        {"distill.mimic.weight": "1e-2"},
    ]
    assert all(a["vs_baseline"]["baseline"] == "base" for a in cells)
    out = capsys.readouterr().out
    assert "student mimic.weight=1e-3" in out and "student mimic.weight=1e-2" in out


def test_a_failing_cell_is_reported_and_the_others_go_on(recipes: Path, trained, capsys) -> None:
    code = main(
        [
            "run",
            "student.vkd",
            "--grid",
            "distill.mimic.weight=1e38,1e-3",
            "--set",
            "train.epochs=2",
            "--out",
            "runs",
        ]
    )
    assert code == 1  # something failed
    captured = capsys.readouterr()
    assert "failed student mimic.weight=1e38" in " ".join(captured.err.split())
    data = report(recipes / "runs", "student")
    bad, good = (a for a in data["arms"] if a["role"] == "recipe")
    assert bad["runs"][0]["status"] == "failed" and "NaN" in bad["runs"][0]["message"]
    assert good["runs"][0]["status"] == "done" and good["runs"][0]["top1"] is not None
    assert good["vs_baseline"]["n"] == 1
    (failure,) = data["not_ok"]
    log = Path(failure["log"]).read_text()
    assert "the loss became NaN" in log and failure["run"].startswith("student mimic.weight=1e38")
    assert "failed: student mimic.weight=1e38" in captured.out


def test_a_failed_teacher_skips_its_students(recipes: Path, trained, capsys) -> None:
    (recipes / "teacher.vkd").write_text(
        TEACHER.replace("compile = off", "compile = off  optimizer = adamw(lr = 1e30)")
    )
    assert main(["run", "student.vkd", "--seeds", "0-1", "--out", "runs"]) == 1
    data = report(recipes / "runs", "student")
    statuses = {a["role"]: [r["status"] for r in a["runs"]] for a in data["arms"]}
    assert statuses == {"baseline": ["done", "done"], "recipe": ["skipped", "skipped"]}
    assert data["teachers"][0]["status"] == "failed"
    assert "needs teacher" in capsys.readouterr().err


def test_bad_experiments_are_refused_before_anything_trains(recipes: Path, trained, capsys):
    assert main(["run", "student.vkd", "--seeds", "0-x", "--out", "runs"]) == 2
    assert "--seeds:1:1: error: seeds are whole numbers or ranges" in capsys.readouterr().err
    assert main(["run", "student.vkd", "--grid", "distill.nkd.gamma=1,-1"]) == 2
    assert "--grid:1:21: error: gamma must be >= 0" in capsys.readouterr().err
    assert main(["run", "student.vkd", "--jobs", "0"]) == 2
    assert main(["run", "student.vkd", "--launcher-arg", "oops"]) == 2
    assert trained == []


def _wait_for(predicate, timeout: float = 120) -> None:  # type: ignore[no-untyped-def]
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def _train_lines(folder: Path) -> int:
    metrics = folder / "metrics.jsonl"
    if not metrics.exists():
        return 0
    return sum('"train"' in line for line in metrics.read_text().splitlines())


def _folders(runs: Path, name: str) -> list[Path]:
    return sorted(p for p in runs.glob(f"{name}-*") if p.is_dir())


@pytest.mark.slow
def test_a_killed_sweep_continues_where_it_stopped(recipes: Path) -> None:
    """SIGKILL in the middle of the second seed: the first is kept, the second resumes from
    its step checkpoint, the third starts; nothing is trained twice."""
    (recipes / "base.vkd").write_text(
        BASE.replace(
            "epochs = 1  log_every = 5", 'epochs = 2  log_every = 1  checkpoint_every = "4 steps"'
        )
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "vitkdl", "run", "base.vkd", "--seeds", "0-2", "--out", "runs"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs = recipes / "runs"

    def second_is_under_way() -> bool:
        done = [f for f in _folders(runs, "base") if (f / "summary.json").exists()]
        busy = [f for f in _folders(runs, "base") if _train_lines(f) >= 10]
        return len(done) == 1 and len(busy) == 2

    _wait_for(second_is_under_way)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = [f for f in _folders(runs, "base") if (f / "summary.json").exists()]
    (first,) = finished
    kept = (first / "summary.json").read_text()
    (second,) = [f for f in _folders(runs, "base") if f != first]
    assert (second / "last.pt").exists()

    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "1 finished already (reused), 2 to run" in result.stderr
    assert (first / "summary.json").read_text() == kept
    assert "resuming at epoch" in (second / "log.txt").read_text()
    assert len([f for f in _folders(runs, "base") if (f / "summary.json").exists()]) == 3
    data = report(runs, "base")
    assert [r["status"] for r in data["arms"][0]["runs"]] == ["done"] * 3


@pytest.mark.slow
def test_jobs_run_in_parallel_processes_and_sigterm_stops_them_with_checkpoints(
    recipes: Path,
) -> None:
    """--jobs 2: two worker processes at once, one live run each; SIGTERM to the sweep asks
    both to save and stop (exit 75); running it again finishes them."""
    (recipes / "base.vkd").write_text(
        BASE.replace("epochs = 1  log_every = 5", "epochs = 3  log_every = 1")
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "vitkdl", "run", "base.vkd", "--seeds", "0-1", "--jobs", "2"]
    cmd += ["--out", "runs"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    runs = recipes / "runs"
    _wait_for(lambda: sum(_train_lines(f) >= 5 for f in _folders(runs, "base")) == 2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    assert "stopped by SIGTERM" in err
    folders = _folders(runs, "base")
    assert len(folders) == 2
    for folder in folders:
        assert (folder / "last.pt").exists() and not (folder / "summary.json").exists()
        assert "stopped by SIGTERM" in (folder / "log.txt").read_text()
    assert "preempted" in out

    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    data = report(runs, "base")
    assert [r["status"] for r in data["arms"][0]["runs"]] == ["done", "done"]
    assert all(r["steps"] == 3 * (1437 // 64) for r in data["arms"][0]["runs"])


@pytest.mark.slow
def test_sigint_to_the_experiment_alone_stops_its_workers_and_the_report_is_true(
    recipes: Path,
) -> None:
    """SIGINT to the experiment's process only (not its group, as `kill -INT PID` does): the
    experiment passes it on, the unfinished run saves a checkpoint and stops, the run that had
    finished is reported done with its accuracy, and the message says to run it again."""
    (recipes / "base.vkd").write_text(
        BASE.replace("epochs = 1  log_every = 5", "epochs = 1  log_every = 1")
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "vitkdl", "run", "base.vkd", "--grid", "train.epochs=1,8"]
    cmd += ["--jobs", "2", "--out", "runs"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    runs = recipes / "runs"
    finished = lambda: [f for f in _folders(runs, "base") if (f / "summary.json").exists()]  # noqa: E731
    _wait_for(lambda: len(finished()) == 1 and len(_folders(runs, "base")) == 2)
    (long,) = [f for f in _folders(runs, "base") if f not in finished()]
    _wait_for(lambda: _train_lines(long) >= 3)
    proc.send_signal(signal.SIGINT)  # to this process alone
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "stopped by SIGINT" in err
    assert (long / "last.pt").exists() and not (long / "summary.json").exists()
    assert "stopped by SIGINT" in (long / "log.txt").read_text()
    assert _train_lines(long) < 8 * (1437 // 64)  # it did not train on to the end
    data = report(runs, "base")
    by_epochs = {a["cell"]["train.epochs"]: a["runs"][0] for a in data["arms"]}
    done, stopped = by_epochs["1"], by_epochs["8"]
    assert done["status"] == "done" and isinstance(done["top1"], float)
    assert stopped["status"] == "interrupted" and stopped["top1"] is None
    assert "--resume" not in json.dumps(data) and "--resume" not in err + out


@pytest.mark.slow
def test_submitit_runs_each_run_as_a_job(recipes: Path, capsys) -> None:
    pytest.importorskip("submitit")
    args = ["run", "student.vkd", "--seeds", "0-1", "--max-steps", "3", "--out", "runs"]
    args += ["--launcher", "submitit", "--launcher-arg", "cluster=local"]
    args += ["--launcher-arg", "timeout_min=10"]
    assert main(args) == 0, capsys.readouterr().err
    data = report(recipes / "runs", "student")
    assert [r["status"] for a in data["arms"] for r in a["runs"]] == ["done"] * 4
    assert data["teachers"][0]["status"] == "done"
    assert any((recipes / "runs" / "submitit").iterdir())  # submitit's own files
    for arm in data["arms"]:
        for run in arm["runs"]:
            assert "vitkdl run" in (Path(run["folder"]) / "log.txt").read_text()


def test_a_worker_reports_a_run_held_by_another_process_and_trains_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    from rich.console import Console

    import vitkdl
    from vitkdl.runs import hold, run_dir
    from vitkdl.train.worker import Task, execute

    recipe = tmp_path / "base.vkd"
    recipe.write_text(BASE)
    trained: list[str] = []
    monkeypatch.setattr(runner, "train", lambda plan, opts, console: trained.append(plan.recipe))
    spec = vitkdl.load(recipe)
    folder = run_dir(tmp_path / "runs", spec.name, spec.hash())
    folder.mkdir(parents=True)
    task = Task(path=str(recipe), key=folder.name, out_root=str(tmp_path / "runs"))
    buf = io.StringIO()
    with hold(folder):  # another process training this run (here: the test itself)
        status, reason = execute(task, Console(file=buf, width=200))
    assert status == 1 and trained == []
    assert f"in use by process {os.getpid()}" in reason
    assert reason in " ".join(buf.getvalue().split())
    # The refused worker leaves the holder's progress file alone; its own run removes its own.
    from vitkdl.train.worker import ProgressFile

    (folder / "progress.json").write_text('{"step": 1, "total": 9, "epoch": 0}')
    ProgressFile(folder).remove()
    assert (folder / "progress.json").is_file()
    mine = ProgressFile(folder)
    mine(2, 9, 0)
    mine.remove()
    assert not (folder / "progress.json").exists()


class _FakeHandle:
    """A started run whose exit status is given (None: still running)."""

    def __init__(self, run, code: int | None, why: str = "") -> None:  # type: ignore[no-untyped-def]
        self.run, self.started, self.code, self.why = run, time.monotonic(), code, why
        self.stops: list[str] = []

    def poll(self) -> int | None:
        return self.code

    def stop(self, name: str = "SIGTERM") -> None:
        self.stops.append(name)

    def reason(self) -> str:
        return self.why


def _scheduler(tmp_path: Path, handles: dict[str, int | None], why: str = ""):  # type: ignore[no-untyped-def]
    import io

    from rich.console import Console

    from vitkdl.experiment import PlannedRun
    from vitkdl.train.jobs import Board, JobOptions, _Scheduler

    opts = JobOptions(out_root=tmp_path / "runs")
    board = Board(Console(file=io.StringIO(), width=200), len(handles), quiet=False)
    scheduler = _Scheduler(None, opts, [], board, {})  # type: ignore[arg-type]
    for slot, (key, code) in enumerate(handles.items()):
        run = PlannedRun(key, "base.vkd", "base", key, (), "recipe", seed=slot)
        scheduler.running[slot] = _FakeHandle(run, code, why)
    return scheduler


def test_an_interrupted_experiment_reports_what_each_run_did(tmp_path: Path) -> None:
    """After a Ctrl-C the experiment waits for its runs: one that finished (status 0) is done,
    one stopped by the signal is interrupted, one still running at the deadline is too."""
    from vitkdl.train.jobs import drain

    scheduler = _scheduler(tmp_path, {"finished": 0, "stopped": 130, "hung": None})
    drain(scheduler, timeout=0.0)
    statuses = {key: o.status for key, o in scheduler.outcomes.items()}
    assert statuses == {"finished": "done", "stopped": "interrupted", "hung": "interrupted"}
    assert scheduler.running == {}


def test_a_stopped_run_of_an_experiment_says_to_run_the_experiment_again(tmp_path: Path) -> None:
    """The run's own message (from the training loop) says --resume; in an experiment the
    same command continues it."""
    why = "stopped by SIGINT at step 3; saved last.pt. Continue with --resume (exit status 130)."
    scheduler = _scheduler(tmp_path, {"a": 130, "b": None}, why=why)
    handle = scheduler.running.pop(0)
    scheduler._end(handle, 130)
    message = scheduler.outcomes["a"].message
    assert "--resume" not in message and "same command again" in message
    assert "stopped by SIGINT at step 3" in message
    # the other running run was asked to stop with the same signal
    assert scheduler.running[1].stops == ["SIGINT"]


def test_the_settings_of_an_experiment_reach_each_run_as_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One settings record (vitkdl.settings.RunSettings) travels from the experiment's options
    through the worker's task (as JSON) to the run's request; only what is a run's own
    changes on the way (its step limit, force for the named recipes only, its log not quiet)."""
    import io

    from rich.console import Console

    from vitkdl.experiment import PlannedRun
    from vitkdl.settings import RunSettings
    from vitkdl.train.jobs import JobOptions, task_of
    from vitkdl.train.worker import Task, execute

    opts = JobOptions(
        out_root=tmp_path / "runs", device="cpu", force=True, smoke=True, quiet=True, jobs=2
    )
    asked: list = []
    monkeypatch.setattr(
        runner, "run_recipe", lambda path, req, console, on_step=None: asked.append(req) or {}
    )
    for role, max_steps in (("recipe", 7), ("teacher", None)):
        run = PlannedRun("k", "r.vkd", "r", "h", ("train.seed=1",), role, max_steps=max_steps)  # type: ignore[arg-type]
        task = Task.from_json(task_of(run, opts, threads=3).to_json())
        assert execute(task, Console(file=io.StringIO()))[0] == 0
        req = asked[-1]
        expected = RunSettings(
            out_root=tmp_path / "runs",
            device="cpu",
            force=role == "recipe",
            smoke=True,
            quiet=False,
            max_steps=max_steps,
        )
        assert task.settings() == req.settings() == expected
        assert req.overrides == ("train.seed=1",) and task.threads == 3
        assert req.continue_unfinished and not req.resume  # an experiment continues its runs
