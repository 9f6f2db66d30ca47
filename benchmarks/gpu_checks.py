"""Checks that need a GPU, in one process: DDP with torch.compile against the plain compiled
step, and an FSDP2 step with gradient clipping. Writes a JSON report.

    python benchmarks/gpu_checks.py --out benchmarks/results/gpu_checks.json
    python benchmarks/gpu_checks.py --device cpu --compile off      # a dry run of the logic

Both use a depth-reduced DeiT-S <- DeiT III-B pair (the paper's terms) so cold compiles stay
short. A process group of one (NCCL on CUDA, gloo on CPU) is enough for DDP's and FSDP's code
paths: the bucketed all-reduce and the DDP optimizer's graph splitting, FSDP's all-gathers,
reduce-scatters and sharded clipping all run.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import vitkdl
from vitkdl.program import resolve_device
from vitkdl.train.distributed import backend_for
from vitkdl.train.step import Update, configure_optimizer, model_param_groups, train_step

RECIPE = "recipes/deit_small_vitkd_kd.vkd"
REDUCED = {
    "student.depth": 4,
    "teacher.depth": 4,
    "data.source": "synthetic",
    "data.batch_size": 32,
    "train.clip_grad": 1.0,
}


def _program(plan: Any, device: torch.device, compile_mode: str) -> Any:
    torch.manual_seed(0)
    return vitkdl.build(plan, device, load=False, compile=compile_mode)


def _update(program: Any, plan: Any, device: torch.device) -> Update:
    groups = model_param_groups(
        program.student, program.terms.named_parameters(), plan.optimizer.weight_decay
    )
    optimizer = configure_optimizer(plan, groups, fused=not program.sharded)
    return Update(
        optimizer, program.trainable_parameters(), plan.clip_grad, device, program.autocast_dtype
    )


def _steps(
    program: Any, update: Update, batches: list[tuple[torch.Tensor, torch.Tensor]], seed: int = 1
) -> tuple[list[float], float]:
    torch.manual_seed(seed)  # the same generation masks in both runs
    losses = []
    program.train()
    start = time.perf_counter()
    for images, targets in batches:
        out = train_step(program.step, update, images, targets)
        losses.append(float(out["loss"].detach()))
    return losses, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--compile", default="default", help="default, max-autotune or off")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_checks.json"))
    args = parser.parse_args()
    device = resolve_device(args.device)
    if device.type == "cuda" and device.index is None:  # a process group's device_id needs one
        device = torch.device("cuda", torch.cuda.current_device())
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    backend = backend_for(args.device)
    kwargs = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend, rank=0, world_size=1, **kwargs)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "backend": backend,
        "compile": args.compile,
        "recipe": RECIPE,
        "overrides": REDUCED,
    }
    plan = vitkdl.plan(vitkdl.load(RECIPE, overrides=REDUCED, strict=False))
    g = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randn(32, 3, 224, 224, generator=g).to(device),
            torch.randint(0, 1000, (32,), generator=g).to(device),
        )
        for _ in range(args.steps)
    ]

    plain = _program(plan, device, args.compile)
    plain_losses, plain_s = _steps(plain, _update(plain, plan, device), batches)
    ddp = _program(plan, device, args.compile)
    ddp.distribute([device.index or 0] if device.type == "cuda" else None)
    ddp_losses, ddp_s = _steps(ddp, _update(ddp, plan, device), batches)
    diff = max(abs(a - b) for a, b in zip(plain_losses, ddp_losses, strict=True))
    weights = max(
        float((a - b).abs().max())
        for a, b in zip(plain.trainable_parameters(), ddp.trainable_parameters(), strict=True)
    )
    report["ddp_compile"] = {
        "plain_losses": plain_losses,
        "ddp_losses": ddp_losses,
        "max_loss_diff": diff,
        "max_weight_diff": weights,
        "plain_seconds": plain_s,
        "ddp_seconds": ddp_s,
    }
    print(
        f"DDP + compile vs compiled: losses {ddp_losses} vs {plain_losses}, "
        f"max diff {diff:.3g}, weights {weights:.3g}"
    )

    sharded = _program(plan, device, "off")  # FSDP steps run eager
    sharded.shard()
    update = _update(sharded, plan, device)
    losses, seconds = _steps(sharded, update, batches)
    norms = []
    for images, targets in batches[:1]:
        out = sharded.step(images, targets)
        update.backward(out["loss"])
        norm = torch.nn.utils.clip_grad_norm_(update.params, plan.clip_grad)
        norms.append(float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))
    report["fsdp"] = {
        "losses": losses,
        "seconds": seconds,
        "grad_norm_before_clip": norms,
        "finite": all(torch.isfinite(torch.tensor(losses)).tolist()),
    }
    print(f"FSDP2 with clipping: losses {losses}, grad norm {norms}")
    if device.type == "cuda":
        report["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    dist.destroy_process_group()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
