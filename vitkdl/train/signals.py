"""How a run is stopped from outside without losing work: the signals and the exit statuses.

SIGTERM is what SLURM and Kubernetes send before they preempt a job (and what ``scancel`` and
``kill`` send); SIGUSR1 is what ``sbatch --signal=USR1@120`` sends ahead of the time limit.
Either stops a run at its next optimizer step with a checkpoint of exactly that step, and the
process exits with :data:`PREEMPTED` (75, sysexits' EX_TEMPFAIL: "try again later"), which a
requeue script acts on by running the same command with ``--resume``. The first Ctrl-C does
the same (a step boundary, so that the saved RNG state is the one the next step starts from)
and exits with :data:`INTERRUPTED` (130); a second one aborts at once, without a checkpoint.
Torch-free.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

from vitkdl.exits import INTERRUPTED, PREEMPTED

STOP_SIGNALS = ("SIGTERM", "SIGUSR1")


def exit_status(signal_name: str) -> int:
    """The exit status of a run stopped by ``signal_name``: :data:`INTERRUPTED` for Ctrl-C
    (SIGINT), :data:`PREEMPTED` for the rest."""
    return INTERRUPTED if signal_name == "SIGINT" else PREEMPTED


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


INTERRUPT_NOTE = "stopping after this step; Ctrl-C again to abort now"


@contextlib.contextmanager
def interrupt_stops(on_stop: Callable[[str], None], note: Callable[[str], None]) -> Iterator[None]:
    """While inside, the first SIGINT (Ctrl-C) calls ``on_stop("SIGINT")`` and ``note`` with
    :data:`INTERRUPT_NOTE` instead of raising :class:`KeyboardInterrupt` wherever the code
    happens to be; a second SIGINT raises it at once (the escape when a step hangs). The
    handler from before is put back after. Outside the main thread nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def first(signum: int, frame: Any) -> None:
        # Armed before the callbacks, so that a second Ctrl-C during them already aborts.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        on_stop("SIGINT")
        note(INTERRUPT_NOTE)

    previous = signal.signal(signal.SIGINT, first)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def stop_with_parent() -> None:
    """Have the kernel send this process SIGTERM when its parent dies (Linux; elsewhere
    nothing): a child started in a session of its own (``start_new_session``, so that a
    terminal's Ctrl-C reaches it from its parent alone) then still saves and stops when the
    parent is killed. Also a ``preexec_fn`` (it runs in the child before it execs)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
