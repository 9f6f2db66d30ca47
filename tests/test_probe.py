"""``vitkdl explain --probe`` (issue 20, item 5): each term's value, its share of the loss and
of the student's gradient, and the teacher's top-1, on real batches before training.

The probe's numbers are checked against a hand computation on a fixed batch of the quickstart
recipe (random weights, eager): the step's own term values, the label loss's gradient written
out by hand, the total loss's gradient from one backward pass, the teacher's argmax.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import RECIPES
from tests.test_program import build, tiny_model, tiny_recipe, write
from vitkdl.probe import probe_batches, student_parameters


@pytest.fixture(autouse=True)
def _fresh() -> None:
    torch.manual_seed(0)


def _norm(grads: list[torch.Tensor | None]) -> float:
    return math.sqrt(sum(float(g.pow(2).sum()) for g in grads if g is not None))


def test_the_probes_numbers_equal_a_hand_computation() -> None:
    program = build(RECIPES / "quickstart.vkd")  # mimic + generate + nkd + labels
    s = program.plan.student
    images = torch.randn(4, s.in_chans, s.img_size, s.img_size)
    assert program.teacher is not None
    with torch.no_grad():
        guess = program.teacher(images).argmax(dim=-1)
    # Half the labels are the teacher's answer, half are not: its top-1 is 50 %.
    labels = torch.cat([guess[:2], (guess[2:] + 1) % s.num_classes])
    before = {k: v.clone() for k, v in program.state_dict().items()}

    torch.manual_seed(5)
    report = probe_batches(program, [(images, labels)])
    # Nothing moved and no gradient was left behind.
    assert all(torch.equal(v, before[k]) for k, v in program.state_dict().items())
    assert all(p.grad is None for p in program.parameters())

    # Term values: the step's own, bit for bit (the same random generator mask drawn).
    torch.manual_seed(5)
    program.train()
    out = program.step(images, labels)
    names = [t.name for t in program.plan.terms]
    assert [t.name for t in report.terms] == names
    for t in report.terms:
        assert t.value == float(out[t.name]), t.name
    assert report.loss == pytest.approx(float(out["loss"].detach()), rel=1e-6)
    assert sum(t.loss_share for t in report.terms) == pytest.approx(1.0)
    for t in report.terms:
        assert t.loss_share == pytest.approx(t.value / float(out["loss"].detach()), rel=1e-6)

    # The total gradient: one backward pass of the step's loss.
    params = student_parameters(program)
    torch.manual_seed(5)
    total = torch.autograd.grad(program.step(images, labels)["loss"], params, allow_unused=True)
    assert report.grad_norm == pytest.approx(_norm(list(total)), rel=1e-5)
    # The label loss alone, written out by hand (quickstart: no smoothing).
    labels_term = next(t for t in report.terms if t.kind == "labels")
    ce = F.cross_entropy(program.student(images), labels)
    hand = torch.autograd.grad(ce, params, allow_unused=True)
    assert labels_term.grad_norm == pytest.approx(_norm(list(hand)), rel=1e-5)
    dot = sum(float((a * b).sum()) for a, b in zip(hand, total, strict=True) if a is not None)
    assert labels_term.grad_share == pytest.approx(dot / report.grad_norm**2, rel=1e-4)
    # Shares of the gradient: projections on the total, so they sum to one.
    assert sum(t.grad_share for t in report.terms) == pytest.approx(1.0, abs=1e-5)
    assert all(t.grad_norm > 0 for t in report.terms)

    # The teacher's top-1: its argmax against the labels.
    assert report.teacher_correct == 2 and report.teacher_top1 == pytest.approx(50.0)
    assert (report.batches, report.images) == (1, 4)


def test_several_batches_average_and_mixup_leaves_the_teachers_images_alone() -> None:
    program = build(RECIPES / "quickstart.vkd")
    s = program.plan.student
    batches = [
        (torch.randn(4, s.in_chans, s.img_size, s.img_size), torch.randint(0, 10, (4,)))
        for _ in range(2)
    ]
    mixed: list[torch.Tensor] = []

    def mixup(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mixed.append(images)
        soft = F.one_hot(labels, 10).float()
        return 0.5 * (images + images.flip(0)), 0.5 * (soft + soft.flip(0))

    torch.manual_seed(1)
    both = probe_batches(program, batches, mixup)
    torch.manual_seed(1)
    one = [probe_batches(program, [b], mixup) for b in batches]
    assert len(mixed) == 4 and (both.batches, both.images) == (2, 8)
    for i, t in enumerate(both.terms):
        assert t.value == pytest.approx((one[0].terms[i].value + one[1].terms[i].value) / 2)
    correct = [r.teacher_correct for r in one]
    assert all(c is not None for c in correct)
    assert both.teacher_correct == sum(c for c in correct if c is not None)  # unmixed images


def test_explain_probe_on_real_batches(tmp_path: Path, capsys) -> None:
    from vitkdl.cli import main

    path = write(
        tmp_path,
        "probed",
        tiny_recipe(
            tiny_model("deit3_small_patch16_224", width=48, depth=3),
            tiny_model("vit_tiny_patch16_224", width=32, depth=2),
            "mimic student.blocks[0] -> teacher.blocks[0] { weight = 1e-3 }\nkd { }",
        ),
    )
    assert main(["explain", str(path), "--probe", "--batches", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "probe: 2 batches" in out
    for row in ("mimic (mimic)", "kd (kd)", "labels (labels)", "teacher top-1 on these images"):
        assert row in out
    assert main(["explain", str(path), "--probe", "--batches", "1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)["probe"]
    assert data["batches"] == 1 and [t["name"] for t in data["terms"]] == [
        "mimic",
        "kd",
        "labels",
    ]
    assert sum(t["loss_share"] for t in data["terms"]) == pytest.approx(1.0)
    assert main(["explain", str(path), "--probe", "--batches", "0"]) == 2
    assert "--batches must be at least 1" in capsys.readouterr().err


def test_explain_probe_names_a_missing_teacher_run(tmp_path: Path, capsys) -> None:
    from vitkdl.cli import main

    code = main(["explain", str(RECIPES / "quickstart.vkd"), "--probe", "--runs", str(tmp_path)])
    assert code == 2
    assert "does not exist yet" in capsys.readouterr().err


def _hand_pass(model: torch.nn.Module, x: torch.Tensor, prefix: int) -> tuple:
    """A timm ViT's logits and patch tokens after blocks 0 and 1 and after the final norm, by
    timm's own forward_intermediates (what the quickstart's terms tap)."""
    final, blocks = model.forward_intermediates(x, indices=[0, 1], output_fmt="NLC")
    logits = model.forward_head(final)
    return logits, {"blocks.0": blocks[0], "blocks.1": blocks[1], "norm": final[:, prefix:]}


def test_the_fidelity_figures_equal_a_hand_computation() -> None:
    """teacher { precision = bf16 }: the probe measures the bf16 teacher against the same
    weights in fp32 (each tap's cosine along the feature dimension, the top-1 agreement)."""
    program = build(RECIPES / "quickstart.vkd", ["teacher.precision=bf16"], reference=True)
    ref = program.teacher_reference
    assert program.teacher is not None and ref is not None
    assert (ref.held, ref.name, ref.dtype) == ("bf16", "fp32", torch.float32)
    # The reference is the teacher's own weights, one precision up; not in the state dict.
    held = dict(program.teacher.named_parameters())
    for name, p in ref.model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p.to(torch.bfloat16), held[name]), name
    assert not any(k.startswith("teacher_reference") for k in program.state_dict())

    s = program.plan.student
    images = torch.randn(6, s.in_chans, s.img_size, s.img_size)
    labels = torch.randint(0, s.num_classes, (6,))
    report = probe_batches(program, [(images[:4], labels[:4]), (images[4:], labels[4:])])
    f = report.fidelity
    assert f is not None and (f.held, f.reference) == ("bf16", "fp32")

    prefix = program.plan.teacher.prefix_tokens
    with torch.no_grad():
        ref_logits, ref_taps = _hand_pass(ref.model, images, prefix)
        low_logits, low_taps = _hand_pass(program.teacher, images.to(torch.bfloat16), prefix)
    assert set(f.cosine) == set(ref_taps)
    for key, cos in f.cosine.items():
        hand = F.cosine_similarity(low_taps[key].float(), ref_taps[key], dim=-1).mean()
        assert cos == pytest.approx(float(hand), abs=1e-6), key
        assert 0.99 < cos < 1.0  # bf16 changes the features, a little
    agreed = int((low_logits.argmax(-1) == ref_logits.argmax(-1)).sum())
    assert f.agreed == agreed and f.top1_agreement == pytest.approx(100 * agreed / 6)


def test_no_fidelity_figures_for_a_teacher_held_as_loaded() -> None:
    program = build(RECIPES / "quickstart.vkd", reference=True)  # CPU, fp32: nothing lowered
    assert program.teacher_reference is None
    s = program.plan.student
    images = torch.randn(2, s.in_chans, s.img_size, s.img_size)
    assert probe_batches(program, [(images, torch.tensor([0, 1]))]).fidelity is None


def test_explain_probe_prints_the_fidelity_of_a_bf16_teacher(tmp_path: Path, capsys) -> None:
    from vitkdl.cli import main

    path = write(
        tmp_path,
        "lowered",
        tiny_recipe(
            tiny_model("deit3_small_patch16_224", width=48, depth=3, extra="precision = bf16"),
            tiny_model("vit_tiny_patch16_224", width=32, depth=2),
            "mimic student.blocks[0] -> teacher.blocks[1] { weight = 1e-3 }\nkd { }",
        ),
    )
    assert main(["explain", str(path), "--probe", "--batches", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "teacher in bf16 against fp32" in out and "top-1 agreement" in out
    assert "cosine of teacher.blocks.1: 0.99" in out
    assert main(["explain", str(path), "--probe", "--batches", "1", "--json"]) == 0
    probed = json.loads(capsys.readouterr().out)["probe"]
    f, images = probed["fidelity"], probed["images"]
    assert (f["held"], f["reference"], list(f["cosine"])) == ("bf16", "fp32", ["blocks.1"])
    assert 0 <= f["agreed"] <= images and f["top1_agreement"] == pytest.approx(
        100 * f["agreed"] / images
    )
