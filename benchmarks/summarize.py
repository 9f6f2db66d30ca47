"""Print `vitkdl bench --json` results as the Markdown tables of benchmarks/README.md.

python benchmarks/summarize.py benchmarks/results/cpu_*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _f(x: float | None, fmt: str = ".1f") -> str:
    return "-" if x is None else format(x, fmt)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.0f}%"


def _pair(r: dict[str, Any]) -> str:
    teacher = r["teacher"] or "-"
    return f"{r['student']} <- {teacher}"


def tables(results: list[tuple[str, dict[str, Any]]]) -> str:
    """Throughput, ratios, breakdown and loader tables, one row per result file."""
    lines = [
        "| run | pair | batch | (a) compiled | (b) eager | (c) hooks | (d) floor | a/b | a/c "
        "| a over d | adapters' FLOPs over d | a over d + losses | MFU (a) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results:
        c, q, b = r["configs"], r["ratios"], r["breakdown"]
        mfu = c["compiled"].get("mfu")
        flops_over = q.get("overhead_vs_floor_from_flops")
        if flops_over is None and q.get("adapter_flops_share") is not None:
            share = q["adapter_flops_share"]  # older files: adapters / total
            flops_over = share / (1 - share) if share < 1 else None
        plus_losses = q.get("overhead_vs_floor_plus_losses")
        if plus_losses is None and b:
            plus_losses = (
                c["compiled"]["ms_per_step"] / (c["floor"]["ms_per_step"] + b["adapters_losses_ms"])
                - 1
            )
        lines.append(
            f"| {name} | {_pair(r)} | {r['batch']} | "
            + " | ".join(
                f"{_f(c[k]['images_per_second'])} img/s ({_f(c[k]['ms_per_step'])} ms)"
                for k in ("compiled", "eager", "hooks", "floor")
            )
            + f" | {_f(q['compiled_vs_eager'], '.2f')}x | {_f(q['compiled_vs_hooks'], '.2f')}x | "
            f"{_pct(q['overhead_vs_floor'])} | "
            f"{_pct(flops_over)} | {_pct(plus_losses)} | "
            f"{'-' if mfu is None else f'{100 * mfu:.1f}%'} |"
        )
    lines += [
        "",
        "| run | teacher fwd | student fwd+bwd | adapters+losses | optimizer | sum "
        "| step | compile (a) | peak MiB a / b / c / d | loader |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results:
        b, c, ld = r["breakdown"] or {}, r["configs"], r["loader"] or {}
        loader = (
            "not measured"
            if not ld or "skipped" in ld
            else f"{_f(ld['images_per_second'])} img/s, {ld['workers']} workers "
            f"({_f(ld['vs_step'], '.1f')}x the step)"
        )
        mem = " / ".join(
            _f(c[k]["peak_memory_mb"], ".0f") for k in ("compiled", "eager", "hooks", "floor")
        )
        lines.append(
            f"| {name} | {_f(b.get('teacher_forward_ms'))} | "
            f"{_f(b.get('student_forward_backward_ms'))} | {_f(b.get('adapters_losses_ms'))} | "
            f"{_f(b.get('optimizer_ms'))} | {_f(b.get('sum_of_parts_ms'))} | "
            f"{_f(b.get('step_ms'))} | {_f(c['compiled']['compile_seconds'])} s | {mem} | "
            f"{loader} |"
        )
    lines += [
        "",
        "| run | device | threads | precision | load average (before, after) |",
        "|---|---|---|---|---|",
    ]
    for name, r in results:
        load = ", ".join(_f(x, ".2f") for x in r.get("load_average") or [])
        lines.append(
            f"| {name} | {r['device_name']} | {r['threads'] or '-'} | {r['precision']} | {load} |"
        )
    return "\n".join(lines)


def main(paths: list[str]) -> None:
    results = [(Path(p).stem, json.loads(Path(p).read_text())) for p in paths]
    print(tables(results))


if __name__ == "__main__":
    main(sys.argv[1:])
