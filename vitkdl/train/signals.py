"""How a run is stopped from outside without losing work: the signals and the exit statuses.

SIGTERM is what SLURM and Kubernetes send before they preempt a job (and what ``scancel`` and
``kill`` send); SIGUSR1 is what ``sbatch --signal=USR1@120`` sends ahead of the time limit.
Either stops a run at its next optimizer step with a checkpoint of exactly that step, and the
process exits with :data:`PREEMPTED` (75, sysexits' EX_TEMPFAIL: "try again later"), which a
requeue script acts on by running the same command with ``--resume``. Ctrl-C also saves a
checkpoint and exits with :data:`INTERRUPTED` (130). Torch-free.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

PREEMPTED = 75
INTERRUPTED = 130

STOP_SIGNALS = ("SIGTERM", "SIGUSR1")


@contextlib.contextmanager
def stop_signals(on_stop: Callable[[str], None]) -> Iterator[None]:
    """While inside, SIGTERM and SIGUSR1 call ``on_stop(signal name)`` instead of ending the
    process; the handlers from before are put back after. Outside the main thread (where
    Python cannot set handlers) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    names = [n for n in STOP_SIGNALS if hasattr(signal, n)]

    def handler(signum: int, frame: Any) -> None:
        on_stop(signal.Signals(signum).name)

    previous = {n: signal.signal(getattr(signal, n), handler) for n in names}
    try:
        yield
    finally:
        for n, old in previous.items():
            signal.signal(getattr(signal, n), old)
