"""``wsld``: weighted soft labels against its authors' code, the per-sample weight's meaning,
and soft labels (mixup) as soft cross-entropies."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import vitkdl
from tests.terms.test_dkd import (
    assert_fp32_under_autocast,
    assert_matches,
    assert_one_graph,
    assert_refuses_an_untrained_teacher_head,
    assert_teacher_detached,
    explain_text,
    logit_recipe,
    logits,
)
from vitkdl.strategies import get_strategy
from vitkdl.terms.wsld.module import WSLD, HandWSLD


@pytest.mark.parametrize("tau", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("soft", [False, True], ids=["indices", "mixed"])
def test_matches_the_authors_code(tau: float, soft: bool) -> None:
    s, t, y, mixed = logits()
    target = mixed if soft else y
    for weight in (1.0, 2.5):
        assert_matches(WSLD(tau, weight), HandWSLD(tau, weight), s, t, target)


def test_a_one_hot_label_is_the_index() -> None:
    s, t, y, _ = logits()
    one_hot = F.one_hot(y, 10).float()
    torch.testing.assert_close(WSLD(2.0)(s, t, one_hot), WSLD(2.0)(s, t, y))


def test_the_weight_keeps_what_the_teacher_knows_and_the_student_does_not() -> None:
    """Sample 0: the teacher is right, the student wrong (CE_s >> CE_t): weight near 1.
    Sample 1: the student fits the label better than the teacher: weight below 1 - 1/e. The
    weight is no function to train: only the soft cross-entropy has a gradient."""
    s = torch.tensor([[-4.0, 4.0, 0.0], [6.0, 0.0, 0.0]], requires_grad=True)
    t = torch.tensor([[4.0, -4.0, 0.0], [1.0, 0.0, 0.0]])
    y = torch.tensor([0, 0])
    log_s, log_t = F.log_softmax(s.detach(), 1), F.log_softmax(t, 1)
    ratio = (-log_s[:, 0]) / (-log_t[:, 0] + 1e-7)
    w = 1 - torch.exp(-ratio)
    assert w[0] > 0.99 and w[1] < 1 - 1 / torch.e
    tau = 2.0
    soft_ce = -(F.softmax(t / tau, 1) * F.log_softmax(s / tau, 1)).sum(1)
    want = tau**2 * (w * soft_ce).mean()
    got = WSLD(tau)(s, t, y)
    torch.testing.assert_close(got, want)
    (grad,) = torch.autograd.grad(got, s)
    (want_grad,) = torch.autograd.grad(want, s)  # w built from detached logits: a constant
    torch.testing.assert_close(grad, want_grad)


def test_fp32_detached_one_graph() -> None:
    s, t, y, mixed = logits()
    wsld = WSLD(2.0, 2.5)
    assert_fp32_under_autocast(wsld, s, t, y)
    assert_teacher_detached(wsld, s, t, y)
    assert_one_graph(wsld, s.detach(), t, y)
    assert_one_graph(wsld, s.detach(), t, mixed)
    with pytest.raises(ValueError, match="temperature"):
        WSLD(temperature=0)


def test_get_strategy() -> None:
    s, t, y, _ = logits()
    loss = get_strategy("wsld")(temperature=2.0, weight=2.5)(s, t, y)
    torch.testing.assert_close(loss, HandWSLD(2.0, 2.5)(s, t, y))


def test_explain_checks_and_refusals(tmp_path: Path, monkeypatch, capsys) -> None:
    path = tmp_path / "wsld.vkd"
    path.write_text(logit_recipe("wsld { weight = 2.5 }", data="mixup = 0.8"))
    text = explain_text(capsys, path)
    assert "wsld (wsld) weight 2.5, coefficient 2.5" in text
    assert "2.5 * 4 * w * CE(softmax(t/2), softmax(s/2))" in text
    assert "w = 1 - exp(-max(CE(y, s) / CE(y, t), 0)) per sample" in text
    program = vitkdl.build(vitkdl.plan(vitkdl.load(path)), "cpu", load=False)
    soft = torch.softmax(torch.randn(4, 10), 1)  # mixed labels reach it as they are
    out = program.forward(torch.randn(4, 3, 16, 16), soft)
    assert set(out) == {"wsld", "labels", "loss"} and torch.isfinite(out["wsld"])
    path.write_text(logit_recipe("wsld { temperature = -2 }"))
    _, diags, _ = vitkdl.validate(path)
    errors = [d for d in diags if d.is_error]
    assert [d.message for d in errors] == ["temperature must be > 0, got -2.0"]
    assert errors[0].span is not None and errors[0].span.line == 6
    assert_refuses_an_untrained_teacher_head(tmp_path, monkeypatch, "wsld { }")
