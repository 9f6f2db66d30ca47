"""Where runs live: one folder per resolved recipe, never shared, never silently replaced.

``OUT/NAME-HASH/`` holds the run of the recipe called NAME whose resolved form (after
``extends``, ``--set`` and defaults; seed included) hashes to HASH, so two different recipes,
or one recipe under different overrides, never write into the same folder. ``OUT/NAME`` is a
symbolic link to the latest of them, so ``runs/quickstart/summary.json`` is the newest run of
the quickstart. A run is *finished* when its ``summary.json`` carries its hash, says it
completed every epoch, and its exported student exists; a run that ``--max-steps`` stopped
early is *partial*: done for a request with that many steps or fewer (:func:`done`), and
continued by ``--resume``. ``--max-steps`` is not part of the hash: it says how far to train
a recipe, not which recipe, so a partial run and its continuation share one folder. Its
checkpoints are ``last.pt`` (where it stopped) and ``best.pt``; its log, when a sweep ran
it, is ``log.txt``. While a process trains a run, it holds the folder's ``.lock``
(:func:`hold`): a second process refuses the folder instead of training the run twice.

An experiment (several seeds, a sweep) writes its report to ``OUT/experiments/LABEL-HASH/``
(``OUT/experiments/LABEL`` links to the latest), LABEL naming its recipes and HASH the runs
it is made of. Torch-free.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from vitkdl.exits import writing


def run_dir(root: Path, name: str, recipe_hash: str) -> Path:
    """The folder of the run of recipe ``name`` with hash ``recipe_hash`` under ``root``."""
    return Path(root) / f"{name}-{recipe_hash}"


#: What a sweep's run writes besides the trainer's files: its output, and where it is while
#: it trains (removed at its end).
LOG = "log.txt"
PROGRESS = "progress.json"


def write_atomic(path: Path, text: str) -> None:
    """Write a small text file atomically (temporary file in the same folder, fsync,
    rename): a crash or a full disk leaves the earlier file as it was. An :class:`OSError`
    becomes :class:`vitkdl.exits.WriteError` naming ``path``."""
    path = Path(path)
    with writing(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def latest_link(root: Path, name: str) -> Path:
    """``OUT/NAME``: the link to the newest run of recipe ``name``."""
    return Path(root) / name


def read_summary(folder: Path) -> dict[str, Any] | None:
    """A run folder's ``summary.json``, or None when it is missing or unreadable."""
    try:
        data = json.loads((Path(folder) / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def finished(folder: Path, recipe_hash: str) -> dict[str, Any] | None:
    """The summary of a finished run of exactly this recipe in ``folder``, else None."""
    summary = read_summary(folder)
    if summary is None or summary.get("hash") != recipe_hash or not summary.get("complete"):
        return None
    if not (Path(folder) / "student.safetensors").is_file():
        return None
    return summary


def done(folder: Path, recipe_hash: str, max_steps: int | None = None) -> dict[str, Any] | None:
    """The summary of a run of this recipe that needs no more training: finished, or (when
    ``max_steps`` bounds the request) stopped at ``max_steps`` or later; else None."""
    summary = finished(folder, recipe_hash)
    if summary is not None or max_steps is None:
        return summary
    summary = read_summary(folder)
    if summary is None or summary.get("hash") != recipe_hash:
        return None
    if (summary.get("steps") or 0) < max_steps:
        return None
    return summary if (Path(folder) / "student.safetensors").is_file() else None


def stopped_early(summary: dict[str, Any]) -> str | None:
    """``"stopped early at step N of M"`` for a run that ``--max-steps`` stopped before the
    end of its recipe (a *partial* run), else None."""
    if summary.get("complete", True):
        return None
    planned = summary.get("planned_steps")
    return f"stopped early at step {summary.get('steps')}" + (
        f" of {planned}" if planned is not None else ""
    )


def checkpoint_files(folder: Path) -> list[Path]:
    """The run's checkpoints in the order a resume tries them: ``last.pt`` first, then any
    other ``*.pt`` (``best.pt``), newest first."""
    folder = Path(folder)
    last = folder / "last.pt"
    others = [p for p in folder.glob("*.pt") if p.name != last.name and p.is_file()]
    others.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return ([last] if last.is_file() else []) + others


def experiment_dir(root: Path, label: str, experiment_hash: str) -> Path:
    """The folder of an experiment's report under ``root``."""
    return Path(root) / "experiments" / f"{label}-{experiment_hash}"


def point_latest(root: Path, name: str, folder: Path) -> str | None:
    """Point ``OUT/NAME`` at ``folder`` (relative link, replaced atomically). Returns a note
    for the user when ``OUT/NAME`` is a real folder (an earlier layout), which is left
    untouched."""
    link = latest_link(root, name)
    if link.exists() and not link.is_symlink():
        return f"{link} is a folder from an earlier vitkdl (left as it is); this run is in {folder}"
    tmp = link.with_name(f".{name}.link-{os.getpid()}")
    with writing(link):
        tmp.unlink(missing_ok=True)
        os.symlink(Path(folder).name, tmp)
        os.replace(tmp, link)
    return None


#: The lock file of a run folder; it holds the PID of the process that holds the lock.
LOCK = ".lock"
#: What a refusal of a held folder says (``vitkdl run --nproc-per-node`` looks for it in its
#: workers' output: torchrun's own exit status does not carry theirs).
IN_USE = "is in use by"


class RunHeld(Exception):
    """Another process holds the run folder: it is training (or about to train) this run."""

    def __init__(self, folder: Path, pid: int | None) -> None:
        self.folder, self.pid = Path(folder), pid
        who = f"process {pid}" if pid is not None else "another process"
        super().__init__(
            f"{folder} {IN_USE} {who} (it holds {Path(folder) / LOCK}); "
            "wait for it to end, or pass another --out"
        )


def holder(folder: Path) -> int | None:
    """The PID written in the folder's lock file (the holder's, while it is held), or None."""
    try:
        text = (Path(folder) / LOCK).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


# The lock files this process holds open. A forked child (a DataLoader worker) shares each
# open file description and with it the flock, so it would keep the folder locked after this
# process let go (a run that failed in-process, then resumed in the same process): children
# close their copies at once.
_HELD_FDS: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in _HELD_FDS:
        with suppress(OSError):
            os.close(fd)
    _HELD_FDS.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


@contextmanager
def hold(folder: Path) -> Iterator[None]:
    """Hold ``folder`` for this process for the duration of the block: an exclusive
    ``flock`` on ``folder/.lock``, which the OS releases when the process dies, so a killed
    run never leaves a stale lock. Raises :class:`RunHeld` (naming the holder's PID) when
    another process holds it. The lock file is never removed: removing it would let a third
    process lock a new file while the second still holds the old one."""
    path = Path(folder) / LOCK
    # No O_TRUNC: opening must not erase the holder's PID before we know we hold the lock.
    with writing(path):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise RunHeld(folder, holder(folder)) from None
        with writing(path):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        _HELD_FDS.add(fd)
        yield
    finally:
        _HELD_FDS.discard(fd)
        os.close(fd)  # releases the lock
