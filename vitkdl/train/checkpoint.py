"""Checkpoints: written atomically, read back with clear errors, RNG state included.

A checkpoint holds everything needed to continue a run exactly: student and adapter weights,
optimizer, scheduler, EMA, the RNG states of python, numpy and torch, the position in training
(epoch, batch within it, global step), metrics so far, and the resolved recipe with its hash.
Only plain types and tensors are stored, so files load with ``weights_only=True``.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename: a crash mid-write
    never leaves a truncated checkpoint behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_atomic`; a missing, truncated or foreign file
    raises :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({first}); it may be "
            "truncated or not a vitkdl checkpoint"
        ) from None
    if not isinstance(obj, dict) or "vitkdl_checkpoint" not in obj:
        raise CheckpointError(f"{path} is not a vitkdl checkpoint")
    return obj


def load_first(paths: list[Path]) -> tuple[dict[str, Any], Path, list[str]]:
    """The first checkpoint of ``paths`` that loads, its path, and what was wrong with each
    one tried before it; :class:`CheckpointError` naming every problem when none loads."""
    problems: list[str] = []
    for path in paths:
        try:
            return load_checkpoint(path), Path(path), problems
        except CheckpointError as exc:
            problems.append(str(exc))
    if not paths:
        raise CheckpointError("no checkpoint to resume from")
    raise CheckpointError("; ".join(problems))


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """This process's python, numpy and torch RNG states as plain data: the CPU generator and,
    on a GPU, the generator of this process's own device only (a checkpoint must load on a
    machine with another number of GPUs)."""
    py = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore what :func:`rng_state` captured (onto ``device``'s generator on a GPU)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if isinstance(cuda, list):  # written by vitkdl <= 0.1: one state per visible GPU
        index = (device.index or 0) if device is not None else 0
        cuda = cuda[index] if index < len(cuda) else None
    if cuda is not None and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)


def rank_states(checkpoint: dict[str, Any]) -> list[dict[str, Any]]:
    """The RNG states of every rank a checkpoint was written by (one per rank; checkpoints of
    vitkdl <= 0.1 kept rank 0's alone)."""
    rng = checkpoint["rng"]
    return list(rng) if isinstance(rng, list) else [rng]
