"""Stage 4: the resolved plan carries the paper's shapes, indices and coefficients."""

from __future__ import annotations

import json

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
