"""The tool commands as a user meets them: fmt, init, ls, cp, help, coloured diagnostics."""

from __future__ import annotations

import io
import re
import sys

from rich.console import Console

import vitkdl
from tests.cli import run
from tests.conftest import GOLDEN, RECIPES
from vitkdl.cli import build_parser
from vitkdl.cli.common import print_diagnostics
from vitkdl.scaffold import init_recipe

MESSY = "student   deit_tiny_patch16_224{drop_path=0.1 # why\n}\n"
TIDY = "student deit_tiny_patch16_224 {\n    drop_path = 0.1  # why\n}\n"


def test_fmt_check_passes_on_the_shipped_recipes(capsys) -> None:
    code, out, err = run(capsys, "fmt", "--check", "recipes")
    assert code == 0, err
    assert out == err == ""


def test_fmt_check_names_what_it_would_change_and_exits_1(tmp_path, capsys) -> None:
    (tmp_path / "messy.vkd").write_text(MESSY)
    (tmp_path / "tidy.vkd").write_text(TIDY)
    (tmp_path / ".hidden.vkd").write_text(MESSY)
    code, _, err = run(capsys, "fmt", "--check", str(tmp_path))
    assert code == 1
    assert f"would reformat {tmp_path / 'messy.vkd'}" in err and "tidy.vkd" not in err
    assert ".hidden" not in err and "1 of 2 files would be reformatted" in err
    assert (tmp_path / "messy.vkd").read_text() == MESSY  # --check writes nothing


def test_fmt_rewrites_in_place_and_diff_shows_without_writing(tmp_path, capsys) -> None:
    path = tmp_path / "messy.vkd"
    path.write_text(MESSY)
    code, out, _ = run(capsys, "fmt", "--diff", str(path))
    assert code == 0 and "-student   deit_tiny_patch16_224{drop_path=0.1 # why" in out
    assert "+    drop_path = 0.1  # why" in out and path.read_text() == MESSY
    code, _, err = run(capsys, "fmt", str(path))
    assert code == 0 and f"reformatted {path}" in err and path.read_text() == TIDY
    code, _, err = run(capsys, "fmt", str(path))
    assert code == 0 and err == ""


def test_fmt_stdin_to_stdout(monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(MESSY))
    code, out, _ = run(capsys, "fmt", "-")
    assert code == 0 and out == TIDY


def test_fmt_reports_a_syntax_error_and_leaves_the_file(tmp_path, capsys) -> None:
    path = tmp_path / "bad.vkd"
    path.write_text("student x {\n    a = \n}\n")
    code, _, err = run(capsys, "fmt", str(path))
    assert code == 2 and f"{path}:3:1: error: unexpected '}}'" in err
    assert "1 file could not be formatted" in err and "Traceback" not in err
    assert path.read_text() == "student x {\n    a = \n}\n"


def test_every_command_has_an_example_in_its_help() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) >= {
        "validate",
        "explain",
        "run",
        "bench",
        "fmt",
        "init",
        "ls",
        "cp",
        "lsp",
    }
    for name, p in sub.choices.items():
        assert "example" in (p.epilog or ""), name
        assert f"vitkdl {name}" in p.epilog, name


def test_ls_lists_every_shipped_recipe(capsys) -> None:
    code, out, _ = run(capsys, "ls")
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == len(list(RECIPES.rglob("*.vkd")))
    assert any(re.match(r"quickstart +Quickstart: ViTKD \+ NKD", line) for line in lines)


def test_cp_copies_with_dependencies_and_refuses_to_clobber(tmp_path, capsys) -> None:
    code, _, err = run(capsys, "cp", "deit_tiny_vitkd_kd", str(tmp_path / "mine.vkd"))
    assert code == 0 and "base/deit_imagenet -> " in err
    assert (tmp_path / "base" / "deit_imagenet.vkd").is_file()
    code, _, err = run(capsys, "cp", "deit_tiny_vitkd_kd", str(tmp_path / "mine.vkd"))
    assert code == 2 and "exists; pass --force" in err
    code, _, err = run(capsys, "cp", "nope", str(tmp_path))
    assert code == 2 and "no shipped recipe named 'nope'" in err
    code, _, err = run(capsys, "cp", "deit_tiny_vitkd_kd", str(tmp_path / "alone.vkd"), "--no-deps")
    assert code == 0 and "names base/deit_imagenet.vkd by relative path" in err


def test_init_writes_a_recipe_that_validates(tmp_path, capsys) -> None:
    out_file = tmp_path / "pair.vkd"
    code, _, err = run(
        capsys,
        "init",
        "--teacher",
        "deit3_small_patch16_224",
        "--student",
        "deit_tiny_patch16_224",
        "--data",
        "synthetic",
        "-o",
        str(out_file),
    )
    assert code == 0 and f"wrote {out_file}" in err
    code, out, err = run(capsys, "validate", str(out_file))
    assert code == 0 and "ok " in out, err
    code, _, err = run(
        capsys,
        "init",
        "--teacher",
        "deit3_small_patch16_224",
        "--student",
        "deit_tiny_patch16_224",
        "-o",
        str(out_file),
    )
    assert code == 2 and "exists; pass --force" in err
    code, out, _ = run(
        capsys, "init", "--teacher", "deit3_small_patch16_224", "--student", "deit_tiny_patch16_224"
    )
    # Without -o the recipe is standard output and nothing else: it validates as written.
    assert code == 0 and out == init_recipe("deit3_small_patch16_224", "deit_tiny_patch16_224")
    spec, diags, _ = vitkdl.validate(tmp_path / "stdout.vkd", text=out)
    assert spec is not None and not [d for d in diags if d.is_error], diags
    assert spec.student.model == "deit_tiny_patch16_224"
    assert spec.teacher is not None and spec.teacher.model == "deit3_small_patch16_224"


def test_init_refuses_different_grids_in_one_message(capsys) -> None:
    code, out, err = run(
        capsys, "init", "--teacher", "vit_base_patch32_224", "--student", "deit_tiny_patch16_224"
    )
    assert code == 2 and out == ""
    assert err.startswith("vitkdl init: error: deit_tiny_patch16_224 sees a 14x14 token grid")


def _diagnostics(console: Console) -> str:
    path = GOLDEN / "broken" / "many_errors.vkd"
    _, diags, sources = vitkdl.validate(path)
    print_diagnostics(console, diags, sources)
    return console.file.getvalue()


def test_diagnostics_are_highlighted_on_a_colour_terminal_only(monkeypatch) -> None:
    monkeypatch.delenv("NO_COLOR")
    plain = _diagnostics(Console(file=io.StringIO(), width=100, highlight=False))
    assert "\x1b[" not in plain
    coloured = _diagnostics(
        Console(
            file=io.StringIO(),
            width=100,
            highlight=False,
            force_terminal=True,
            color_system="standard",
        )
    )
    assert "\x1b[" in coloured
    assert re.sub(r"\x1b\[[0-9;]*m", "", coloured) == plain  # the same text, coloured
    quoted = next(
        line
        for line in coloured.splitlines()
        if "drop_pth = 0.1" in re.sub(r"\x1b\[[0-9;]*m", "", line)
    )
    assert quoted.count("\x1b[") >= 4  # the field, '=' and the number are coloured apart
    monkeypatch.setenv("NO_COLOR", "1")
    no_color = _diagnostics(
        Console(file=io.StringIO(), width=100, highlight=False, force_terminal=True)
    )
    assert "drop_pth = 0.1" in no_color
    assert not re.search(r"\x1b\[[0-9;]*3[0-9](;|m)", no_color)  # no colours
