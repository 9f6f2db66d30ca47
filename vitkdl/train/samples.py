"""What every reader of samples shares, below the loaders and the readers both: the seed mixer,
the stand-in for an evaluation sample that cannot be read, and the run-wide "warned once" flags.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def mix_seed(*parts: int) -> int:
    """Combine integers into one 63-bit seed (stable across processes, unlike ``hash``)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h * 0x100000001B3 ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


#: The label of an evaluation sample that could not be read. Evaluation leaves it out of every
#: count and reports how many there were: standing in another image for it would count that
#: image twice and measure top-1 on another set (training, where only the stream of images
#: matters, takes the next readable one instead).
UNREADABLE = -1


class WarnedOnce:
    """Which of ``n`` samples a run has already warned about, shared by the DataLoader worker
    processes of the run: the flags live in shared memory made here, in the process that
    builds the dataset, before the workers fork (or are spawned: the flags travel to them).
    Each worker holds its own copy of a dataset, so without this every worker would warn about
    the same unreadable file once more."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.flags: Any = _shared_flags(n)

    def first(self, index: int) -> bool:
        """Whether ``index`` is warned about for the first time in this run (then marked)."""
        if self.flags is None:
            return True
        with self.flags.get_lock():  # two workers may fail on the same file at once
            if self.flags[index]:
                return False
            self.flags[index] = 1
            return True

    def __getstate__(self) -> dict[str, Any]:
        from multiprocessing.context import get_spawning_popen

        # Shared memory travels only to a process being started; a copy made otherwise
        # (a deepcopy, a pickle to disk) gets flags of its own.
        shared = get_spawning_popen() is not None
        return {"n": self.n, "flags": self.flags if shared else None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.n = state["n"]
        self.flags = state["flags"] if state["flags"] is not None else _shared_flags(self.n)


def _shared_flags(n: int) -> Any:
    """``n`` zeroed bytes in shared memory, with a lock (None for none)."""
    import multiprocessing

    return multiprocessing.Array("b", n) if n else None


def unreadable_stand_in(transform: Callable[[Any], Any] | None, mode: str) -> tuple[Any, int]:
    """What an evaluation dataset yields for a sample it cannot read: a blank image through
    its own transform (so the batch keeps its shape), labelled :data:`UNREADABLE`."""
    from PIL import Image

    img = Image.new(mode, (32, 32))
    return (transform(img) if transform is not None else img), UNREADABLE


class seeded_streams:
    """Run a block with the global random streams that augmentation draws from (Python's
    ``random``, numpy's legacy global state and torch's CPU generator) seeded from ``key``.

    The training stream's random choices (a sample's crop, flip, RandAugment and random
    erasing; a batch's mixup/cutmix pairing and lambda) are made under it, with ``key`` a
    function of ``(data.seed, epoch, sample or step)`` only: so they replay bit for bit
    whatever else drew from those streams (the student's initialisation, drop path, masks),
    in the main process and in a loader worker alike.

    ``restore``: give Python's and torch's streams back as they were afterwards (in the main
    process, where the student draws from torch's); a loader worker has nothing to keep.
    numpy's global stream is seeded and left so: nothing of the student draws from it, and
    saving and restoring its state costs 110 us, more than the rest together (a checkpoint
    keeps it all the same, and a resumed run restores it).
    """

    def __init__(self, key: int, restore: bool = True) -> None:
        self.key = key
        self.restore = restore
        self._saved: tuple[Any, Any] | None = None

    def __enter__(self) -> None:
        import random

        import numpy as np
        import torch

        if self.restore:
            self._saved = (random.getstate(), torch.get_rng_state())
        random.seed(self.key)
        np.random.seed(self.key % 2**32)
        # The CPU generator alone: torch.manual_seed also queues a seed for every CUDA
        # device, recording a stack trace each time before CUDA starts (1 ms a sample).
        torch.default_generator.manual_seed(self.key)

    def __exit__(self, *exc: object) -> None:
        import random

        import torch

        if self._saved is not None:
            py, torch_state = self._saved
            random.setstate(py)
            torch.set_rng_state(torch_state)
            self._saved = None
