"""The exit statuses of the ``vitkdl`` command, and the one mapping from an exception to one.

Every subcommand returns one of the statuses below (the README's table lists them with the
commands that produce each); the numbers above 2 are the BSD ``sysexits.h`` ones a scheduler
or a shell script already knows. :func:`exit_of` maps an exception that ended a command (or
a run of an experiment) to its status and a one-line message: ``vitkdl run`` and an
experiment's workers (:mod:`vitkdl.train.worker`) both go through it, so a failure reads and
exits the same wherever it happens.

A file that cannot be written (a full disk, a read-only folder) is a :class:`WriteError`,
raised by :func:`writing` around each write: ``cannot write FILE: cause``, status
:data:`IOERR`. Torch-free: the exception classes of the training layers are named here by
their import path, not imported.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

#: Done: every run finished, every file checked is as it should be.
OK = 0
#: A run failed (the others of an experiment went on), or a check failed (``fmt --check``,
#: ``docs --check``).
FAILED = 1
#: Bad input: the command line, a recipe with errors, a request that would lose or mix work
#: (an unfinished run without ``--resume`` or ``--force``, a checkpoint of other models).
USAGE = 2
#: EX_SOFTWARE: a bug in vitkdl (the message asks for a report).
INTERNAL = 70
#: EX_IOERR: a file could not be written (disk full, read-only folder); earlier files intact.
IOERR = 74
#: EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1 with a checkpoint, or the run folder is held by
#: another process; the same command succeeds later.
PREEMPTED = 75
#: Stopped by Ctrl-C (with a checkpoint, after the first one).
INTERRUPTED = 130

#: What each status means, in the words of the README's table.
MEANINGS: dict[int, str] = {
    OK: "success",
    FAILED: "a run failed (the others went on), or a check failed",
    USAGE: "bad input: command line, recipe errors, a refused request",
    INTERNAL: "internal error (a bug: please report it)",
    IOERR: "cannot write a file (disk full, read-only folder)",
    PREEMPTED: "stopped by SIGTERM/SIGUSR1 with a checkpoint, or the run folder is in use",
    INTERRUPTED: "stopped by Ctrl-C",
}

# The one exception -> status table. Keys are ``module.QualName`` of a class; an exception
# takes the status of the first class of its MRO found here. None: the exception carries its
# own status in ``code`` (a signal's: 75 or 130).
_STATUS_OF: dict[str, int | None] = {
    "builtins.KeyboardInterrupt": INTERRUPTED,
    "vitkdl.exits.WriteError": IOERR,
    "vitkdl.errors.VkdError": USAGE,
    "vitkdl.train.runner.RunRefused": USAGE,
    "vitkdl.train.loop.ResumeRefused": USAGE,
    "vitkdl.train.jobs.LaunchError": USAGE,
    "vitkdl.train.runner.RunInUse": PREEMPTED,
    "vitkdl.train.loop.Interrupted": None,
    "vitkdl.train.loop.TrainError": FAILED,
    "vitkdl.train.data.DataError": FAILED,
    "vitkdl.train.readers.DataError": FAILED,
    "vitkdl.train.checkpoint.CheckpointError": FAILED,
}

#: OSError numbers only a write produces: such an error is a :class:`WriteError` even where
#: no :func:`writing` named the file.
WRITE_ERRNOS = frozenset(
    getattr(errno, name) for name in ("ENOSPC", "EROFS", "EDQUOT", "EFBIG") if hasattr(errno, name)
)


class WriteError(OSError):
    """A file that could not be written: ``cannot write FILE: cause`` (exit status
    :data:`IOERR`). An :class:`OSError`, so code that tolerates a failed write still does."""

    def __init__(self, path: str | Path, cause: OSError, hint: str = "") -> None:
        super().__init__(cause.errno, cause.strerror, str(path))
        self.path = Path(path)
        self.cause = cause
        self.hint = hint  # what to do, after the cause

    def __str__(self) -> str:
        text = f"cannot write {self.path}: {self.cause.strerror or self.cause}"
        return f"{text}; {self.hint}" if self.hint else text


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Inside, an :class:`OSError` becomes a :class:`WriteError` naming ``path`` (one
    already naming its file passes unchanged)."""
    try:
        yield
    except WriteError:
        raise
    except OSError as exc:
        raise WriteError(path, exc) from exc


@dataclass(frozen=True)
class Exit:
    """How a command ends: its exit status and a one-line message (plain text, no markup;
    empty for :data:`OK`)."""

    status: int
    message: str
    #: Stopped by a signal (Ctrl-C, SIGTERM, SIGUSR1), not failed: the message is no error.
    stopped: bool = False


def _class_key(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _carries_code(exc: BaseException) -> bool:
    """Whether ``exc`` is a stop by a signal, whose status it carries itself."""
    return any(_STATUS_OF.get(_class_key(c), 0) is None for c in type(exc).__mro__)


def status_of(exc: BaseException) -> int:
    """The exit status for ``exc``: the table's, an unwritable file's :data:`IOERR`, else
    :data:`INTERNAL`."""
    for cls in type(exc).__mro__:
        key = _class_key(cls)
        if key in _STATUS_OF:
            status = _STATUS_OF[key]
            return int(getattr(exc, "code", INTERNAL)) if status is None else status
    if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
        return IOERR
    return INTERNAL


def exit_of(exc: BaseException, in_experiment: bool = False) -> Exit:
    """``exc``'s exit status and one-line message: the exception's own message (for recipe
    errors, the first one's), ``cannot write FILE: cause`` for an unwritable file, and the
    exception's type and first line for a bug. ``in_experiment``: for one run of an
    experiment, where :data:`PREEMPTED` means "stopped with a checkpoint" alone, so a run
    whose folder another process holds is a failed run of the experiment."""
    status = status_of(exc)
    if in_experiment and status == PREEMPTED and not _carries_code(exc):
        status = FAILED
    if isinstance(exc, KeyboardInterrupt):
        return Exit(status, "interrupted", stopped=True)
    if _carries_code(exc):
        return Exit(status, str(exc), stopped=True)
    if status == IOERR and not isinstance(exc, WriteError):
        assert isinstance(exc, OSError)
        return Exit(status, str(WriteError(exc.filename or "a file", exc)))
    errors = getattr(exc, "errors", None)
    if status == USAGE and isinstance(errors, list) and errors:  # a VkdError
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        first = errors[0]
        where = f"{first.span}: " if first.span is not None else ""
        return Exit(status, f"{where}{first.message}{more}")
    text = str(exc)
    if status == INTERNAL:
        first_line = text.splitlines()[0] if text.strip() else ""
        return Exit(status, f"{type(exc).__name__}: {first_line}".rstrip(": "))
    return Exit(status, text or type(exc).__name__)
