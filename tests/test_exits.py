"""Exit statuses: one table (vitkdl.exits), every exception mapped through it, and the
README's table in step with it."""

from __future__ import annotations

import ast
import errno
import importlib
from pathlib import Path

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


ROOT = Path(__file__).resolve().parent.parent
CLI = ROOT / "vitkdl" / "cli"


def _readme_table() -> dict[int, tuple[str, str]]:
    """The README's exit-status table: status -> (its constant's name, its commands cell)."""
    text = (ROOT / "README.md").read_text()
    start = text.index("**Exit status** of every `vitkdl` command")
    rows: dict[int, tuple[str, str]] = {}
    for line in text[start:].splitlines()[1:]:
        if rows and not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells and cells[0].isdigit():
            assert int(cells[0]) not in rows, f"status {cells[0]} twice in the README"
            rows[int(cells[0])] = (cells[1].strip("`"), cells[2])
    return rows


def _constants() -> dict[str, int]:
    return {
        name: value
        for name, value in vars(exits).items()
        if name.isupper() and isinstance(value, int) and not isinstance(value, bool)
    }


def test_the_readme_table_is_the_constants_module() -> None:
    table = _readme_table()
    constants = _constants()
    assert set(table) == set(constants.values()) == set(exits.MEANINGS)
    for status, (name, _) in table.items():
        assert constants.get(name) == status, f"README: {status} is not vitkdl.exits.{name}"


def _returned(path: Path) -> set[int]:
    """The statuses a CLI module returns or exits with, as literals or vitkdl.exits names
    (a ``return`` of a computed value is ``vitkdl run``'s exit_of, checked on its own)."""
    constants = _constants()
    found: set[int] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        value = None
        if isinstance(node, ast.Return) and node.value is not None:
            value = node.value
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "SystemExit":
            value = node.args[0] if node.args else None
        if isinstance(value, ast.Constant) and isinstance(value.value, int):
            if not isinstance(value.value, bool):
                found.add(value.value)
        elif isinstance(value, ast.Name) and value.id in constants:
            found.add(constants[value.id])
    return found


def test_every_status_a_command_returns_is_in_the_readme_for_that_command() -> None:
    table = _readme_table()
    modules = sorted(p for p in CLI.glob("*.py") if p.stem not in ("common",))
    assert len(modules) > 8
    seen: set[int] = set()
    for path in modules:
        command = path.stem
        statuses = _returned(path)
        if command == "run":  # every exception goes through exit_of: any status it maps to
            statuses |= set(exits.MEANINGS)
        seen |= statuses
        for status in statuses:
            assert status in table, f"vitkdl/cli/{path.name} returns {status}, not in README"
            cell = table[status][1]
            if command != "__init__":  # main(): every command's last line
                assert cell == "all" or f"`{command}`" in cell, (
                    f"README: status {status} does not list `{command}` (it returns it)"
                )
    assert seen == set(table)  # and the table lists nothing no command returns
