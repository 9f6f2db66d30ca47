"""``vitkdl bench``: how fast the compiled distillation step is, against what it replaces.

One process, the recipe's real models (random weights), synthetic batches of the recipe's shapes
already on the device. Four training configurations are timed, one after the other, each on
freshly built modules (same seed, so the same weights) with its own peak memory:

``compiled``  (a) vitkdl's step: ``Program.forward`` (teacher, student, adapters, losses) under
              ``torch.compile(fullgraph=True)``; backward, gradient clipping and the optimizer
              step (timm AdamW over the student and adapters) outside the graph, as the
              trainer runs it.
``eager``     (b) the same step without ``torch.compile``.
``hooks``     (c) what users write today: forward hooks on the student's and teacher's blocks
              capture the features, ``teacher(images)`` and ``student(images)`` run as two full
              forwards, a separate hand-written loss module (:class:`HandWrittenLoss`, written
              here independently of :mod:`vitkdl.strategies`) computes the same terms; eager.
``floor``     (d) the least a distillation step can cost: a student-only training step on the
              labels plus a teacher inference forward, each timed alone, each at its best
              (compiled on CUDA, eager on CPU; ``floor="best"`` measures both and keeps the
              faster of each).

For (a) a breakdown times the parts separately (each compiled on its own, synchronised between
parts): teacher forward, student forward + backward, adapters + losses (forward + backward),
optimizer (clipping, AdamW, zeroing). The data loader of the recipe is timed on its own and
compared with the step's images/s. Warm-up steps are excluded (the first one's extra time is
reported as compile time); every figure is the median of ``steps`` timed steps.

Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA (reset per configuration); on CPU the
process's peak resident set size, reset per configuration through ``/proc/self/clear_refs``
(Linux), else ``getrusage`` peak since the process started. ``BenchResult.memory_kind`` says
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
from vitkdl.planner import Plan, TermPlan
from vitkdl.program import Program, create_model, resolve_device, resolve_precision

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
    "run_bench",
]

BACKENDS = ("inductor", "aot_eager", "eager")
FLOOR_MODES = ("auto", "eager", "compiled", "best")

#: Dense bf16/fp16 tensor-core peak FLOP/s by card name (first match wins).
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
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
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS if key in name), None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_calls(fn: Callable[[], Any], device: torch.device, warmup: int, steps: int
                ) -> tuple[list[float], float]:
    """``(timed seconds per call, seconds of the first warm-up call)``, synchronised."""
    first = 0.0
    for i in range(warmup):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        if i == 0:
            first = time.perf_counter() - start
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times, first


def _compile_seconds(first: float, times: Sequence[float], compiled: bool) -> float | None:
    """The first call's time over a normal step: tracing and code generation."""
    if not compiled:
        return None
    return max(0.0, first - statistics.median(times))


class _Memory:
    """Peak memory per configuration: CUDA allocator peak, or the process's peak RSS."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.resettable = False
        if device.type == "cuda":
            self.kind = "torch.cuda.max_memory_allocated (reset per configuration)"
        else:
            self.resettable = self._clear_refs()
            self.kind = ("process peak RSS (VmHWM, reset per configuration via "
                         "/proc/self/clear_refs; includes the Python and torch runtime)"
                         if self.resettable else
                         "process peak RSS since start (getrusage ru_maxrss; not reset "
                         "between configurations, so later figures are upper bounds)")

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


def _no_decay(named: Iterable[tuple[str, nn.Parameter]], skip: set[str],
              weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in named:
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name in skip or name.endswith(("pos_embed", "cls_token", "dist_token",
                                                          "mask_token")):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def _optimizer(plan: Plan, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    import timm.optim

    opt = plan.optimizer
    return timm.optim.create_optimizer_v2(groups, opt=opt.name, lr=opt.lr,
                                          weight_decay=opt.weight_decay, **opt.kwargs)


class _Updater:
    """Backward, clipping and the optimizer step, as the trainer runs them."""

    def __init__(self, plan: Plan, optimizer: torch.optim.Optimizer,
                 params: list[nn.Parameter], device: torch.device,
                 dtype: torch.dtype | None) -> None:
        self.optimizer = optimizer
        self.params = params
        self.clip = plan.clip_grad
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def backward(self, loss: Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()

    def step(self) -> None:
        if self.clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()


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


def _single_logits(logits: Tensor | tuple[Tensor, ...]) -> Tensor:
    """One ``[B, C]`` tensor (a distilled DeiT in train mode returns two heads: averaged)."""
    if isinstance(logits, (tuple, list)):
        return sum(logits[1:], logits[0]) / len(logits)
    return logits


def _block_taps(terms: Sequence[TermPlan], side: str) -> list[int]:
    """The block indices one side's terms tap (sorted, no duplicates)."""
    out = {b for t in terms for b in (t.student_blocks if side == "student" else
                                      t.teacher_blocks) if isinstance(b, int)}
    return sorted(out)


def _tap_pass(model: nn.Module, images: Tensor, blocks: list[int], prefix: int
              ) -> tuple[Tensor, dict[int | str, Tensor]]:
    """One timm pass: logits and the taps (patch tokens), as the compiled step takes them."""
    if blocks:
        final, feats = model.forward_intermediates(images, indices=blocks, output_fmt="NLC")
        taps: dict[int | str, Tensor] = dict(zip(blocks, feats, strict=True))
    else:
        final = model.forward_features(images)
        taps = {}
    taps["norm"] = final[:, prefix:]
    return _single_logits(model.forward_head(final)), taps


def _label_smoothing(plan: Plan) -> float:
    for t in plan.terms:
        if t.kind == "labels":
            return float(t.options["smoothing"])
    return plan.data.smoothing


# --------------------------------------------------------------------------------------------
# (c) What users write today: hooks and a hand-written loss module


def _adapter(kind: str, d_in: int, d_out: int) -> nn.Module:
    if kind == "auto":
        kind = "identity" if d_in == d_out else "linear"
    if kind == "identity":
        return nn.Identity()
    if kind == "mlp":
        return nn.Sequential(nn.Linear(d_in, d_out), nn.GELU(), nn.Linear(d_out, d_out))
    return nn.Linear(d_in, d_out)


class HandMimic(nn.Module):
    """Shallow mimicking as in the authors' code: a projection per layer and sum-MSE / B."""

    def __init__(self, layers: int, d_s: int, d_t: int, align: str = "linear",
                 loss: str = "mse", weight: float = 3e-5) -> None:
        super().__init__()
        self.proj = nn.ModuleList(_adapter(align, d_s, d_t) for _ in range(layers))
        self.loss, self.weight = loss, weight

    def forward(self, student: list[Tensor], teacher: list[Tensor]) -> Tensor:
        total = 0.0
        for proj, s, t in zip(self.proj, student, teacher, strict=True):
            pred = proj(s.float())
            if self.loss == "mse":
                total = total + F.mse_loss(pred, t.float(), reduction="sum") / s.shape[0]
            else:
                total = total + F.mse_loss(pred, t.float())
        return self.weight * total


class HandGenerate(nn.Module):
    """Deep generation: MAE-style random masking with a mask token, a conv generator, MSE on
    the masked tokens, summed, / (B x ratio)."""

    def __init__(self, d_s: int, d_t: int, ratio: float = 0.5, align: str = "linear",
                 weight: float = 3e-6) -> None:
        super().__init__()
        self.proj = _adapter(align, d_s, d_t)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d_t))
        self.generation = nn.Sequential(nn.Conv2d(d_t, d_t, 3, padding=1), nn.ReLU(),
                                        nn.Conv2d(d_t, d_t, 3, padding=1))
        self.ratio, self.weight = ratio, weight

    def forward(self, student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
        x = self.proj(student.float())
        b, n, d = x.shape
        side = int(n ** 0.5)
        if mask is None:
            n_mask = n - int(n * (1 - self.ratio))
            ids = torch.rand(b, n, device=x.device).argsort(dim=1)
            mask = torch.zeros(b, n, device=x.device).scatter_(1, ids[:, :n_mask], 1.0)
        m = mask.float().unsqueeze(-1)
        x = x * (1 - m) + self.mask_token * m
        x = x.transpose(1, 2).reshape(b, d, side, side)
        y = self.generation(x).flatten(2).transpose(1, 2)
        loss = (F.mse_loss(y, teacher.float(), reduction="none") * m).sum()
        return self.weight * loss / (b * self.ratio)


class HandKD(nn.Module):
    """Hinton KD: KL(teacher || student) at temperature T, batch mean, x T^2."""

    def __init__(self, temperature: float = 1.0, weight: float = 1.0) -> None:
        super().__init__()
        self.t, self.weight = temperature, weight

    def forward(self, s: Tensor, t: Tensor, target: Tensor) -> Tensor:
        kl = F.kl_div(F.log_softmax(s.float() / self.t, dim=1),
                      F.softmax(t.float() / self.t, dim=1), reduction="batchmean")
        return self.weight * kl * self.t ** 2


class HandNKD(nn.Module):
    """NKD as in its authors' code (boolean-mask indexing drops the target column)."""

    def __init__(self, temperature: float = 1.0, gamma: float = 1.0,
                 weight: float = 1.0) -> None:
        super().__init__()
        self.t, self.gamma, self.weight = temperature, gamma, weight

    def forward(self, s: Tensor, t: Tensor, target: Tensor) -> Tensor:
        s, t = s.float(), t.float()
        label = target.argmax(1, keepdim=True) if target.dim() > 1 else target.view(-1, 1)
        n = s.shape[0]
        s_t = torch.gather(F.log_softmax(s, dim=1), 1, label)
        t_t = torch.gather(F.softmax(t, dim=1), 1, label).detach()
        loss_t = -(t_t * s_t).mean()
        keep = torch.ones_like(s).scatter_(1, label, 0).bool()
        s_non = F.log_softmax(s[keep].reshape(n, -1) / self.t, dim=1)
        t_non = F.softmax(t[keep].reshape(n, -1) / self.t, dim=1)
        loss_non = -self.gamma * self.t ** 2 * (t_non * s_non).sum(dim=1).mean()
        return self.weight * (loss_t + loss_non)


class HandLabels(nn.Module):
    """Cross-entropy on hard labels (smoothed) or on soft mixup targets."""

    def __init__(self, smoothing: float = 0.1, weight: float = 1.0) -> None:
        super().__init__()
        self.smoothing, self.weight = smoothing, weight

    def forward(self, s: Tensor, target: Tensor) -> Tensor:
        if target.dim() > 1:
            loss = torch.sum(-target * F.log_softmax(s.float(), dim=-1), dim=-1).mean()
        else:
            loss = F.cross_entropy(s.float(), target, label_smoothing=self.smoothing)
        return self.weight * loss


class HandWrittenLoss(nn.Module):
    """A ViTKD criterion as users write it: one module per term, fed by features that forward
    hooks captured (``{tap: [B, N, D]}`` patch tokens) and by the two models' logits."""

    def __init__(self, plan: Plan) -> None:
        super().__init__()
        s, t = plan.student, plan.teacher
        self.plan_terms = [(term.name, term.kind, list(term.student_blocks),
                            list(term.teacher_blocks)) for term in plan.terms]
        self.losses = nn.ModuleDict()
        for term in plan.terms:
            o = term.options
            if term.kind == "mimic":
                assert t is not None
                self.losses[term.name] = HandMimic(len(term.student_blocks), s.width, t.width,
                                                   o["align"], o["loss"], term.weight)
            elif term.kind == "generate":
                assert t is not None
                self.losses[term.name] = HandGenerate(s.width, t.width, o["mask"], o["align"],
                                                      term.weight)
            elif term.kind == "kd":
                self.losses[term.name] = HandKD(o["temperature"], term.weight)
            elif term.kind == "nkd":
                self.losses[term.name] = HandNKD(o["temperature"], o["gamma"], term.weight)
            else:
                self.losses[term.name] = HandLabels(o["smoothing"], term.weight)

    def forward(self, s_feats: Mapping[int | str, Tensor], t_feats: Mapping[int | str, Tensor],
                s_logits: Tensor, t_logits: Tensor | None, target: Tensor
                ) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        total = torch.zeros((), device=s_logits.device)
        for name, kind, s_blocks, t_blocks in self.plan_terms:
            loss = self.losses[name]
            if kind == "mimic":
                value = loss([s_feats[b] for b in s_blocks], [t_feats[b] for b in t_blocks])
            elif kind == "generate":
                value = loss(s_feats[s_blocks[0]], t_feats[t_blocks[0]])
            elif kind == "labels":
                value = loss(s_logits, target)
            else:
                assert t_logits is not None
                value = loss(s_logits, t_logits, target)
            out[name] = value.detach()
            total = total + value
        out["loss"] = total
        return out


def register_feature_hooks(model: nn.Module, taps: Iterable[int | str], prefix: int,
                           store: dict[int | str, Tensor]) -> list[Any]:
    """Forward hooks that put the patch tokens (prefix tokens dropped) of ``blocks[i]`` and of
    ``norm`` into ``store``; returns the handles (``.remove()`` them)."""
    def capture(key: int | str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Tensor) -> None:
            store[key] = output[:, prefix:]
        return hook

    handles = []
    for tap in taps:
        module = model.norm if tap == "norm" else model.blocks[int(tap)]
        handles.append(module.register_forward_hook(capture(tap)))
    return handles


def _feature_taps(terms: Sequence[TermPlan], side: str) -> list[int | str]:
    out: list[int | str] = []
    for t in terms:
        if t.kind in ("mimic", "generate"):
            for b in (t.student_blocks if side == "student" else t.teacher_blocks):
                if b not in out:
                    out.append(b)
    return out


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
    memory: _Memory
    say: Progress

    @property
    def batch(self) -> int:
        return int(self.images.shape[0])

    def compile(self, fn: Callable[..., Any]) -> Any:
        return _compiler(self.backend, self.mode)(fn)

    def result(self, name: str, times: list[float], first: float, compiled: bool,
               flops: int, peak: float | None, **details: Any) -> ConfigResult:
        ms = statistics.median(times) * 1e3
        ips = self.batch / (ms / 1e3)
        mfu = flops * ips / peak if peak and self.dtype in (torch.bfloat16, torch.float16) \
            else None
        return ConfigResult(name=name, images_per_second=ips, ms_per_step=ms,
                            ms_steps=[t * 1e3 for t in times],
                            peak_memory_mb=self.memory.peak_mb(),
                            compile_seconds=_compile_seconds(first, times, compiled), mfu=mfu,
                            details=details)


def _build(s: _Setup, compiled: bool) -> tuple[Program, Callable[..., Any]]:
    torch.manual_seed(s.plan.seed)
    if compiled and s.backend == "inductor":
        program = vitkdl.build(s.plan, s.device, load=False, compile=s.mode or "default")
        return program, program.step
    program = vitkdl.build(s.plan, s.device, load=False, compile="off")
    return program, s.compile(program.forward) if compiled else program.forward


def _program_config(s: _Setup, compiled: bool, peak: float | None
                    ) -> tuple[ConfigResult, Program, _Updater]:
    """(a) or (b): vitkdl's step, compiled or eager."""
    from vitkdl.train.loop import param_groups

    s.memory.reset()
    program, step = _build(s, compiled)
    program.train()
    updater = _Updater(s.plan, _optimizer(s.plan, param_groups(program,
                                                               s.plan.optimizer.weight_decay)),
                       program.trainable_parameters(), s.device, s.dtype)

    def train_step() -> None:
        out = step(s.images, s.targets)
        updater.backward(out["loss"])
        updater.step()

    times, first = _time_calls(train_step, s.device, s.warmup, s.steps)
    name = "compiled" if compiled else "eager"
    return s.result(name, times, first, compiled, s.plan.cost.total, peak), program, updater


def _breakdown(s: _Setup, program: Program, updater: _Updater, step_ms: float) -> dict[str, Any]:
    """Teacher forward, student forward + backward, adapters + losses, optimizer: each part
    compiled on its own (as in the step) and timed between synchronisations."""
    plan = program.plan
    s_blocks, t_blocks = _block_taps(plan.terms, "student"), _block_taps(plan.terms, "teacher")
    s_keys: list[int | str] = [*s_blocks, "norm"]
    t_keys: list[int | str] = [*t_blocks, "norm"]
    s_prefix = plan.student.prefix_tokens
    t_prefix = plan.teacher.prefix_tokens if plan.teacher else 0
    teacher = program.teacher if any(t.kind != "labels" for t in plan.terms) else None

    def teacher_fwd(images: Tensor) -> tuple[Tensor, list[Tensor]]:
        assert teacher is not None
        with torch.no_grad(), _autocast(s.device, s.dtype):
            logits, taps = _tap_pass(teacher, images, t_blocks, t_prefix)
        return logits, [taps[k] for k in t_keys]

    def student_fwd(images: Tensor) -> tuple[Tensor, list[Tensor]]:
        with _autocast(s.device, s.dtype):
            logits, taps = _tap_pass(program.student, images, s_blocks, s_prefix)
        return logits, [taps[k] for k in s_keys]

    def losses(s_logits: Tensor, s_taps: list[Tensor], t_logits: Tensor | None,
               t_taps: list[Tensor], targets: Tensor) -> Tensor:
        s_map = dict(zip(s_keys, s_taps, strict=True))
        t_map = dict(zip(t_keys, t_taps, strict=False))
        total = s_logits.new_zeros((), dtype=torch.float32)
        for t in plan.terms:
            module = program.terms[t.name]
            if t.kind in ("mimic", "generate"):
                value = module([s_map[b] for b in t.student_blocks],
                               [t_map[b] for b in t.teacher_blocks])
            elif t.kind == "labels":
                value = module(s_logits, targets)
            else:
                value = module(s_logits, t_logits, targets)
            total = total + value
        return total

    t_fn = s.compile(teacher_fwd) if teacher is not None else None
    s_fn, l_fn = s.compile(student_fwd), s.compile(losses)
    parts: dict[str, list[float]] = {"teacher_forward": [], "student_forward_backward": [],
                                     "adapters_losses": [], "optimizer": []}
    firsts: dict[str, float] = {}

    def one(record: bool) -> None:
        marks = [time.perf_counter()]

        def mark() -> None:
            _sync(s.device)
            marks.append(time.perf_counter())

        _sync(s.device)
        marks[0] = time.perf_counter()
        t_logits, t_taps = t_fn(s.images) if t_fn is not None else (None, [])
        mark()  # 1: teacher
        s_logits, s_taps = s_fn(s.images)
        mark()  # 2: student forward
        leaves = [x.detach().requires_grad_() for x in (s_logits, *s_taps)]
        total = l_fn(leaves[0], leaves[1:], t_logits, t_taps, s.targets)
        updater.backward(total)
        mark()  # 3: losses forward + backward (adapters' gradients, features' gradients)
        pairs = [(out, leaf.grad) for out, leaf in zip((s_logits, *s_taps), leaves, strict=True)
                 if leaf.grad is not None]
        if pairs:
            torch.autograd.backward([p[0] for p in pairs], [p[1] for p in pairs])
        mark()  # 4: student backward
        updater.step()
        updater.optimizer.zero_grad(set_to_none=True)
        mark()  # 5: optimizer
        d = [b - a for a, b in itertools.pairwise(marks)]
        values = {"teacher_forward": d[0], "student_forward_backward": d[1] + d[3],
                  "adapters_losses": d[2], "optimizer": d[4]}
        if record:
            for k, v in values.items():
                parts[k].append(v)
        elif not firsts:
            firsts.update(values)

    for _ in range(s.warmup):
        one(record=False)
    for _ in range(s.steps):
        one(record=True)
    ms = {f"{k}_ms": statistics.median(v) * 1e3 for k, v in parts.items()}
    total_ms = sum(ms.values())
    compile_s = sum(max(0.0, firsts.get(k, 0.0) - statistics.median(v))
                    for k, v in parts.items())
    return {**ms, "sum_of_parts_ms": total_ms, "step_ms": step_ms,
            "fusion_gain_ms": total_ms - step_ms, "compile_seconds": compile_s,
            "share": {k: v / total_ms if total_ms else None for k, v in ms.items()}}


def _hooks_config(s: _Setup, peak: float | None) -> ConfigResult:
    """(c) hooks, two full forwards, a hand-written loss module; eager."""
    plan = s.plan
    s.memory.reset()
    torch.manual_seed(plan.seed)
    student = create_model(plan.student, s.device)
    needs_teacher = plan.teacher is not None and any(t.kind != "labels" for t in plan.terms)
    teacher = create_model(plan.teacher, s.device) if plan.teacher is not None else None
    criterion = HandWrittenLoss(plan).to(s.device)
    if teacher is not None:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad = False
    student.train()
    s_feats: dict[int | str, Tensor] = {}
    t_feats: dict[int | str, Tensor] = {}
    handles = register_feature_hooks(student, _feature_taps(plan.terms, "student"),
                                     plan.student.prefix_tokens, s_feats)
    if teacher is not None and needs_teacher:
        handles += register_feature_hooks(teacher, _feature_taps(plan.terms, "teacher"),
                                          plan.teacher.prefix_tokens if plan.teacher else 0,
                                          t_feats)
    skip = {f"student.{n}" for n in getattr(student, "no_weight_decay", lambda: set())()}
    named = [(f"student.{n}", p) for n, p in student.named_parameters()]
    named += [(f"criterion.{n}", p) for n, p in criterion.named_parameters()]
    params = [p for _, p in named]
    updater = _Updater(plan, _optimizer(plan, _no_decay(named, skip,
                                                        plan.optimizer.weight_decay)),
                       params, s.device, s.dtype)

    def train_step() -> None:
        t_logits = None
        with _autocast(s.device, s.dtype):
            if teacher is not None and needs_teacher:
                with torch.no_grad():
                    t_logits = _single_logits(teacher(s.images))
            s_logits = _single_logits(student(s.images))
        out = criterion(s_feats, t_feats, s_logits, t_logits, s.targets)
        updater.backward(out["loss"])
        updater.step()

    try:
        times, first = _time_calls(train_step, s.device, s.warmup, s.steps)
    finally:
        for h in handles:
            h.remove()
    return s.result("hooks", times, first, False, plan.cost.total, peak)


def _floor_config(s: _Setup, floor: str, peak: float | None) -> ConfigResult:
    """(d) a student-only training step plus teacher inference, each at its best."""
    plan = s.plan
    s.memory.reset()
    torch.manual_seed(plan.seed)
    student = create_model(plan.student, s.device)
    teacher = create_model(plan.teacher, s.device) if plan.teacher is not None else None
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    student.train()
    skip = {f"student.{n}" for n in getattr(student, "no_weight_decay", lambda: set())()}
    named = [(f"student.{n}", p) for n, p in student.named_parameters()]
    updater = _Updater(plan, _optimizer(plan, _no_decay(named, skip,
                                                        plan.optimizer.weight_decay)),
                       [p for _, p in named], s.device, s.dtype)
    smoothing = _label_smoothing(plan)

    def forward_loss(images: Tensor, targets: Tensor) -> Tensor:
        with _autocast(s.device, s.dtype):
            logits = _single_logits(student(images)).float()
        if targets.dim() > 1:
            return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
        return F.cross_entropy(logits, targets, label_smoothing=smoothing)

    def infer(images: Tensor) -> Tensor:
        assert teacher is not None
        with torch.no_grad(), _autocast(s.device, s.dtype):
            return _single_logits(teacher(images))

    if floor == "auto":
        modes = ["compiled"] if s.device.type == "cuda" else ["eager"]
    elif floor == "best":
        modes = ["eager", "compiled"]
    else:
        modes = [floor]
    student_runs: dict[str, tuple[list[float], float]] = {}
    teacher_runs: dict[str, tuple[list[float], float]] = {}
    for mode in modes:
        fwd = s.compile(forward_loss) if mode == "compiled" else forward_loss

        def student_step(fwd: Callable[..., Tensor] = fwd) -> None:
            updater.backward(fwd(s.images, s.targets))
            updater.step()

        student_runs[mode] = _time_calls(student_step, s.device, s.warmup, s.steps)
        if teacher is not None:
            inf = s.compile(infer) if mode == "compiled" else infer
            teacher_runs[mode] = _time_calls(lambda inf=inf: inf(s.images), s.device,
                                             s.warmup, s.steps)

    def best(runs: dict[str, tuple[list[float], float]]) -> str:
        return min(runs, key=lambda m: statistics.median(runs[m][0]))

    s_mode = best(student_runs)
    s_times, s_first = student_runs[s_mode]
    t_mode = best(teacher_runs) if teacher_runs else None
    t_times = teacher_runs[t_mode][0] if t_mode else [0.0] * len(s_times)
    t_first = teacher_runs[t_mode][1] if t_mode else 0.0
    s_ms, t_ms = statistics.median(s_times) * 1e3, statistics.median(t_times) * 1e3
    # The floor step is the sum of the two medians; per-step figures pair the timed runs.
    times = [a + b for a, b in zip(s_times, t_times, strict=True)]
    flops = plan.cost.teacher_forward + plan.cost.student_forward_backward
    result = s.result("floor", times, s_first + t_first, "compiled" in (s_mode, t_mode), flops,
                      peak, student_step_ms=s_ms, teacher_inference_ms=t_ms,
                      student_mode=s_mode, teacher_mode=t_mode,
                      measured={m: {"student_step_ms": statistics.median(student_runs[m][0])
                                    * 1e3,
                                    "teacher_inference_ms":
                                        statistics.median(teacher_runs[m][0]) * 1e3
                                        if m in teacher_runs else None}
                                for m in modes})
    result.ms_per_step = s_ms + t_ms
    result.images_per_second = s.batch / (result.ms_per_step / 1e3)
    if result.mfu is not None and peak:
        result.mfu = flops * result.images_per_second / peak
    return result


def _loader(plan: Plan, images: int, step_ips: float | None) -> dict[str, Any]:
    """The recipe's training data loader on its own: images/s against the step's."""
    from vitkdl.train.data import DataError, build_loaders
    from vitkdl.train.loop import data_config

    cfg = data_config(plan)
    info: dict[str, Any] = {"source": cfg.source, "root": cfg.root, "workers": cfg.workers,
                            "batch": cfg.batch_size, "augment": cfg.augment}
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
    info.update(images_per_second=ips, images=count, seconds=elapsed,
                vs_step=ips / step_ips if step_ips else None,
                keeps_up=bool(step_ips and ips >= step_ips))
    return info


def bench_plan(plan: Plan, *, steps: int = 10, warmup: int = 3, device: str | None = None,
               compile_backend: str = "inductor", compile_mode: str | None = "default",
               floor: str = "auto", breakdown: bool = True, loader: bool = True,
               threads: int | None = None, progress: Progress | None = None) -> BenchResult:
    """Benchmark a resolved plan (see the module docstring for what is measured).

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
    try:
        dev = resolve_device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise BenchError(f"device {device}: CUDA is not available here; use --device cpu")
        torch.empty(1, device=dev)
    except (RuntimeError, AssertionError) as exc:
        raise BenchError(f"device {device!r}: {str(exc).splitlines()[0]}") from None
    say = progress or (lambda _: None)
    start_all = time.perf_counter()
    threads_before = torch.get_num_threads()
    used_threads: int | None = None
    if dev.type == "cpu":
        used_threads = threads or (1 if plan.cost.total * plan.data.batch_size
                                   < SMALL_STEP_FLOPS else threads_before)
        torch.set_num_threads(used_threads)
    dtype = resolve_precision(plan.precision, dev)
    images, targets = _batch(plan, dev)
    memory = _Memory(dev)
    s = _Setup(plan=plan, device=dev, dtype=dtype, backend=compile_backend,
               mode=compile_mode if compile_backend == "inductor" else None, steps=steps,
               warmup=warmup, images=images, targets=targets, memory=memory, say=say)
    peak = peak_flops(dev)
    notes: list[str] = []
    if dev.type == "cuda" and peak is None:
        notes.append(f"MFU omitted: no known peak for {torch.cuda.get_device_name(dev)}")
    elif peak is not None and dtype not in (torch.bfloat16, torch.float16):
        notes.append("MFU omitted: the peak table is for bf16/fp16 and precision is fp32")
    torch._dynamo.reset()
    configs: dict[str, ConfigResult] = {}
    parts: dict[str, Any] | None = None
    try:
        say(f"compiled step ({compile_backend}), {warmup} warm-up + {steps} timed steps")
        configs["compiled"], program, updater = _program_config(s, True, peak)
        if breakdown:
            say("breakdown of the compiled step")
            parts = _breakdown(s, program, updater, configs["compiled"].ms_per_step)
        del program, updater
        torch._dynamo.reset()  # frees the compiled graphs (and what they hold)
        say("eager step")
        configs["eager"] = _program_config(s, False, peak)[0]
        say("hook-based step (hand-written loss, two full forwards)")
        configs["hooks"] = _hooks_config(s, peak)
        say("floor: student-only step + teacher inference")
        configs["floor"] = _floor_config(s, floor, peak)
    finally:
        torch._dynamo.reset()
        torch.set_num_threads(threads_before)
    gc.collect()
    loader_info = None
    if loader:
        say("data loader")
        loader_info = _loader(plan, max(2 * steps, 10) * plan.data.batch_size,
                              configs["compiled"].images_per_second)
    a, b = configs["compiled"], configs["eager"]
    c, d = configs["hooks"], configs["floor"]
    ratios: dict[str, float | None] = {
        "compiled_vs_eager": b.ms_per_step / a.ms_per_step,
        "compiled_vs_hooks": c.ms_per_step / a.ms_per_step,
        "overhead_vs_floor": a.ms_per_step / d.ms_per_step - 1,
        "eager_vs_hooks": c.ms_per_step / b.ms_per_step,
        # The floor leaves out the adapters' work (ViTKD's generator can be a large part of the
        # FLOPs at small widths): the overhead over the floor is at least this share.
        "adapter_flops_share": plan.cost.adapters_forward_backward / plan.cost.total
        if plan.cost.total else None,
    }
    if dev.type == "cpu":
        notes.append(f"CPU: {used_threads} thread(s), fp32 unless the recipe says otherwise; "
                     "the floor runs eager unless --floor best/compiled")
    return BenchResult(
        recipe=plan.recipe, student=plan.student.name,
        teacher=plan.teacher.name if plan.teacher else None, device=str(dev),
        device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name(),
        threads=used_threads, batch=plan.data.batch_size,
        precision=str(dtype).removeprefix("torch.") if dtype else "fp32",
        backend=compile_backend, compile_mode=s.mode, steps=steps, warmup=warmup,
        flops_per_image=plan.cost.total, memory_kind=memory.kind, configs=configs,
        ratios=ratios, breakdown=parts, loader=loader_info, peak_device_flops=peak,
        wall_seconds=time.perf_counter() - start_all, notes=notes)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    import platform

    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def run_bench(path: str | Path, overrides: Sequence[str] | Mapping[str, Any] | None = None, *,
              batch: int | None = None, **kwargs: Any) -> BenchResult:
    """Load, check and plan a recipe, then :func:`bench_plan` it.

    ``overrides`` as for :func:`vitkdl.load`; ``batch`` overrides ``data.batch_size``; other
    keyword arguments go to :func:`bench_plan`. Raises :class:`vitkdl.VkdError` for a recipe
    with errors and :class:`BenchError` for a bad option.
    """
    over = vitkdl.override_list(overrides)
    if batch is not None:
        if batch < 1:
            raise BenchError("--batch must be at least 1")
        over.append(f"data.batch_size={batch}")
    plan = vitkdl.plan(vitkdl.load(path, over))
    return bench_plan(plan, **kwargs)
