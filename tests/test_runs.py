"""Run folders: one process at a time holds a run folder (an OS lock, released on death)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vitkdl.runs import LOCK, RunHeld, hold, holder


def test_a_held_folder_is_refused_naming_the_holder_and_free_again_after(tmp_path: Path) -> None:
    with hold(tmp_path):
        assert holder(tmp_path) == os.getpid()
        # A second holder (a new open file: flock is per open file, so even this process
        # counts as another one) is refused, and the holder's PID survives the attempt.
        with pytest.raises(RunHeld) as caught, hold(tmp_path):
            pass
        assert caught.value.pid == os.getpid()
        assert f"process {os.getpid()}" in str(caught.value)
        assert holder(tmp_path) == os.getpid()
    with hold(tmp_path):  # released at the end of the block
        pass
    assert (tmp_path / LOCK).is_file()  # never removed (see hold)
