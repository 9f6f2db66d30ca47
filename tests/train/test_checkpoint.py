"""Checkpoints carry a sha256 sidecar: corrupted bytes are refused, old files still load."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from vitkdl.train import checkpoint
from vitkdl.train.checkpoint import (
    CheckpointError,
    checksum_path,
    load_checkpoint,
    load_first,
    save_atomic,
)


def _state(seed: int) -> dict[str, object]:
    gen = torch.Generator().manual_seed(seed)
    return {"vitkdl_checkpoint": 1, "step": seed, "w": torch.randn(4096, generator=gen)}


def _corrupt(path: Path, count: int = 16) -> None:
    """Overwrite ``count`` bytes in the middle of the file (inside the tensor data)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + count] = bytes(b ^ 0xFF for b in data[middle : middle + count])
    path.write_bytes(bytes(data))


def test_the_sidecar_holds_the_sha256_of_the_bytes_written(tmp_path) -> None:
    path = tmp_path / "last.pt"
    save_atomic(_state(1), path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert checksum_path(path) == tmp_path / "last.pt.sha256"
    assert checksum_path(path).read_text() == f"{digest}  last.pt\n"
    save_atomic(_state(2), path)  # a second save keeps only the new digest
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert checksum_path(path).read_text() == f"{digest}  last.pt\n"
    assert torch.equal(load_checkpoint(path)["w"], _state(2)["w"])


def test_sixteen_corrupted_bytes_are_refused_naming_the_file(tmp_path) -> None:
    path = tmp_path / "last.pt"
    save_atomic(_state(1), path)
    _corrupt(path)
    # torch.load alone reads the changed weights without a complaint: the checksum catches it
    assert not torch.equal(torch.load(path, weights_only=True)["w"], _state(1)["w"])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert f"checkpoint {path} is corrupted" in str(info.value)
    assert "last.pt.sha256" in str(info.value)


def test_load_first_falls_back_past_a_corrupted_checkpoint(tmp_path) -> None:
    last, best = tmp_path / "last.pt", tmp_path / "best.pt"
    save_atomic(_state(2), last)
    save_atomic(_state(1), best)
    _corrupt(last)
    ckpt, path, problems = load_first([last, best])
    assert path == best and ckpt["step"] == 1
    assert len(problems) == 1 and str(last) in problems[0] and "corrupted" in problems[0]


def test_a_checkpoint_without_a_checksum_loads_with_a_note(tmp_path) -> None:
    path = tmp_path / "last.pt"
    torch.save(_state(3), path)  # as vitkdl <= 0.1 wrote it: no sidecar
    notes: list[str] = []
    assert load_checkpoint(path, notes)["step"] == 3
    assert len(notes) == 1 and str(path) in notes[0] and "no checksum" in notes[0]
    save_atomic(_state(4), path)
    notes.clear()
    assert load_checkpoint(path, notes)["step"] == 4 and notes == []


def test_a_crash_between_the_two_renames_leaves_a_pair_that_verifies(tmp_path, monkeypatch) -> None:
    path = tmp_path / "last.pt"
    save_atomic(_state(1), path)
    real = checkpoint.os.replace

    def crash_on_the_checkpoint(src: str, dst: str | Path) -> None:
        if Path(dst) == path:
            raise KeyboardInterrupt  # killed after the sidecar, before the checkpoint
        real(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", crash_on_the_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        save_atomic(_state(2), path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1  # the old checkpoint still verifies
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
