"""Stage 4: the resolved plan carries the paper's shapes, indices and coefficients."""

from __future__ import annotations

import json

import pytest

import vitkdl
from tests.conftest import RECIPES
from vitkdl.terms.nkd import NKDOptions


def test_deit_base_plan_matches_the_paper_setting() -> None:
    plan = vitkdl.plan(vitkdl.load(RECIPES / "deit_base_vitkd_kd.vkd"))
    s, t = plan.student, plan.teacher
    assert (s.width, s.depth, s.heads, s.tokens, s.grid) == (768, 12, 12, 196, (14, 14))
    assert (t.width, t.depth, t.heads, t.tokens, t.grid) == (1024, 24, 16, 196, (14, 14))
    assert t.params == 304_374_760 and not t.trainable and s.trainable
    mimic, generate, nkd, labels = plan.terms
    assert [p.key for p in mimic.student] == ["blocks.0", "blocks.1"]
    assert [p.key for p in mimic.teacher] == ["blocks.0", "blocks.1"]
    assert mimic.student_shape == [196, 768] and mimic.teacher_shape == [196, 1024]
    assert [a.params for a in mimic.adapters] == [768 * 1024 + 1024] * 2
    # per-element coefficient: 3e-5 x (2 layers x 196 tokens x 1024 channels)
    assert abs(mimic.coefficient - 3e-5 * 2 * 196 * 1024) < 1e-9
    assert [p.key for p in generate.student] == [p.key for p in generate.teacher] == ["norm"]
    generator = next(a for a in generate.adapters if a.name == "generator")
    assert generator.params == 2 * (9 * 1024 * 1024 + 1024)  # 18.9 M
    assert generate.options.masked_tokens == 98
    assert abs(generate.coefficient - 3e-6 * 98 * 1024 / 0.5) < 1e-9
    assert nkd.options.model_dump() == {"temperature": 1.0, "gamma": 1.0}
    assert labels.options.model_dump() == {"smoothing": 0.1}
    # each entry carries what its kind's module is built from: both widths, typed options
    assert [(e.student_width, e.teacher_width) for e in plan.terms] == [(768, 1024)] * 4
    assert isinstance(nkd.options, NKDOptions) and nkd.options.temperature == 1.0
    assert plan.data.global_batch == 128 and plan.optimizer.lr == 1e-3
    assert plan.schedule.warmup_epochs == 20 and plan.ema == 0.99996 and plan.clip_grad == 5.0
    assert plan.cost.total == (
        plan.cost.teacher_forward
        + plan.cost.student_forward_backward
        + plan.cost.adapters_forward_backward
    )
    assert plan.cost.student_forward_backward == 3 * s.forward_flops
    # The plan is data: adapters as numbers (forward FLOPs per image), no prose.
    assert generator.module == "conv3x3_pair" and generator.flops == 2 * 2 * 9 * 1024**2 * 196
    assert all(a.module == "linear" and a.dims == (768, 1024) for a in mimic.adapters)
    assert mimic.adapter_flops == 3 * 2 * 2 * 768 * 1024 * 196
    assert plan.optimizer.no_weight_decay[:3] == ("pos_embed", "cls_token", "dist_token")
    assert plan.teacher_used


def test_deit_tiny_coefficient_is_the_facts_4_5x() -> None:
    plan = vitkdl.plan(vitkdl.load(RECIPES / "deit_tiny_vitkd.vkd"))
    assert round(plan.terms[0].coefficient, 2) == 4.52  # 3e-5 x 2 x 196 x 384


def test_plan_is_json_with_plain_numbers() -> None:
    plan = vitkdl.plan(vitkdl.load(RECIPES / "quickstart.vkd"))
    data = json.loads(plan.model_dump_json())
    assert data["student"]["width"] == 16 and data["teacher"]["width"] == 128
    assert data["student"]["grid"] == [4, 4] and data["student"]["tokens"] == 16
    assert data["teacher"]["from_recipe"].endswith("quickstart_teacher.vkd")
    assert data["data"]["train_images"] == 1437 and data["data"]["num_classes"] == 10


def test_world_size_scales_the_global_batch() -> None:
    spec = vitkdl.load(RECIPES / "deit_small_vitkd_kd.vkd")
    assert vitkdl.plan(spec, world_size=8).data.global_batch == 1024


def test_plan_records_share_one_frozen_base() -> None:
    """The planner's records and the kinds' plan data derive from one definition."""
    from pydantic import ValidationError

    from vitkdl.plain import Plain
    from vitkdl.planner import DataPlan, Plan, TapPoint, TermPlan

    for record in (Plan, DataPlan, TapPoint, TermPlan):
        assert issubclass(record, Plain), record
    tap = TapPoint(block=1, point="mlp")
    with pytest.raises(ValidationError):
        tap.block = 2  # frozen
    with pytest.raises(ValidationError):
        TapPoint(point="mlp", where="nowhere")  # extra fields rejected


def test_counts_in_words() -> None:
    from vitkdl.counts import count_words

    assert [count_words(x) for x in (999, 1_000, 18_900_000, 123.1e9, -2_500)] == [
        "999",
        "1.0K",
        "18.9M",
        "123.1G",
        "-2.5K",
    ]


def test_the_data_plan_is_the_loaders_config() -> None:
    """The student's normalisation, interpolation and crop and the run's seed are resolved
    once, into the plan's data block, and the loader's transforms are built from it."""
    from vitkdl.train.data import build_transforms

    plan = vitkdl.plan(vitkdl.load(RECIPES / "deit_tiny_vitkd.vkd", ["train.seed=3"]))
    d, s = plan.data, plan.student
    assert (d.mean, d.std, d.interpolation, d.crop_pct) == (
        s.mean,
        s.std,
        s.interpolation,
        s.crop_pct,
    )
    assert d.seed == plan.seed == 3
    _, eval_tf = build_transforms(d)
    resize, crop, _, norm = eval_tf.transforms
    assert resize.interpolation.value == d.interpolation
    assert resize.size == int(d.image_size / d.crop_pct) and crop.size == (224, 224)
    assert norm.mean.tolist() == pytest.approx(d.mean) and norm.std.tolist() == pytest.approx(d.std)


def test_the_quickstart_loaders_come_from_the_plan() -> None:
    """``build_loaders(plan.data)``: the digits, normalised with the student's statistics."""
    from vitkdl.train.data import build_loaders

    plan = vitkdl.plan(vitkdl.load(RECIPES / "quickstart.vkd"))
    train, val, classes = build_loaders(plan.data)
    assert classes == plan.data.num_classes and len(val.dataset) == plan.data.val_images
    assert len(train) == plan.data.train_images // plan.data.batch_size  # drop_last
    x, _ = next(iter(val))
    assert x.shape == (plan.data.batch_size, plan.data.in_chans, 8, 8)
    pixels = x * plan.data.std[0] + plan.data.mean[0]  # the digits' [0, 1] strokes again
    assert pixels.min().item() == pytest.approx(0.0) and pixels.max().item() <= 1.0 + 1e-6


def test_a_data_field_reaches_the_plan_under_its_own_name() -> None:
    """A field the plan takes as written needs no copying code: each such field set in the
    recipe is the plan's."""
    from vitkdl.planner import DataPlan
    from vitkdl.spec import DataSpec

    written = {
        "root": "/data",
        "augment": "basic",
        "mixup": 0.2,
        "cutmix": 0.3,
        "smoothing": 0.1,
        "name": "someone/set",
        "split": "a",
        "val_split": "b",
        "val_root": "c",
        "image_key": "d",
        "label_key": "e",
        "batch_size": 16,
    }
    sets = [f"data.{k}={v}" for k, v in written.items()]
    plan = vitkdl.plan(vitkdl.load(RECIPES / "quickstart.vkd", sets))
    assert {k: getattr(plan.data, k) for k in written} == written
    shared = set(DataPlan.model_fields) & set(DataSpec.model_fields)
    # All of them; the seed is resolved (data.seed, else train.seed).
    assert set(written) | {"source", "image_size", "workers", "seed"} == shared
    seeded = vitkdl.plan(vitkdl.load(RECIPES / "quickstart.vkd", ["data.seed=7"]))
    assert (seeded.data.seed, seeded.seed) == (7, plan.seed)


def test_a_model_field_is_declared_once_with_its_timm_name() -> None:
    """MODEL_FIELDS and the create_model arguments both come from the fields' declaration:
    each declared field, written, reaches timm under its declared name."""
    from pydantic import ValidationError

    from vitkdl.spec import MODEL_FIELDS, ModelField, ModelSpec

    declared = {
        name: marker
        for name, info in ModelSpec.model_fields.items()
        for marker in info.metadata
        if isinstance(marker, ModelField)
    }
    assert tuple(declared) == MODEL_FIELDS
    for name, marker in declared.items():
        if marker.timm is None:
            continue
        for value in (2, 0.5):  # a count, else a rate
            try:
                model = ModelSpec(role="student", model="m", **{name: value})
            except ValidationError:
                continue
            assert model.timm_kwargs() == {marker.timm: value}, name
            break
        else:
            raise AssertionError(f"no sample value for {name}")
    assert "weights" in MODEL_FIELDS and "weights" not in ModelSpec(
        role="student", model="m", weights="w.pt"
    ).timm_kwargs(10)


def test_every_model_plan_has_its_input_size_resolved() -> None:
    """The planner resolves each model's input resolution once; the plan has no sentinel."""
    from vitkdl.planner import ModelPlan

    assert ModelPlan.model_fields["input_size"].is_required()
    plan = vitkdl.plan(vitkdl.load(RECIPES / "quickstart.vkd"))
    assert plan.teacher is not None
    for m in (plan.student, plan.teacher):
        assert m.input_size == (m.img_size, m.img_size) == (8, 8)
