"""Stage 6: the training loop. Reads top to bottom: set-up, the epoch loop, the end.

Everything timm already does well is timm's: the optimizer (``create_optimizer_v2``), the
per-iteration cosine schedule with warm-up (``create_scheduler_v2``), EMA (``ModelEmaV3``),
mixup/cutmix and accuracy. What is new here is the compiled distillation step and the
bookkeeping that makes a run resumable to the exact same numbers.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from vitkdl.planner import Plan
from vitkdl.program import Program, build, resolve_device
from vitkdl.train import distributed
from vitkdl.train.checkpoint import (
    CheckpointError,
    load_checkpoint,
    rank_states,
    rng_state,
    save_atomic,
    set_rng_state,
)
from vitkdl.train.data import DataConfig, build_loaders, build_mixup, mix_seed, set_epoch
from vitkdl.train.report import MetricsLog, write_curves

SMALL_STEP_FLOPS = 5e9  # below this per step, one CPU thread beats several


class TrainError(Exception):
    """A run that cannot start or cannot go on; the message says why and what to do."""


@dataclass
class RunOptions:
    """How to run (not what: that is the plan)."""

    out_dir: Path
    device: str | None = None
    resume: bool = False
    force: bool = False
    max_steps: int | None = None
    max_eval_batches: int | None = None
    quiet: bool = False
    load_weights: bool = True
    runs_dir: Path = Path("runs")
    recipe: dict[str, Any] = field(default_factory=dict)
    # Resume from this checkpoint instead of OUT/last.pt (a run of an earlier version of the
    # recipe, continued under --force into this run's own folder).
    resume_from: Path | None = None


def data_config(plan: Plan) -> DataConfig:
    """The data layer's view of the plan."""
    d, s = plan.data, plan.student
    return DataConfig(source=d.source, root=d.root, image_size=d.image_size, in_chans=d.in_chans,
                      batch_size=d.batch_size, workers=min(d.workers, os.cpu_count() or 1),
                      augment=d.augment, mixup=d.mixup, cutmix=d.cutmix,
                      smoothing=d.smoothing, size=d.train_images or 1024,
                      classes=d.num_classes, mean=s.mean, std=s.std,
                      interpolation=s.interpolation, crop_pct=s.crop_pct, seed=plan.seed)


def param_groups(program: Program, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no decay on norms, biases, position embeddings, class/distillation tokens
    and mask tokens (everything 1-d, plus the tokens timm and the strategies name)."""
    skip = set(getattr(program.student, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    named = [(f"student.{n}", n, p) for n, p in program.student.named_parameters()]
    named += [(f"terms.{n}", n, p) for n, p in program.terms.named_parameters()]
    for _, short, p in named:
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or short in skip or short.endswith(("mask_token", "pos_embed",
                                                          "cls_token", "dist_token")):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@torch.no_grad()
def evaluate(predict: Any, loader: Any, device: torch.device,
             max_batches: int | None = None) -> tuple[float, float]:
    """Top-1 and top-5 accuracy (%) of ``predict`` over ``loader``."""
    correct1 = correct5 = total = 0
    for i, (images, labels) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        images, labels = images.to(device), labels.to(device)
        logits = predict(images).float()
        k = min(5, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices
        hits = top.eq(labels[:, None])
        correct1 += int(hits[:, 0].sum())
        correct5 += int(hits.any(dim=-1).sum())
        total += labels.numel()
    # Each rank evaluates its own shard; the counts add up over ranks.
    correct1, correct5, total = distributed.all_reduce_sum([correct1, correct5, total], device)
    return 100.0 * correct1 / max(total, 1), 100.0 * correct5 / max(total, 1)


class Progress:
    """Rich progress bars on a terminal; one plain line per interval otherwise."""

    def __init__(self, console: Console, quiet: bool, total_steps: int) -> None:
        self.console, self.quiet = console, quiet
        self.live = console.is_terminal and not quiet
        self.bar: Any = None
        if self.live:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeRemainingColumn,
            )
            from rich.progress import (
                Progress as RichProgress,
            )

            self.bar = RichProgress(TextColumn("{task.description}"), BarColumn(),
                                    MofNCompleteColumn(), TimeRemainingColumn(),
                                    TextColumn("{task.fields[info]}"), console=console,
                                    transient=True)
            self.task = self.bar.add_task("train", total=total_steps, info="")
            self.bar.start()

    def update(self, step: int, epoch: int, info: str, log_line: bool) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, description=f"epoch {epoch}", info=info)
        elif log_line and not self.quiet:
            self.console.print(f"epoch {epoch} step {step}: {info}", highlight=False)

    def note(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text, highlight=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def train(plan: Plan, opts: RunOptions, console: Console | None = None) -> dict[str, Any]:
    """Train the plan's student; returns the summary (also written to ``summary.json``)."""
    console = console or Console(stderr=True)
    job = distributed.current()
    out = opts.out_dir
    if job.is_main:
        check_writable(out)
    device = resolve_device(opts.device)
    if job.enabled and device.type == "cuda":
        device = torch.device("cuda", job.local_rank)
    ckpt_path = out / "last.pt"
    checkpoint = _resume_point(plan, opts, opts.resume_from or ckpt_path)

    # ---- set-up ------------------------------------------------------------------------
    _seed_everything(plan.seed)
    if device.type == "cpu" and plan.cost.total * plan.data.batch_size < SMALL_STEP_FLOPS:
        # Tiny models: thread hand-offs cost more than the maths (measured 5x on 2 cores).
        torch.set_num_threads(1)
    program = build(plan, device, load=opts.load_weights, runs_dir=opts.runs_dir)
    cfg = data_config(plan)
    train_loader, val_loader, num_classes = build_loaders(
        cfg, distributed=job.enabled, rank=job.rank, world_size=job.world_size)
    if job.enabled:
        if plan.shard == "fsdp":
            program.shard()
        else:
            program.distribute([job.local_rank] if device.type == "cuda" else None)
        torch.manual_seed(plan.seed + job.rank)  # masks and drop path differ across ranks
    if num_classes != plan.student.num_classes:
        raise TrainError(f"the data has {num_classes} classes but the student's head has "
                         f"{plan.student.num_classes}; set num_classes = {num_classes} on the "
                         "student (and teacher)")
    mixup = build_mixup(cfg, num_classes)

    import timm.optim
    import timm.scheduler
    import timm.utils

    opt = plan.optimizer
    extra = dict(opt.kwargs)
    if opt.name in ("adamw", "adam") and not program.sharded:
        extra.setdefault("fused", True)  # one kernel for all parameters (3-4x on CPU too)
    optimizer = timm.optim.create_optimizer_v2(param_groups(program, opt.weight_decay),
                                               opt=opt.name, lr=opt.lr,
                                               weight_decay=opt.weight_decay, **extra)
    steps_per_epoch = len(train_loader)
    sched = plan.schedule
    scheduler: Any = None
    if sched.name != "constant":
        scheduler, _ = timm.scheduler.create_scheduler_v2(
            optimizer, sched=sched.name, num_epochs=plan.epochs,
            warmup_epochs=int(sched.warmup_epochs), warmup_lr=sched.warmup_lr,
            min_lr=sched.min_lr, decay_epochs=sched.decay_epochs or 30,
            decay_rate=sched.decay_rate, step_on_epochs=False,
            updates_per_epoch=steps_per_epoch)
    ema = timm.utils.ModelEmaV3(program.student, decay=plan.ema) if plan.ema else None
    scaler = torch.amp.GradScaler(device.type, enabled=program.autocast_dtype == torch.float16)

    start_epoch, skip_batches, step, best_top1 = 0, 0, 0, 0.0
    global_batch = plan.data.batch_size * job.world_size
    teacher_top1: float | None = None
    history: list[dict[str, Any]] = []
    if checkpoint is not None:
        _load_states(program, optimizer, checkpoint)
        if ema is not None and checkpoint.get("ema"):
            ema.load_state_dict(checkpoint["ema"])
        scaler.load_state_dict(checkpoint["scaler"])
        # Positions are kept in images, so a run resumes on another number of devices.
        start_epoch, best_top1 = checkpoint["epoch"], checkpoint["best_top1"]
        skip_batches = checkpoint["batch"] * checkpoint["global_batch"] // global_batch
        step = checkpoint["step"] * checkpoint["global_batch"] // global_batch
        teacher_top1, history = checkpoint["teacher_top1"], checkpoint["history"]
        if scheduler is not None:  # timm's schedules are a function of the step alone
            scheduler.step_update(num_updates=step)

    log = MetricsLog(out / "metrics.jsonl", resume_step=step if checkpoint else None) \
        if job.is_main else None
    total_steps = plan.epochs * steps_per_epoch
    if opts.max_steps is not None:
        total_steps = min(total_steps, opts.max_steps)
    progress = Progress(console, opts.quiet or not job.is_main, total_steps)
    trainable = sum(p.numel() for p in program.trainable_parameters())
    progress.note(
        f"[bold]{plan.recipe}[/]: {plan.student.name} <- "
        f"{plan.teacher.name if plan.teacher else 'no teacher'} on {device.type}\n"
        f"  batch {plan.data.batch_size} x {job.world_size} = {global_batch}, "
        f"{steps_per_epoch} steps/epoch, {plan.epochs} epochs ({total_steps} steps), lr "
        f"{opt.lr:g} ({opt.name}), {trainable:,} trainable params, precision "
        f"{program.autocast_dtype or 'fp32'}, compile {program.compile_mode or 'off'}"
        + (f", {torch.get_num_threads()} CPU threads" if device.type == "cpu" else "")
        + (f"\n  resuming at epoch {start_epoch} step {step}" if checkpoint else ""))

    def save(epoch: int, batch: int, name: str = "last.pt") -> None:
        student_sd, terms_sd, optim_sd = _states(program, optimizer)  # collective when sharded
        rng = distributed.all_gather_states(rng_state(device))  # every rank's own streams
        if not job.is_main:
            return
        state = {
            "vitkdl_checkpoint": 1, "recipe": opts.recipe, "hash": plan.hash,
            "epoch": epoch, "batch": batch, "step": step, "best_top1": best_top1,
            "global_batch": global_batch, "world_size": job.world_size,
            "teacher_top1": teacher_top1, "history": history,
            "student": student_sd, "terms": terms_sd, "optimizer": optim_sd,
            "optimizer_format": "fqn" if program.sharded else "torch",
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "ema": ema.state_dict() if ema is not None else None,
            "scaler": scaler.state_dict(), "rng": rng}
        save_atomic(state, out / name)

    if program.teacher is not None and teacher_top1 is None and any(
            t.kind != "labels" for t in plan.terms):
        teacher_top1, _ = evaluate(program.teacher_logits, val_loader, device,
                                   opts.max_eval_batches)
        progress.note(f"  teacher top-1 {teacher_top1:.2f}%")

    # ---- the loop ----------------------------------------------------------------------
    start = time.perf_counter()
    images_seen, stop, last_log = 0, False, time.perf_counter()
    bad_terms: torch.Tensor | None = None
    term_names = [t.name for t in plan.terms] + ["loss"]
    epoch, batch_in_epoch = start_epoch, 0
    program.train()
    try:
        for epoch in range(start_epoch, plan.epochs):
            set_epoch(train_loader, epoch, seed=cfg.seed, rank=job.rank)
            batches = iter(train_loader)
            batch_in_epoch = 0
            if checkpoint is not None and epoch == start_epoch:
                for _ in range(skip_batches):  # a checkpoint from the middle of an epoch
                    next(batches)
                batch_in_epoch = skip_batches
                _restore_rng(checkpoint, plan.seed, step, job, device, progress)
            for images, labels in batches:
                if opts.max_steps is not None and step >= opts.max_steps:
                    stop = True
                    break
                images = images.to(device, non_blocking=True)
                targets = labels.to(device, non_blocking=True)
                if mixup is not None:  # teacher and student see the same mixed batch
                    images, targets = mixup(images, targets)
                result = program.step(images, targets)
                loss = result["loss"]
                # Non-finite terms are remembered on the device (no sync per step) and checked
                # at every log line and before anything is evaluated or saved.
                flags = torch.stack([~torch.isfinite(v.detach()) for v in result.values()])
                bad_terms = flags if bad_terms is None else bad_terms | flags
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if plan.clip_grad:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(program.trainable_parameters(),
                                                   plan.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                step += 1
                batch_in_epoch += 1
                images_seen += images.shape[0] * job.world_size
                if scheduler is not None:
                    scheduler.step_update(num_updates=step)
                if ema is not None:
                    ema.update(program.student, step=step)
                if step % plan.log_every == 0 or step == total_steps:
                    _stop_if_not_finite(bad_terms, list(result), step, epoch, ckpt_path, job,
                                        device)
                    now = time.perf_counter()
                    record = {"kind": "train", "step": step, "epoch": epoch,
                              **{k: round(float(v.detach()), 6) for k, v in result.items()},
                              "lr": optimizer.param_groups[0]["lr"],
                              "images_per_second": round(
                                  plan.log_every * global_batch / (now - last_log), 2)}
                    last_log = now
                    if log is not None:
                        log.write(record)
                    info = " ".join(f"{k} {float(v.detach()):.4g}" for k, v in result.items())
                    info += f", lr {record['lr']:.3g}, {record['images_per_second']:.0f} img/s"
                    progress.update(step, epoch, info, log_line=True)
                elif progress.live:
                    rate = images_seen / max(time.perf_counter() - start, 1e-9)
                    progress.update(step, epoch, f"loss {float(loss.detach()):.4g}, "
                                    f"{rate:.0f} img/s", log_line=False)
                if opts.max_steps is not None and step >= opts.max_steps:
                    stop = True
                    break
            _stop_if_not_finite(bad_terms, term_names, step, epoch, ckpt_path, job, device)
            last_epoch = stop or epoch == plan.epochs - 1
            # Where a resumed run picks up: the next epoch, or this one's next batch when
            # --max-steps stopped it part-way.
            done = batch_in_epoch >= steps_per_epoch
            position = (epoch + 1, 0) if done else (epoch, batch_in_epoch)
            if last_epoch or (epoch + 1) % plan.eval_every == 0:
                program.eval()
                top1, top5 = evaluate(program.predict, val_loader, device,
                                      opts.max_eval_batches)
                ema_top1 = None
                if ema is not None:
                    ema_top1, _ = evaluate(ema.module, val_loader, device,
                                           opts.max_eval_batches)
                program.train()
                best_top1 = max(best_top1, top1)
                record = {"kind": "eval", "step": step, "epoch": epoch, "top1": top1,
                          "top5": top5, "ema_top1": ema_top1}
                history.append(record)
                if log is not None:
                    log.write(record)
                progress.note(f"  epoch {epoch}: top-1 {top1:.2f}% top-5 {top5:.2f}%"
                              + (f" (EMA {ema_top1:.2f}%)" if ema_top1 is not None else ""))
                if top1 >= best_top1:
                    save(*position, "best.pt")
            if last_epoch or (epoch + 1) % plan.checkpoint_every == 0:
                save(*position)
            if stop:
                break
    except KeyboardInterrupt:
        progress.close()
        save(epoch, batch_in_epoch)
        if log is not None:
            log.close()
        raise TrainError(f"interrupted at step {step}; saved {ckpt_path}. Continue with "
                         "--resume.") from None
    finally:
        progress.close()
    wall = time.perf_counter() - start
    # Replicas must agree; shards differ by design.
    in_sync = None if program.sharded else distributed.params_in_sync(
        program.trainable_parameters(), device)
    student_sd = _states(program, optimizer)[0]  # gathered on rank 0 when sharded
    if not job.is_main:
        distributed.barrier()  # wait for rank 0's files
        return {"recipe": plan.recipe, "hash": plan.hash, "rank": job.rank}
    if log is not None:
        log.close()

    # ---- the end -----------------------------------------------------------------------
    _export(student_sd, ema, out)
    last = history[-1] if history else {}
    summary = {
        "recipe": plan.recipe, "hash": plan.hash, "overrides": list(plan.overrides),
        # Finished: every epoch trained (a --max-steps run is not, and --resume continues it).
        "complete": step >= plan.epochs * steps_per_epoch, "top1": last.get("top1"),
        "top5": last.get("top5"), "best_top1": best_top1 if history else None,
        "ema_top1": last.get("ema_top1"), "teacher_top1": teacher_top1,
        "epochs": epoch + 1, "steps": step,
        "images_per_second": round(images_seen / wall, 2) if wall > 0 else None,
        "wall_seconds": round(wall, 2), "peak_memory_mb": _peak_memory_mb(device),
        "world_size": job.world_size, "global_batch": global_batch,
        "ranks_in_sync": in_sync, "device": device.type,
        "compile": {"mode": program.compile_mode, "graphs_compiled": _graphs_compiled()},
        "student_weights": str(out / "student.safetensors"),
        # How to load the export with timm (num_classes in the overlay keeps the head when it
        # differs from the architecture's default).
        "timm": {"name": plan.student.name, "kwargs": plan.student.timm_kwargs,
                 "pretrained_cfg_overlay": {"file": str(out / "student.safetensors"),
                                            "num_classes": plan.student.num_classes}},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_curves(out / "metrics.jsonl", out / "curves.png", plan.recipe)
    distributed.barrier()
    return summary


def _restore_rng(checkpoint: dict[str, Any], seed: int, step: int, job: distributed.Dist,
                 device: torch.device, progress: Progress) -> None:
    """Each rank continues its own random streams (generation masks, drop path, CPU-side
    augmentation), restored after the skipped batches: exactly where it stopped. Resumed on
    another number of processes, the saved streams do not map onto the ranks: each rank then
    starts a fresh stream derived from the seed, the step and its rank."""
    states = rank_states(checkpoint)
    if len(states) == job.world_size:
        set_rng_state(states[job.rank], device)
        return
    _seed_everything(mix_seed(seed, step, job.rank))
    progress.note(f"  the checkpoint was written by {len(states)} process(es), this run has "
                  f"{job.world_size}: fresh per-rank random states from the seed and step "
                  f"{step} (masks and drop path do not replay the original run's)")


def _stop_if_not_finite(flags: torch.Tensor | None, names: list[str], step: int, epoch: int,
                        ckpt: Path, job: distributed.Dist, device: torch.device) -> None:
    """Stop the run, naming the terms, once any loss term was NaN/Inf (on any rank)."""
    if flags is None:
        return
    counts = distributed.all_reduce_sum([float(f) for f in flags.tolist()], device)
    bad = [n for n, c in zip(names, counts, strict=True) if c > 0 and n != "loss"]
    if not any(counts):
        return
    raise TrainError(
        f"the loss became NaN or infinite by step {step} (epoch {epoch}) in term "
        f"{', '.join(bad) or 'loss'}; stopped without saving. The last good checkpoint is "
        f"{ckpt if ckpt.exists() else 'not written yet'}. Lower the learning rate or that "
        "term's weight.")


def check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise TrainError(f"cannot write to the output folder {out}: {exc.strerror or exc}; "
                         "pass --out DIR") from None


def _resume_point(plan: Plan, opts: RunOptions, path: Path) -> dict[str, Any] | None:
    if not opts.resume:
        return None
    if not path.exists():
        raise TrainError(f"--resume: no checkpoint at {path}; start without --resume")
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as exc:
        raise TrainError(str(exc)) from None
    if ckpt["hash"] != plan.hash and not opts.force:
        raise TrainError(f"--resume: {path} was written by a different version of the recipe "
                         f"(hash {ckpt['hash']}, now {plan.hash}); resuming would mix two "
                         "recipes. Pass --force to resume anyway, or start a new run.")
    return ckpt


def _export(student: dict[str, torch.Tensor], ema: Any, out: Path) -> None:
    """``student.safetensors`` (and ``student_ema.safetensors``): plain timm state dicts."""
    from safetensors.torch import save_file

    def plain(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in state.items()}

    save_file(plain(student), str(out / "student.safetensors"))
    if ema is not None:
        save_file(plain(ema.module.state_dict()), str(out / "student_ema.safetensors"))


def _states(program: Program, optimizer: torch.optim.Optimizer
            ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Student, adapter and optimizer state as full (unsharded) state dicts, so checkpoints
    load on one device whatever the run was sharded over. Collective under FSDP: every rank
    calls it, rank 0 receives the tensors."""
    if not program.sharded:
        return program.student.state_dict(), program.terms.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = get_model_state_dict(program.core, options=options)
    optim = get_optimizer_state_dict(program.core, optimizer, options=options)
    student = {k.removeprefix("student."): v for k, v in full.items()
               if k.startswith("student.")}
    terms = {k.removeprefix("terms."): v for k, v in full.items() if k.startswith("terms.")}
    return student, terms, optim


def _load_states(program: Program, optimizer: torch.optim.Optimizer,
                 checkpoint: dict[str, Any]) -> None:
    """The inverse of :func:`_states`, from any checkpoint onto this run's layout."""
    fqn_optim = checkpoint.get("optimizer_format") == "fqn"
    if not program.sharded and not fqn_optim:
        program.student.load_state_dict(checkpoint["student"])
        program.terms.load_state_dict(checkpoint["terms"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    full = {**{f"student.{k}": v for k, v in checkpoint["student"].items()},
            **{f"terms.{k}": v for k, v in checkpoint["terms"].items()}}
    set_model_state_dict(program.core, full, options=options)
    if fqn_optim:
        set_optimizer_state_dict(program.core, optimizer, checkpoint["optimizer"],
                                 options=options)
    else:  # a replicated run's optimizer state onto a sharded run: start it afresh
        pass


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return round(rss / (2**20 if sys.platform == "darwin" else 2**10), 1)
    except Exception:
        return math.nan


def _graphs_compiled() -> int:
    """Graphs dynamo compiled in this process (2 for a compiled run: step and evaluation;
    more means recompiles)."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"].get("unique_graphs", 0))
    except Exception:
        return 0
