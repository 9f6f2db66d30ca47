"""Stage 6: the training loop. Reads top to bottom: set-up, the epoch loop, the end.

Everything timm already does well is timm's: the optimizer (``create_optimizer_v2``), the
per-iteration cosine schedule with warm-up (``create_scheduler_v2``), EMA (``ModelEmaV3``),
mixup/cutmix and accuracy. What is new here is the compiled distillation step and the
bookkeeping that makes a run resumable to the exact same numbers.
"""

from __future__ import annotations

import functools
import json
import math
import random
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape

from vitkdl.exits import WriteError, writing
from vitkdl.planner import Plan
from vitkdl.program import Program, build, precision_name, resolve_device
from vitkdl.runs import checkpoint_files, write_atomic
from vitkdl.settings import RunSettings
from vitkdl.train import distributed
from vitkdl.train.cache import CacheError, CacheReader, needed_epochs
from vitkdl.train.cache import fill as cache_pass
from vitkdl.train.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_first,
    rank_states,
    rng_state,
    save_atomic,
    set_rng_state,
)
from vitkdl.train.data import (
    UNREADABLE,
    build_loaders,
    build_mixup,
    check_val_readable,
    mix_seed,
    set_epoch,
    step_key,
    unwrap,
)
from vitkdl.train.report import PLOTS_MISSING, MetricsLog, write_curves
from vitkdl.train.signals import (
    exit_status,
    interrupt_stops,
    stop_signals,
)
from vitkdl.train.step import (
    Update,
    configure_optimizer,
    cpu_threads,
    model_param_groups,
    train_step,
)


class TrainError(Exception):
    """A run that cannot start or cannot go on; the message says why and what to do."""


#: Under torch.distributed the ranks agree every this many steps whether a stop signal
#: arrived or a checkpoint is due by the clock (one small all-reduce).
CONTROL_EVERY = 10


class DataPipelineError(TrainError):
    """The data pipeline raised in the middle of a run (a worker's exception, an unreadable
    shard): the run stopped after a checkpoint of its last completed step, where ``--resume``
    continues once the cause is fixed. Exit status 1 (a run failed)."""


class ResumeRefused(TrainError):
    """``--resume`` from a checkpoint this run cannot continue: another recipe's (without
    ``--force``), not a vitkdl checkpoint, or one of other models. Exit status 2: nothing
    failed, the command needs another checkpoint or no ``--resume``."""


class Interrupted(TrainError):
    """A run stopped by a signal after saving a checkpoint to continue from; ``code`` is
    the exit status that says so (:data:`INTERRUPTED` for Ctrl-C, :data:`PREEMPTED`)."""

    def __init__(self, message: str, signal_name: str) -> None:
        super().__init__(message)
        self.signal_name = signal_name
        self.code = exit_status(signal_name)


@dataclass(frozen=True, kw_only=True)
class RunOptions(RunSettings):
    """How to run (not what: that is the plan): the settings (:class:`vitkdl.settings.
    RunSettings`; ``max_steps`` already the smoke run's when it is one, ``out_root`` where
    teachers' runs are found) and what the loop needs of its own."""

    out_dir: Path
    resume: bool = False
    max_eval_batches: int | None = None
    load_weights: bool = True
    recipe: dict[str, Any] = field(default_factory=dict)
    # Resume from this checkpoint instead of OUT/last.pt (a run of an earlier version of the
    # recipe, continued under --force into this run's own folder).
    resume_from: Path | None = None
    # Called after every optimizer step with (step, total steps, epoch): how a sweep shows
    # each run's progress. Cheap calls only (no device sync happens for it).
    on_step: Callable[[int, int, int], None] | None = None


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Evaluation(NamedTuple):
    """What :func:`evaluate` measured: accuracies (%) over the readable samples only."""

    top1: float
    top5: float
    #: With ``heads``: the class head's and the distillation head's own top-1.
    heads: tuple[float, ...]
    #: Samples the accuracies are over (every rank's), and those that could not be read
    #: (labelled ``UNREADABLE``): in no accuracy, reported.
    counted: int
    skipped: int


@torch.no_grad()
def evaluate(
    predict: Any,
    loader: Any,
    device: torch.device,
    max_batches: int | None = None,
    heads: bool = False,
) -> Evaluation:
    """Top-1 and top-5 accuracy (%) of ``predict`` over ``loader``.

    With ``heads``, ``predict`` returns a distilled student's class and distillation logits:
    top-1 and top-5 of their mean (timm's inference rule), then each head's own top-1.

    A last, partial batch is padded to the loader's batch size and its padding ignored, so a
    compiled ``predict`` sees one shape (one graph, no recompile). A sample the dataset could
    not read comes labelled ``UNREADABLE`` (-1): it matches no prediction and is left out of
    the total, and counted apart. The counts stay on the device until the end: one
    synchronisation per evaluation, not per batch.
    """
    size = unwrap(loader).batch_size
    counts = torch.zeros(6 if heads else 4, dtype=torch.int64, device=device)
    for i, (images, labels) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        n = labels.shape[0]
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if size is not None and n < size:
            images = torch.cat([images, images.new_zeros((size - n, *images.shape[1:]))])
        out = predict(images)
        per_head: list[torch.Tensor] = []
        if heads:
            cls, dist = (x[:n].float() for x in out)
            logits = (cls + dist) / 2
            per_head = [h.argmax(dim=-1).eq(labels).sum() for h in (cls, dist)]
        else:
            logits = out[:n].float()
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        hits = top.eq(labels[:, None])  # never true for UNREADABLE (-1): no class is -1
        unreadable = labels.eq(UNREADABLE).sum()
        counts += torch.stack(
            [hits[:, 0].sum(), hits.any(dim=-1).sum(), *per_head, n - unreadable, unreadable]
        )
    # Each rank evaluates its own shard (nothing padded across ranks); the counts add up.
    *correct, total, skipped = distributed.all_reduce_sum(counts.tolist(), device)
    top1, top5, *per = (100.0 * c / max(total, 1) for c in correct)
    return Evaluation(top1, top5, tuple(per), int(total), int(skipped))


def _skipped(result: Evaluation) -> str:
    """The note's tail when samples could not be read: how many, and that none counted."""
    if not result.skipped:
        return ""
    images = "image" if result.skipped == 1 else "images"
    return f" ({result.skipped} unreadable validation {images} left out)"


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

            self.bar = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                console=console,
                transient=True,
            )
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
    """Train the plan's student; returns the summary (also written to ``summary.json``).

    Ctrl-C, SIGTERM and SIGUSR1 stop the run with a checkpoint of where it stopped (a signal
    at the next step) and raise :class:`Interrupted`, whose ``code`` is the exit status
    (:mod:`vitkdl.train.signals`)."""
    threads, graphs = torch.get_num_threads(), _graphs_compiled()
    try:
        return _train(plan, opts, console, graphs)
    finally:  # a later run in this process starts from the same settings
        torch.set_num_threads(threads)


def _train(plan: Plan, opts: RunOptions, console: Console | None, graphs: int) -> dict[str, Any]:
    run = Run(plan, opts, console or Console(stderr=True))
    run.graphs_before = graphs

    def stop(name: str) -> None:  # the first signal names the stop (and its exit status)
        run.stop_signal = run.stop_signal or name

    def note(text: str) -> None:  # even with --quiet: the user is waiting on it
        if run.job.is_main:
            run.progress.console.print(text, highlight=False)

    with stop_signals(stop), interrupt_stops(stop, note):
        run.evaluate_teacher()
        try:
            run.loop()
        except KeyboardInterrupt:  # a second Ctrl-C: mid-step, so nothing is saved now
            run.progress.close()
            if run.log is not None:
                run.log.close()
            last = (
                f"--resume continues from the last checkpoint, {run.ckpt_path}"
                if run.ckpt_path.exists()
                else "there is no checkpoint to resume from"
            )
            raise Interrupted(
                f"aborted by a second Ctrl-C at step {run.step}, without a checkpoint; {last}.",
                "SIGINT",
            ) from None
        except TrainError:  # a signal, a data pipeline error, a NaN/Inf loss
            if run.log is not None:
                run.log.close()
            raise
        finally:
            run.progress.close()
        return run.finish()


class Run:
    """One training run, in the order it happens: set-up (``__init__``), the teacher's
    accuracy, the loop (an epoch of steps, then evaluation and checkpoints), the end."""

    # ---- set-up ------------------------------------------------------------------------

    def __init__(self, plan: Plan, opts: RunOptions, console: Console) -> None:
        if plan.cache is not None and not opts.load_weights:
            # A smoke run (random weights, synthetic data) runs its teacher: a cache of it
            # would stand in the recipe's cache folder under another key.
            plan = plan.model_copy(update={"cache": None})
        self.plan, self.opts = plan, opts
        self.graphs_before = 0  # graphs dynamo had compiled in this process before the run
        job = self.job = distributed.current()
        self.out = opts.out_dir
        if job.is_main:
            check_writable(self.out)
        device = resolve_device(opts.device)
        if job.enabled and device.type == "cuda":
            device = torch.device("cuda", job.local_rank)
        self.device = device
        self.ckpt_path = self.out / "last.pt"
        self.checkpoint = _resume_point(plan, opts, console if job.is_main else None)

        # A teacher cache is completed (for the epochs this run reaches) before anything
        # else is built; the step then reads the teacher's logits from it.
        self.cache: CacheReader | None = None
        threads = cpu_threads(plan, device)
        if threads is not None:
            torch.set_num_threads(threads)
        if plan.cache is not None:
            self.cache = _teacher_cache(plan, opts, device, job, console)
        _seed_everything(plan.seed)
        program = self.program = build(plan, device, load=opts.load_weights, runs_dir=opts.out_root)
        # On a GPU, batches of decoded images travel as uint8 and are normalised there.
        self.train_loader, self.val_loader, num_classes = build_loaders(
            plan.data,
            distributed=job.enabled,
            rank=job.rank,
            world_size=job.world_size,
            prefetch_device=str(device) if device.type == "cuda" else None,
        )
        if job.enabled:
            if plan.shard == "fsdp":
                program.shard()
            else:
                program.distribute([job.local_rank] if device.type == "cuda" else None)
            torch.manual_seed(plan.seed + job.rank)  # masks and drop path differ across ranks
        if num_classes != plan.student.num_classes:
            raise TrainError(
                f"the data has {num_classes} classes but the student's head has "
                f"{plan.student.num_classes}; set num_classes = {num_classes} on "
                "the student (and teacher)"
            )
        # Before any step: a validation split that cannot be read would otherwise fail only
        # at the first evaluation, an epoch later.
        cfg = plan.data
        split = cfg.val_root or (f"{cfg.root}/val" if cfg.root else cfg.name or cfg.root)
        check_val_readable(
            self.val_loader,
            f"({cfg.source}{' ' + split if split else ''})",
            allow_empty=job.enabled,
        )
        self.mixup = build_mixup(plan.data, num_classes)
        self._optimizer()

        self.start_epoch, self.skip_batches, self.step, self.best_top1 = 0, 0, 0, 0.0
        self.global_batch = plan.data.batch_size * job.world_size
        self.teacher_top1: float | None = None
        self.history: list[dict[str, Any]] = []
        if self.checkpoint is not None:
            self._resume(self.checkpoint)
        self.log = (
            MetricsLog(
                self.out / "metrics.jsonl", resume_step=self.step if self.checkpoint else None
            )
            if job.is_main
            else None
        )
        self.steps_per_epoch = len(self.train_loader)
        if self.cache is not None and self.cache.steps_per_epoch != self.steps_per_epoch:
            raise TrainError(
                f"the teacher cache {self.cache.root} holds {self.cache.steps_per_epoch} steps "
                f"per epoch and the data gives {self.steps_per_epoch}: the data changed since "
                "it was built; delete the folder and run `vitkdl cache` again"
            )
        self.total_steps = plan.epochs * self.steps_per_epoch
        if opts.max_steps is not None:
            self.total_steps = min(self.total_steps, opts.max_steps)
        self.progress = Progress(console, opts.quiet or not job.is_main, self.total_steps)
        if self.log is not None and self.log.note is not None:
            # Shown under --quiet too: records were lost, the user should know which.
            console.print(f"warning: {self.log.note}", highlight=False, markup=False)
        self.epoch, self.batch_in_epoch = self.start_epoch, 0
        self.images_seen, self.wall = 0, 0.0
        self.stop_signal: str | None = None  # set by SIGTERM / SIGUSR1 / SIGINT (see train())
        self.last_save = time.monotonic()
        # The step of the newest last.pt (None: none yet): every save is of finite weights.
        self.saved_step: int | None = self.step if self.checkpoint is not None else None
        self._announce()

    def _optimizer(self) -> None:
        """Optimizer (one decay rule), per-iteration schedule, EMA and the update step."""
        import timm.scheduler
        import timm.utils

        plan, program = self.plan, self.program
        groups = model_param_groups(
            program.student, program.terms.named_parameters(), plan.optimizer.weight_decay
        )
        self.optimizer = configure_optimizer(plan, groups, fused=not program.sharded)
        sched = plan.schedule
        self.scheduler: Any = None
        if sched.name != "constant":
            self.scheduler, _ = timm.scheduler.create_scheduler_v2(
                self.optimizer,
                sched=sched.name,
                num_epochs=plan.epochs,
                warmup_epochs=int(sched.warmup_epochs),
                warmup_lr=sched.warmup_lr,
                min_lr=sched.min_lr,
                decay_epochs=sched.decay_epochs or 30,
                decay_rate=sched.decay_rate,
                step_on_epochs=False,
                updates_per_epoch=len(self.train_loader),
            )
        self.ema = timm.utils.ModelEmaV3(program.student, decay=plan.ema) if plan.ema else None
        # The EMA copy is evaluated as the student is: under autocast, compiled with the step.
        self.ema_predict = program.predictor(self.ema.module) if self.ema is not None else None
        self.update = Update(
            self.optimizer,
            program.trainable_parameters(),
            plan.clip_grad,
            self.device,
            program.autocast_dtype,
            self.ema,
            program.student,
        )

    def _resume(self, checkpoint: dict[str, Any]) -> None:
        try:
            _load_states(self.program, self.optimizer, checkpoint)
        except (RuntimeError, KeyError, ValueError) as exc:  # weights of other models
            raise ResumeRefused(_misfit(checkpoint, exc)) from None
        if self.ema is not None and checkpoint.get("ema"):
            self.ema.load_state_dict(checkpoint["ema"])
        self.update.scaler.load_state_dict(checkpoint["scaler"])
        # Positions are kept in images, so a run resumes on another number of devices.
        self.start_epoch, self.best_top1 = checkpoint["epoch"], checkpoint["best_top1"]
        saved = checkpoint["global_batch"]
        self.skip_batches = checkpoint["batch"] * saved // self.global_batch
        self.step = checkpoint["step"] * saved // self.global_batch
        self.teacher_top1, self.history = checkpoint["teacher_top1"], checkpoint["history"]
        if self.scheduler is not None:  # timm's schedules are a function of the step alone
            self.scheduler.step_update(num_updates=self.step)

    def _announce(self) -> None:
        plan, opt, program = self.plan, self.plan.optimizer, self.program
        trainable = sum(p.numel() for p in program.trainable_parameters())
        self.progress.note(
            f"[bold]{plan.recipe}[/]: {plan.student.name} <- "
            f"{plan.teacher.name if plan.teacher else 'no teacher'} on {self.device.type}\n"
            f"  batch {plan.data.batch_size} x {self.job.world_size} = {self.global_batch}, "
            f"{self.steps_per_epoch} steps/epoch, {plan.epochs} epochs ({self.total_steps} "
            f"steps), lr {opt.lr:g} ({opt.name}), {trainable:,} trainable params, precision "
            f"{precision_name(program.autocast_dtype)}, compile {program.compile_mode or 'off'}"
            + (f", {torch.get_num_threads()} CPU threads" if self.device.type == "cpu" else "")
            + (
                f"\n  resuming at epoch {self.start_epoch} step {self.step}"
                if self.checkpoint
                else ""
            )
        )

    # ---- the teacher -------------------------------------------------------------------

    def evaluate_teacher(self) -> None:
        """The teacher's accuracy on the validation split, once per run."""
        if self.plan.teacher_used and self.teacher_top1 is None:
            if self.cache is not None:  # measured by the cache pass (the teacher is not here)
                self.teacher_top1 = self.cache.teacher_top1
                shown = f"{self.teacher_top1:.2f}%" if self.teacher_top1 is not None else "n/a"
                self.progress.note(f"  teacher top-1 {shown} (from the cache)")
                return
            if self.plan.teacher is not None and not self.plan.teacher.num_classes:
                # A headless teacher's "logits" are its pooled features: no accuracy to report.
                self.progress.note("  teacher top-1 n/a (the teacher has no classifier head)")
                return
            result = evaluate(
                self.program.teacher_logits,
                self.val_loader,
                self.device,
                self.opts.max_eval_batches,
            )
            self.teacher_top1 = result.top1
            self.progress.note(f"  teacher top-1 {self.teacher_top1:.2f}%{_skipped(result)}")

    # ---- the loop ----------------------------------------------------------------------

    def loop(self) -> None:
        """Epochs of steps; after each, evaluation and checkpoints as the plan says."""
        plan = self.plan
        start = self.loop_start = time.perf_counter()
        self.last_log = start
        self.last_info = "loss -"
        # Per term (and the total), the first step whose value was NaN/Inf (0: none yet).
        self.first_bad: torch.Tensor | None = None
        self.program.train()
        try:
            for epoch in range(self.start_epoch, plan.epochs):
                self.epoch = epoch
                stop = self._epoch(epoch)
                self._end_of_epoch(epoch, stop)
                if stop:
                    break
        finally:
            self.wall = time.perf_counter() - start

    def _epoch(self, epoch: int) -> bool:
        """One epoch's steps; True when ``--max-steps`` stopped the run."""
        set_epoch(self.train_loader, epoch, seed=self.plan.data.seed, rank=self.job.rank)
        self.program.set_epoch(epoch + 1)  # terms count epochs from 1 (warm-ups: DKD's authors)
        batches = iter(self.train_loader)
        self.batch_in_epoch = 0
        if self.checkpoint is not None and epoch == self.start_epoch:
            try:
                for _ in range(self.skip_batches):  # a checkpoint from the middle of an epoch
                    next(batches)
            except Exception as exc:  # the checkpoint resumed from stands as it is
                raise self._data_failed(exc, save=False) from exc
            self.batch_in_epoch = self.skip_batches
            _restore_rng(
                self.checkpoint, self.plan.seed, self.step, self.job, self.device, self.progress
            )  # after skipping: exactly where it stopped
        max_steps = self.opts.max_steps
        while True:
            try:
                images, labels = next(batches)
            except StopIteration:
                break
            except Exception as exc:  # the step after the last completed one never began
                raise self._data_failed(exc) from exc
            if max_steps is not None and self.step >= max_steps:
                return True
            self._step(images, labels)
            self._control()
            if max_steps is not None and self.step >= max_steps:
                return True
        return False

    def _data_failed(self, exc: Exception, save: bool = True) -> DataPipelineError:
        """The error for an exception raised by the data pipeline between two steps, after
        saving a checkpoint of the last completed step (its weights, optimizer and position
        are consistent: the next step had not begun). The full traceback (a worker's
        included) goes to ``error.txt`` in the run folder; the message keeps its last line.
        Under torch.distributed one process cannot save alone, and while a resumed run skips
        to its checkpoint's batch (``save`` False) nothing new was done: the last checkpoint
        stands."""
        self.progress.close()
        # A worker's exception carries its traceback in the message: its last line is the
        # original "Type: message".
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        cause = lines[-1] if lines else ""
        if not cause.split(" ", 1)[0].endswith(":"):
            cause = f"{type(exc).__name__}: {cause}".rstrip(": ")
        where = (
            f"at step {self.step + 1} (epoch {self.epoch}, batch {self.batch_in_epoch})"
            if save
            else f"while skipping to batch {self.skip_batches} of epoch {self.epoch} to resume"
        )
        details = ""
        if self.job.is_main:
            trace = self.out / "error.txt"
            trace.write_text("".join(traceback.format_exception(exc)))
            details = f" (traceback in {trace})"
        if not save:
            saved = "the checkpoint it resumed from is unchanged"
        elif self.job.enabled:
            saved = (
                f"the last checkpoint is {self.ckpt_path} (step {self.saved_step})"
                if self.saved_step is not None
                else "no checkpoint was written yet"
            )
        else:
            self._stop_if_not_finite(self._term_names())  # an earlier NaN is the first cause
            self.save(self.epoch, self.batch_in_epoch)
            saved = f"saved {self.ckpt_path} at step {self.step}, the last completed step"
        return DataPipelineError(
            f"the data pipeline failed {where}: {cause}{details}; {saved}. Fix the cause, "
            "then resume with the same command and --resume."
        )

    def _control(self) -> None:
        """After a step: stop with a checkpoint when a stop signal arrived, and save one when
        ``checkpoint_every`` (in steps or minutes) says so. Under torch.distributed the ranks
        decide together (every :data:`CONTROL_EVERY` steps), so every rank saves or stops at
        the same step."""
        plan, step = self.plan, self.step
        unit = plan.checkpoint_unit
        due = unit == "steps" and step % int(plan.checkpoint_every) == 0
        if self.job.enabled and step % CONTROL_EVERY != 0:
            stop, late = False, False
        else:
            stop = self.stop_signal is not None
            late = unit == "minutes" and (
                time.monotonic() - self.last_save >= plan.checkpoint_every * 60
            )
            if self.job.enabled:  # one rank's signal or clock decides for all
                votes = distributed.all_reduce_sum([float(stop), float(late)], self.device)
                stop, late = votes[0] > 0, votes[1] > 0
        if stop:
            self._stop_if_not_finite(list(self._term_names()))
            self.save(self.epoch, self.batch_in_epoch)
            self.progress.close()
            name = self.stop_signal or "a signal on another rank"
            signal_name = self.stop_signal or "SIGTERM"
            raise Interrupted(
                f"stopped by {name} at step {step} (epoch {self.epoch}, batch "
                f"{self.batch_in_epoch}); saved {self.ckpt_path}. Continue with --resume "
                f"(exit status {exit_status(signal_name)}).",
                signal_name,
            )
        if due or late:
            self._stop_if_not_finite(list(self._term_names()))
            self.save(self.epoch, self.batch_in_epoch)

    def _term_names(self) -> list[str]:
        return [t.name for t in self.plan.terms] + ["loss"]

    def _step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        images = images.to(self.device, non_blocking=True)
        targets = labels.to(self.device, non_blocking=True)
        if self.mixup is not None:  # teacher and student see the same mixed batch
            key = step_key(self.plan.data.seed, self.epoch, self.batch_in_epoch, self.job.rank)
            images, targets = self.mixup(images, targets, key)
        forward = self.program.step
        if self.cache is not None:  # the teacher's logits of this very batch, from the cache
            cached = self.cache.logits(self.epoch, self.batch_in_epoch)
            forward = functools.partial(self.program.step, cached=cached)
        result = train_step(forward, self.update, images, targets, self.step + 1)
        # The first step at which each term was NaN/Inf is remembered on the device (no sync
        # per step) and checked at every log line and before anything is evaluated or saved.
        flags = torch.stack([~torch.isfinite(v.detach()) for v in result.values()])
        first = self.first_bad
        if first is None:
            first = torch.zeros_like(flags, dtype=torch.int64)
        self.first_bad = torch.where(flags & (first == 0), self.step + 1, first)
        self.step += 1
        self.batch_in_epoch += 1
        self.images_seen += images.shape[0] * self.job.world_size
        if self.scheduler is not None:
            self.scheduler.step_update(num_updates=self.step)
        self._report(result)

    def _report(self, result: dict[str, torch.Tensor]) -> None:
        """A log line (and metrics record) every ``log_every`` steps, the only steps that wait
        for the device (one transfer of every term's value); between them the live bar moves
        on host-side counts alone."""
        plan, step = self.plan, self.step
        if self.opts.on_step is not None:
            self.opts.on_step(step, self.total_steps, self.epoch)
        if step % plan.log_every == 0 or step == self.total_steps:
            self._stop_if_not_finite(list(result))
            values = dict(
                zip(
                    result,
                    torch.stack([v.detach().float() for v in result.values()]).tolist(),
                    strict=True,
                )
            )
            now = time.perf_counter()
            record = {
                "kind": "train",
                "step": step,
                "epoch": self.epoch,
                **{k: round(v, 6) for k, v in values.items()},
                "lr": self.optimizer.param_groups[0]["lr"],
                "images_per_second": round(
                    plan.log_every * self.global_batch / (now - self.last_log), 2
                ),
            }
            self.last_log = now
            if self.log is not None:
                self.log.write(record)
            info = " ".join(f"{k} {v:.4g}" for k, v in values.items())
            info += f", lr {record['lr']:.3g}, {record['images_per_second']:.0f} img/s"
            self.last_info = f"loss {values['loss']:.4g} at step {step}"
            self.progress.update(step, self.epoch, info, log_line=True)
        elif self.progress.live:
            rate = self.images_seen / max(time.perf_counter() - self.loop_start, 1e-9)
            self.progress.update(
                step, self.epoch, f"{self.last_info}, {rate:.0f} img/s", log_line=False
            )

    def _end_of_epoch(self, epoch: int, stop: bool) -> None:
        """Evaluation, the best and the last checkpoint, at the epoch's end (or the stop)."""
        plan = self.plan
        self._stop_if_not_finite([t.name for t in plan.terms] + ["loss"])
        last_epoch = stop or epoch == plan.epochs - 1
        # Where a resumed run picks up: the next epoch, or this one's next batch when
        # --max-steps stopped it part-way.
        done = self.batch_in_epoch >= self.steps_per_epoch
        position = (epoch + 1, 0) if done else (epoch, self.batch_in_epoch)
        by_epochs = plan.checkpoint_unit == "epochs"
        save_last = last_epoch or (by_epochs and (epoch + 1) % int(plan.checkpoint_every) == 0)
        evaluating = last_epoch or (epoch + 1) % plan.eval_every == 0
        if save_last:
            # The epoch's weights first: an evaluation that fails never loses them. Saved
            # again after the evaluation with its record (best_top1, history); evaluating
            # draws from no training RNG stream, so both copies resume the same way.
            self.save(*position)
        if evaluating:
            try:
                self._evaluate_epoch(epoch)
            except Exception as exc:
                raise self._evaluation_failed(exc, epoch, saved=save_last) from exc
            if self.history[-1]["top1"] >= self.best_top1:
                self.save(*position, "best.pt")
            if save_last:
                self.save(*position)

    def _evaluation_failed(self, exc: Exception, epoch: int, saved: bool) -> DataPipelineError:
        """The error for an evaluation that raised after epoch ``epoch``: its cause's last line
        (a worker's traceback goes to ``error.txt``) and where the run can continue from."""
        self.progress.close()
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        cause = lines[-1] if lines else ""
        if not cause.split(" ", 1)[0].endswith(":"):
            cause = f"{type(exc).__name__}: {cause}".rstrip(": ")
        details = ""
        if self.job.is_main:
            trace = self.out / "error.txt"
            trace.write_text("".join(traceback.format_exception(exc)))
            details = f" (traceback in {trace})"
        where = (
            f"saved {self.ckpt_path} of epoch {epoch} (step {self.step}) before evaluating"
            if saved
            else f"the last checkpoint is {self.ckpt_path} (step {self.saved_step})"
            if self.saved_step is not None
            else "no checkpoint was written yet"
        )
        return DataPipelineError(
            f"evaluation after epoch {epoch} failed: {cause}{details}; {where}. Fix the "
            "cause, then resume with the same command and --resume."
        )

    def _evaluate_epoch(self, epoch: int) -> None:
        """The student's (and its EMA's) accuracy after ``epoch``: recorded in the history and
        the metrics log, and shown."""
        self.program.eval()
        heads: dict[str, float] = {}
        if self.program.distilled:  # the two heads trained apart: each one's top-1 too
            result = evaluate(
                self.program.predict_heads,
                self.val_loader,
                self.device,
                self.opts.max_eval_batches,
                heads=True,
            )
            heads["class_head_top1"], heads["dist_head_top1"] = result.heads
        else:
            result = evaluate(
                self.program.predict, self.val_loader, self.device, self.opts.max_eval_batches
            )
        top1, top5 = result.top1, result.top5
        ema_top1 = None
        if self.ema_predict is not None:
            ema_top1 = evaluate(
                self.ema_predict, self.val_loader, self.device, self.opts.max_eval_batches
            ).top1
        self.program.train()
        self.best_top1 = max(self.best_top1, top1)
        record = {
            "kind": "eval",
            "step": self.step,
            "epoch": epoch,
            "top1": top1,
            "top5": top5,
            "ema_top1": ema_top1,
            **heads,
            "skipped": result.skipped,  # unreadable validation samples, in no count
        }
        self.history.append(record)
        if self.log is not None:
            self.log.write(record)
        self.progress.note(
            f"  epoch {epoch}: top-1 {top1:.2f}% top-5 {top5:.2f}%"
            + (f" (EMA {ema_top1:.2f}%)" if ema_top1 is not None else "")
            + (
                f"; class head {heads['class_head_top1']:.2f}%, distillation head "
                f"{heads['dist_head_top1']:.2f}%"
                if heads
                else ""
            )
            + _skipped(result)
        )

    def _stop_if_not_finite(self, names: list[str]) -> None:
        _stop_if_not_finite(
            self.first_bad,
            names,
            self.step,
            self.steps_per_epoch,
            (self.ckpt_path, self.saved_step),
            self.device,
        )

    # ---- checkpoints -------------------------------------------------------------------

    def save(self, epoch: int, batch: int, name: str = "last.pt") -> None:
        """A checkpoint to continue exactly from (epoch, batch); collective under DDP/FSDP."""
        student_sd, terms_sd, optim_sd = _states(self.program, self.optimizer)
        rng = distributed.all_gather_states(rng_state(self.device))  # every rank's streams
        if not self.job.is_main:
            return
        state = {
            "vitkdl_checkpoint": 1,
            "recipe": self.opts.recipe,
            "hash": self.plan.hash,
            "epoch": epoch,
            "batch": batch,
            "step": self.step,
            "best_top1": self.best_top1,
            "global_batch": self.global_batch,
            "world_size": self.job.world_size,
            "teacher_top1": self.teacher_top1,
            "history": self.history,
            "student": student_sd,
            "terms": terms_sd,
            "optimizer": optim_sd,
            "optimizer_format": "fqn" if self.program.sharded else "torch",
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "scaler": self.update.scaler.state_dict(),
            "rng": rng,
        }
        save_atomic(state, self.out / name)
        if name == "last.pt":
            self.last_save = time.monotonic()
            self.saved_step = self.step

    # ---- the end -----------------------------------------------------------------------

    def finish(self) -> dict[str, Any]:
        """Export the student, write ``summary.json`` and the curves (rank 0)."""
        plan, out, program, device, job = self.plan, self.out, self.program, self.device, self.job
        # Replicas must agree; shards differ by design.
        in_sync = (
            None
            if program.sharded
            else distributed.params_in_sync(program.trainable_parameters(), device)
        )
        student_sd = _states(program, self.optimizer)[0]  # gathered on rank 0 when sharded
        if not job.is_main:
            distributed.barrier()  # wait for rank 0's files
            return {"recipe": plan.recipe, "hash": plan.hash, "rank": job.rank}
        if self.log is not None:
            self.log.close()
        _export(student_sd, self.ema, out)
        last = self.history[-1] if self.history else {}
        wall = self.wall
        summary = {
            "recipe": plan.recipe,
            "hash": plan.hash,
            "overrides": list(plan.overrides),
            # Finished: every epoch trained (a --max-steps run is not; --resume continues it).
            "complete": self.step >= plan.epochs * self.steps_per_epoch,
            "top1": last.get("top1"),
            "top5": last.get("top5"),
            "best_top1": self.best_top1 if self.history else None,
            "ema_top1": last.get("ema_top1"),
            # A distilled student whose heads were trained apart (a token term): each head.
            "class_head_top1": last.get("class_head_top1"),
            "dist_head_top1": last.get("dist_head_top1"),
            # Validation images that could not be read, left out of the accuracies above.
            "eval_skipped": last.get("skipped"),
            "teacher_top1": self.teacher_top1,
            # A run resumed at its end trains no epoch: self.epoch is then plan.epochs.
            "epochs": min(self.epoch + 1, plan.epochs),
            "steps": self.step,
            # What the recipe plans and what --max-steps asked for: a run stopped by
            # --max-steps is *partial*, reused by the same request (vitkdl.runs.done).
            "planned_steps": plan.epochs * self.steps_per_epoch,
            "max_steps": self.opts.max_steps,
            "images_per_second": round(self.images_seen / wall, 2) if wall > 0 else None,
            "wall_seconds": round(wall, 2),
            "peak_memory_mb": _peak_memory_mb(device),
            "world_size": job.world_size,
            "global_batch": self.global_batch,
            "ranks_in_sync": in_sync,
            "device": device.type,
            # graphs this run compiled (not the ones earlier runs in this process did)
            "compile": {
                "mode": program.compile_mode,
                "graphs_compiled": _graphs_compiled() - self.graphs_before,
            },
            "student_weights": str(out / "student.safetensors"),
            # How to load the export with timm (num_classes in the overlay keeps the head
            # when it differs from the architecture's default).
            "timm": {
                "name": plan.student.name,
                "kwargs": plan.student.timm_kwargs,
                "pretrained_cfg_overlay": {
                    "file": str(out / "student.safetensors"),
                    "num_classes": plan.student.num_classes,
                },
            },
        }
        write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        if not write_curves(out / "metrics.jsonl", out / "curves.png", plan.recipe):
            self.progress.note(f"  curves.png skipped: {PLOTS_MISSING}")
        distributed.barrier()
        return summary


def fill_cache(
    plan: Plan,
    device: torch.device,
    *,
    runs_dir: Path,
    epochs: int | None = None,
    load: bool = True,
    max_eval_batches: int | None = None,
    note: Any = None,
    on_epoch: Any = None,
) -> Any:
    """Complete ``plan``'s teacher cache (:func:`vitkdl.train.cache.fill`), the teacher's top-1
    on the validation split measured as a run measures it."""

    def top1(logits: Any, loader: Any) -> float | None:
        if plan.teacher is not None and not plan.teacher.num_classes:
            return None
        return evaluate(logits, loader, device, max_eval_batches).top1

    return cache_pass(
        plan,
        device,
        runs_dir=runs_dir,
        epochs=epochs,
        load=load,
        evaluate=top1,
        note=note,
        on_epoch=on_epoch,
    )


def _teacher_cache(
    plan: Plan, opts: RunOptions, device: torch.device, job: Any, console: Console
) -> CacheReader:
    """The reader of the run's teacher cache, completed first for the epochs the run reaches
    (by the one process of a run; under torch.distributed it must be complete already)."""
    assert plan.cache is not None
    per_epoch = plan.cache.samples_per_epoch
    steps = per_epoch // plan.data.global_batch if per_epoch else 1
    epochs = needed_epochs(plan, steps, opts.max_steps) if per_epoch else plan.epochs
    try:
        if not job.enabled:
            quiet = opts.quiet

            def note(text: str) -> None:
                if not quiet:
                    console.print(text, highlight=False, markup=False)

            report = fill_cache(
                plan,
                device,
                runs_dir=opts.out_root,
                epochs=epochs,
                load=opts.load_weights,
                max_eval_batches=opts.max_eval_batches,
                note=note,
            )
            if report.computed:
                note(
                    f"  teacher cache {report.path}: computed epoch(s) "
                    f"{report.computed[0]}-{report.computed[-1]} in {report.seconds:.1f} s"
                )
        return CacheReader(plan, device, job.rank, opts.out_root, epochs)
    except CacheError as exc:
        raise TrainError(str(exc)) from None


def _restore_rng(
    checkpoint: dict[str, Any],
    seed: int,
    step: int,
    job: distributed.Dist,
    device: torch.device,
    progress: Progress,
) -> None:
    """Each rank continues its own random streams (generation masks, drop path, CPU-side
    augmentation), restored after the skipped batches: exactly where it stopped. Resumed on
    another number of processes, the saved streams do not map onto the ranks: each rank then
    starts a fresh stream derived from the seed, the step and its rank."""
    states = rank_states(checkpoint)
    if len(states) == job.world_size:
        set_rng_state(states[job.rank], device)
        return
    _seed_everything(mix_seed(seed, step, job.rank))
    progress.note(
        f"  the checkpoint was written by {len(states)} process(es), this run has "
        f"{job.world_size}: fresh per-rank random states from the seed and step "
        f"{step} (masks and drop path do not replay the original run's)"
    )


def _stop_if_not_finite(
    first_bad: torch.Tensor | None,
    names: list[str],
    step: int,
    steps_per_epoch: int,
    saved: tuple[Path, int | None],
    device: torch.device,
) -> None:
    """Stop the run once any loss term was NaN/Inf (on any rank), naming the first step at
    which one was and the first term that was at that step (later steps' NaNs, and the other
    terms of that step, are its consequences, not causes).

    ``first_bad`` holds, per name, the first step whose value was not finite (0: none), kept
    on the device without a sync per step; this is the only place it is read. The weights
    after that step are no longer finite, so nothing is saved: every ``last.pt`` was checked
    before it was written, and ``saved`` (path, step) names the newest."""
    if first_bad is None:
        return
    counts = distributed.all_reduce_sum((first_bad > 0).double().tolist(), device)
    if not any(counts):
        return
    per_rank = [r["s"].tolist() for r in distributed.all_gather_states({"s": first_bad.cpu()})]
    firsts = [min((r[i] for r in per_rank if r[i] > 0), default=0) for i in range(len(names))]
    at = min(f for f in firsts if f > 0)
    bad = [n for n, f in zip(names, firsts, strict=True) if f == at]
    term = next((n for n in bad if n != "loss"), None)
    what = (
        f"in term {term}"
        if term is not None
        else "in the total loss (every term finite: their sum overflowed)"
    )
    path, saved_step = saved
    fix = f"the weight of {term}" if term is not None else "the terms' weights"
    again = (
        f"then continue from the last good checkpoint, {path} (step {saved_step}), with "
        "--resume --force (the recipe changed), or start again"
        if saved_step is not None and path.exists()
        else f"and start again (no checkpoint was written before step {at})"
    )
    raise TrainError(
        f"the loss became NaN or infinite at step {at} (epoch "
        f"{(at - 1) // max(steps_per_epoch, 1)}) {what}; stopped at step {step} without "
        f"saving (the weights are no longer finite). Lower the learning rate or {fix}, "
        f"{again}."
    )


def check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:  # exit status 74, before any training
        raise WriteError(out, exc, hint="pass --out DIR") from None


def _resume_point(plan: Plan, opts: RunOptions, console: Console | None) -> dict[str, Any] | None:
    """The checkpoint to resume from: ``opts.resume_from`` when given, else the run's own
    newest checkpoint that loads (``last.pt``; when that cannot be read, ``best.pt`` or
    another, with a warning)."""
    if not opts.resume:
        return None
    notes: list[str] = []  # a checkpoint of an earlier vitkdl, without a checksum
    if opts.resume_from is not None:
        path = opts.resume_from
        if not path.exists():
            raise TrainError(f"--resume: no checkpoint at {path}; start without --resume")
        try:
            ckpt = load_checkpoint(path, notes)
        except CheckpointError as exc:  # another run's file: refused, not failed
            raise ResumeRefused(f"--resume: {exc}; start without --resume") from None
    else:
        candidates = checkpoint_files(opts.out_dir)
        if not candidates:
            path = opts.out_dir / "last.pt"
            raise TrainError(f"--resume: no checkpoint at {path}; start without --resume")
        try:
            ckpt, path, problems = load_first(candidates, notes)
        except CheckpointError as exc:
            raise TrainError(str(exc)) from None
        if problems and console is not None:
            console.print(
                f"[yellow]warning:[/] {escape('; '.join(problems))}; resuming from "
                f"{escape(str(path))} instead "
                f"(step {ckpt['step']}, epoch {ckpt['epoch']})",
                highlight=False,
            )
    if console is not None:
        for note in notes:
            console.print(f"note: {note}", highlight=False, markup=False)
    if ckpt["hash"] != plan.hash and not opts.force:
        raise ResumeRefused(
            f"--resume: {path} was written by a different version of the recipe "
            f"(hash {ckpt['hash']}, now {plan.hash}); resuming would mix two "
            "recipes. Pass --force to resume anyway, or start a new run."
        )
    ckpt[LOADED_FROM] = str(path)  # in memory only: named if its weights do not fit
    return ckpt


#: The key under which :func:`_resume_point` notes the file a checkpoint was read from.
LOADED_FROM = "loaded_from"


def _misfit(checkpoint: dict[str, Any], exc: Exception) -> str:
    """One line saying that ``checkpoint`` holds weights of other models than the run's
    (what ``load_state_dict`` reports, one problem of many)."""
    problems = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
    problems = problems or [str(exc).splitlines()[0] if str(exc) else type(exc).__name__]
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    path = checkpoint.get(LOADED_FROM, "the checkpoint")
    return (
        f"--resume: {path} holds weights of other models than this recipe's "
        f"({problems[0].rstrip('.')}{more}); start without --resume"
    )


def _export(student: dict[str, torch.Tensor], ema: Any, out: Path) -> None:
    """``student.safetensors`` (and ``student_ema.safetensors``): plain timm state dicts."""
    from safetensors.torch import save_file

    def plain(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in state.items()}

    for name, state in (("student", student), ("student_ema", ema and ema.module.state_dict())):
        if state is not None:
            path = out / f"{name}.safetensors"
            with writing(path):  # a full disk: one line naming the file, exit status 74
                save_file(plain(state), str(path))


def _states(
    program: Program, optimizer: torch.optim.Optimizer
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
    student = {k.removeprefix("student."): v for k, v in full.items() if k.startswith("student.")}
    terms = {k.removeprefix("terms."): v for k, v in full.items() if k.startswith("terms.")}
    return student, terms, optim


def _load_states(
    program: Program, optimizer: torch.optim.Optimizer, checkpoint: dict[str, Any]
) -> None:
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
    full = {
        **{f"student.{k}": v for k, v in checkpoint["student"].items()},
        **{f"terms.{k}": v for k, v in checkpoint["terms"].items()},
    }
    set_model_state_dict(program.core, full, options=options)
    if fqn_optim:
        set_optimizer_state_dict(program.core, optimizer, checkpoint["optimizer"], options=options)
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
