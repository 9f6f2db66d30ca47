"""What a run leaves behind for people: metrics.jsonl, curves.png, comparison tables/plots."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` (and TensorBoard when the
    ``tensorboard`` package is installed)."""

    def __init__(
        self, path: Path, tensorboard: bool = True, resume_step: int | None = None
    ) -> None:
        self.path = path
        if resume_step is not None and path.exists():
            # A resumed run rewrites what came after its checkpoint.
            kept = [
                line
                for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
            path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None:
            path.write_text("")
        self.writer: Any = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(path.parent / "tensorboard"))
            except Exception:
                self.writer = None

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
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
    """The records of a ``metrics.jsonl``."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
    fig.savefig(out, dpi=80)
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
    ]
    for name, value in rows:
        if value is None:
            continue
        table.add_row(name, f"{value:.2f}" if isinstance(value, float) else str(value))
    return table


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
    for col in columns:
        table.add_column(col, justify="left" if col in ("recipe", "--set") else "right")

    def f(x: Any) -> str:
        return "-" if x is None else f"{x:.2f}"

    for s, extra in zip(summaries, own, strict=True):
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
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return True


def print_summary(console: Console, summary: dict[str, Any]) -> None:
    console.print(summary_table(summary))
