"""The `vitkdl` command as a user meets it: exit codes, stderr, golden `explain` output."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import vitkdl
from tests.cli import run
from tests.conftest import GOLDEN, RECIPES, ROOT, check_golden, shipped_recipes
from vitkdl.cli import main


def test_validate_all_shipped_recipes(capsys) -> None:
    code, out, err = run(capsys, "validate", *map(str, shipped_recipes()))
    assert code == 0, err
    assert out.count("ok ") == len(shipped_recipes())
    assert "Traceback" not in err


def test_validate_reports_every_error_and_exits_2(capsys) -> None:
    broken = GOLDEN / "broken" / "many_errors.vkd"
    code, out, err = run(capsys, "validate", str(broken), "recipes/quickstart.vkd")
    assert code == 2
    assert err.count(": error: ") >= 7 and "1 of 2 recipes failed validation" in err
    assert "ok recipes/quickstart.vkd" in out


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such file"),
        ("DIR", "is a directory"),
        (b"", "is empty"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00", "binary file"),
        (b"# recipe\n" * 1_200_000, "MB; a recipe is at most 1 MB"),
        ("student deit_tiny_patch16_224 # caf\xe9\n".encode("latin-1"), "not UTF-8"),
        ("student x".encode("utf-16"), "UTF-16"),
    ],
)
def test_bad_files_get_one_line_errors(tmp_path, capsys, content, message) -> None:
    path = tmp_path / "r.vkd"
    if content == "DIR":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    code, _, err = run(capsys, "validate", str(path))
    assert code == 2
    assert message in err and "Traceback" not in err
    assert err.splitlines()[0].startswith(f"{path}:1:1: error: ")


def test_bad_command_lines_exit_2_without_traceback(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["explain"])
    assert info.value.code == 2
    with pytest.raises(SystemExit):
        main(["frobnicate"])
    assert "invalid choice" in capsys.readouterr().err
    code, _, err = run(capsys, "explain", str(RECIPES / "quickstart.vkd"), "--set", "x")
    assert code == 2 and "an override is PATH=VALUE" in err


@pytest.mark.parametrize("name", ["deit_base_vitkd_kd", "quickstart"])
def test_explain_golden(capsys, name) -> None:
    code, out, err = run(capsys, "explain", f"recipes/{name}.vkd")
    assert code == 0, err
    check_golden(GOLDEN / "explain" / f"{name}.txt", out)


def test_explain_acceptance_numbers(capsys) -> None:
    code, out, _ = run(capsys, "explain", "recipes/deit_base_vitkd_kd.vkd")
    assert code == 0
    for text in (
        "768 x 12 blocks",
        "1024 x 24 blocks",
        "196 on a 14x14 grid",
        "blocks 0, 1 -> blocks 0, 1",
        "norm -> norm",
        "18.9M params",
        "coefficient 12.04",
        "coefficient 0.6021",
    ):
        assert text in out, text


def test_explain_json(capsys) -> None:
    code, out, _ = run(
        capsys,
        "explain",
        "recipes/deit_base_vitkd_kd.vkd",
        "--json",
        "--set",
        "distill.generate.mask=0.75",
    )
    data = json.loads(out)
    assert code == 0 and data["student"]["width"] == 768 and data["teacher"]["depth"] == 24
    assert data["teacher"]["tokens"] == 196 and data["terms"][1]["options"]["mask"] == 0.75
    assert data["terms"][0]["teacher"] == [
        {"block": 0, "point": "mlp", "identity": False},
        {"block": 1, "point": "mlp", "identity": False},
    ]
    assert data["terms"][0]["formula"] == "3e-05 * sum((align(s) - t)^2) / B"  # in words too


def test_module_entry_point_and_version(tmp_path) -> None:
    """``python -m vitkdl`` is the command: its version is the package's, a command runs
    through it with the command's exit status, and no command is a usage error."""
    out = subprocess.run(
        [sys.executable, "-m", "vitkdl", "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert out == f"vitkdl {vitkdl.__version__}\n"
    missing = tmp_path / "missing.vkd"
    proc = subprocess.run(
        [sys.executable, "-m", "vitkdl", "validate", str(missing)], capture_output=True, text=True
    )
    assert proc.returncode == 2 and str(missing) in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "vitkdl"], capture_output=True, text=True)
    assert proc.returncode == 2 and "validate" in proc.stderr and proc.stdout == ""


@pytest.mark.slow
def test_warm_validate_does_not_import_torch(tmp_path) -> None:
    code = (
        "import sys; from vitkdl.cli import main; rc = main(['validate', "
        "'recipes/deit_base_vitkd_kd.vkd']); print('torch' in sys.modules); "
        "sys.exit(rc)"
    )
    env = {**os.environ, "VITKDL_CACHE_DIR": str(tmp_path)}
    for expected in ("True", "False"):  # cold: resolves models with torch; warm: from cache
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip().splitlines()[-1] == expected


@pytest.mark.slow
def test_explain_compile_report(capsys) -> None:
    code, out, err = run(capsys, "explain", "recipes/quickstart.vkd", "--compile")
    assert code == 0, err
    assert "graphs: 1, graph breaks: 0" in out
    code, out, _ = run(capsys, "explain", "recipes/quickstart.vkd", "--compile", "--json")
    report = json.loads(out)["compile_report"]
    assert report["graphs"] == 1 and report["breaks"] == 0


def test_run_help_lists_examples(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["run", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--resume" in out and "--smoke" in out and "vitkdl run recipes/quickstart.vkd" in out


def test_explain_shows_each_models_normalisation(capsys) -> None:
    code, out, err = run(
        capsys,
        "explain",
        "recipes/deit_tiny_vitkd_kd.vkd",
        "--set",
        "teacher.model=vit_small_patch16_224.augreg_in21k_ft_in1k",
    )
    assert code == 0, err
    text = " ".join(out.split())
    assert "input mean │ (0.5, 0.5, 0.5) │ (0.485, 0.456, 0.406)" in text
    assert "re-normalises the teacher's input in-graph" in text
    code, out, _ = run(capsys, "explain", "recipes/deit_tiny_vitkd_kd.vkd", "--json")
    plan = json.loads(out)
    assert plan["teacher"]["mean"] == plan["student"]["mean"] == [0.485, 0.456, 0.406]
    code, out, _ = run(capsys, "explain", "recipes/deit_tiny_vitkd_kd.vkd")
    assert "re-normalises" not in out  # the paper's pairs share ImageNet's statistics


def test_explain_overrides_follow_hydras_rules_and_show_argument_origins(capsys) -> None:
    recipe = str(RECIPES / "deit_tiny_vitkd_kd.vkd")
    code, out, err = run(capsys, "explain", recipe, "--set", "distill.kd.temperature=4")
    assert code == 2 and "loss =" not in out
    assert "--set:1:1: error: no distill term named 'kd'" in err
    assert "+distill.kd.temperature=... adds a kd term" in err
    code, out, err = run(capsys, "explain", recipe, "--set", "+distill.kd.temperature=4")
    assert code == 0 and "loss = mimic + generate + nkd + kd + labels" in out
    code, out, err = run(capsys, "explain", recipe, "--set", "~distill.nkd")
    assert code == 0 and "loss = mimic + generate + labels" in out
    code, _, err = run(
        capsys, "explain", recipe, "--set", "data.workers=1", "--set", "data.workers=2"
    )
    assert code == 2
    assert "data.workers is given twice: --set data.workers=1 and --set data.workers=2" in err
    code, out, err = run(
        capsys, "explain", recipe, "--json", "--set", "train.optimizer=sgd(lr=0.1)"
    )
    assert code == 0, err
    optimizer = json.loads(out)["optimizer"]
    assert (optimizer["name"], optimizer["weight_decay"]) == ("sgd", 0.0)
    assert optimizer["origins"] == {"lr": "--set", "weight_decay": "default"}


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("tpu", "unknown device 'tpu'; expected one of cpu, cuda, cuda:N, mps"),
        ("cuda", "no CUDA device here"),
    ],
)
def test_run_with_an_unusable_device_is_a_clean_error_before_any_run_folder(
    tmp_path, capsys, monkeypatch, device, message
) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a CPU-only machine
    out = tmp_path / "runs"
    code, _, err = run(
        capsys, "run", str(RECIPES / "quickstart.vkd"), "--device", device, "--out", str(out)
    )
    assert code == 2
    assert message in err and "internal error" not in err
    assert not out.exists()
