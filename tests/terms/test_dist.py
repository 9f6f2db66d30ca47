"""``dist``: DIST's inter- and intra-class Pearson relations against its authors' code and
against ``torch.corrcoef``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

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
from vitkdl.terms.dist.module import DIST, HandDIST


@pytest.mark.parametrize("tau", [1.0, 2.0, 4.0])
def test_matches_the_authors_code(tau: float) -> None:
    s, t, y, soft = logits()
    for beta, gamma, weight in ((1.0, 1.0, 2.0), (0.5, 2.0, 1.0), (1.0, 0.0, 0.3)):
        assert_matches(DIST(beta, gamma, tau, weight), HandDIST(beta, gamma, tau, weight), s, t, y)
    # targets are not read: soft labels change nothing
    torch.testing.assert_close(DIST(1.0, 1.0, tau)(s, t, soft), DIST(1.0, 1.0, tau)(s, t, y))


def test_relations_are_pearson_correlations_per_sample_and_per_class() -> None:
    s, t, _, _ = logits(b=5, c=7, seed=3)
    tau = 2.0
    p_s, p_t = torch.softmax(s.detach() / tau, 1), torch.softmax(t / tau, 1)

    def corr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.corrcoef(torch.stack([a, b]))[0, 1]

    inter = 1 - torch.stack([corr(p_s[i], p_t[i]) for i in range(5)]).mean()
    intra = 1 - torch.stack([corr(p_s[:, c], p_t[:, c]) for c in range(7)]).mean()
    torch.testing.assert_close(DIST(1.0, 0.0, tau)(s, t), tau**2 * inter, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(DIST(0.0, 1.0, tau)(s, t), tau**2 * intra, rtol=1e-5, atol=1e-6)
    # a student that matches the teacher has nothing left to learn
    same = DIST(1.0, 1.0, tau)(t, t)
    torch.testing.assert_close(same, torch.tensor(0.0), atol=1e-5, rtol=0)


def test_one_sample_stays_finite() -> None:
    """One sample: its class probabilities over the batch are constant, correlation 0 (the
    authors' epsilon), not nan."""
    s, t, _, _ = logits(b=1)
    out = DIST()(s, t)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(s.grad).all()


def test_fp32_detached_one_graph() -> None:
    s, t, y, _ = logits()
    dist = DIST(1.0, 1.0, 4.0, 2.0)
    assert_fp32_under_autocast(dist, s, t)
    assert_teacher_detached(dist, s, t)
    assert_one_graph(dist, s.detach(), t, y)
    with pytest.raises(ValueError, match="temperature"):
        DIST(temperature=-1)


def test_get_strategy() -> None:
    s, t, y, _ = logits()
    loss = get_strategy("dist")(beta=1.0, gamma=2.0, temperature=1.0, weight=2.0)(s, t, y)
    torch.testing.assert_close(loss, HandDIST(1.0, 2.0, 1.0, 2.0)(s, t))


def test_explain_checks_and_refusals(tmp_path: Path, monkeypatch, capsys) -> None:
    path = tmp_path / "dist.vkd"
    path.write_text(logit_recipe("dist { gamma = 2.0  temperature = 2.0  weight = 2.0 }"))
    text = explain_text(capsys, path)
    assert "dist (dist) weight 2, coefficient 2" in text
    assert "beta 1.0, gamma 2.0, temperature 2.0" in text
    assert (
        "2 * 4 * (1 * (1 - mean_i pearson(p_s[i], p_t[i])) + 2 * (1 - mean_c "
        "pearson(p_s[:, c], p_t[:, c])))" in text
    )
    assert "p = softmax(z/2) of each model's logits" in text
    program = vitkdl.build(vitkdl.plan(vitkdl.load(path)), "cpu", load=False)
    out = program.forward(torch.randn(4, 3, 16, 16), torch.tensor([1, 2, 3, 4]))
    assert set(out) == {"dist", "labels", "loss"} and torch.isfinite(out["dist"])
    path.write_text(logit_recipe("dist { temperature = 0  gamma = -1 }"))
    _, diags, _ = vitkdl.validate(path)
    errors = {d.message for d in diags if d.is_error}
    assert errors == {"temperature must be > 0, got 0.0", "gamma must be >= 0, got -1.0"}
    assert all(d.span is not None and d.span.line == 6 for d in diags if d.is_error)
    assert_refuses_an_untrained_teacher_head(tmp_path, monkeypatch, "dist { }")


def test_no_kinds_folder_is_ignored_by_git() -> None:
    """``dist/`` (a build's output) was ignored anywhere, and hid ``vitkdl/terms/dist/`` from
    ``git add``: every kind's files must be committable."""
    import shutil
    import subprocess

    from vitkdl.terms import KINDS

    root = Path(__file__).resolve().parents[2]
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    files = [f"vitkdl/terms/{k}/{name}" for k in KINDS for name in ("__init__.py", "module.py")]
    ignored = subprocess.run(
        ["git", "check-ignore", "--no-index", *files], cwd=root, capture_output=True, text=True
    )
    assert ignored.stdout.split() == []
