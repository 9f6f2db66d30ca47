"""Checkpoints: written atomically, read back with clear errors, RNG state included.

A checkpoint holds everything needed to continue a run exactly: student and adapter weights,
optimizer, scheduler, EMA, the RNG states of python, numpy and torch, the position in training
(epoch, batch within it, global step), metrics so far, and the resolved recipe with its hash.
Only plain types and tensors are stored, so files load with ``weights_only=True``.

Every checkpoint ``X.pt`` has a sidecar ``X.pt.sha256`` holding the sha256 of its bytes,
hashed while they are written (no second read). A load checks it, so bytes changed on disk
after the write (a bad disk, a stray write) are refused instead of trained on silently; a
checkpoint of an earlier vitkdl, without a sidecar, still loads, with a note.
"""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from vitkdl.exits import writing
from vitkdl.runs import write_atomic


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


class _HashingWriter:
    """A binary file that hashes what goes through it (``torch.save`` only writes)."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.sha = hashlib.sha256()

    def write(self, data: Any) -> int:
        self.sha.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def checksum_path(path: str | Path) -> Path:
    """The sidecar holding the sha256 of checkpoint ``path``: ``path`` + ``.sha256``."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def _recorded(path: Path) -> list[str] | None:
    """The digests the sidecar of ``path`` accepts (None: no sidecar)."""
    try:
        text = checksum_path(path).read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return []
    return [line.split()[0] for line in text.splitlines() if line.strip()]


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename: a crash mid-write
    never leaves a truncated checkpoint behind. The sha256 of the bytes, computed as they are
    written, goes to the sidecar :func:`checksum_path`. A full disk or a read-only folder
    raises :class:`vitkdl.exits.WriteError` naming the file, the earlier checkpoint intact."""
    path = Path(path)
    with writing(path):
        _save_atomic(obj, path)


def _save_atomic(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            writer = _HashingWriter(f)
            torch.save(obj, writer)  # type: ignore[arg-type]
            f.flush()
            os.fsync(f.fileno())
        digest = writer.sha.hexdigest()
        # The checkpoint and its sidecar are two renames: until the checkpoint is replaced the
        # sidecar accepts the old digest as well, so a crash between the two leaves a pair
        # that still verifies (whichever file it stopped at); then only the new one.
        old = (_recorded(path) or [])[:1] if path.is_file() else []
        write_atomic(checksum_path(path), "".join(f"{d}  {path.name}\n" for d in [digest, *old]))
        os.replace(tmp, path)
        if old:
            write_atomic(checksum_path(path), f"{digest}  {path.name}\n")
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def _checksum_note(path: Path) -> tuple[bool, str | None]:
    """Whether ``path``'s bytes match its sidecar, and a note when there is no sidecar (a
    checkpoint of vitkdl <= 0.1: accepted unverified)."""
    accepted = _recorded(path)
    if accepted is None:
        return True, (
            f"{path} has no checksum ({checksum_path(path).name} is missing: written by an "
            "earlier vitkdl); loaded unverified"
        )
    return file_sha256(path) in accepted, None


def load_checkpoint(path: str | Path, notes: list[str] | None = None) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_atomic`; a missing, truncated, corrupted
    (its sha256 differs from its sidecar's) or foreign file raises :class:`CheckpointError`.
    A checkpoint without a checksum loads, and a note saying so is appended to ``notes``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    intact, note = _checksum_note(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({first}); it may be "
            "truncated or not a vitkdl checkpoint"
        ) from None
    if not intact:  # it unpickles, but not to what was written: never train on it
        raise CheckpointError(
            f"checkpoint {path} is corrupted: its sha256 differs from the one recorded in "
            f"{checksum_path(path).name} when it was written"
        )
    if not isinstance(obj, dict) or "vitkdl_checkpoint" not in obj:
        raise CheckpointError(f"{path} is not a vitkdl checkpoint")
    if note is not None and notes is not None:
        notes.append(note)
    return obj


def load_first(
    paths: list[Path], notes: list[str] | None = None
) -> tuple[dict[str, Any], Path, list[str]]:
    """The first checkpoint of ``paths`` that loads, its path, and what was wrong with each
    one tried before it; :class:`CheckpointError` naming every problem when none loads.
    ``notes``: as in :func:`load_checkpoint`, for the one that loads."""
    problems: list[str] = []
    for path in paths:
        try:
            return load_checkpoint(path, notes), Path(path), problems
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
    algorithm, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((algorithm, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
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
