"""Tests for vitkdl.models: timm ViT facts resolved on the meta device, cached on disk."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from vitkdl import models
from vitkdl.models import (
    ModelError,
    ModelFacts,
    cache_path,
    clear_cache,
    model_facts,
    model_names,
    suggest_models,
)

REPO = Path(__file__).resolve().parents[1]

TINY = "vit_tiny_patch16_224"
TINY_KWARGS = {
    "img_size": 8,
    "patch_size": 2,
    "in_chans": 1,
    "depth": 2,
    "embed_dim": 32,
    "num_heads": 2,
    "num_classes": 10,
    "drop_path_rate": 0.1,
}


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Every test gets an empty cache directory and an empty in-memory cache."""
    directory = tmp_path / "cache"
    monkeypatch.setenv("VITKDL_CACHE_DIR", str(directory))
    clear_cache(memory_only=True)
    yield directory
    clear_cache(memory_only=True)


def _entries() -> dict[str, dict]:
    return json.loads(cache_path().read_text())["entries"]


# ---------------------------------------------------------------------------------------------
# Facts
# ---------------------------------------------------------------------------------------------


def test_deit3_large() -> None:
    f = model_facts("deit3_large_patch16_224")
    assert f.name == f.arch == "deit3_large_patch16_224"
    assert f.tag is None
    assert f.family == "VisionTransformer"
    assert (f.embed_dim, f.depth, f.num_heads) == (1024, 24, 16)
    assert f.num_prefix_tokens == 1
    assert f.grid == (14, 14)
    assert f.num_patches == 196
    assert f.img_size == (224, 224)
    assert f.patch_size == (16, 16)
    assert f.in_chans == 3
    assert f.num_classes == 1000
    assert f.params == 304_374_760
    assert f.head_params == 1024 * 1000 + 1000
    assert f.flops == pytest.approx(123.1e9, rel=0.01)
    assert f.mean == pytest.approx((0.485, 0.456, 0.406))
    assert f.std == pytest.approx((0.229, 0.224, 0.225))
    assert f.interpolation == "bicubic"


def test_tagged_name_uses_that_pretrained_cfg() -> None:
    f = model_facts("deit3_large_patch16_224.fb_in22k_ft_in1k")
    assert f.name == "deit3_large_patch16_224.fb_in22k_ft_in1k"
    assert f.arch == "deit3_large_patch16_224"
    assert f.tag == "fb_in22k_ft_in1k"
    assert f.crop_pct == 1.0  # the untagged default (fb_in1k) has 0.9
    assert model_facts("deit3_large_patch16_224").crop_pct == 0.9


def test_deit_base() -> None:
    f = model_facts("deit_base_patch16_224")
    assert (f.embed_dim, f.depth, f.num_heads, f.num_prefix_tokens) == (768, 12, 12, 1)
    assert f.grid == (14, 14)


def test_distilled_deit_has_two_prefix_tokens_and_two_heads() -> None:
    f = model_facts("deit_base_distilled_patch16_224")
    assert f.family == "VisionTransformerDistilled"
    assert f.num_prefix_tokens == 2
    assert f.head_params == 2 * (768 * 1000 + 1000)


def test_no_class_token_variant() -> None:
    f = model_facts("vit_base_patch16_224", {"class_token": False, "global_pool": "avg"})
    assert f.num_prefix_tokens == 0
    assert f.num_patches == 196
    # deit3 models keep a class token
    assert model_facts("deit3_small_patch16_224").num_prefix_tokens == 1


def test_tiny_override() -> None:
    f = model_facts(TINY, TINY_KWARGS)
    assert f.grid == (4, 4)
    assert f.num_patches == 16
    assert f.img_size == (8, 8)
    assert f.patch_size == (2, 2)
    assert f.in_chans == 1
    assert (f.embed_dim, f.depth, f.num_heads, f.num_classes) == (32, 2, 2, 10)
    assert f.head_params == 32 * 10 + 10
    assert 0 < f.head_params < f.params < 100_000
    assert f.flops > 0


def test_pretrained_flag_is_ignored() -> None:
    plain = model_facts(TINY, TINY_KWARGS)
    assert model_facts(TINY, {**TINY_KWARGS, "pretrained": True}) == plain


def test_facts_are_frozen() -> None:
    f = model_facts(TINY, TINY_KWARGS)
    with pytest.raises(ValidationError):
        f.depth = 3  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_unknown_model_suggests() -> None:
    with pytest.raises(ModelError) as info:
        model_facts("deit_tiny_patch16_22")
    err = info.value
    assert err.reason == "unknown_model"
    assert err.message == "unknown timm model 'deit_tiny_patch16_22'"
    assert err.suggestions[0] == "deit_tiny_patch16_224"
    assert len(err.suggestions) <= 3
    assert suggest_models("deit_tiny_patch16_22")[0] == "deit_tiny_patch16_224"
    assert suggest_models("completely-unrelated-zzz") == []


def test_unknown_tag() -> None:
    with pytest.raises(ModelError) as info:
        model_facts("deit3_large_patch16_224.fb_in22k")
    err = info.value
    assert err.reason == "unknown_tag"
    assert "fb_in22k" in err.message
    assert err.suggestions
    assert set(err.suggestions) <= {
        "deit3_large_patch16_224.fb_in1k",
        "deit3_large_patch16_224.fb_in22k_ft_in1k",
    }


def test_bad_argument() -> None:
    with pytest.raises(ModelError) as info:
        model_facts(TINY, {**TINY_KWARGS, "foo": 1})
    err = info.value
    assert err.reason == "bad_argument"
    assert err.argument == "foo"
    assert "foo" in err.message
    assert {"img_size", "patch_size", "depth", "embed_dim", "num_heads"} <= set(err.expected)
    assert "self" not in err.expected

    with pytest.raises(ModelError) as info:
        model_facts(TINY, {"dept": 2})
    assert info.value.argument == "dept"
    assert info.value.suggestions[0] == "depth"


def test_a_classifier_without_vit_blocks_has_facts_for_logit_terms() -> None:
    facts = model_facts("resnet18", {"num_classes": 10})
    assert not facts.vit and facts.not_vit and "blocks" in facts.not_vit
    assert (facts.family, facts.embed_dim, facts.depth, facts.grid) == ("ResNet", 512, 0, (0, 0))
    assert (facts.img_size, facts.in_chans, facts.num_classes) == ((224, 224), 3, 10)
    assert facts.crop_pct == 0.95 and facts.flops > 3e9  # its own pretrained config
    assert (facts.pretrained_tag, facts.hf_hub_id) == ("a1_in1k", "timm/resnet18.a1_in1k")
    # a CNN takes no img_size: it is the resolution the model is fed, not a timm argument
    small = model_facts("resnet18", {"num_classes": 10, "img_size": 32})
    assert small.img_size == (32, 32) and not small.takes_img_size
    assert small.flops < facts.flops / 40


def test_a_distilled_deit_and_a_dinov2_with_registers() -> None:
    deit = model_facts("deit_tiny_distilled_patch16_224", {"depth": 1})
    assert deit.vit and deit.distilled and deit.num_prefix_tokens == 2
    dino = model_facts("vit_small_patch14_reg4_dinov2", {"img_size": 224, "depth": 1})
    assert dino.vit and not dino.distilled and dino.num_prefix_tokens == 5
    assert dino.grid == (16, 16) and dino.patch_size == (14, 14)


def test_build_failed_is_one_line() -> None:
    with pytest.raises(ModelError) as info:  # a 16x16 patch does not fit in an 8x8 image
        model_facts(TINY, {"img_size": 8, "patch_size": 16, "depth": 1})
    err = info.value
    assert err.reason == "build_failed"
    assert err.message.startswith("RuntimeError: ")
    assert "\n" not in err.message


def test_hub_names_are_rejected_without_network() -> None:
    with pytest.raises(ModelError) as info:
        model_facts("hf-hub:timm/vit_tiny_patch16_224.augreg_in21k")
    assert info.value.reason == "unknown_model"


def test_model_error_pickles() -> None:
    err = ModelError("bad_argument", "m", suggestions=["a"], argument="x", expected=["a", "b"])
    again = pickle.loads(pickle.dumps(err))
    assert again == err
    assert (again.reason, again.argument, again.expected) == ("bad_argument", "x", ["a", "b"])


# ---------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------


def test_cache_path_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert cache_path().parent == tmp_path / "cache"
    assert cache_path().name.startswith("models-timm")
    assert "-torch" in cache_path().name
    assert cache_path().suffix == ".json"
    monkeypatch.delenv("VITKDL_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_path().parent == tmp_path / "xdg" / "vitkdl"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_path().parent == Path.home() / ".cache" / "vitkdl"


def test_results_and_errors_are_cached_with_canonical_keys() -> None:
    facts = model_facts(TINY, TINY_KWARGS)
    with pytest.raises(ModelError) as first:
        model_facts("deit_tiny_patch16_22")
    entries = _entries()
    assert len(entries) == 2
    data = json.loads(cache_path().read_text())
    assert TINY in data["index"]["names"]

    clear_cache(memory_only=True)  # reload from disk
    assert model_facts(TINY, dict(reversed(list(TINY_KWARGS.items())))) == facts
    with pytest.raises(ModelError) as second:
        model_facts("deit_tiny_patch16_22")
    assert second.value == first.value
    assert len(_entries()) == 2
    assert "deit_tiny_patch16_224" in model_names()


def test_saves_merge_with_other_writers() -> None:
    model_facts(TINY, {**TINY_KWARGS, "depth": 1})
    stale = models._CACHES[cache_path()]
    clear_cache(memory_only=True)
    model_facts(TINY, {**TINY_KWARGS, "depth": 3})  # "another process" adds an entry
    models._CACHES[cache_path()] = stale
    model_facts(TINY, {**TINY_KWARGS, "depth": 4})
    depths = sorted(json.loads(k.split(" ", 1)[1])["depth"] for k in _entries())
    assert depths == [1, 3, 4]


def test_corrupt_cache_file_is_ignored() -> None:
    path = cache_path()
    path.parent.mkdir(parents=True)
    path.write_text('{"format": 1, "entries": {"trunc')
    f = model_facts(TINY, TINY_KWARGS)
    assert f.grid == (4, 4)
    assert len(_entries()) == 1  # rewritten as valid JSON

    clear_cache(memory_only=True)
    path.write_bytes(b"\xff\xfe not json")
    assert model_facts(TINY, TINY_KWARGS) == f

    clear_cache(memory_only=True)
    key = f"{TINY} " + json.dumps(TINY_KWARGS, sort_keys=True, separators=(",", ":"))
    data = json.loads(path.read_text())
    data["entries"][key] = {"facts": {"name": "garbage"}}
    path.write_text(json.dumps(data))
    assert model_facts(TINY, TINY_KWARGS) == f  # an unusable entry is recomputed


def test_unwritable_cache_dir_is_tolerated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("VITKDL_CACHE_DIR", str(blocker / "cache"))
    clear_cache()  # deleting a file that cannot exist is fine too
    assert model_facts(TINY, TINY_KWARGS).num_patches == 16
    assert not cache_path().exists()
    assert list(tmp_path.iterdir()) == [blocker]


def test_clear_cache_deletes_the_file() -> None:
    model_facts(TINY, TINY_KWARGS)
    assert cache_path().exists()
    clear_cache()
    assert not cache_path().exists()
    assert not models._CACHES


def test_warm_cache_needs_no_torch(cache_dir: Path) -> None:
    facts = model_facts(TINY, TINY_KWARGS)
    with pytest.raises(ModelError):
        model_facts(TINY, {**TINY_KWARGS, "foo": 1})
    script = textwrap.dedent(
        f"""
        import json, sys
        from vitkdl.models import ModelError, model_facts, suggest_models
        facts = model_facts({TINY!r}, {TINY_KWARGS!r})
        reasons = []
        for name, kwargs in [
            ({TINY!r}, {{**{TINY_KWARGS!r}, "foo": 1}}),  # cached error
            ("deit_tiny_patch16_22", None),  # not cached: answered from the name index
            ("deit3_large_patch16_224.nope", None),  # not cached: answered from the tag index
        ]:
            try:
                model_facts(name, kwargs)
            except ModelError as err:
                reasons.append(err.reason)
        print(json.dumps({{
            "facts": facts.model_dump(mode="json"),
            "reasons": reasons,
            "suggest": suggest_models("deit_tiny_patch16_22"),
            "torch": "torch" in sys.modules,
            "timm": "timm" in sys.modules,
        }}))
        """
    )
    env = {**os.environ, "VITKDL_CACHE_DIR": str(cache_dir)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert ModelFacts.model_validate(out["facts"]) == facts
    assert out["reasons"] == ["bad_argument", "unknown_model", "unknown_tag"]
    assert out["suggest"][0] == "deit_tiny_patch16_224"
    assert out["torch"] is False
    assert out["timm"] is False


def test_which_norm_is_real_and_where_the_head_is_come_from_the_modules() -> None:
    plain = model_facts("vit_tiny_patch16_224", {"depth": 1})
    assert not plain.norm_identity and not plain.fc_norm and plain.head_key == "head.weight"
    avg = model_facts("vit_tiny_patch16_224", {"depth": 1, "global_pool": "avg"})
    assert avg.norm_identity and avg.fc_norm  # timm normalises after pooling there
    mim = model_facts("eva02_tiny_patch14_224.mim_in22k", {"depth": 1})
    assert mim.head_key is None and mim.pretrained_classes == 0
    assert model_facts("resnet18", {"num_classes": 10}).head_key == "fc.weight"
