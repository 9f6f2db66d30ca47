"""Exit statuses: one table (vitkdl.exits), every exception mapped through it, and the
README's table in step with it."""

from __future__ import annotations

import errno
import importlib

import pytest

from vitkdl import exits
from vitkdl.exits import WriteError, exit_of, status_of, writing


@pytest.mark.parametrize("key", sorted(exits._STATUS_OF))
def test_every_class_the_table_names_exists(key: str) -> None:
    module, _, name = key.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    assert isinstance(cls, type) and issubclass(cls, BaseException)


def test_the_training_errors_map_to_their_statuses() -> None:
    from vitkdl.errors import VkdError, error
    from vitkdl.train.checkpoint import CheckpointError
    from vitkdl.train.data import DataError
    from vitkdl.train.loop import DataPipelineError, Interrupted, ResumeRefused, TrainError
    from vitkdl.train.runner import RunInUse, RunRefused

    assert status_of(TrainError("x")) == status_of(DataPipelineError("x")) == exits.FAILED
    assert status_of(DataError("x")) == status_of(CheckpointError("x")) == exits.FAILED
    assert status_of(RunRefused("x")) == status_of(ResumeRefused("x")) == exits.USAGE
    assert status_of(VkdError([error("bad")])) == exits.USAGE
    assert exit_of(RunInUse("held")) == exits.Exit(exits.PREEMPTED, "held")
    assert exit_of(RunInUse("held"), in_experiment=True).status == exits.FAILED
    stop = exit_of(Interrupted("stopped", "SIGINT"), in_experiment=True)
    assert (stop.status, stop.stopped) == (exits.INTERRUPTED, True)
    assert exit_of(Interrupted("stopped", "SIGTERM")).status == exits.PREEMPTED
    assert exit_of(KeyboardInterrupt()).status == exits.INTERRUPTED
    bug = exit_of(ValueError("first line\nsecond line"))
    assert bug == exits.Exit(exits.INTERNAL, "ValueError: first line")


def test_an_unwritable_file_is_one_line_naming_it() -> None:
    with pytest.raises(WriteError) as caught, writing("/out/summary.json"):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert isinstance(caught.value, OSError)  # code tolerating a failed write still does
    assert exit_of(caught.value) == exits.Exit(
        exits.IOERR, "cannot write /out/summary.json: No space left on device"
    )
    # A full disk or read-only folder nobody wrapped: still a write error, named.
    bare = OSError(errno.EROFS, "Read-only file system", "/out/x")
    assert exit_of(bare) == exits.Exit(exits.IOERR, "cannot write /out/x: Read-only file system")
    assert status_of(OSError(errno.ENOENT, "No such file")) == exits.INTERNAL
