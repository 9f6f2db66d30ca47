"""Weights by name through the Hugging Face hub cache: a faked cache entry, nothing downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import vitkdl
from vitkdl import hub
from vitkdl.cli import main

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty hub cache of our own, offline: nothing here may reach the network."""
    root = tmp_path / "hub"
    root.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return root


def fake_entry(root: Path, repo: str, state: dict[str, torch.Tensor]) -> Path:
    """What ``hf_hub_download`` leaves in the cache: refs/main -> snapshots/COMMIT/FILE."""
    folder = root / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(COMMIT)
    snapshot = folder / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / "model.safetensors"))
    return snapshot / "model.safetensors"


def test_names_and_files() -> None:
    assert hub.weight_files(None) == ("model.safetensors", "pytorch_model.bin")
    assert hub.weight_files("open_clip_pytorch_model.bin") == (
        "open_clip_model.safetensors",
        "open_clip_pytorch_model.bin",
    )
    assert hub.split_repo("hf-hub:org/name@v2") == ("org/name", "v2")
    assert hub.is_hub_name("hf-hub:timm/x") and not hub.is_hub_name("x.safetensors")


RECIPE = """
teacher test_resnet {{ pretrained = true  img_size = 32  num_classes = 1000 }}
student test_vit {{ {student} num_classes = 1000 }}
data synthetic {{ image_size = 160  batch_size = 2  size = 4 }}
distill {{ kd {{ }} }}
train {{ epochs = 1 }}
"""


def test_pretrained_offline_and_not_cached_is_one_clean_error(
    cache: Path, tmp_path: Path, capsys
) -> None:
    path = tmp_path / "r.vkd"
    path.write_text(RECIPE.format(student=""))
    assert main(["validate", str(path)]) == 0  # a warning until run
    assert "HF_HUB_OFFLINE is set" in capsys.readouterr().err
    assert main(["run", str(path), "--out", str(tmp_path / "runs"), "--quiet"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "timm/test_resnet.r160_in1k is not in the Hugging Face hub cache" in err
    assert str(cache) in err and 'weights = "' in err and "Traceback" not in err
    # the step that reads the cache says the same when it is reached (e.g. from Python)
    plan = vitkdl.plan(vitkdl.load(path))
    with pytest.raises(vitkdl.VkdError, match=r"teacher's pretrained tag test_resnet\.r160_in1k"):
        vitkdl.build(plan, "cpu")


def test_pretrained_and_hf_hub_weights_load_from_the_cache(cache: Path, tmp_path: Path) -> None:
    teacher = timm.create_model("test_resnet")
    with torch.no_grad():
        teacher.fc.bias.zero_()
        teacher.fc.bias[3] = 7.0
    fake_entry(cache, "timm/test_resnet.r160_in1k", teacher.state_dict())
    student = timm.create_model("test_vit")
    fake_entry(cache, "someone/my_vit", student.state_dict())
    path = tmp_path / "r.vkd"
    path.write_text(RECIPE.format(student='weights = "hf-hub:someone/my_vit"'))
    spec, diags, _ = vitkdl.validate(path, strict=True)
    assert not [d for d in diags if d.is_error]
    plan = vitkdl.plan(spec)
    assert plan.teacher.pretrained and plan.teacher.hf_hub_id == "timm/test_resnet.r160_in1k"
    program = vitkdl.build(plan, "cpu")
    assert program.teacher.fc.bias[3] == 7.0  # the cached tag, through timm's own loader
    for a, b in zip(program.student.parameters(), student.parameters(), strict=True):
        assert torch.equal(a, b)
    # both at once is one error at `pretrained`
    path.write_text(RECIPE.format(student='pretrained = true  weights = "x.safetensors"'))
    _, diags, _ = vitkdl.validate(path)
    assert any("both pretrained = true and weights" in d.message for d in diags)
