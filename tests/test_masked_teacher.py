"""Fewer tokens for logit-only ViT teachers (issue 20, item 4; MaskedKD, Son et al. 2024):
``teacher { keep = 0.5 }`` feeds the teacher only the patch tokens that the student's class
token attends to most in its last block, each with its own position embedding.

Eager on CPU, tiny models (a 4x4 patch grid); the one-graph check traces with dynamo only.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch._dynamo
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

import vitkdl
import vitkdl.program as program_module
from tests.test_program import batch, explain, one_graph, tiny_model, tiny_recipe, write
from vitkdl.program import (
    Program,
    attention_with_cls_row,
    attention_with_map,
    create_model,
    keep_indices,
    masked_pass,
    single_logits,
    tap_pass,
)

STUDENT = tiny_model("deit_tiny_patch16_224", width=32)


def teacher(extra: str = "keep = 0.5", name: str = "deit_tiny_patch16_224") -> str:
    return tiny_model(name, width=48, extra=extra)


@pytest.fixture(autouse=True)
def _fresh() -> None:
    torch.manual_seed(0)
    torch._dynamo.reset()


def recipe(tmp_path: Path, t: str, distill: str = "kd { }", student: str = STUDENT) -> Path:
    return write(tmp_path, "masked", tiny_recipe(t, student, distill))


def program_of(path: Path) -> Program:
    return vitkdl.build(vitkdl.plan(vitkdl.load(path)), device="cpu", load=False)


def errors(path: Path, overrides: list[str] | None = None) -> list:
    _, diags, _ = vitkdl.validate(path, overrides)
    return [d for d in diags if d.is_error]


# --------------------------------------------------------------------------------------------
# The plan


def test_the_plan_keeps_round_keep_n_patches_and_counts_their_flops(tmp_path: Path) -> None:
    plan = vitkdl.plan(vitkdl.load(recipe(tmp_path, teacher("keep = 0.3"))))
    t = plan.teacher
    assert t is not None and t.keep == 0.3 and t.tokens == 16
    assert plan.teacher_keep == 5  # round(0.3 * 16)
    # The teacher's FLOPs are what FlopCounterMode counts for the masked pass on the meta
    # device, where the model facts' FLOPs are counted.
    with torch.device("meta"), torch.no_grad():
        model = create_model(t, "meta").eval()
        x = torch.empty(1, t.in_chans, t.img_size, t.img_size)
        keep = torch.zeros(1, 5, dtype=torch.long)
        with FlopCounterMode(display=False) as counter:
            masked_pass(model, x, keep, t.prefix_tokens)
    assert plan.cost.teacher_forward == counter.get_total_flops()
    assert plan.cost.teacher_forward < t.forward_flops
    # keep = 1: every patch, the plain teacher (and its full cost).
    full = vitkdl.plan(vitkdl.load(recipe(tmp_path, teacher("keep = 1.0"))))
    assert full.teacher_keep is None and full.cost.teacher_forward == t.forward_flops


# --------------------------------------------------------------------------------------------
# The step


def _teacher_tokens(program: Program) -> list[Tensor]:
    """The token sequences the teacher's first block receives (a pre-hook; eager)."""
    assert program.teacher is not None
    seen: list[Tensor] = []
    program.teacher.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    return seen


def test_exactly_k_tokens_chosen_by_the_students_attention(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hand-made class-token attention ranks known patches highest, differently per image:
    the teacher's blocks see exactly those patches (with their own position embeddings)
    behind its class token, and nothing else."""
    program = program_of(recipe(tmp_path, teacher()))
    program.train()
    images, targets = batch(program, b=3)
    chosen = torch.tensor(
        [[0, 5, 10, 15, 3, 6, 9, 12], [1, 2, 3, 4, 5, 6, 7, 8], [15] * 1 + list(range(7))]
    )
    scores = torch.zeros(3, 16)
    for i, row in enumerate(chosen):
        scores[i, row] = torch.linspace(2.0, 1.0, len(row))  # the rest stay at 0

    def handmade(attn: torch.nn.Module, x: Tensor, prefix: int) -> tuple[Tensor, Tensor]:
        out, real = attention_with_cls_row(attn, x, prefix)
        assert real.shape == scores.shape and not real.requires_grad
        return out, scores

    monkeypatch.setattr(program_module, "attention_with_cls_row", handmade)
    seen = _teacher_tokens(program)
    program.forward(images, targets)
    (tokens,) = seen
    assert tokens.shape == (3, 1 + 8, 48)  # the class token and k = 8 of 16 patches
    assert program.teacher is not None
    with torch.no_grad():
        every = program.teacher._pos_embed(program.teacher.patch_embed(images))
    for i, row in enumerate(chosen):
        torch.testing.assert_close(tokens[i, 0], every[i, 0])  # the class token, first
        torch.testing.assert_close(tokens[i, 1:], every[i, 1 + row])  # in rank order


def test_the_class_token_row_is_the_attention_maps_row_and_the_output_unchanged() -> None:
    """The scores are the class token's attention to the patches, mean over heads, the same
    numbers the explicit attention map holds; the block's output is the fused one."""
    model = create_model(vitkdl.plan(vitkdl.load(_quick())).student).eval()
    block = model.blocks[-1]
    x = torch.randn(2, 17, model.embed_dim)
    out, scores = attention_with_cls_row(block.attn, block.norm1(x), 1)
    ref_out, probs = attention_with_map(block.attn, block.norm1(x))
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(out, block.attn(block.norm1(x)))
    torch.testing.assert_close(scores, probs[:, :, 0, 1:].mean(dim=1))
    assert keep_indices(scores, 4).shape == (2, 4)


def _quick() -> Path:
    from tests.conftest import RECIPES

    return RECIPES / "quickstart.vkd"


def test_keep_one_is_the_full_teacher_and_all_patches_give_its_logits(tmp_path: Path) -> None:
    program = program_of(recipe(tmp_path, teacher("keep = 1.0")))
    assert program.plan.teacher_keep is None and program.core.masked_teacher is None
    images, _ = batch(program, b=4)
    assert program.teacher is not None
    with torch.no_grad():
        full, _ = tap_pass(program.teacher, images, [], 1)
        # every patch, in the order an attention would rank them: the same logits
        order = torch.stack([torch.randperm(16) for _ in range(4)])
        masked = single_logits(masked_pass(program.teacher, images, order, 1))
    torch.testing.assert_close(masked, full, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_one_graph_no_gradient_through_the_choice_or_the_teacher(tmp_path: Path) -> None:
    program = program_of(recipe(tmp_path, teacher(), "kd { }\n nkd { }"))
    program.train()
    images, targets = batch(program, b=4)
    assert explain(program, images, targets) == (1, 0)
    out = one_graph(program, images, targets)
    assert torch.isfinite(out["loss"])
    seen = _teacher_tokens(program)
    program.forward(images, targets)["loss"].backward()
    assert seen[0].shape[1] == 1 + 8 and not seen[0].requires_grad
    assert all(p.grad is None for p in program.teacher.parameters())
    assert any(p.grad is not None for p in program.student.parameters())


def test_a_distilled_teacher_keeps_both_prefix_tokens(tmp_path: Path) -> None:
    t = tiny_model("deit_tiny_distilled_patch16_224", width=48, extra="keep = 0.25")
    program = program_of(recipe(tmp_path, t))
    program.train()
    seen = _teacher_tokens(program)
    out = program.forward(*batch(program, b=2))
    assert seen[0].shape[1] == 2 + 4 and torch.isfinite(out["loss"])


# --------------------------------------------------------------------------------------------
# Positioned errors


def test_feature_terms_are_refused_at_the_term(tmp_path: Path) -> None:
    path = recipe(tmp_path, teacher(), "kd { }\n mimic student.blocks[0] -> teacher.blocks[0] { }")
    (err,) = errors(path)
    assert "reads the teacher's features" in err.message and "mimic" in err.message
    assert err.span is not None and err.span.line == 7  # the mimic term
    assert "kd" in (err.expected or "")


@pytest.mark.parametrize("value", ["0", "-0.5", "1.5"])
def test_keep_outside_zero_one_is_refused_at_the_field(tmp_path: Path, value: str) -> None:
    (err,) = errors(recipe(tmp_path, teacher(f"keep = {value}")))
    assert err.message.startswith("keep must be")
    assert err.span is not None and err.span.line == 2  # the teacher block's line


def test_keep_with_a_teacher_cache_is_refused_at_keep(tmp_path: Path) -> None:
    # A cached teacher never runs, so a mask would silently mean nothing.
    (err,) = errors(recipe(tmp_path, teacher('keep = 0.5  cache = "c"  topk = all')))
    assert "cached teacher never runs" in err.message
    assert err.span is not None and err.span.line == 2 and err.span.column > 1


def test_a_cnn_teacher_is_refused(tmp_path: Path) -> None:
    t = "test_resnet { img_size = 32  num_classes = 10  keep = 0.5 }"
    errs = errors(recipe(tmp_path, t))
    assert any(
        "has no ViT blocks" in e.message or "keep feeds the teacher" in e.message for e in errs
    )
    (err,) = [e for e in errs if "keep" in e.message]
    assert err.span is not None and err.span.line == 2


def test_keep_on_the_student_and_other_grids_are_refused(tmp_path: Path) -> None:
    student = tiny_model("deit_tiny_patch16_224", width=32, extra="keep = 0.5")
    (err,) = errors(
        recipe(tmp_path, tiny_model("deit_tiny_patch16_224", width=48), student=student)
    )
    assert "the student always sees the whole image" in err.message
    assert err.span is not None and err.span.line == 3
    other = tiny_model("deit_tiny_patch16_224", width=48, extra="keep = 0.5").replace(
        "patch_size = 8", "patch_size = 4"
    )
    (err,) = errors(recipe(tmp_path, other))
    assert "patch grids differ (student 4x4, teacher 8x8)" in err.message


def test_explain_shows_keep_the_tokens_and_the_flops_saved(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from vitkdl.cli import main

    path = recipe(tmp_path, teacher())
    assert main(["explain", str(path)]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "teacher tokens: 8 of 16 patches plus its class token (keep = 0.5, MaskedKD" in text
    assert "of a full teacher forward saved" in text
    assert main(["explain", str(path), "--set", "teacher.keep=1"]) == 0
    assert "all 16 patches" in " ".join(capsys.readouterr().out.split())


DDP_MASKED = """
import json, os, sys, torch, torch.distributed as dist
import vitkdl
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
dist.init_process_group("gloo", rank=0, world_size=1)
plan = vitkdl.plan(vitkdl.load(sys.argv[2]))
losses = {}
for name in ("plain", "ddp"):
    torch.manual_seed(0)
    p = vitkdl.build(plan, "cpu", load=False, compile=sys.argv[3])
    if name == "ddp":
        p.distribute(None)
    p.train()
    torch.manual_seed(1)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    out = p.step(x, y)
    out["loss"].backward()
    losses[name] = [float(out["loss"].detach()), float(out["kd"])]
print(json.dumps(losses))
dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["off", "default"])
def test_under_ddp_the_masked_teacher_runs_inside_the_student_side(
    tmp_path: Path, mode: str
) -> None:
    """Under DDP (one gloo process, eager and compiled) the masked teacher runs in the
    wrapped student side's pass: the same losses as the plain step."""
    import json
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    script = tmp_path / "ddp_masked.py"
    script.write_text(DDP_MASKED)
    path = recipe(tmp_path, teacher())
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    port = "29573" if mode == "off" else "29574"
    proc = subprocess.run(
        [sys.executable, str(script), port, str(path), mode],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = json.loads(proc.stdout.strip().splitlines()[-1])
    assert losses["plain"] == pytest.approx(losses["ddp"], rel=1e-5)
