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

import vitkdl
from vitkdl.planner import Plan, TapPoint
from vitkdl.program import (
    Program,
    create_model,
    distilled_heads,
    model_taps,
    resize_input,
    resolve_device,
    resolve_precision,
    single_logits,
    tap_pass,
    teacher_resize,
    term_losses,
)
from vitkdl.sources import teacher_affine
from vitkdl.spec import split_op
from vitkdl.terms import KINDS, StepInputs
from vitkdl.train.step import Update, configure_optimizer, model_param_groups, train_step

__all__ = [
    "BACKENDS",
    "FLOOR_MODES",
    "PEAK_FLOPS",
    "BenchError",
    "BenchResult",
    "ConfigResult",
    "HandWrittenLoss",
    "bench_plan",
    "peak_flops",
    "register_feature_hooks",
    "run_bench",
    "timm_task_kwargs",
]

BACKENDS = ("inductor", "aot_eager", "eager")
FLOOR_MODES = ("auto", "eager", "compiled", "best")

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
    """Peak memory per configuration: CUDA allocator peak, or the process's peak RSS."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.resettable = False
        if device.type == "cuda":
            self.kind = (
                "torch.cuda.max_memory_allocated while the configuration is built and "
                "warmed up, less what was allocated before (the other configurations)"
            )
        else:
            self.resettable = self._clear_refs()
            self.kind = (
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
    plan: Plan, named: Iterable[tuple[str, nn.Parameter]], student: nn.Module, s: _Setup
) -> Update:
    """The trainer's update over a student and further named parameters: the same optimizer
    (one decay rule, fused AdamW), clipping and loss scaling as ``vitkdl run``."""
    extra = list(named)
    groups = model_param_groups(student, extra, plan.optimizer.weight_decay)
    params = [p for p in student.parameters() if p.requires_grad]
    params += [p for _, p in extra if p.requires_grad]
    return Update(configure_optimizer(plan, groups), params, plan.clip_grad, s.device, s.dtype)


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
class _Setup:
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


def _program_timer(s: _Setup, compiled: bool) -> tuple[_Timer, Program, Update]:
    """(a) or (b): vitkdl's step, compiled or eager, then the trainer's update."""
    torch.manual_seed(s.plan.seed)
    if compiled and s.backend == "inductor":
        program = vitkdl.build(s.plan, s.device, load=False, compile=s.mode or "default")
        step = program.step
    else:
        program = vitkdl.build(s.plan, s.device, load=False, compile="off")
        step = s.compile(program.forward) if compiled else program.forward
    program.train()
    update = _update(s.plan, program.terms.named_parameters(), program.student, s)

    def one_step() -> None:
        train_step(step, update, s.images, s.targets)

    return _Timer("compiled" if compiled else "eager", one_step, compiled), program, update


_PARTS = ("teacher_forward", "student_forward_backward", "adapters_losses", "optimizer")


def _breakdown_timer(s: _Setup, program: Program, update: Update) -> _Timer:
    """The compiled step's parts, each compiled on its own and timed between
    synchronisations: teacher forward, student forward + backward, adapters + losses (forward
    and backward), optimizer (clipping, AdamW, zeroing)."""
    plan = s.plan
    s_points, t_points = model_taps(plan.terms, "student"), model_taps(plan.terms, "teacher")
    s_keys = [*(p.key for p in s_points), "norm"]
    t_keys = [*(p.key for p in t_points), "norm"]
    s_prefix = plan.student.prefix_tokens
    student, terms = program.student, program.terms

    def teacher_fwd(images: Tensor) -> tuple[Tensor, list[Tensor]]:
        logits, taps = program.teacher_pass(images)  # the step's own teacher half
        assert logits is not None
        return logits, [taps[k] for k in t_keys]

    def student_fwd(images: Tensor) -> tuple[Tensor, list[Tensor]]:
        with _autocast(s.device, s.dtype):
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
        )
        return term_losses(plan.terms, terms, inputs)["loss"]

    t_fn = s.compile(teacher_fwd) if plan.teacher_used else None
    s_fn, l_fn = s.compile(student_fwd), s.compile(losses)

    def parts() -> dict[str, float]:
        marks: list[float] = []

        def mark() -> None:
            _sync(s.device)
            marks.append(time.perf_counter())

        mark()
        t_logits, t_taps = t_fn(s.images) if t_fn is not None else (None, [])
        mark()  # teacher forward
        s_logits, s_taps = s_fn(s.images)
        mark()  # student forward
        leaves = [x.detach().requires_grad_() for x in (s_logits, *s_taps)]
        total = l_fn(leaves[0], leaves[1:], t_logits, t_taps, s.targets)
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


def _hooks_timer(s: _Setup) -> _Timer:
    """(c) forward hooks, two full forwards, a hand-written loss module; eager."""
    plan = s.plan
    torch.manual_seed(plan.seed)
    student = create_model(plan.student, s.device)
    teacher = create_model(plan.teacher, s.device) if plan.teacher_used and plan.teacher else None
    criterion = HandWrittenLoss(plan).to(s.device)
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
        plan, [(f"criterion.{n}", p) for n, p in criterion.named_parameters()], student, s
    )
    t_images = s.images
    if teacher is not None and plan.teacher is not None:  # the teacher's own normalisation
        affine = teacher_affine(
            (plan.student.mean, plan.student.std), (plan.teacher.mean, plan.teacher.std)
        )
        if affine is not None:
            scale, shift = (torch.tensor(v, device=s.device).view(1, -1, 1, 1) for v in affine)
            t_images = s.images * scale + shift
    resize = teacher_resize(plan)
    dist_head = any(KINDS[t.kind].reads_dist_logits for t in plan.terms)
    if dist_head:  # DeiT's distillation token: the two heads apart, as DeiT's code does
        student.set_distilled_training(True)

    def one_step() -> None:
        t_logits, s_dist = None, None
        with _autocast(s.device, s.dtype):
            if teacher is not None:
                with torch.no_grad():
                    seen = resize_input(t_images, *resize) if resize else t_images
                    t_logits = single_logits(teacher(seen))
            out = student(s.images)
            if dist_head:
                s_logits, s_dist = distilled_heads(out)
            else:
                s_logits = single_logits(out)
        out = criterion(StepInputs(s_logits, s_feats, t_logits, t_feats, s.targets, s_dist))
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


def _timm_timer(s: _Setup) -> _Timer:
    """(e) timm's own distillation task (the logit or the token task), compiled with the same
    backend, then the same optimizer step."""
    import timm.loss
    import timm.task

    plan = s.plan
    kwargs = timm_task_kwargs(plan)
    assert plan.teacher is not None
    torch.manual_seed(plan.seed)
    student = create_model(plan.student, s.device)
    teacher = create_model(plan.teacher, s.device).eval()
    soft = s.targets.dim() > 1
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
        "device": s.device,
        "verbose": False,
    }
    if "distill_type" in kwargs:
        common["distill_type"] = kwargs["distill_type"]
    task: nn.Module = getattr(timm.task, kwargs["task"])(student, teacher, **common)
    task.train()
    if s.backend == "inductor":
        task.compile(mode=s.mode)
    elif s.backend != "eager":
        task.compile(backend=s.backend)
    update = _update(plan, [], student, s)

    def one_step() -> None:
        with _autocast(s.device, s.dtype):
            out = task(s.images, s.targets)
        update.backward(out["loss"])
        update.step()

    return _Timer("timm", one_step, s.backend != "eager")


def _floor_timers(s: _Setup, modes: Sequence[str]) -> list[_Timer]:
    """(d) a student-only training step on the labels and a teacher inference forward, timed
    separately, in each of ``modes`` (``eager``, ``compiled``)."""
    plan = s.plan
    torch.manual_seed(plan.seed)
    student = create_model(plan.student, s.device)
    teacher = create_model(plan.teacher, s.device) if plan.teacher is not None else None
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    student.train()
    update = _update(plan, [], student, s)
    smoothing = plan.data.smoothing

    def forward_loss(images: Tensor, targets: Tensor) -> Tensor:
        with _autocast(s.device, s.dtype):
            logits = single_logits(student(images)).float()
        if targets.dim() > 1:
            return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
        return F.cross_entropy(logits, targets, label_smoothing=smoothing)

    resize = teacher_resize(plan)

    def infer(images: Tensor) -> Tensor:
        assert teacher is not None
        with torch.no_grad(), _autocast(s.device, s.dtype):
            if resize is not None:  # the teacher at its own resolution
                images = resize_input(images, *resize)
            return single_logits(teacher(images))

    timers = []
    for mode in modes:
        compiled = mode == "compiled"
        fwd = s.compile(forward_loss) if compiled else forward_loss

        def student_step(fwd: Callable[..., Tensor] = fwd) -> None:
            update.backward(fwd(s.images, s.targets))
            update.step()

        timers.append(_Timer(f"floor.student.{mode}", student_step, compiled))
        if teacher is not None and plan.teacher_used:
            inf = s.compile(infer) if compiled else infer
            timers.append(_Timer(f"floor.teacher.{mode}", lambda inf=inf: inf(s.images), compiled))
    return timers


def _loader(plan: Plan, images: int, step_ips: float | None) -> dict[str, Any]:
    """The recipe's training data loader on its own: images/s against the step's."""
    from vitkdl.train.data import DataError, build_loaders
    from vitkdl.train.loop import data_config

    cfg = data_config(plan)
    info: dict[str, Any] = {
        "source": cfg.source,
        "root": cfg.root,
        "workers": cfg.workers,
        "batch": cfg.batch_size,
        "augment": cfg.augment,
    }
    try:
        start = time.perf_counter()
        loader, _, _ = build_loaders(cfg)
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


def bench_plan(
    plan: Plan,
    *,
    steps: int = 10,
    warmup: int = 3,
    device: str | None = None,
    compile_backend: str = "inductor",
    compile_mode: str | None = "default",
    floor: str = "auto",
    breakdown: bool = True,
    loader: bool = True,
    threads: int | None = None,
    progress: Progress | None = None,
) -> BenchResult:
    """Benchmark a resolved plan (see the module docstring for what is measured).

    Every configuration is built and warmed up in turn (its peak memory measured then); all
    stay alive, and the timed steps run in ``steps`` interleaved rounds (one step of each
    configuration per round), so that load from elsewhere on the machine hits them alike.

    Args:
        plan: the resolved plan (its ``data.batch_size`` is the batch).
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

    Resets ``torch._dynamo`` before and after. Raises :class:`BenchError` for a bad option or
    device.
    """
    from vitkdl.train.loop import SMALL_STEP_FLOPS

    if steps < 1 or warmup < 1:
        raise BenchError("--steps and --warmup must be at least 1")
    if compile_backend not in BACKENDS:
        raise BenchError(f"unknown backend {compile_backend!r}; one of {', '.join(BACKENDS)}")
    if floor not in FLOOR_MODES:
        raise BenchError(f"unknown floor mode {floor!r}; one of {', '.join(FLOOR_MODES)}")
    if threads is not None and threads < 1:
        raise BenchError("--threads must be at least 1")
    try:
        dev = resolve_device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise BenchError(f"device {device}: CUDA is not available here; use --device cpu")
        torch.empty(1, device=dev)
    except ValueError as exc:  # resolve_device: a device this machine cannot use
        raise BenchError(str(exc)) from None
    except (RuntimeError, AssertionError) as exc:
        raise BenchError(f"device {device!r}: {str(exc).splitlines()[0]}") from None
    say = progress or (lambda _: None)
    start_all = time.perf_counter()
    load_before = _load_average()
    threads_before = torch.get_num_threads()
    used_threads: int | None = None
    if dev.type == "cpu":
        used_threads = threads or (
            1 if plan.cost.total * plan.data.batch_size < SMALL_STEP_FLOPS else threads_before
        )
        torch.set_num_threads(used_threads)
    dtype = resolve_precision(plan.precision, dev)
    images, targets = _batch(plan, dev)
    memory = _Memory(dev)
    s = _Setup(
        plan=plan,
        device=dev,
        dtype=dtype,
        backend=compile_backend,
        mode=compile_mode if compile_backend == "inductor" else None,
        steps=steps,
        warmup=warmup,
        images=images,
        targets=targets,
    )
    if floor == "auto":
        floor_modes = ["compiled"] if dev.type == "cuda" else ["eager"]
    else:
        floor_modes = ["eager", "compiled"] if floor == "best" else [floor]

    timers: dict[str, _Timer] = {}
    peak_mb: dict[str, float] = {}
    skipped: dict[str, str] = {}

    def warm(name: str, new: Sequence[_Timer], before: float | None) -> None:
        for t in new:
            t.warm(dev, warmup)
            timers[t.name] = t
        if before is not None:
            peak_mb[name] = max(0.0, memory.peak_mb() - before)

    torch._dynamo.reset()
    try:
        say(f"build and warm up: compiled step ({compile_backend}; the first step compiles)")
        memory.reset()
        before = memory.current_mb()
        timer, program, updater = _program_timer(s, True)
        warm("compiled", [timer], before)
        if breakdown:
            say("build and warm up: the compiled step's parts, each compiled alone")
            warm("breakdown", [_breakdown_timer(s, program, updater)], None)
        del program, updater
        for name, make in (
            ("eager", lambda: [_program_timer(s, False)[0]]),
            ("hooks", lambda: [_hooks_timer(s)]),
            ("timm", lambda: [_timm_timer(s)]),
            ("floor", lambda: _floor_timers(s, floor_modes)),
        ):
            say(f"build and warm up: {name}")
            memory.reset()
            before = memory.current_mb()
            try:
                built = make()
            except BenchError as exc:  # no hand-written peer for what this recipe taps
                skipped[name] = str(exc)
                continue
            warm(name, built, before)
        say(f"timing: {steps} rounds of {len(timers)} interleaved steps")
        _rounds(list(timers.values()), dev, steps)
    finally:
        torch.set_num_threads(threads_before)

    peak = peak_flops(dev)
    low_precision = dtype in (torch.bfloat16, torch.float16)

    def result(
        name: str,
        ms: float,
        flops: int,
        compile_s: float | None,
        ms_steps: list[float],
        **details: Any,
    ) -> ConfigResult:
        ips = s.batch / (ms / 1e3)
        return ConfigResult(
            name=name,
            images_per_second=ips,
            ms_per_step=ms,
            ms_steps=ms_steps,
            peak_memory_mb=peak_mb[name],
            compile_seconds=compile_s,
            mfu=flops * ips / peak if peak and low_precision else None,
            details=details,
        )

    configs: dict[str, ConfigResult] = {}
    for name in ("compiled", "eager", "hooks", "timm"):
        if name not in timers:
            continue
        t = timers[name]
        configs[name] = result(
            name, t.median * 1e3, plan.cost.total, t.compile_seconds(), [x * 1e3 for x in t.times]
        )

    def best(role: str) -> _Timer | None:
        found = [timers[f"floor.{role}.{m}"] for m in floor_modes if f"floor.{role}.{m}" in timers]
        return min(found, key=lambda t: t.median) if found else None

    fs, ft = best("student"), best("teacher")
    assert fs is not None
    s_ms = fs.median * 1e3
    t_ms = ft.median * 1e3 if ft is not None else 0.0
    measured = {
        name.removeprefix("floor."): t.median * 1e3
        for name, t in timers.items()
        if name.startswith("floor.")
    }
    floor_compile = sum(t.compile_seconds() or 0.0 for t in (fs, ft) if t is not None)
    configs["floor"] = result(
        "floor",
        s_ms + t_ms,
        plan.cost.teacher_forward + plan.cost.student_forward_backward,
        floor_compile if (fs.compiled or (ft is not None and ft.compiled)) else None,
        [
            (a + b) * 1e3
            for a, b in zip(fs.times, ft.times if ft else [0.0] * len(fs.times), strict=True)
        ],
        student_step_ms=s_ms,
        teacher_inference_ms=t_ms if ft else None,
        student_mode=fs.name.rsplit(".", 1)[1],
        teacher_mode=ft.name.rsplit(".", 1)[1] if ft else None,
        measured_ms=measured,
    )

    parts: dict[str, Any] | None = None
    if breakdown:
        bt = timers["breakdown"]
        ms = {f"{k}_ms": statistics.median(p[k] for p in bt.parts) * 1e3 for k in _PARTS}
        total_ms = sum(ms.values())
        step_ms = configs["compiled"].ms_per_step
        compile_s = sum(max(0.0, bt.first_parts.get(k, 0.0) - ms[f"{k}_ms"] / 1e3) for k in _PARTS)
        parts = {
            **ms,
            "sum_of_parts_ms": total_ms,
            "step_ms": step_ms,
            "parts_minus_step_ms": total_ms - step_ms,
            "compile_seconds": compile_s,
            "share": {k: v / total_ms if total_ms else None for k, v in ms.items()},
        }

    timers.clear()  # frees the configurations' modules before the loader runs
    torch._dynamo.reset()
    gc.collect()
    loader_info = None
    if loader:
        say("data loader")
        loader_info = _loader(
            plan, max(2 * steps, 10) * plan.data.batch_size, configs["compiled"].images_per_second
        )
    a, b = configs["compiled"], configs["eager"]
    c, d = configs.get("hooks"), configs["floor"]
    e = configs.get("timm")
    floor_flops = plan.cost.teacher_forward + plan.cost.student_forward_backward
    ratios: dict[str, float | None] = {
        "compiled_vs_eager": b.ms_per_step / a.ms_per_step,
        "compiled_vs_hooks": c.ms_per_step / a.ms_per_step if c else None,
        "overhead_vs_floor": a.ms_per_step / d.ms_per_step - 1,
        "eager_vs_hooks": c.ms_per_step / b.ms_per_step if c else None,
        # timm's own task, where it expresses the recipe: what timm users run today
        "compiled_vs_timm": e.ms_per_step / a.ms_per_step if e else None,
        # The floor leaves out the adapters' work (ViTKD's generator: 10-18 % of the FLOPs of
        # the paper's pairs, more at reduced depth), so by FLOPs alone the step costs this much
        # more than the floor ...
        "overhead_vs_floor_from_flops": plan.cost.adapters_forward_backward / floor_flops
        if floor_flops
        else None,
        "adapter_flops_share": plan.cost.adapters_forward_backward / plan.cost.total
        if plan.cost.total
        else None,
        # ... and what is left once the adapters' and losses' measured time is added to the
        # floor is the price of running them together in one step.
        "overhead_vs_floor_plus_losses": a.ms_per_step
        / (d.ms_per_step + parts["adapters_losses_ms"])
        - 1
        if parts
        else None,
    }
    notes: list[str] = [f"{name} not measured: {why}" for name, why in skipped.items()]
    if dev.type == "cuda" and peak is None:
        notes.append(f"MFU omitted: no known peak for {torch.cuda.get_device_name(dev)}")
    elif peak is not None and not low_precision:
        notes.append("MFU omitted: the peak table is for bf16/fp16 and precision is fp32")
    if dev.type == "cpu":
        notes.append(f"CPU: {used_threads} thread(s); the floor runs {' and '.join(floor_modes)}")
    load_after = _load_average()
    if load_before is not None and load_after is not None:
        notes.append(
            f"load average {load_before:.2f} before, {load_after:.2f} after "
            f"({os.cpu_count()} CPUs): a load above the CPU count means other "
            "processes shared them"
        )
    return BenchResult(
        recipe=plan.recipe,
        student=plan.student.name,
        teacher=plan.teacher.name if plan.teacher else None,
        device=str(dev),
        device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name(),
        threads=used_threads,
        batch=plan.data.batch_size,
        precision=str(dtype).removeprefix("torch.") if dtype else "fp32",
        backend=compile_backend,
        compile_mode=s.mode,
        steps=steps,
        warmup=warmup,
        flops_per_image=plan.cost.total,
        memory_kind=memory.kind,
        configs=configs,
        ratios=ratios,
        breakdown=parts,
        loader=loader_info,
        peak_device_flops=peak,
        load_average=[load_before, load_after],
        wall_seconds=time.perf_counter() - start_all,
        notes=notes,
    )


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
    over = vitkdl.override_list(overrides)
    if batch is not None:
        if batch < 1:
            raise BenchError("--batch must be at least 1")
        if any(split_op(o.split("=", 1)[0])[1] == "data.batch_size" for o in over):
            # Two values for one path are an error (not "the last wins"), said in its words.
            raise BenchError("--batch and --set data.batch_size both set the batch; give one")
        over.append(f"data.batch_size={batch}")
    plan = vitkdl.plan(vitkdl.load(path, over))
    return bench_plan(plan, **kwargs)
