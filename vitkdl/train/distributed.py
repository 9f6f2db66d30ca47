"""torch.distributed for the trainer: started by torchrun (``WORLD_SIZE`` and friends in the
environment), NCCL on GPU and gloo on CPU. One process is one device; rank 0 alone logs and
writes files."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def backend_for(device: str | None) -> str:
    """NCCL when the run's device is a GPU (``--device`` left out and CUDA present, or
    ``cuda[:N]``), gloo otherwise (``--device cpu`` on a GPU machine included)."""
    wants_cuda = device is None or str(device).startswith("cuda")
    return "nccl" if wants_cuda and torch.cuda.is_available() else "gloo"


def init_from_env(device: str | None = None) -> Dist:
    """Join the process group torchrun set up, for a run on ``device``; a plain process is
    rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = backend_for(device)
        kwargs: dict[str, Any] = {}
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
            # Bound to its GPU from the start: NCCL connects eagerly, and barriers know the
            # device instead of guessing it.
            kwargs["device_id"] = torch.device("cuda", local_rank)
        dist.init_process_group(backend=backend, **kwargs)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank)


def shutdown() -> None:
    """Leave the process group (at the end of ``vitkdl run``), so the launcher sees a clean
    exit and NCCL frees its resources."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def current() -> Dist:
    """The job this process is part of (rank 0 of 1 when torch.distributed is not running)."""
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return Dist()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_gather_states(state: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's ``state`` (plain data and CPU tensors), in rank order; ``[state]`` in a
    single process. Sent as ``torch.save`` bytes: collective pickling of tensors is not
    supported by every backend."""
    if not (dist.is_available() and dist.is_initialized()):
        return [state]
    buffer = io.BytesIO()
    torch.save(state, buffer)
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, buffer.getvalue())
    return [torch.load(io.BytesIO(b), weights_only=True) for b in out]


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum over ranks (identity in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def params_in_sync(params: list[torch.Tensor], device: torch.device) -> bool:
    """True when every rank holds the same parameters (a checksum compared across ranks)."""
    if not (dist.is_available() and dist.is_initialized()):
        return True
    flat = torch.cat([p.detach().double().flatten() for p in params])
    mine = torch.stack(
        [
            flat.sum(),
            (flat * flat).sum(),
            (
                flat
                * torch.arange(flat.numel(), device=flat.device, dtype=torch.float64).remainder(7)
            ).sum(),
        ]
    ).to(device)
    gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    return all(torch.equal(g, gathered[0]) for g in gathered)
