"""The teacher-output cache (``teacher { cache = "PATH"  topk = K }``): the teacher's logits
over every epoch's augmented batches, computed once and replayed, so the step never runs (or
builds) the teacher. TinyViT's scheme, made exact by the replayable stream of
:mod:`vitkdl.train.data`.

The pass runs the teacher over the very batches a run will see: the loaders of the plan (one
per rank of the plan's world size), each epoch's order, each sample's augmentation under
``(data.seed, epoch, index)``, each batch's mixup/cutmix under ``(data.seed, epoch, batch,
rank)``. It stores per step the logits the step would have computed:

``topk = all``
    every logit, in the dtype the teacher computed it (fp32 on a CPU, bf16 under bf16
    autocast): replayed, they are the step's own, bit for bit.
``topk = K``
    TinyViT's: the top K of the teacher's log-probabilities at temperature 1 (fp16) and their
    indices (int16; int32 beyond 32767 classes). Replayed, the other classes share what
    probability the top K leave, evenly: the logits handed to the terms are the K stored
    log-probabilities and ``log((1 - sum of the K probabilities) / (C - K))`` elsewhere, whose
    softmax at temperature 1 is that distribution (at another temperature an approximation).

A cache is a folder: ``manifest.json`` (its key, what it holds, the teacher's top-1 on the
validation split) and one file per epoch, ``epoch-00000.pt`` (written atomically: a killed
pass leaves only whole epochs and continues from the first missing one). The key is the
teacher (model, its weights' sha256, the precision it runs in, its input), the data (source,
root, split, size, classes), the transforms, the batch size, the world size, the data seed
and ``topk``; a cache built under another key is refused with what differs.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vitkdl import hub
from vitkdl.planner import CachePlan, Plan, without_cache
from vitkdl.program import (
    hub_file,
    precision_name,
    resolve_precision,
    teacher_precision,
    teacher_weights_path,
)
from vitkdl.runs import write_atomic
from vitkdl.train.checkpoint import save_atomic

__all__ = [
    "FORMAT",
    "CacheError",
    "CacheReader",
    "cache_key",
    "complete_epochs",
    "fill",
    "key_differences",
    "needed_epochs",
]

#: The layout of a cache folder and of the stream it replays; a cache of another format is
#: refused (its batches would not be this version's).
FORMAT = 1
MANIFEST = "manifest.json"


class CacheError(Exception):
    """A cache that cannot be used: built under another key, or unreadable; the message says
    what differs and what to do."""


# --------------------------------------------------------------------------------------------
# The key


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _teacher_weights(plan: Plan, runs_dir: str | Path) -> dict[str, Any]:
    """What the teacher's weights are: the sha256 of the file they are read from; a teacher
    without weights is random: its initialisation follows from the student's seed and model
    (it is built right after the student)."""
    t = plan.teacher
    assert t is not None
    if t.pretrained and t.from_recipe is None and t.hf_hub_id is not None:
        what = f"the teacher's pretrained tag {t.arch}.{t.pretrained_tag}"
        path = hub_file(t.hf_hub_id, hub.weight_files(t.hf_hub_filename), what)
        return {"pretrained": f"{t.arch}.{t.pretrained_tag}", "sha256": _sha256(path)}
    path = teacher_weights_path(t, runs_dir)
    if path is not None and hub.is_hub_name(str(path)):
        path = hub_file(str(path), hub.DEFAULT_FILES, f"the teacher's weights {path}")
    if path is not None:
        if not path.is_file():
            raise CacheError(f"the teacher's weights {path} do not exist (yet)")
        return {"file": path.name, "sha256": _sha256(path)}
    return {
        "random_init": {"train.seed": plan.seed, "student": plan.student.name},
        "student_kwargs": plan.student.timm_kwargs,
    }


def cache_key(plan: Plan, device: torch.device, runs_dir: str | Path = "runs") -> dict[str, Any]:
    """What a cache of ``plan`` on ``device`` is a function of (see the module's docstring):
    a cache whose key differs in any leaf is refused."""
    t, d, c = plan.teacher, plan.data, plan.cache
    assert t is not None and c is not None
    autocast = resolve_precision(plan.precision, device)
    held = teacher_precision(device, autocast, t.precision)
    return {
        "format": FORMAT,
        "teacher": {
            "model": t.name,
            "timm_kwargs": t.timm_kwargs,
            "weights": _teacher_weights(plan, runs_dir),
            "autocast": precision_name(autocast),
            "weights_dtype": precision_name(held) if held is not None else "as loaded",
            "precision": t.precision,
            "input": {
                "size": list(t.input_size),
                "mean": list(t.mean),
                "std": list(t.std),
                "interpolation": t.interpolation,
            },
        },
        "data": {
            "source": d.source,
            "root": str(Path(d.root).expanduser().resolve()) if d.root else None,
            "name": d.name,
            "split": d.split,
            "train_images": d.train_images,
            "classes": d.num_classes,
        },
        "transform": {
            "image_size": d.image_size,
            "in_chans": d.in_chans,
            "augment": d.augment,
            "mixup": d.mixup,
            "cutmix": d.cutmix,
            "mean": list(d.mean),
            "std": list(d.std),
            "interpolation": d.interpolation,
            "crop_pct": d.crop_pct,
        },
        "batch_size": d.batch_size,
        "world_size": plan.world_size,
        "seed": d.seed,
        "topk": c.topk if c.topk is not None else "all",
    }


def key_differences(built: Any, wanted: Any, where: str = "") -> list[str]:
    """The leaves in which two keys differ, as ``path (built: A, now: B)``."""
    if isinstance(built, dict) and isinstance(wanted, dict):
        out: list[str] = []
        for k in sorted(set(built) | set(wanted), key=str):
            sub = f"{where}.{k}" if where else str(k)
            if k not in built or k not in wanted:
                out.append(f"{sub} (built: {built.get(k, '-')}, now: {wanted.get(k, '-')})")
            else:
                out += key_differences(built[k], wanted[k], sub)
        return out
    if built != wanted:
        return [f"{where} (built: {_short(built)}, now: {_short(wanted)})"]
    return []


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 24 else text[:12] + "..."


# --------------------------------------------------------------------------------------------
# The folder


def _epoch_file(root: Path, epoch: int) -> Path:
    return root / f"epoch-{epoch:05d}.pt"


def _read_manifest(root: Path) -> dict[str, Any] | None:
    path = root / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CacheError(f"the cache manifest {path} cannot be read ({exc}); delete it") from None


def _check_key(root: Path, manifest: dict[str, Any], key: dict[str, Any]) -> None:
    differs = key_differences(manifest.get("key"), key)
    if differs:
        listed = "; ".join(differs[:6]) + ("; ..." if len(differs) > 6 else "")
        seeds = any(d.startswith("seed ") for d in differs)
        hint = (
            " (students of several train seeds share one stream, and one cache, when the "
            "recipe writes data { seed = N })"
            if seeds
            else ""
        )
        raise CacheError(
            f"the teacher cache {root} was built for another teacher, data or stream: "
            f"{listed}. Delete the folder (or point teacher.cache elsewhere) and run "
            f"`vitkdl cache` again{hint}"
        )


def complete_epochs(root: Path, epochs: int) -> list[int]:
    """The epochs below ``epochs`` whose file is there (each is written whole or not at all)."""
    return [e for e in range(epochs) if _epoch_file(root, e).is_file()]


def needed_epochs(plan: Plan, steps_per_epoch: int, max_steps: int | None) -> int:
    """How many epochs a run of ``plan`` reaches (all of them, or those ``max_steps``
    reaches)."""
    if max_steps is None:
        return plan.epochs
    return min(plan.epochs, max(1, math.ceil(max_steps / max(1, steps_per_epoch))))


# --------------------------------------------------------------------------------------------
# The pass


def _store(logits: Tensor, cache: CachePlan) -> dict[str, Tensor]:
    """What one epoch's logits ``[W, S, B, C]`` are stored as."""
    if cache.topk is None:
        return {"logits": logits.contiguous()}
    logp = torch.log_softmax(logits.float(), dim=-1)
    values, indices = logp.topk(cache.topk, dim=-1)
    index_dtype = torch.int16 if cache.classes <= 32767 else torch.int32
    return {"values": values.to(torch.float16), "indices": indices.to(index_dtype)}


@dataclass
class FillReport:
    """What a pass did: the epochs it computed (those already there were kept)."""

    path: Path
    computed: list[int]
    kept: list[int]
    teacher_top1: float | None
    seconds: float


def fill(
    plan: Plan,
    device: torch.device,
    *,
    runs_dir: str | Path = "runs",
    epochs: int | None = None,
    load: bool = True,
    evaluate: Callable[[Callable[[Tensor], Tensor], Any], float | None] | None = None,
    on_epoch: Callable[[int], None] | None = None,
    note: Callable[[str], None] | None = None,
) -> FillReport:
    """Compute the epochs of ``plan``'s cache (the first ``epochs``; all by default) that are
    not there yet. ``evaluate(teacher_logits, val_loader)``: the teacher's top-1, recorded in
    the manifest (a cached run reports it). ``on_epoch(epoch)``: called after each epoch's
    file is written. The global random streams are left as they were."""
    import random
    import time

    import numpy as np

    from vitkdl.program import build
    from vitkdl.train.data import build_loaders, build_mixup, set_epoch, step_key
    from vitkdl.train.step import cpu_threads

    cache = plan.cache
    if cache is None:
        raise CacheError(f"{plan.recipe} has no teacher cache (teacher {{ cache = ... }})")
    root = Path(cache.path)
    key = cache_key(plan, device, runs_dir)
    manifest = _read_manifest(root)
    if manifest is not None:
        _check_key(root, manifest, key)
    elif any(root.glob("epoch-*.pt")):  # files whose key is unknown: never taken on trust
        raise CacheError(
            f"the teacher cache {root} holds epoch files but no {MANIFEST} (their key is "
            "unknown); delete the folder and run `vitkdl cache` again"
        )
    epochs = plan.epochs if epochs is None else epochs
    have = complete_epochs(root, epochs)
    todo = [e for e in range(epochs) if e not in have]
    top1 = manifest.get("teacher_top1") if manifest is not None else None
    if not todo and manifest is not None:
        return FillReport(root, [], have, top1, 0.0)
    start = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    py, np_state = random.getstate(), np.random.get_state()
    threads_before, threads = torch.get_num_threads(), cpu_threads(plan, device)
    with torch.random.fork_rng(devices=[]):
        try:
            if threads is not None:  # the run's count: the teacher's sums in the same order
                torch.set_num_threads(threads)
            # As a run builds it: the student's seed, then the models (a random teacher is
            # the one an uncached run would build), then the teacher alone is used.
            random.seed(plan.seed)
            np.random.seed(plan.seed % 2**32)
            torch.manual_seed(plan.seed)
            program = build(without_cache(plan), device, load=load, runs_dir=runs_dir)
            program.train()
            teacher = program.teacher_pass
            if program.compile_mode is not None:
                teacher = torch.compile(teacher, fullgraph=True, mode=program.compile_mode)
            world = plan.world_size
            prefetch = str(device) if device.type == "cuda" else None
            loaders = [
                build_loaders(
                    plan.data,
                    distributed=world > 1,
                    rank=r,
                    world_size=world,
                    prefetch_device=prefetch,
                )
                for r in range(world)
            ]
            if top1 is None and evaluate is not None:  # on the whole split, as a run sums it
                val = loaders[0][1] if world == 1 else build_loaders(plan.data)[1]
                top1 = evaluate(program.teacher_logits, val)
            mixup = build_mixup(plan.data, loaders[0][2])
            dtype: str | None = manifest.get("dtype") if manifest is not None else None
            steps = len(loaders[0][0])
            for epoch in todo:
                per_rank = []
                for rank, (train, _, _) in enumerate(loaders):
                    set_epoch(train, epoch, seed=plan.data.seed, rank=rank)
                    rows = []
                    for batch, (images, labels) in enumerate(train):
                        images = images.to(device, non_blocking=True)
                        if mixup is not None:
                            key_b = step_key(plan.data.seed, epoch, batch, rank)
                            images, _ = mixup(images, labels.to(device), key_b)
                        logits, _ = teacher(images)
                        assert logits is not None
                        rows.append(logits.detach().to("cpu"))
                    per_rank.append(torch.stack(rows))
                logits = torch.stack(per_rank)  # [W, S, B, C]
                dtype = str(logits.dtype).removeprefix("torch.")
                if manifest is None:
                    manifest = _manifest(key, cache, steps, dtype, top1)
                    write_atomic(root / MANIFEST, json.dumps(manifest, indent=1))
                save_atomic(_store(logits, cache), _epoch_file(root, epoch))
                if note is not None:
                    note(f"  cache: epoch {epoch} written ({steps} steps x {world} rank(s))")
                if on_epoch is not None:
                    on_epoch(epoch)
            if manifest is None:  # nothing to compute, no manifest yet: an empty cache
                manifest = _manifest(key, cache, steps, dtype, top1)
            if manifest.get("teacher_top1") is None and top1 is not None:
                manifest["teacher_top1"] = top1
            write_atomic(root / MANIFEST, json.dumps(manifest, indent=1))
        finally:
            random.setstate(py)
            np.random.set_state(np_state)
            torch.set_num_threads(threads_before)
    return FillReport(root, todo, have, top1, time.perf_counter() - start)


def _manifest(
    key: dict[str, Any], cache: CachePlan, steps: int, dtype: str | None, top1: float | None
) -> dict[str, Any]:
    return {
        "key": key,
        "steps_per_epoch": steps,
        "classes": cache.classes,
        "topk": cache.topk,
        "dtype": dtype,
        "bytes_per_sample": cache.bytes_per_sample,
        "teacher_top1": top1,
    }


# --------------------------------------------------------------------------------------------
# Replay


class CacheReader:
    """The teacher's logits of a run's steps, from its cache: ``logits(epoch, batch)`` is the
    ``[B, C]`` tensor the teacher would have computed for that batch of this rank (with
    ``topk = K``, the TinyViT distribution's logits; see the module's docstring). One epoch's
    file is held at a time, memory-mapped."""

    def __init__(
        self,
        plan: Plan,
        device: torch.device,
        rank: int = 0,
        runs_dir: str | Path = "runs",
        epochs: int | None = None,
    ) -> None:
        cache = plan.cache
        assert cache is not None
        self.root = Path(cache.path)
        self.cache, self.device, self.rank = cache, device, rank
        manifest = _read_manifest(self.root)
        if manifest is None:
            raise CacheError(f"the teacher cache {self.root} is empty: run `vitkdl cache` first")
        _check_key(self.root, manifest, cache_key(plan, device, runs_dir))
        missing = sorted(
            set(range(plan.epochs if epochs is None else epochs))
            - set(complete_epochs(self.root, plan.epochs))
        )
        if missing:
            raise CacheError(
                f"the teacher cache {self.root} lacks epoch(s) {_epochs(missing)}: "
                "run `vitkdl cache` (or `vitkdl run`) to complete it"
            )
        self.manifest = manifest
        self.steps_per_epoch = int(manifest["steps_per_epoch"])
        self.dtype = getattr(torch, manifest.get("dtype") or "float32")
        self._epoch: int | None = None
        self._data: dict[str, Tensor] = {}

    @property
    def teacher_top1(self) -> float | None:
        """The teacher's top-1 on the validation split, as the pass measured it."""
        top1 = self.manifest.get("teacher_top1")
        return float(top1) if top1 is not None else None

    def _load(self, epoch: int) -> None:
        path = _epoch_file(self.root, epoch)
        try:
            self._data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            raise CacheError(
                f"the teacher cache file {path} cannot be read ({type(exc).__name__}); "
                "delete it and run `vitkdl cache` again"
            ) from None
        self._epoch = epoch

    def logits(self, epoch: int, batch: int) -> Tensor:
        """The teacher's logits for batch ``batch`` of ``epoch`` on this rank, on the device."""
        if self._epoch != epoch:
            self._load(epoch)
        if "logits" in self._data:
            row = self._data["logits"][self.rank, batch]
            return row.to(self.device, non_blocking=True).to(self.dtype)
        values = self._data["values"][self.rank, batch].to(self.device).float()
        indices = self._data["indices"][self.rank, batch].to(self.device).long()
        return topk_logits(values, indices, self.cache.classes)


def topk_logits(values: Tensor, indices: Tensor, classes: int) -> Tensor:
    """Logits ``[B, classes]`` whose softmax is TinyViT's distribution from the top-k
    log-probabilities ``values`` at ``indices``: those k, and what probability they leave
    spread evenly over the other classes."""
    k = values.shape[-1]
    left = (1.0 - values.exp().sum(-1, keepdim=True)).clamp_min(1e-12)
    rest = torch.log(left / max(classes - k, 1))
    out = rest.expand(values.shape[0], classes).clone()
    return out.scatter(-1, indices, values)


def _epochs(epochs: list[int]) -> str:
    shown = ", ".join(map(str, epochs[:8]))
    return shown + (f", ... ({len(epochs)} in all)" if len(epochs) > 8 else "")
