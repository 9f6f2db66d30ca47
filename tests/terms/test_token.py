"""``token``: DeiT's distillation-token loss against its formulas, and which head learns what."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import vitkdl
from tests.test_program import one_graph
from vitkdl.cli import main
from vitkdl.terms import KINDS
from vitkdl.terms.token.module import HandToken, TokenDistillation


def test_hard_is_cross_entropy_on_the_teachers_argmax() -> None:
    dist, teacher = torch.randn(4, 6), torch.randn(4, 6)
    got = TokenDistillation(mode="hard", weight=0.5)(dist, teacher)
    want = 0.0
    for b in range(4):
        y = int(teacher[b].argmax())
        want += -(float(dist[b, y]) - math.log(float(dist[b].exp().sum())))
    torch.testing.assert_close(got, torch.tensor(0.5 * want / 4), rtol=1e-5, atol=1e-6)


def test_soft_is_t2_times_the_batch_mean_kl() -> None:
    dist, teacher, tau = torch.randn(4, 6), torch.randn(4, 6), 3.0
    got = TokenDistillation(mode="soft", temperature=tau, weight=2.0)(dist, teacher)
    p_t = torch.softmax(teacher / tau, dim=1)
    p_s = torch.softmax(dist / tau, dim=1)
    kl = (p_t * (p_t.log() - p_s.log())).sum() / 4  # summed over classes, batch mean
    torch.testing.assert_close(got, 2.0 * tau**2 * kl, rtol=1e-5, atol=1e-6)
    # DeiT's own DistillationLoss term (the hand-written reference) agrees
    for mode in ("hard", "soft"):
        ours = TokenDistillation(mode=mode, temperature=tau)(dist, teacher)
        torch.testing.assert_close(HandToken(mode, tau)(dist, teacher), ours)
    with pytest.raises(ValueError, match="mode"):
        TokenDistillation(mode="medium")


DEIT = """
teacher deit_small_patch16_224 {{ img_size = 16  patch_size = 4  depth = 1  embed_dim = 32
    num_heads = 2  num_classes = 10  head = random }}
student deit_tiny_distilled_patch16_224 {{ img_size = 16  patch_size = 4  depth = 1
    embed_dim = 16  num_heads = 2  num_classes = 10 }}
data synthetic {{ image_size = 16 }}
distill {{
    token {{ mode = {mode}  temperature = 2.0  weight = 0.5 }}
    labels {{ weight = 0.5 }}
    {more}
}}
"""


def test_the_class_head_learns_the_labels_the_distillation_head_the_teacher(
    tmp_path: Path, capsys
) -> None:
    path = tmp_path / "token.vkd"
    path.write_text(DEIT.format(mode="soft", more="kd { }"))
    assert main(["explain", str(path)]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "0.5 * 4 * KL(softmax(t/2) || softmax(s_dist/2))" in text
    assert "the distillation head learns the teacher; the class head learns" in text
    assert "class + distillation: trained apart" in text
    plan = vitkdl.plan(vitkdl.load(path))
    program = vitkdl.build(plan, "cpu", load=False)
    assert program.distilled and program.student.distilled_training
    images, labels = torch.randn(3, 3, 16, 16), torch.tensor([1, 2, 3])
    program.train()
    torch.manual_seed(0)
    out = program.forward(images, labels)
    assert torch.equal(one_graph(program, images, labels)["labels"], out["labels"])
    with torch.no_grad():
        cls, dist = program.student(images)  # timm's two heads in distilled training
        teacher = program.teacher(images)
    p_t = torch.softmax(teacher / 2, 1)
    token = 0.5 * 4 * (p_t * (p_t.log() - torch.log_softmax(dist / 2, 1))).sum(1).mean()
    torch.testing.assert_close(out["token"], token, rtol=1e-5, atol=1e-6)
    ce = torch.nn.functional.cross_entropy(cls, labels)
    torch.testing.assert_close(out["labels"], 0.5 * ce, rtol=1e-5, atol=1e-6)
    p1 = torch.softmax(teacher, 1)  # kd at T = 1 reads the class head, not the heads' mean
    kd = (p1 * (p1.log() - torch.log_softmax(cls, 1))).sum(1).mean()
    torch.testing.assert_close(out["kd"], kd, rtol=1e-5, atol=1e-6)
    # evaluation: both heads, and their mean as timm's inference
    program.eval()
    with torch.no_grad():
        c, d = program.predict_heads(images)
        torch.testing.assert_close(program.student_logits(images), (c + d) / 2)
    assert KINDS["token"].timm_task(next(t for t in plan.terms if t.kind == "token")) == {
        "task": "TokenDistillationTask",
        "distill_type": "soft",
        "temperature": 2.0,
        "distill_loss_weight": 0.5,
    }
