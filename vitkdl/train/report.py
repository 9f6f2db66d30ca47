"""What a run leaves behind for people: metrics.jsonl, curves.png, comparison tables/plots."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from vitkdl.exits import writing
from vitkdl.runs import stopped_early, write_atomic


def _records(path: Path) -> tuple[list[tuple[str, dict[str, Any]]], list[int]]:
    """The (line, record) pairs of a ``metrics.jsonl`` and the numbers of the lines that are
    not JSON objects: a line torn by a crash or a full disk mid-write (the last one, as a
    rule) loses that record, never the run."""
    kept: list[tuple[str, dict[str, Any]]] = []
    torn: list[int] = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            kept.append((line, record))
        else:
            torn.append(number)
    return kept, torn


def _torn_note(path: Path, torn: list[int]) -> str | None:
    if not torn:
        return None
    lines = ", ".join(str(n) for n in torn)
    return f"{path}: dropped {len(torn)} unreadable line(s) ({lines}; torn by an earlier crash)"


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` (and TensorBoard when the
    ``tensorboard`` package is installed). ``note`` says which unreadable (torn) lines a
    resume dropped, else None."""

    def __init__(
        self, path: Path, tensorboard: bool = True, resume_step: int | None = None
    ) -> None:
        self.path = path
        self.note: str | None = None
        if resume_step is not None and path.exists():
            # A resumed run rewrites what came after its checkpoint, and drops torn lines:
            # appending after a line without its newline would tear the next record too.
            records, torn = _records(path)
            kept = [line for line, record in records if record.get("step", 0) <= resume_step]
            write_atomic(path, "".join(line + "\n" for line in kept))  # all or nothing
            self.note = _torn_note(path, torn)
        elif resume_step is None:
            with writing(path):
                path.write_text("")
        self.writer: Any = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(path.parent / "tensorboard"))
            except Exception:
                self.writer = None

    def write(self, record: dict[str, Any]) -> None:
        with writing(self.path), self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            step = record.get("step", 0)
            for key, value in record.items():
                if key not in ("step", "epoch", "kind") and isinstance(value, (int, float)):
                    group = "eval" if record.get("kind") == "eval" else "train"
                    self.writer.add_scalar(f"{group}/{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (unreadable, torn lines left out)."""
    if not path.exists():
        return []
    return [record for _, record in _records(path)[0]]


PLOTS_MISSING = 'plots need matplotlib: pip install -e ".[plots]" (or pip install matplotlib)'


def pyplot() -> Any:
    """matplotlib's pyplot on a file backend, or None when matplotlib (the optional ``plots``
    extra) is not installed: runs and reports go on without their figures."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_curves(metrics: Path, out: Path, title: str = "") -> bool:
    """``curves.png``: every loss term, the learning rate and the accuracies over steps.
    False (nothing written) without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False

    records = read_metrics(metrics)
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    skip = {"step", "epoch", "kind", "lr", "images_per_second"}
    keys = sorted({k for r in train for k in r if k not in skip})
    for key in keys:
        pts = [
            (r["step"], r[key])
            for r in train
            if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])
        ]
        if pts:
            axes[0].plot(*zip(*pts, strict=True), label=key, lw=2 if key == "loss" else 1)
    axes[0].set_title("loss terms")
    axes[0].set_xlabel("step")
    if keys:
        axes[0].legend(fontsize=8)
    if train:
        axes[1].plot([r["step"] for r in train], [r["lr"] for r in train])
    axes[1].set_title("learning rate")
    axes[1].set_xlabel("step")
    for key in ("top1", "top5", "ema_top1"):
        pts = [(r["step"], r[key]) for r in evals if r.get(key) is not None]
        if pts:
            axes[2].plot(*zip(*pts, strict=True), marker="o", label=key)
    axes[2].set_title("validation accuracy (%)")
    axes[2].set_xlabel("step")
    if evals:
        axes[2].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    try:
        with writing(out):
            fig.savefig(out, dpi=80)
    finally:
        plt.close(fig)
    return True


def summary_table(summary: dict[str, Any]) -> Table:
    """The final table of one run."""
    table = Table(title=f"{summary['recipe']}", title_justify="left", show_header=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("student top-1", summary.get("top1")),
        ("student top-5", summary.get("top5")),
        ("best top-1", summary.get("best_top1")),
        ("EMA top-1", summary.get("ema_top1")),
        ("class head top-1", summary.get("class_head_top1")),
        ("distillation head top-1", summary.get("dist_head_top1")),
        ("teacher top-1", summary.get("teacher_top1")),
        ("epochs / steps", f"{summary['epochs']} / {summary['steps']}"),
        ("images/s", summary.get("images_per_second")),
        ("wall time (s)", summary.get("wall_seconds")),
        ("peak memory (MB)", summary.get("peak_memory_mb")),
        ("stopped early", _early(summary)),
    ]
    for name, value in rows:
        if value is None:
            continue
        table.add_row(name, f"{value:.2f}" if isinstance(value, float) else str(value))
    return table


def _early(summary: dict[str, Any]) -> str | None:
    """What stopped a run (or its teacher) before the end of its recipe, for the tables: such
    a run is a smoke, not a result."""
    notes = []
    early = stopped_early(summary)
    if early is not None:
        notes.append(early.removeprefix("stopped early "))  # the row or column says the rest
    teacher = summary.get("teacher_stopped_early")
    if isinstance(teacher, dict):
        notes.append(f"teacher at step {teacher.get('steps')} of {teacher.get('planned_steps')}")
    return "; ".join(notes) or None


def comparison_table(summaries: Sequence[dict[str, Any]]) -> Table:
    """Several runs side by side."""
    sets = [tuple(s.get("overrides") or ()) for s in summaries]
    shared = set(sets[0]).intersection(*sets[1:]) if sets else set()
    caption = (
        "every run with --set " + " --set ".join(o for o in sets[0] if o in shared)
        if shared
        else None
    )
    table = Table(title="comparison", title_justify="left", caption=caption, caption_justify="left")
    columns = ["recipe", "teacher top-1", "top-1", "top-5", "best top-1", "images/s", "wall s"]
    own = [[o for o in s if o not in shared] for s in sets]
    if any(own):  # what each run was given beyond what all share
        columns.append("--set")
    early = [_early(s) for s in summaries]
    if any(early):
        columns.append("stopped early")
    for col in columns:
        left = col in ("recipe", "--set", "stopped early")
        table.add_column(col, justify="left" if left else "right")

    def f(x: Any) -> str:
        return "-" if x is None else f"{x:.2f}"

    for s, extra, stop in zip(summaries, own, early, strict=True):
        row = [
            s["recipe"],
            f(s.get("teacher_top1")),
            f(s.get("top1")),
            f(s.get("top5")),
            f(s.get("best_top1")),
            f(s.get("images_per_second")),
            f(s.get("wall_seconds")),
        ]
        if any(own):
            row.append(" ".join(extra) or "-")
        if any(early):
            row.append(stop or "-")
        table.add_row(*row)
    return table


def write_comparison(summaries: Sequence[dict[str, Any]], out: Path) -> bool:
    """``comparison.png``: top-1 of each run (and its teacher's, when it had one). False
    (nothing written) without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False

    names = [s["recipe"] for s in summaries]
    fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(names)), 3.5))
    ax.bar(names, [s.get("top1") or 0 for s in summaries], color="tab:blue", label="student")
    teachers = [
        (i, s["teacher_top1"]) for i, s in enumerate(summaries) if s.get("teacher_top1") is not None
    ]
    if teachers:
        ax.scatter(
            *zip(*teachers, strict=True), color="tab:red", marker="_", s=600, label="teacher"
        )
    for i, s in enumerate(summaries):
        if s.get("top1") is not None:
            ax.text(i, s["top1"], f"{s['top1']:.1f}", ha="center", va="bottom")
    ax.set_ylabel("top-1 (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        with writing(out):
            fig.savefig(out, dpi=80)
    finally:
        plt.close(fig)
    return True


def print_summary(console: Console, summary: dict[str, Any]) -> None:
    console.print(summary_table(summary))


# --------------------------------------------------------------------------------------------
# Experiments: several seeds, a sweep (the data comes from vitkdl.experiment.assemble_report)

_STATUS_WORDS = {
    "failed": "failed",
    "skipped": "skipped",
    "preempted": "stopped",
    "interrupted": "stopped",
    "missing": "-",
}


def _pm(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:+.{digits}f}"


def _cell_value(run: dict[str, Any]) -> str:
    if run.get("top1") is not None:
        return f"{run['top1']:.2f}"
    return _STATUS_WORDS.get(run.get("status", "missing"), "-")


def experiment_tables(report: dict[str, Any]) -> list[Any]:
    """The report of an experiment as two tables: each arm (a recipe under one cell) with its
    run per seed; then each arm's mean and standard deviation and its paired comparison with
    its baseline (the mean difference, its interval, n and the wins)."""
    seeds = report.get("seeds")
    level = round(100 * report.get("level", 0.95))
    metric = report["metric"].replace("top1", "top-1")
    arms = report["arms"]

    def table() -> Table:
        return Table(box=box.SIMPLE_HEAD, pad_edge=False)

    heading = f"{report['experiment']}: {metric} (%) per seed"
    per_seed = table()
    per_seed.add_column("run", no_wrap=True)
    columns = [f"seed {s}" for s in seeds] if seeds is not None else ["seed", metric]
    for col in columns:
        per_seed.add_column(col, justify="right", no_wrap=True)
    for arm in arms:
        runs = arm["runs"]
        if seeds is not None:
            by_seed = {r["seed"]: r for r in runs}
            cells = [_cell_value(by_seed[s]) if s in by_seed else "" for s in seeds]
        else:
            cells = [" ".join(str(r["seed"]) for r in runs), " ".join(map(_cell_value, runs))]
        per_seed.add_row(arm["label"], *cells)

    compared = any(a.get("vs_baseline") for a in arms)
    summary = table()
    summary.add_column("run", no_wrap=True)
    for col in ("runs", "mean ± sd"):
        summary.add_column(col, justify="right", no_wrap=True)
    if compared:
        for col in ("vs baseline", f"{level}% CI (paired t)", "n", "wins"):
            summary.add_column(col, justify="right", no_wrap=True)
    for arm in arms:
        stats = arm["stats"]
        if stats["n"] == 0:
            spread = "-"
        elif stats["sd"] is None:
            spread = f"{stats['mean']:.2f}"
        else:
            spread = f"{stats['mean']:.2f} ± {stats['sd']:.2f}"
        row = [arm["label"], str(stats["n"]), spread]
        if compared:
            vs = arm.get("vs_baseline")
            if arm["role"] == "baseline":
                row += ["(baseline)", "", "", ""]
            elif vs is None or vs["n"] == 0:
                row += ["", "", "", ""]
            else:
                interval = vs["interval"]
                ci = f"[{_pm(interval[0])}, {_pm(interval[1])}]" if interval else "-"
                wins = f"{vs['wins']}/{vs['n']}" + (f", {vs['ties']} tied" if vs["ties"] else "")
                row += [_pm(vs["mean"]), ci, str(vs["n"]), wins]
        summary.add_row(*row)
    return [
        Text(heading, style="bold"),
        per_seed,
        Text(f"{report['experiment']}: {metric} (%) over the seeds", style="bold"),
        summary,
    ]


def experiment_notes(report: dict[str, Any]) -> list[str]:
    """The lines under the table: what the columns mean, the overrides every run had, the
    teachers, the runs that did not finish."""
    level = round(100 * report.get("level", 0.95))
    lines = ["mean ± sd: over the seeds (sample sd)"]
    if any(a.get("vs_baseline") for a in report["arms"]):
        lines[0] += (
            "; vs baseline: the mean of the differences with the baseline's run of the same "
            f"seed, and its {level}% interval (paired t, n - 1 degrees of freedom); n: the pairs; "
            "wins: the seeds where the row is better"
        )
    overrides = report.get("overrides") or []
    if overrides:
        lines.append(
            "the recipes ran with --set "
            + " --set ".join(overrides)
            + " (their baselines with those of student.*, data.* and train.*)"
        )
    for t in report.get("teachers", []):
        value = f"{t['top1']:.2f}" if t.get("top1") is not None else t.get("status", "-")
        lines.append(
            f"teacher {t['recipe']}: top-1 {value} (one run, its recipe's seed {t['seed']}, "
            f"shared by every run; {t['folder']})"
        )
    if all(a["stats"]["n"] <= 1 for a in report["arms"]):
        lines.append("one run per row: no spread and no interval (--seeds 0-4 runs five)")
    early = report.get("stopped_early") or []
    if early:
        at = ", ".join(sorted({e["note"].removeprefix("stopped early ") for e in early}))
        lines.append(
            f"stopped early by --max-steps ({at}): {len(early)} of the runs (a smoke, not a result)"
        )
    for f in report.get("not_ok", []):
        why = f": {f['message']}" if f.get("message") else ""
        log = f" (log: {f['log']})" if f.get("log") else ""
        lines.append(f"{f['status']}: {f['run']}{why}{log}")
    return lines


def _numeric_axis(report: dict[str, Any]) -> tuple[str, dict[str, float]] | None:
    """The first axis whose values are all numbers (and that has several), with each value's
    number."""
    for path, values in (report.get("axes") or {}).items():
        try:
            numbers = {v: float(v) for v in values}
        except ValueError:
            continue
        if len(numbers) > 1:
            return path, numbers
    return None


def write_experiment_plot(report: dict[str, Any], out: Path) -> bool:
    """``report.png``: over a numeric axis, each recipe's mean with its interval against the
    axis (a line per combination of the other axes; the seeds as dots; the baseline dashed);
    otherwise every arm with its seeds as dots, its mean as a bar and its interval as a
    whisker. False (nothing written) without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    arms = report["arms"]
    level = round(100 * report.get("level", 0.95))
    numeric = _numeric_axis(report)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(arms) + 2), 4))

    def values(arm: dict[str, Any]) -> list[float]:
        return [r["top1"] for r in arm["runs"] if r.get("top1") is not None]

    def whisker(arm: dict[str, Any]) -> tuple[float, float] | None:
        i = arm["stats"]["interval"]
        m = arm["stats"]["mean"]
        return None if i is None or m is None else (m - i[0], i[1] - m)

    arms_with = [a for a in arms if a["stats"]["mean"] is not None]  # runs that finished

    if numeric is not None:
        path, numbers = numeric
        groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for arm in arms_with:
            if path not in arm["cell"]:
                continue
            others = " ".join(
                f"{k.split('.')[-1]}={v}" for k, v in arm["cell"].items() if k != path
            )
            groups.setdefault((arm["recipe"], others), []).append(arm)
        for (recipe, others), members in groups.items():
            members.sort(key=lambda a: numbers[a["cell"][path]])
            xs = [numbers[a["cell"][path]] for a in members]
            means = [a["stats"]["mean"] for a in members]
            errs = [whisker(a) or (0.0, 0.0) for a in members]
            line = ax.errorbar(
                xs,
                means,
                yerr=list(zip(*errs, strict=True)),
                marker="o",
                capsize=4,
                label=f"{recipe} {others}".strip(),
            )
            for x, a in zip(xs, members, strict=True):
                ys = values(a)
                ax.scatter([x] * len(ys), ys, s=12, alpha=0.4, color=line[0].get_color())
            indices = [a.get("baseline") for a in members]
            if all(i is not None and arms[i]["stats"]["mean"] is not None for i in indices):
                bases = [arms[i] for i in indices]
                if len(set(indices)) == 1:  # one baseline for every value of the axis
                    bx, bm = [min(xs), max(xs)], [bases[0]["stats"]["mean"]] * 2
                    band = bases[0]["stats"]["interval"]
                    if band is not None:
                        ax.axhspan(band[0], band[1], color="grey", alpha=0.15, lw=0)
                else:
                    bx, bm = xs, [b["stats"]["mean"] for b in bases]
                ax.plot(bx, bm, ls="--", color="grey", label=f"{bases[0]['label']} (baseline)")
        ax.set_xlabel(path)
    else:
        for i, arm in enumerate(arms):
            colour = "tab:grey" if arm["role"] == "baseline" else "tab:blue"
            m = arm["stats"]["mean"]
            if m is not None:
                ax.bar(i, m, color=colour, alpha=0.35, width=0.6)
                w = whisker(arm)
                if w is not None:
                    ax.errorbar([i], [m], yerr=[[w[0]], [w[1]]], color="black", capsize=6)
            ys = values(arm)
            n = len(ys)
            xs = [i + (k - (n - 1) / 2) * 0.08 for k in range(n)]
            ax.scatter(xs, ys, s=16, color=colour, zorder=3)
        ax.set_xticks(range(len(arms)))
        ax.set_xticklabels(
            [a["label"] + (" (baseline)" if a["role"] == "baseline" else "") for a in arms],
            rotation=20,
            ha="right",
            fontsize=8,
        )
        lows = [y for a in arms for y in values(a)]
        if lows:
            ax.set_ylim(bottom=max(0.0, min(lows) - 5))
    ax.set_ylabel(f"top-1 (%): seeds as dots, mean, {level}% interval")
    ax.set_title(report["experiment"])
    if numeric is not None:
        ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        with writing(out):
            fig.savefig(out, dpi=80)
    finally:
        plt.close(fig)
    return True
