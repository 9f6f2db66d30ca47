"""Stop signals: the first Ctrl-C stops at the next step (130), a second one aborts now."""

from __future__ import annotations

import os
import signal

import pytest

from vitkdl.train.signals import (
    INTERRUPT_NOTE,
    INTERRUPTED,
    PREEMPTED,
    exit_status,
    interrupt_stops,
)


def test_first_ctrl_c_sets_the_stop_flag_and_a_second_raises() -> None:
    stops: list[str] = []
    notes: list[str] = []
    before = signal.getsignal(signal.SIGINT)
    with interrupt_stops(stops.append, notes.append):
        os.kill(os.getpid(), signal.SIGINT)  # handled before kill returns (main thread)
        assert stops == ["SIGINT"] and exit_status(stops[0]) == INTERRUPTED
        assert notes == [INTERRUPT_NOTE]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        assert stops == ["SIGINT"]  # the second one does not ask for another stop
    assert signal.getsignal(signal.SIGINT) is before


def test_sigterm_and_sigusr1_exit_75() -> None:
    assert exit_status("SIGTERM") == exit_status("SIGUSR1") == PREEMPTED
