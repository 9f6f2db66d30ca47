"""How ``vitkdl run`` ends when a file cannot be written, a checkpoint is of other models, a
path holds ``[...]`` or a dataset row has no label: one line naming the file (or row) and the
cause, an exit status from the README's table (vitkdl.exits), earlier files intact."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from vitkdl.cli import main
from vitkdl.exits import IOERR, USAGE

RECIPE = """recipe base
student vit_tiny_patch16_224 {{
    img_size = 8  patch_size = 2  in_chans = 1  depth = 1  embed_dim = {width}  num_heads = 2
    num_classes = 10
}}
data digits {{ batch_size = 64 }}
train {{ epochs = 1  log_every = 50  precision = fp32  compile = off }}
"""


def _recipe(folder: Path, width: int = 8) -> str:
    path = folder / f"base{width}.vkd"
    path.write_text(RECIPE.format(width=width))
    return str(path)


def _err(capsys: pytest.CaptureFixture[str]) -> str:
    return " ".join(capsys.readouterr().err.split())


def _fail(name: str, code: int = errno.ENOSPC) -> OSError:
    return OSError(code, os.strerror(code), name)


@pytest.fixture
def started(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[str, Path, Path]:
    """A run stopped at step 1 (every file written once): (recipe, --out, run folder)."""
    recipe, out = _recipe(tmp_path), tmp_path / "runs"
    assert main(["run", recipe, "--out", str(out), "--max-steps", "1", "--quiet"]) == 0
    capsys.readouterr()
    return recipe, out, (out / "base").resolve()


# (file that fails, how it is made to fail): os.replace is the last step of every atomic
# write (checkpoints, their sidecars, summary/recipe/plan JSON, the latest link).
SITES = [
    ("last.pt", "replace"),
    ("last.pt.sha256", "replace"),
    ("summary.json", "replace"),
    ("recipe.json", "replace"),
    ("plan.json", "replace"),
    ("base", "replace"),  # OUT/NAME, the link to the latest run
    ("metrics.jsonl", "append"),
    ("student.safetensors", "export"),
    (".lock", "open"),
]


@pytest.mark.parametrize(("name", "how"), SITES, ids=[s[0] for s in SITES])
def test_a_full_disk_is_one_line_naming_the_file_and_earlier_files_stay(
    started: tuple[str, Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    name: str,
    how: str,
) -> None:
    recipe, out, folder = started
    target = out / name if name == "base" else folder / name
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    _inject(monkeypatch, name, how)
    code = main(["run", recipe, "--out", str(out), "--resume", "--max-steps", "2", "--quiet"])
    err = _err(capsys)
    assert code == IOERR, err
    assert f"cannot write {target}: No space left on device" in err
    assert "internal error" not in err and "Traceback" not in err
    if name in before:  # written atomically (or appended to): what was there is intact
        now = target.read_bytes()
        assert now == before[name] or (name == "metrics.jsonl" and now.startswith(before[name]))
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def _inject(monkeypatch: pytest.MonkeyPatch, name: str, how: str) -> None:
    if how == "replace":
        real_replace = os.replace

        def replace(src: Any, dst: Any, *a: Any, **k: Any) -> None:
            if Path(dst).name == name:
                raise _fail(str(dst))
            real_replace(src, dst, *a, **k)

        monkeypatch.setattr(os, "replace", replace)
    elif how == "append":
        real_open = Path.open

        def open_(self: Path, mode: str = "r", *a: Any, **k: Any) -> Any:
            if self.name == name and "a" in mode:
                raise _fail(str(self))
            return real_open(self, mode, *a, **k)

        monkeypatch.setattr(Path, "open", open_)
    elif how == "export":
        import safetensors.torch

        def save_file(tensors: Any, filename: str, *a: Any, **k: Any) -> None:
            raise _fail(filename)

        monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    else:
        real_os_open = os.open

        def os_open(path: Any, *a: Any, **k: Any) -> int:
            if Path(path).name == name:
                raise _fail(str(path))
            return real_os_open(path, *a, **k)

        monkeypatch.setattr(os, "open", os_open)


def test_a_read_only_run_folder(
    started: tuple[str, Path, Path], monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """Every write into the folder fails (chmod where it works; as root, simulated)."""
    recipe, out, folder = started
    if os.geteuid() != 0:
        folder.chmod(0o555)
        cause = "Permission denied"
    else:  # root writes through a chmod: each new file fails as on a read-only mount
        import tempfile

        real = tempfile.mkstemp

        def mkstemp(*a: Any, dir: Any = None, **k: Any) -> Any:
            if dir is not None and Path(dir).resolve() == folder:
                raise _fail(str(dir), errno.EROFS)
            return real(*a, dir=dir, **k)

        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
        cause = "Read-only file system"
    try:
        code = main(["run", recipe, "--out", str(out), "--force", "--max-steps", "2", "--quiet"])
    finally:
        folder.chmod(0o755)
    err = _err(capsys)
    assert code == IOERR, err
    assert f"cannot write {folder}" in err and cause in err and "internal error" not in err


def test_a_read_only_out_in_an_experiment(tmp_path: Path, monkeypatch, capsys) -> None:
    recipe = _recipe(tmp_path)
    out = tmp_path / "ro"
    out.mkdir()
    real_mkdir = Path.mkdir

    def mkdir(self: Path, *a: Any, **k: Any) -> None:  # a read-only mount at --out
        if self != out and out in self.parents:
            raise _fail(str(self), errno.EROFS)
        real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    code = main(["run", recipe, "--out", str(out), "--seeds", "0", "--max-steps", "1"])
    err = _err(capsys)
    assert code == IOERR, err
    assert f"cannot write {out}" in err and "Read-only file system" in err
    assert "internal error" not in err and "Traceback" not in err


def test_square_brackets_in_out_are_shown(tmp_path: Path, capsys) -> None:
    """rich would take ``[a]`` and ``[bold]`` for markup and drop them from the messages."""
    recipe, out = _recipe(tmp_path), tmp_path / "[a]" / "[bold]runs"
    assert main(["run", recipe, "--out", str(out), "--resume"]) == USAGE  # an error
    assert f"no checkpoint at {out}" in _err(capsys)
    assert main(["run", recipe, "--out", str(out), "--max-steps", "1"]) == 0
    capsys.readouterr()
    assert main(["run", recipe, "--out", str(out), "--max-steps", "1"]) == 0  # a note
    assert f"{(out / 'base').resolve()} ran as far as --max-steps 1 asks" in _err(capsys)


def test_resume_force_from_a_checkpoint_of_other_models_is_refused(
    started: tuple[str, Path, Path], capsys
) -> None:
    recipe, out, folder = started
    wide = _recipe(Path(recipe).parent, width=16)  # recipe base, another width
    code = main(["run", wide, "--out", str(out), "--resume", "--force", "--quiet"])
    err = _err(capsys)
    assert code == USAGE, err
    assert f"{folder / 'last.pt'} holds weights of other models" in err
    assert "size mismatch for" in err and "internal error" not in err
    assert (out / "base").resolve() == folder  # the refusal left the latest link alone
    # A file that is no checkpoint at all, under --force: refused the same way.
    (folder / "last.pt").write_bytes(b"not a checkpoint")
    (folder / "last.pt.sha256").unlink()
    code = main(["run", wide, "--out", str(out), "--resume", "--force", "--quiet"])
    err = _err(capsys)
    assert code == USAGE and f"checkpoint {folder / 'last.pt'} cannot be read" in err


def test_an_unwritable_file_elsewhere_is_not_an_internal_error(tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    code = main(["init", "--teacher", "vit_small_patch16_224", "--student",
                 "vit_tiny_patch16_224", "-o", str(blocker / "x.vkd")])  # fmt: skip
    err = _err(capsys)
    assert code == IOERR, err
    assert f"{blocker / 'x.vkd'}" in err
