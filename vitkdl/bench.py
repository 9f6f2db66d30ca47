"""``vitkdl bench``: how fast the compiled distillation step is, against what it replaces.

One process, the recipe's real models (random weights), synthetic batches of the recipe's shapes
already on the device. Four training configurations, each on its own freshly built modules (same
seed, so the same weights), are built and warmed up in turn (peak memory is measured then), and
then timed in interleaved rounds, one step of each per round, so that load from elsewhere on the
machine hits all of them alike:

``compiled``  (a) vitkdl's step: ``Program.forward`` (teacher, student, adapters, losses) under
              ``torch.compile(fullgraph=True)``; backward, gradient clipping and the optimizer
              step (timm AdamW over the student and adapters) outside the graph, as the
              trainer runs it.
``eager``     (b) the same step without ``torch.compile``.
``hooks``     (c) what users write today: forward hooks on the student's and teacher's blocks
              capture the features, ``teacher(images)`` and ``student(images)`` run as two full
              forwards, a separate hand-written loss module (:class:`HandWrittenLoss`, written
              here independently of :mod:`vitkdl.strategies`) computes the same terms; eager.
``timm``      (e) what timm users run today where timm can express the recipe: timm's own
              ``timm.task.LogitDistillationTask`` (``kd``) or ``TokenDistillationTask``
              (``token``), with the label loss as its task loss, compiled with the same
              backend through ``task.compile()``, the same optimizer step. Left out, with the
              reason in the notes, for recipes it cannot express (feature terms, NKD, several
              distillation losses, a teacher at another resolution).
``floor``     (d) the least a distillation step can cost: a student-only training step on the
              labels plus a teacher inference forward, each timed alone, each at its best
              (compiled on CUDA, eager on CPU; ``floor="best"`` measures both and keeps the
              faster of each).

The teacher's options (issue 20), each (a) with one option on, compiled alike, against
``teacher_plain`` (f): the whole teacher, its weights as loaded (fp32; autocast casts them
every step), every patch token, run in the step. Each is measured where the recipe allows it
and left out, the reason in the notes, where it does not; one that runs exactly as a
configuration measured before it (the recipe's own step is often one of them) is reported as
that one (``details["same_as"]``), not built twice:

``early_exit``    (g) only as deep as read: the teacher stops after its deepest tapped block
                  (recipes that read only shallow blocks).
``teacher_bf16``  (h) the teacher's weights held in bf16 (CUDA only).
``teacher_fp8``   (i) its linear layers in FP8 (torchao and a GPU with FP8).
``cached_logits`` (j) no teacher: its logits are an input of the step, the shape of a run that
                  reads them from a cache (recipes whose terms read only the teacher's logits).
``masked``        (k) MaskedKD: the teacher sees the share ``keep`` of the patch tokens (the
                  recipe's, else :data:`~vitkdl.bench_options.MASKED_KEEP`), where the recipe's
                  checks allow it (logit terms only, ViT teacher and student on one grid).

The ratios give each as a speed-up over (f), the teacher's share of the step (from the
breakdown, and measured as what the cached step saves over (f)) and the cached step against
the floor's student-only step.

For (a) a breakdown times the parts separately (each compiled on its own, synchronised between
parts): teacher forward, student forward + backward, adapters + losses (forward + backward),
optimizer (clipping, AdamW, zeroing). The data loader of the recipe is timed on its own and
compared with the step's images/s. Warm-up steps are excluded (the first one's extra time is
reported as compile time); every figure is the median of ``steps`` timed steps.

Peak memory: what a configuration adds while it is built and warmed up: on CUDA
``torch.cuda.max_memory_allocated`` less what was allocated before; on CPU the process's peak
resident set size (reset through ``/proc/self/clear_refs`` on Linux) less the RSS before, an
approximation (the allocator reuses memory freed earlier). ``BenchResult.memory_kind`` says
which. Model FLOPs utilisation (MFU) is reported on CUDA cards with a known bf16/fp16 peak, for
bf16/fp16 precision only.

EMA, the learning-rate schedule, mixup and the trainer's finiteness check are left out of every
configuration (they cost the same in all of them).

Python API::

    from vitkdl.bench import run_bench
    result = run_bench("recipes/quickstart.vkd", steps=10)
    result.ratios["compiled_vs_hooks"], result.to_dict()
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch._dynamo
import torch.nn.functional as F
from torch import Tensor, nn

from vitkdl import pipeline
from vitkdl.bench_options import (
    BACKENDS,
    DEFAULT_STEPS,
    DEFAULT_WARMUP,
    FLOOR_MODES,
    MASKED_KEEP,
    TEACHER_CONFIGURATIONS,
    configurations_problem,
    options_problem,
)
from vitkdl.errors import VkdError
from vitkdl.planner import Plan, TapPoint, teacher_flops, without_cache
from vitkdl.probe import FidelityMeter
from vitkdl.program import (
    Program,
    build,
    create_model,
    distilled_heads,
    model_taps,
    resize_input,
    resolve_device,
    resolve_precision,
    single_logits,
    tap_pass,
    teacher_precision,
    teacher_resize,
    term_losses,
)
from vitkdl.sources import teacher_affine
from vitkdl.spec import split_op
from vitkdl.terms import KINDS, StepInputs
from vitkdl.train.step import Update, configure_optimizer, model_param_groups, train_step

__all__ = [
    "BACKENDS",
    "CONFIGURATIONS",
    "FLOOR_MODES",
    "PEAK_FLOPS",
    "TEACHER_CONFIGURATIONS",
    "Bench",
    "BenchError",
    "BenchResult",
    "ConfigResult",
    "Configuration",
    "HandWrittenLoss",
    "bench_plan",
    "peak_flops",
    "register_feature_hooks",
    "run_bench",
    "teacher_variant",
    "timm_task_kwargs",
]


#: Dense bf16/fp16 tensor-core peak FLOP/s by card, as ``torch.cuda.get_device_name`` spells
#: it (a regular expression, searched; the first match wins). Cards not listed (an H100 NVL or
#: PCIe variant we have not seen, consumer cards) get no MFU rather than a wrong one.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    (r"\bH100 PCIe\b", 756e12),
    (r"\bH100 NVL\b", 835e12),
    (r"\bH100 (80GB HBM3|SXM)", 989e12),
    (r"\bH200 NVL\b", 835e12),
    (r"\bH200( SXM| 141GB|$)", 989e12),
    (r"\bA100\b", 312e12),
)

Progress = Callable[[str], None]


class BenchError(Exception):
    """A benchmark that cannot run as asked (bad device, bad option); the message says why."""


# --------------------------------------------------------------------------------------------
# Results


@dataclass
class ConfigResult:
    """Timings and memory of one configuration."""

    name: str
    images_per_second: float
    ms_per_step: float
    ms_steps: list[float]
    peak_memory_mb: float
    compile_seconds: float | None = None
    mfu: float | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class BenchResult:
    """Everything ``vitkdl bench`` measured; ``to_dict()`` is what ``--json`` prints."""

    recipe: str
    student: str
    teacher: str | None
    device: str
    device_name: str
    threads: int | None
    batch: int
    precision: str
    backend: str
    compile_mode: str | None
    steps: int
    warmup: int
    flops_per_image: int
    memory_kind: str
    configs: dict[str, ConfigResult]
    ratios: dict[str, float | None]
    breakdown: dict[str, Any] | None
    loader: dict[str, Any] | None
    peak_device_flops: float | None
    load_average: list[float | None]
    wall_seconds: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (floats rounded for reading)."""
        return _rounded(asdict(self))


def _rounded(obj: Any) -> Any:
    if isinstance(obj, float):
        if not math.isfinite(obj):
            return None
        return float(f"{obj:.5g}")
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_rounded(v) for v in obj]
    return obj


# --------------------------------------------------------------------------------------------
# Devices, timing, memory


def peak_flops(device: torch.device) -> float | None:
    """The card's dense bf16/fp16 peak FLOP/s from :data:`PEAK_FLOPS`, or None."""
    if device.type != "cuda":
        return None
    return peak_flops_of(torch.cuda.get_device_name(device))


def peak_flops_of(name: str) -> float | None:
    """The dense bf16/fp16 peak of a card by its CUDA name, or None when unknown."""
    import re

    return next((flops for pattern, flops in PEAK_FLOPS if re.search(pattern, name)), None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class _Timer:
    """One timed callable. ``fn`` may return ``{part: seconds}`` (the breakdown's parts)."""

    name: str
    fn: Callable[[], Any]
    compiled: bool
    first: float = 0.0
    first_parts: dict[str, float] = field(default_factory=dict)
    times: list[float] = field(default_factory=list)
    parts: list[dict[str, float]] = field(default_factory=list)

    def call(self, device: torch.device) -> tuple[float, dict[str, float] | None]:
        _sync(device)
        start = time.perf_counter()
        out = self.fn()
        _sync(device)
        return time.perf_counter() - start, out if isinstance(out, dict) else None

    def warm(self, device: torch.device, warmup: int) -> None:
        """Untimed calls; the first one's time is kept (it compiles)."""
        for i in range(warmup):
            seconds, parts = self.call(device)
            if i == 0:
                self.first, self.first_parts = seconds, parts or {}

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    def compile_seconds(self) -> float | None:
        """The first call's time over a normal one: tracing and code generation."""
        return max(0.0, self.first - self.median) if self.compiled else None


def _rounds(timers: Sequence[_Timer], device: torch.device, steps: int) -> None:
    """``steps`` rounds, each calling every timer once (the starting one rotates), so that
    every configuration sees the same machine: on a shared machine the load changes from
    minute to minute, and timing one configuration after the other would compare loads."""
    for r in range(steps):
        k = r % len(timers)
        for timer in [*timers[k:], *timers[:k]]:
            seconds, parts = timer.call(device)
            timer.times.append(seconds)
            if parts:
                timer.parts.append(parts)


class _Memory:
    """Peak memory per configuration: CUDA allocator peak, or the process's peak RSS;
    ``measure`` says which, in words (the JSON's ``memory_kind``)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.resettable = False
        if device.type == "cuda":
            self.measure = (
                "torch.cuda.max_memory_allocated while the configuration is built and "
                "warmed up, less what was allocated before (the other configurations)"
            )
        else:
            self.resettable = self._clear_refs()
            self.measure = (
                "process peak RSS (VmHWM, reset through /proc/self/clear_refs) while "
                "the configuration is built and warmed up, less the RSS before; "
                "approximate: the allocator reuses memory freed earlier"
                if self.resettable
                else "process peak RSS since start (getrusage ru_maxrss) less the RSS "
                "before the configuration: a rough upper bound"
            )

    @staticmethod
    def _clear_refs() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return _proc_status_mb("VmHWM") is not None
        except OSError:
            return False

    def reset(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.resettable:
            self._clear_refs()

    def current_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / 2**20
        value = _proc_status_mb("VmRSS")
        return value if value is not None else 0.0

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.resettable:
            value = _proc_status_mb("VmHWM")
            if value is not None:
                return value
        try:
            import resource

            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return rss / (2**20 if sys.platform == "darwin" else 2**10)
        except Exception:
            return math.nan


def _proc_status_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


# --------------------------------------------------------------------------------------------
# Shared pieces


def _autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager[Any]:
    if dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _compiler(backend: str, mode: str | None) -> Callable[[Callable[..., Any]], Any]:
    def compile_fn(fn: Callable[..., Any]) -> Any:
        if backend == "inductor":
            return torch.compile(fn, fullgraph=True, mode=mode)
        return torch.compile(fn, fullgraph=True, backend=backend)

    return compile_fn


def _update(
    plan: Plan, named: Iterable[tuple[str, nn.Parameter]], student: nn.Module, work: _Workload
) -> Update:
    """The trainer's update over a student and further named parameters: the same optimizer
    (one decay rule, fused AdamW), clipping and loss scaling as ``vitkdl run``."""
    extra = list(named)
    groups = model_param_groups(student, extra, plan.optimizer.weight_decay)
    params = [p for p in student.parameters() if p.requires_grad]
    params += [p for _, p in extra if p.requires_grad]
    return Update(
        configure_optimizer(plan, groups), params, plan.clip_grad, work.device, work.dtype
    )


def _batch(plan: Plan, device: torch.device) -> tuple[Tensor, Tensor]:
    """One synthetic batch of the recipe's shapes: soft targets when the recipe mixes."""
    d = plan.data
    g = torch.Generator().manual_seed(plan.seed)
    images = torch.randn(d.batch_size, d.in_chans, d.image_size, d.image_size, generator=g)
    labels = torch.randint(0, plan.student.num_classes, (d.batch_size,), generator=g)
    if d.mixup > 0 or d.cutmix > 0:
        classes = plan.student.num_classes
        other = labels.roll(1)
        lam = 0.7
        off = d.smoothing / classes
        on = 1.0 - d.smoothing + off
        hot = F.one_hot(labels, classes).float() * (on - off) + off
        hot_other = F.one_hot(other, classes).float() * (on - off) + off
        return images.to(device), (lam * hot + (1 - lam) * hot_other).to(device)
    return images.to(device), labels.to(device)


# --------------------------------------------------------------------------------------------
# (c) What users write today: hooks and a hand-written loss module


class HandWrittenLoss(nn.Module):
    """A ViTKD criterion as users write it: one module per term (each kind's independent
    hand-written reference, :meth:`vitkdl.terms.base.Kind.reference`), fed by features that
    forward hooks captured and by the two models' logits."""

    def __init__(self, plan: Plan) -> None:
        super().__init__()
        self.plan_terms = plan.terms
        losses = {t.name: KINDS[t.kind].reference(t) for t in plan.terms}
        missing = [f"{t.name} ({t.kind})" for t in plan.terms if losses[t.name] is None]
        if missing:
            raise BenchError(f"no hand-written reference for {', '.join(missing)}")
        self.losses = nn.ModuleDict({k: v for k, v in losses.items() if v is not None})

    def forward(self, inputs: StepInputs) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        total = torch.zeros((), device=inputs.s_logits.device)
        for t in self.plan_terms:
            value = KINDS[t.kind].loss(self.losses[t.name], t, inputs)
            out[t.name] = value.detach()
            total = total + value
        out["loss"] = total
        return out


def register_feature_hooks(
    model: nn.Module, taps: Iterable[TapPoint], prefix: int, store: dict[str, Tensor]
) -> list[Any]:
    """Forward hooks that put the patch tokens (prefix tokens dropped) of block outputs and of
    ``norm`` into ``store`` under the taps' keys; returns the handles (``.remove()`` them)."""

    def capture(key: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Tensor) -> None:
            store[key] = output[:, prefix:]

        return hook

    handles = []
    for tap in taps:
        if tap.point not in ("mlp", "norm"):
            raise BenchError(f"the hook-based reference taps block outputs and norm, not {tap.key}")
        module = model.norm if tap.point == "norm" else model.blocks[int(tap.block or 0)]
        handles.append(module.register_forward_hook(capture(tap.key)))
    return handles


# --------------------------------------------------------------------------------------------
# The benchmark


@dataclass
class _Workload:
    """What every configuration runs on: the plan, the device and precision, the compiler and
    one synthetic batch of the recipe's shapes already on the device."""

    plan: Plan
    device: torch.device
    dtype: torch.dtype | None
    backend: str
    mode: str | None
    steps: int
    warmup: int
    images: Tensor
    targets: Tensor

    @property
    def batch(self) -> int:
        return int(self.images.shape[0])

    def compile(self, fn: Callable[..., Any]) -> Any:
        return _compiler(self.backend, self.mode)(fn)


def _program_timer(
    work: _Workload, compiled: bool, plan: Plan | None = None, name: str | None = None
) -> tuple[_Timer, Program, Update]:
    """(a) or (b): vitkdl's step, compiled or eager, then the trainer's update; ``plan``: a
    variant of the recipe's (a teacher option), timed as ``name``."""
    plan = plan or work.plan
    torch.manual_seed(plan.seed)
    if compiled and work.backend == "inductor":
        program = build(
            without_cache(plan), work.device, load=False, compile=work.mode or "default"
        )
        step = program.step
    else:
        program = build(without_cache(plan), work.device, load=False, compile="off")
        step = work.compile(program.forward) if compiled else program.forward
    program.train()
    update = _update(plan, program.terms.named_parameters(), program.student, work)

    def one_step() -> None:
        train_step(step, update, work.images, work.targets)

    name = name or ("compiled" if compiled else "eager")
    return _Timer(name, one_step, compiled), program, update


def _cached_timer(work: _Workload, plan: Plan) -> _Timer:
    """(j) the compiled step with the teacher's logits as an input instead of a teacher
    forward: what a run that reads them from a cache pays. The logits are the teacher's on
    the batch, computed once; the teacher is then dropped, as a cached run never loads it."""
    torch.manual_seed(plan.seed)
    program = build(without_cache(plan), work.device, load=False, compile="off")
    program.train()
    logits = program.teacher_logits(work.images).detach()
    program.teacher = None
    step = work.compile(program.forward)  # the cached run's step: forward(..., cached=logits)
    update = _update(plan, program.terms.named_parameters(), program.student, work)

    def one_step() -> None:
        train_step(lambda x, y: step(x, y, logits), update, work.images, work.targets)

    return _Timer("cached_logits", one_step, True)


_PARTS = ("teacher_forward", "student_forward_backward", "adapters_losses", "optimizer")


_PartFn = Callable[..., Any]


def _part_functions(work: _Workload, program: Program) -> tuple[_PartFn | None, _PartFn, _PartFn]:
    """The compiled step's halves, each compiled on its own: the teacher's forward (None
    without a teacher), the student's forward, the adapters and losses."""
    plan = work.plan
    s_points, t_points = model_taps(plan.terms, "student"), model_taps(plan.terms, "teacher")
    s_keys = [*(p.key for p in s_points), "norm"]
    t_keys = [*(p.key for p in t_points), "norm"]
    s_prefix = plan.student.prefix_tokens
    student, terms = program.student, program.terms
    t_head = program.core.teacher_head[0] if program.core.teacher_head else None  # srrl's

    kept = program.plan.teacher_keep if plan.teacher_used else None

    def teacher_fwd(images: Tensor) -> tuple[Tensor | None, list[Tensor]]:
        # The step's own teacher half (no logits nor final norm when it stops early)
        if kept is not None:  # MaskedKD runs it after the student: any k patches cost alike
            scores = torch.zeros(images.shape[0], plan.student.tokens, device=images.device)
            return program.masked_teacher(images, scores), []
        logits, taps = program.teacher_pass(images)
        return logits, [taps[k] for k in t_keys if k in taps]

    def student_fwd(images: Tensor) -> tuple[Tensor, list[Tensor]]:
        with _autocast(work.device, work.dtype):
            logits, taps = tap_pass(student, images, s_points, s_prefix)
        return logits, [taps[k] for k in s_keys]

    def losses(
        s_logits: Tensor,
        s_taps: list[Tensor],
        t_logits: Tensor | None,
        t_taps: list[Tensor],
        targets: Tensor,
    ) -> Tensor:
        inputs = StepInputs(
            s_logits,
            dict(zip(s_keys, s_taps, strict=True)),
            t_logits,
            dict(zip(t_keys, t_taps, strict=False)),
            targets,
            t_head=t_head,
        )
        return term_losses(plan.terms, terms, inputs)["loss"]

    t_fn = work.compile(teacher_fwd) if plan.teacher_used else None
    return t_fn, work.compile(student_fwd), work.compile(losses)


def _breakdown_timer(work: _Workload, program: Program, update: Update) -> _Timer:
    """The compiled step's parts, each compiled on its own and timed between
    synchronisations: teacher forward, student forward + backward, adapters + losses (forward
    and backward), optimizer (clipping, AdamW, zeroing)."""
    t_fn, s_fn, l_fn = _part_functions(work, program)

    def parts() -> dict[str, float]:
        marks: list[float] = []

        def mark() -> None:
            _sync(work.device)
            marks.append(time.perf_counter())

        mark()
        t_logits, t_taps = t_fn(work.images) if t_fn is not None else (None, [])
        mark()  # teacher forward
        s_logits, s_taps = s_fn(work.images)
        mark()  # student forward
        leaves = [x.detach().requires_grad_() for x in (s_logits, *s_taps)]
        total = l_fn(leaves[0], leaves[1:], t_logits, t_taps, work.targets)
        update.backward(total)
        mark()  # losses forward + backward: the adapters' and the features' gradients
        pairs = [
            (out, leaf.grad)
            for out, leaf in zip((s_logits, *s_taps), leaves, strict=True)
            if leaf.grad is not None
        ]
        if pairs:
            torch.autograd.backward([p[0] for p in pairs], [p[1] for p in pairs])
        mark()  # student backward
        update.step()
        update.optimizer.zero_grad(set_to_none=True)
        mark()  # optimizer
        d = [b - a for a, b in itertools.pairwise(marks)]
        return {
            "teacher_forward": d[0],
            "student_forward_backward": d[1] + d[3],
            "adapters_losses": d[2],
            "optimizer": d[4],
        }

    return _Timer("breakdown", parts, True)


def _hooks_timer(work: _Workload) -> _Timer:
    """(c) forward hooks, two full forwards, a hand-written loss module; eager."""
    plan = work.plan
    torch.manual_seed(plan.seed)
    student = create_model(plan.student, work.device)
    teacher = (
        create_model(plan.teacher, work.device) if plan.teacher_used and plan.teacher else None
    )
    criterion = HandWrittenLoss(plan).to(work.device)
    if teacher is not None:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad = False
    student.train()
    s_feats: dict[str, Tensor] = {}
    t_feats: dict[str, Tensor] = {}
    register_feature_hooks(
        student, model_taps(plan.terms, "student"), plan.student.prefix_tokens, s_feats
    )
    if teacher is not None and plan.teacher is not None:
        register_feature_hooks(
            teacher, model_taps(plan.terms, "teacher"), plan.teacher.prefix_tokens, t_feats
        )
    update = _update(
        plan, [(f"criterion.{n}", p) for n, p in criterion.named_parameters()], student, work
    )
    t_images = work.images
    if teacher is not None and plan.teacher is not None:  # the teacher's own normalisation
        affine = teacher_affine(
            (plan.student.mean, plan.student.std), (plan.teacher.mean, plan.teacher.std)
        )
        if affine is not None:
            scale, shift = (torch.tensor(v, device=work.device).view(1, -1, 1, 1) for v in affine)
            t_images = work.images * scale + shift
    resize = teacher_resize(plan)
    dist_head = any(KINDS[t.kind].reads_dist_logits for t in plan.terms)
    if dist_head:  # DeiT's distillation token: the two heads apart, as DeiT's code does
        student.set_distilled_training(True)

    def one_step() -> None:
        t_logits, s_dist = None, None
        with _autocast(work.device, work.dtype):
            if teacher is not None:
                with torch.no_grad():
                    seen = resize_input(t_images, *resize) if resize else t_images
                    t_logits = single_logits(teacher(seen))
            out = student(work.images)
            if dist_head:
                s_logits, s_dist = distilled_heads(out)
            else:
                s_logits = single_logits(out)
        out = criterion(StepInputs(s_logits, s_feats, t_logits, t_feats, work.targets, s_dist))
        update.backward(out["loss"])
        update.step()

    return _Timer("hooks", one_step, False)


def timm_task_kwargs(plan: Plan) -> dict[str, Any]:
    """How timm's own training task expresses a recipe (each term's kind says how it maps,
    :meth:`vitkdl.terms.base.Kind.timm_task`), or :class:`BenchError` saying why it cannot."""
    if plan.teacher is None or not plan.teacher_used:
        raise BenchError("timm's distillation tasks need a teacher")
    merged: dict[str, Any] = {"task_loss_weight": 0.0, "smoothing": plan.data.smoothing}
    tasks = []
    for t in plan.terms:
        mapped = KINDS[t.kind].timm_task(t)
        if mapped is None:
            raise BenchError(f"timm's tasks cannot express the {t.kind} term '{t.name}'")
        if "task" in mapped:
            tasks.append(t.name)
        merged.update(mapped)
    if len(tasks) != 1:
        raise BenchError(f"timm's tasks take one distillation loss, the recipe has {len(tasks)}")
    if teacher_resize(plan) is not None:
        size = plan.teacher.input_size
        raise BenchError(
            f"timm's tasks feed the teacher the student's resolution; this recipe resizes the "
            f"teacher's input to {size[0]}x{size[1]}"
        )
    return merged


def _timm_timer(work: _Workload) -> _Timer:
    """(e) timm's own distillation task (the logit or the token task), compiled with the same
    backend, then the same optimizer step."""
    import timm.loss
    import timm.task

    plan = work.plan
    kwargs = timm_task_kwargs(plan)
    assert plan.teacher is not None
    torch.manual_seed(plan.seed)
    student = create_model(plan.student, work.device)
    teacher = create_model(plan.teacher, work.device).eval()
    soft = work.targets.dim() > 1
    criterion: nn.Module = (
        timm.loss.SoftTargetCrossEntropy()
        if soft
        else nn.CrossEntropyLoss(label_smoothing=kwargs["smoothing"])
    )
    common = {
        "criterion": criterion,
        "temperature": kwargs["temperature"],
        "distill_loss_weight": kwargs["distill_loss_weight"],
        "task_loss_weight": kwargs["task_loss_weight"],
        "device": work.device,
        "verbose": False,
    }
    if "distill_type" in kwargs:
        common["distill_type"] = kwargs["distill_type"]
    task: nn.Module = getattr(timm.task, kwargs["task"])(student, teacher, **common)
    task.train()
    if work.backend == "inductor":
        task.compile(mode=work.mode)
    elif work.backend != "eager":
        task.compile(backend=work.backend)
    update = _update(plan, [], student, work)

    def one_step() -> None:
        with _autocast(work.device, work.dtype):
            out = task(work.images, work.targets)
        update.backward(out["loss"])
        update.step()

    return _Timer("timm", one_step, work.backend != "eager")


def _floor_timers(work: _Workload, modes: Sequence[str]) -> list[_Timer]:
    """(d) a student-only training step on the labels and a teacher inference forward, timed
    separately, in each of ``modes`` (``eager``, ``compiled``)."""
    plan = work.plan
    torch.manual_seed(plan.seed)
    student = create_model(plan.student, work.device)
    teacher = create_model(plan.teacher, work.device) if plan.teacher is not None else None
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    student.train()
    update = _update(plan, [], student, work)
    smoothing = plan.data.smoothing

    def forward_loss(images: Tensor, targets: Tensor) -> Tensor:
        with _autocast(work.device, work.dtype):
            logits = single_logits(student(images)).float()
        if targets.dim() > 1:
            return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
        return F.cross_entropy(logits, targets, label_smoothing=smoothing)

    resize = teacher_resize(plan)

    def infer(images: Tensor) -> Tensor:
        assert teacher is not None
        with torch.no_grad(), _autocast(work.device, work.dtype):
            if resize is not None:  # the teacher at its own resolution
                images = resize_input(images, *resize)
            return single_logits(teacher(images))

    timers = []
    for mode in modes:
        compiled = mode == "compiled"
        fwd = work.compile(forward_loss) if compiled else forward_loss

        def student_step(fwd: Callable[..., Tensor] = fwd) -> None:
            update.backward(fwd(work.images, work.targets))
            update.step()

        timers.append(_Timer(f"floor.student.{mode}", student_step, compiled))
        if teacher is not None and plan.teacher_used:
            inf = work.compile(infer) if compiled else infer
            timers.append(
                _Timer(f"floor.teacher.{mode}", lambda inf=inf: inf(work.images), compiled)
            )
    return timers


def _loader(plan: Plan, images: int, step_ips: float | None) -> dict[str, Any]:
    """The recipe's training data loader on its own: images/s against the step's."""
    from vitkdl.train.data import DataError, build_loaders, loader_workers

    data = plan.data
    info: dict[str, Any] = {
        "source": data.source,
        "root": data.root,
        "workers": loader_workers(data),
        "batch": data.batch_size,
        "augment": data.augment,
    }
    try:
        start = time.perf_counter()
        loader, _, _ = build_loaders(data)
        it = iter(loader)
        next(it)
        info["first_batch_seconds"] = time.perf_counter() - start
        count = 0
        start = time.perf_counter()
        while count < images:
            try:
                batch, _ = next(it)
            except StopIteration:
                it = iter(loader)
                continue
            count += int(batch.shape[0])
        elapsed = time.perf_counter() - start
        del it, loader
    except DataError as exc:
        info["skipped"] = str(exc)
        return info
    ips = count / elapsed if elapsed > 0 else math.inf
    info.update(
        images_per_second=ips,
        images=count,
        seconds=elapsed,
        vs_step=ips / step_ips if step_ips else None,
        keeps_up=bool(step_ips and ips >= step_ips),
    )
    return info


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _bench_device(device: str | None) -> torch.device:
    """The device to measure on, or :class:`BenchError` saying why this machine cannot."""
    try:
        dev = resolve_device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise BenchError(f"device {device}: CUDA is not available here; use --device cpu")
        torch.empty(1, device=dev)
    except ValueError as exc:  # resolve_device: a device this machine cannot use
        raise BenchError(str(exc)) from None
    except (RuntimeError, AssertionError) as exc:
        raise BenchError(f"device {device!r}: {str(exc).splitlines()[0]}") from None
    return dev


@dataclass(frozen=True)
class Configuration:
    """One measured configuration: ``name`` keys its result and the ratios; ``build`` makes
    its timers (untimed yet); ``announce`` is its progress line (``{backend}`` filled in);
    a configuration that is not ``required`` is left out, the reason in the notes, when
    building it raises :class:`BenchError` (no hand-written or timm peer for this recipe)."""

    name: str
    build: Callable[[Bench], list[_Timer]]
    announce: str = "{name}"
    required: bool = False


#: The configurations in the order they are built, warmed up, reported and shown (the
#: module docstring says what each measures). The compiled step's parts (``breakdown``) are
#: built right after ``compiled``, on its modules.
CONFIGURATIONS: tuple[Configuration, ...] = (
    Configuration(
        "compiled",
        lambda bench: [bench.build_compiled()],
        announce="compiled step ({backend}; the first step compiles)",
        required=True,
    ),
    Configuration("eager", lambda bench: [_program_timer(bench.work, False)[0]]),
    Configuration("hooks", lambda bench: [_hooks_timer(bench.work)]),
    Configuration("timm", lambda bench: [_timm_timer(bench.work)]),
    Configuration(
        "floor",
        lambda bench: _floor_timers(bench.work, bench.floor_modes),
        announce="floor: student step and teacher inference",
        required=True,
    ),
    *(
        Configuration(
            name,
            lambda bench, name=name: bench.build_teacher(name),
            announce=f"{name} ({{backend}})",
        )
        for name in TEACHER_CONFIGURATIONS
    ),
)


def _plain(plan: Plan) -> Plan:
    """The recipe's plan with a plain teacher: its whole depth, its weights as loaded (fp32),
    every patch token."""
    t = plan.teacher
    assert t is not None
    teacher = t.model_copy(update={"precision": "fp32", "keep": None})
    return _with_teacher(plan, teacher, t.depth, None)


def _with_teacher(plan: Plan, teacher: Any, depth: int, kept: int | None) -> Plan:
    """``plan`` with another teacher, run through ``depth`` blocks on ``kept`` patch tokens
    (None: all), its cost counted again."""
    forward = teacher_flops(teacher, depth, kept)
    cost = plan.cost.model_copy(
        update={
            "teacher_forward": forward,
            "total": plan.cost.total - plan.cost.teacher_forward + forward,
        }
    )
    update = {"teacher": teacher, "teacher_depth": depth, "teacher_keep": kept, "cost": cost}
    return plan.model_copy(update=update)


def teacher_variant(plan: Plan, name: str, device: torch.device) -> Plan:
    """The plan a teacher configuration runs (``teacher_plain`` and one option on it), or a
    :class:`BenchError` saying why the recipe does not allow it here."""
    t = plan.teacher
    if t is None or not plan.teacher_used:
        raise BenchError("no term reads a teacher")
    plain = _plain(plan)
    if name == "teacher_plain":
        return plain
    if name == "early_exit":
        if plan.teacher_depth >= t.depth:
            raise BenchError(
                "a term reads the teacher's logits, final norm or last block: all of it runs"
            )
        return _with_teacher(plan, plain.teacher, plan.teacher_depth, None)
    if name in ("teacher_bf16", "teacher_fp8"):
        problem = _precision_problem(name, device)
        if problem is not None:
            raise BenchError(problem)
        held = plain.teacher.model_copy(update={"precision": name.removeprefix("teacher_")})
        return _with_teacher(plan, held, t.depth, None)
    if name == "cached_logits":
        for term in plan.terms:
            if term.teacher:
                raise BenchError(
                    f"the {term.kind} term '{term.name}' reads the teacher's features: only "
                    "logits can be cached"
                )
        return plain
    if name == "masked":
        return _masked_variant(plan, plain)
    raise BenchError(f"unknown teacher configuration {name!r}")


def _precision_problem(name: str, device: torch.device) -> str | None:
    """Why the teacher cannot be measured in bf16 or fp8 on ``device``, or None."""
    if device.type != "cuda":
        if name == "teacher_bf16":
            return "CUDA only (a GPU option: CPU matmuls in bf16 are no faster than in fp32)"
        return "CUDA only (FP8 needs a GPU with compute capability 8.9 or newer)"
    if name == "teacher_fp8":
        import importlib.util

        if torch.cuda.get_device_capability(device) < (8, 9):
            return f"{torch.cuda.get_device_name(device)} has no FP8 (compute capability < 8.9)"
        if importlib.util.find_spec("torchao") is None:
            return "torchao is not installed (the [fp8] extra)"
    return None


def _masked_variant(plan: Plan, plain: Plan) -> Plan:
    """The plain teacher on the share ``keep`` of its patch tokens (the recipe's, else
    :data:`MASKED_KEEP`), where the recipe's own checks allow it (they are run again)."""
    t = plan.teacher
    assert t is not None and plain.teacher is not None
    keep = t.keep if t.keep is not None else MASKED_KEEP
    try:  # a recipe that writes keep has passed its checks already
        masked = plan
        if t.keep is None:
            over = [*plan.overrides, f"teacher.keep={keep}"]
            masked = pipeline.plan(pipeline.load(plan.file, over))
    except VkdError as exc:
        first = next((d for d in exc.diagnostics if d.is_error), None)
        raise BenchError(first.message if first else str(exc)) from None
    if masked.teacher_keep is None:
        raise BenchError(f"keep = {keep:g} keeps every patch token")
    teacher = plain.teacher.model_copy(update={"keep": keep})
    return _with_teacher(plan, teacher, t.depth, masked.teacher_keep)


def _runs_as(plan: Plan, device: torch.device, dtype: torch.dtype | None) -> tuple[Any, ...]:
    """What decides how a plan's teacher runs: two plans alike here time the same step."""
    t = plan.teacher
    if t is None or not plan.teacher_used:
        return ()
    held = teacher_precision(device, dtype, t.precision)
    return (plan.teacher_depth, plan.teacher_keep, held, t.precision == "fp8")


class Bench:
    """One benchmark of a resolved plan, in the shape of torchtune's recipes: :meth:`setup`
    (device, threads, precision, the synthetic batch), :meth:`build` (each configuration
    built and warmed up in turn, its peak memory measured then), :meth:`time` (all of them in
    interleaved rounds), :meth:`results`. :meth:`run` does the four; the options are
    :func:`bench_plan`'s."""

    def __init__(
        self,
        plan: Plan,
        *,
        steps: int = DEFAULT_STEPS,
        warmup: int = DEFAULT_WARMUP,
        device: str | None = None,
        compile_backend: str = "inductor",
        compile_mode: str | None = "default",
        floor: str = "auto",
        breakdown: bool = True,
        loader: bool = True,
        threads: int | None = None,
        progress: Progress | None = None,
        configs: Sequence[str] | None = None,
    ) -> None:
        problem = options_problem(steps, warmup, compile_backend, floor, threads)
        if problem is None and configs is not None:
            problem = configurations_problem(list(configs))
        if problem is not None:
            raise BenchError(problem)
        self.plan = plan
        self.steps, self.warmup = steps, warmup
        self.device_option, self.threads_option = device, threads
        self.backend, self.compile_mode = compile_backend, compile_mode
        self.floor, self.breakdown, self.loader = floor, breakdown, loader
        self.say: Progress = progress or (lambda _: None)
        self.timers: dict[str, _Timer] = {}
        self.peak_mb: dict[str, float] = {}
        self.skipped: dict[str, str] = {}
        # The configurations to measure (compiled and the floor always), and those that run
        # exactly as one measured before them: name -> that one's name.
        # A teacher option's ratio is against the plain teacher: it comes with any of them.
        self.selected = None if configs is None else {*configs, "compiled", "floor"}
        if self.selected is not None and self.selected & set(TEACHER_CONFIGURATIONS):
            self.selected.add("teacher_plain")
        self.same_as: dict[str, str] = {}
        self._runs_as: dict[str, tuple[Any, ...]] = {}
        self._flops: dict[str, int] = {}  # a teacher configuration's FLOPs per image
        self._details: dict[str, dict[str, Any]] = {}  # how its teacher runs
        # The compiled configuration's modules, kept until its breakdown is built on them.
        self._compiled: tuple[Program, Update] | None = None

    def run(self) -> BenchResult:
        """Setup, build, time, results; ``torch._dynamo`` reset before and after, the thread
        count restored."""
        self.setup()
        torch._dynamo.reset()
        try:
            self.build()
            self.time()
            self.fidelity()
        finally:
            torch.set_num_threads(self.threads_before)
        return self.results()

    # ----------------------------------------------------------------------------------------
    # Setup

    def setup(self) -> None:
        """The device, the thread count, the precision, the batch and the memory meter."""
        from vitkdl.train.step import cpu_threads

        plan = self.plan
        self.dev = dev = _bench_device(self.device_option)
        self.start = time.perf_counter()
        self.load_before = _load_average()
        self.threads_before = torch.get_num_threads()
        self.used_threads: int | None = None
        if dev.type == "cpu":
            rule = cpu_threads(plan, dev)
            self.used_threads = self.threads_option or rule or self.threads_before
            torch.set_num_threads(self.used_threads)
        self.dtype = resolve_precision(plan.precision, dev)
        images, targets = _batch(plan, dev)
        self.memory = _Memory(dev)
        self.work = _Workload(
            plan=plan,
            device=dev,
            dtype=self.dtype,
            backend=self.backend,
            mode=self.compile_mode if self.backend == "inductor" else None,
            steps=self.steps,
            warmup=self.warmup,
            images=images,
            targets=targets,
        )
        if self.floor == "auto":
            self.floor_modes = ["compiled"] if dev.type == "cuda" else ["eager"]
        else:
            self.floor_modes = ["eager", "compiled"] if self.floor == "best" else [self.floor]

    # ----------------------------------------------------------------------------------------
    # Build each configuration

    def build(self) -> None:
        """Build and warm up every configuration in turn (the compiled step's parts right
        after the compiled step); each one's peak memory is what its building added."""
        for config in CONFIGURATIONS:
            if self.selected is not None and config.name not in self.selected:
                continue
            what = config.announce.format(name=config.name, backend=self.backend)
            self.say(f"build and warm up: {what}")
            self.memory.reset()
            before = self.memory.current_mb()
            try:
                built = config.build(self)
            except BenchError as exc:
                if config.required:
                    raise
                self.skipped[config.name] = str(exc)
                continue
            if not built:  # runs as a configuration measured before it
                continue
            self._warm(built)
            self.peak_mb[config.name] = max(0.0, self.memory.peak_mb() - before)
            if config.name == "compiled":
                self._build_breakdown()

    def build_compiled(self) -> _Timer:
        """(a), keeping its modules for the breakdown."""
        timer, program, update = _program_timer(self.work, True)
        self._compiled = program, update
        self._runs_as["compiled"] = _runs_as(self.plan, self.dev, self.dtype)
        return timer

    def build_teacher(self, name: str) -> list[_Timer]:
        """A teacher configuration (f)-(k): the compiled step on its variant of the plan, or
        nothing when it runs exactly as one measured before it (``same_as``); a
        :class:`BenchError` saying why the recipe does not allow it."""
        plan = teacher_variant(self.plan, name, self.dev)
        if name == "cached_logits":
            self._flops[name] = plan.cost.total - plan.cost.teacher_forward
            return [_cached_timer(self.work, plan)]
        runs_as = _runs_as(plan, self.dev, self.dtype)
        other = next((n for n, r in self._runs_as.items() if r == runs_as), None)
        if other is not None:
            self.same_as[name] = other
            return []
        self._runs_as[name] = runs_as
        self._flops[name] = plan.cost.total
        t = plan.teacher
        assert t is not None
        self._details[name] = {
            "teacher_depth": plan.teacher_depth,
            "teacher_tokens": plan.teacher_keep or t.tokens,
            "teacher_precision": t.precision,
            "teacher_forward_flops": plan.cost.teacher_forward,
        }
        return [_program_timer(self.work, True, plan, name)[0]]

    def fidelity(self) -> None:
        """What the bf16 and fp8 teachers change on the bench batch, against the same
        weights one precision up (the probe's figures, :class:`vitkdl.probe.FidelityMeter`):
        measured after timing, on an eager program of their own, so they cost the timed
        configurations nothing."""
        for name in ("teacher_bf16", "teacher_fp8"):
            if name not in self._details:
                continue
            torch.manual_seed(self.plan.seed)
            plan = without_cache(teacher_variant(self.plan, name, self.dev))
            program = build(plan, self.dev, load=False, compile="off", reference=True)
            meter = FidelityMeter()
            meter.add(program, self.work.images)
            self._details[name]["fidelity"] = asdict(meter.fidelity(program))
            del program

    def _build_breakdown(self) -> None:
        """The compiled step's parts on the compiled configuration's modules (no memory
        figure of their own: they add little to what the compiled step holds)."""
        program, update = self._compiled or (None, None)
        self._compiled = None  # the breakdown's timer keeps what it needs
        if self.breakdown and program is not None and update is not None:
            self.say("build and warm up: the compiled step's parts, each compiled alone")
            self._warm([_breakdown_timer(self.work, program, update)])

    def _warm(self, timers: Sequence[_Timer]) -> None:
        for t in timers:
            t.warm(self.dev, self.warmup)
            self.timers[t.name] = t

    # ----------------------------------------------------------------------------------------
    # Time

    def time(self) -> None:
        """``steps`` interleaved rounds, one step of every configuration per round."""
        self.say(f"timing: {self.steps} rounds of {len(self.timers)} interleaved steps")
        _rounds(list(self.timers.values()), self.dev, self.steps)

    # ----------------------------------------------------------------------------------------
    # Results

    def results(self) -> BenchResult:
        """The figures of every configuration, the breakdown, the loader, the ratios and the
        notes. Frees the configurations' modules before the loader runs."""
        plan = self.plan
        self.peak = peak_flops(self.dev)
        self.low_precision = self.dtype in (torch.bfloat16, torch.float16)
        configs: dict[str, ConfigResult] = {}
        for config in CONFIGURATIONS:
            if config.name == "floor":
                configs["floor"] = self._floor_result()
            elif config.name in self.timers:
                configs[config.name] = self._timed_result(config.name)
            elif config.name in self.same_as:
                other = configs[self.same_as[config.name]]
                details = {**other.details, "same_as": other.name}
                configs[config.name] = dataclasses.replace(other, name=config.name, details=details)
        parts = self._breakdown_result(configs["compiled"]) if self.breakdown else None
        self.timers.clear()  # frees the configurations' modules before the loader runs
        torch._dynamo.reset()
        gc.collect()
        loader_info = None
        if self.loader:
            self.say("data loader")
            loader_info = _loader(
                plan,
                max(2 * self.steps, 10) * plan.data.batch_size,
                configs["compiled"].images_per_second,
            )
        ratios = _ratios(plan, configs, parts)
        return BenchResult(
            recipe=plan.recipe,
            student=plan.student.name,
            teacher=plan.teacher.name if plan.teacher else None,
            device=str(self.dev),
            device_name=torch.cuda.get_device_name(self.dev)
            if self.dev.type == "cuda"
            else _cpu_name(),
            threads=self.used_threads,
            batch=plan.data.batch_size,
            precision=str(self.dtype).removeprefix("torch.") if self.dtype else "fp32",
            backend=self.backend,
            compile_mode=self.work.mode,
            steps=self.steps,
            warmup=self.warmup,
            flops_per_image=plan.cost.total,
            memory_kind=self.memory.measure,
            configs=configs,
            ratios=ratios,
            breakdown=parts,
            loader=loader_info,
            peak_device_flops=self.peak,
            load_average=[self.load_before, load_after := _load_average()],
            wall_seconds=time.perf_counter() - self.start,
            notes=self._notes(load_after),
        )

    def _result(
        self,
        name: str,
        ms: float,
        flops: int,
        compile_s: float | None,
        ms_steps: list[float],
        **details: Any,
    ) -> ConfigResult:
        ips = self.work.batch / (ms / 1e3)
        peak = self.peak
        return ConfigResult(
            name=name,
            images_per_second=ips,
            ms_per_step=ms,
            ms_steps=ms_steps,
            peak_memory_mb=self.peak_mb[name],
            compile_seconds=compile_s,
            mfu=flops * ips / peak if peak and self.low_precision else None,
            details=details,
        )

    def _timed_result(self, name: str) -> ConfigResult:
        """A configuration timed as one step."""
        t = self.timers[name]
        ms_steps = [x * 1e3 for x in t.times]
        flops = self._flops.get(name, self.plan.cost.total)
        details = self._details.get(name, {})
        return self._result(name, t.median * 1e3, flops, t.compile_seconds(), ms_steps, **details)

    def _floor_best(self, role: str) -> _Timer | None:
        """The floor's student step or teacher inference in its fastest mode."""
        names = [f"floor.{role}.{m}" for m in self.floor_modes]
        found = [self.timers[n] for n in names if n in self.timers]
        return min(found, key=lambda t: t.median) if found else None

    def _floor_result(self) -> ConfigResult:
        """(d): the best student step plus the best teacher inference, step by step."""
        cost = self.plan.cost
        fs, ft = self._floor_best("student"), self._floor_best("teacher")
        assert fs is not None
        s_ms = fs.median * 1e3
        t_ms = ft.median * 1e3 if ft is not None else 0.0
        measured = {
            name.removeprefix("floor."): t.median * 1e3
            for name, t in self.timers.items()
            if name.startswith("floor.")
        }
        compile_s = sum(t.compile_seconds() or 0.0 for t in (fs, ft) if t is not None)
        t_times = ft.times if ft else [0.0] * len(fs.times)
        return self._result(
            "floor",
            s_ms + t_ms,
            cost.teacher_forward + cost.student_forward_backward,
            compile_s if (fs.compiled or (ft is not None and ft.compiled)) else None,
            [(a + b) * 1e3 for a, b in zip(fs.times, t_times, strict=True)],
            student_step_ms=s_ms,
            teacher_inference_ms=t_ms if ft else None,
            student_mode=fs.name.rsplit(".", 1)[1],
            teacher_mode=ft.name.rsplit(".", 1)[1] if ft else None,
            measured_ms=measured,
        )

    def _breakdown_result(self, compiled: ConfigResult) -> dict[str, Any]:
        """The compiled step's parts: medians, their sum against the whole step, shares."""
        bt = self.timers["breakdown"]
        ms = {f"{k}_ms": statistics.median(p[k] for p in bt.parts) * 1e3 for k in _PARTS}
        total_ms = sum(ms.values())
        step_ms = compiled.ms_per_step
        compile_s = sum(max(0.0, bt.first_parts.get(k, 0.0) - ms[f"{k}_ms"] / 1e3) for k in _PARTS)
        return {
            **ms,
            "sum_of_parts_ms": total_ms,
            "step_ms": step_ms,
            "parts_minus_step_ms": total_ms - step_ms,
            "compile_seconds": compile_s,
            "share": {k: v / total_ms if total_ms else None for k, v in ms.items()},
        }

    def _notes(self, load_after: float | None) -> list[str]:
        """What the figures leave out and what they ran under."""
        dev = self.dev
        notes: list[str] = [f"{name} not measured: {why}" for name, why in self.skipped.items()]
        notes += [f"{name} runs as {other}: the same step" for name, other in self.same_as.items()]
        if dev.type == "cuda" and self.peak is None:
            notes.append(f"MFU omitted: no known peak for {torch.cuda.get_device_name(dev)}")
        elif self.peak is not None and not self.low_precision:
            notes.append("MFU omitted: the peak table is for bf16/fp16 and precision is fp32")
        if dev.type == "cpu":
            modes = " and ".join(self.floor_modes)
            notes.append(f"CPU: {self.used_threads} thread(s); the floor runs {modes}")
        if self.load_before is not None and load_after is not None:
            notes.append(
                f"load average {self.load_before:.2f} before, {load_after:.2f} after "
                f"({os.cpu_count()} CPUs): a load above the CPU count means other "
                "processes shared them"
            )
        return notes


def _ratios(
    plan: Plan, configs: Mapping[str, ConfigResult], parts: Mapping[str, Any] | None
) -> dict[str, float | None]:
    """The ratios between configurations, keyed by name; None where one is not measured."""
    ms = {name: c.ms_per_step for name, c in configs.items()}

    def speedup(other: str, ref: str) -> float | None:
        """How much faster ``ref`` runs than ``other``: other's ms over ref's."""
        return ms[other] / ms[ref] if other in ms and ref in ms else None

    return {**_core_ratios(plan, parts, ms, speedup), **_teacher_ratios(configs, parts)}


def _core_ratios(
    plan: Plan,
    parts: Mapping[str, Any] | None,
    ms: Mapping[str, float],
    speedup: Callable[[str, str], float | None],
) -> dict[str, float | None]:
    """The compiled step against the eager one, the hooks, timm's task and the floor."""
    cost = plan.cost
    floor_flops = cost.teacher_forward + cost.student_forward_backward
    return {
        "compiled_vs_eager": speedup("eager", "compiled"),
        "compiled_vs_hooks": speedup("hooks", "compiled"),
        "overhead_vs_floor": ms["compiled"] / ms["floor"] - 1,
        "eager_vs_hooks": speedup("hooks", "eager"),
        # timm's own task, where it expresses the recipe: what timm users run today
        "compiled_vs_timm": speedup("timm", "compiled"),
        # The floor leaves out the adapters' work (ViTKD's generator: 10-18 % of the FLOPs of
        # the paper's pairs, more at reduced depth), so by FLOPs alone the step costs this much
        # more than the floor ...
        "overhead_vs_floor_from_flops": cost.adapters_forward_backward / floor_flops
        if floor_flops
        else None,
        "adapter_flops_share": cost.adapters_forward_backward / cost.total if cost.total else None,
        # ... and what is left once the adapters' and losses' measured time is added to the
        # floor is the price of running them together in one step.
        "overhead_vs_floor_plus_losses": ms["compiled"]
        / (ms["floor"] + parts["adapters_losses_ms"])
        - 1
        if parts
        else None,
    }


def _teacher_ratios(
    configs: Mapping[str, ConfigResult], parts: Mapping[str, Any] | None
) -> dict[str, float | None]:
    """The teacher's share of the step and each teacher option's speed-up over the plain
    teacher (its ms over the option's); None where one is not measured."""
    ms = {name: c.ms_per_step for name, c in configs.items()}
    plain = ms.get("teacher_plain")
    out: dict[str, float | None] = {
        # the compiled step's teacher forward (its breakdown) over the sum of its parts
        "teacher_share": parts["teacher_forward_ms"] / parts["sum_of_parts_ms"]
        if parts and parts.get("sum_of_parts_ms") and "teacher_forward_ms" in parts
        else None,
        # measured the other way: what dropping the teacher saves on the plain teacher's step
        "teacher_share_of_plain": 1 - ms["cached_logits"] / plain
        if plain and "cached_logits" in ms
        else None,
    }
    for name in TEACHER_CONFIGURATIONS[1:]:
        out[f"{name}_vs_plain"] = plain / ms[name] if plain and name in ms else None
    # A run reading cached logits against the floor's student-only step (same step, no KD):
    # the cache's promise is that the teacher then costs next to nothing.
    student = _floor_student_ms(configs.get("floor"), configs.get("cached_logits"))
    out["cached_vs_student_only"] = (
        ms["cached_logits"] / student if student and "cached_logits" in ms else None
    )
    return out


def _floor_student_ms(floor: ConfigResult | None, cached: ConfigResult | None) -> float | None:
    """The floor's student step in the cached step's mode (compiled) when measured, else its
    best."""
    if floor is None:
        return None
    measured = floor.details.get("measured_ms", {})
    if cached is not None and "student.compiled" in measured:
        return measured["student.compiled"]
    return floor.details.get("student_step_ms")


def bench_plan(plan: Plan, **options: Any) -> BenchResult:
    """Benchmark a resolved plan (see the module docstring for what is measured).

    Every configuration is built and warmed up in turn (its peak memory measured then); all
    stay alive, and the timed steps run in ``steps`` interleaved rounds (one step of each
    configuration per round), so that load from elsewhere on the machine hits them alike.

    Keyword arguments (:class:`Bench`'s):
        steps: timed steps per figure (medians are reported).
        warmup: untimed steps first (the first compiles); at least 1.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``; default CUDA when available.
        compile_backend: torch.compile backend of the compiled figures: ``"inductor"`` (what
            training uses), or ``"aot_eager"`` / ``"eager"`` for tests and debugging.
        compile_mode: inductor mode (``"default"``, ``"max-autotune"``, ...).
        floor: how the floor runs: ``"auto"`` (compiled on CUDA, eager on CPU), ``"eager"``,
            ``"compiled"`` or ``"best"`` (both; the faster of each part).
        breakdown: time the compiled step's parts separately.
        loader: time the recipe's data loader.
        threads: CPU threads (default: the trainer's rule, one thread for small steps).
        progress: called with a line before each measurement.
        configs: the configurations to measure (default all; ``compiled`` and ``floor``
            always).

    Resets ``torch._dynamo`` before and after. Raises :class:`BenchError` for a bad option or
    device.
    """
    return Bench(plan, **options).run()


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    import platform

    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def run_bench(
    path: str | Path,
    overrides: Sequence[str] | Mapping[str, Any] | None = None,
    *,
    batch: int | None = None,
    **kwargs: Any,
) -> BenchResult:
    """Load, check and plan a recipe, then :func:`bench_plan` it.

    ``overrides`` as for :func:`vitkdl.load`; ``batch`` overrides ``data.batch_size``; other
    keyword arguments go to :func:`bench_plan`. Raises :class:`vitkdl.VkdError` for a recipe
    with errors and :class:`BenchError` for a bad option.
    """
    over = pipeline.override_list(overrides)
    if batch is not None:
        if batch < 1:
            raise BenchError("--batch must be at least 1")
        if any(split_op(o.split("=", 1)[0])[1] == "data.batch_size" for o in over):
            # Two values for one path are an error (not "the last wins"), said in its words.
            raise BenchError("--batch and --set data.batch_size both set the batch; give one")
        over.append(f"data.batch_size={batch}")
    plan = pipeline.plan(pipeline.load(path, over))
    return bench_plan(plan, **kwargs)
