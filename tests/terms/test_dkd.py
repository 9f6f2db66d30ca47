"""``dkd``: decoupled KD against its authors' formulation, its warm-up fed by the training
loop's epoch (a tensor: no recompile), and what a recipe with it says and refuses.

The helpers above the DKD tests are shared with the other logit kinds' tests (``dist``,
``wsld``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import vitkdl
from tests.cli import run
from tests.test_checks import TINY, _validate
from vitkdl.cli import main
from vitkdl.strategies import KD, get_strategy
from vitkdl.terms.dkd.module import DKD, HandDKD

# --------------------------------------------------------------------------------------------
# Shared by the logit kinds' tests


def logits(b: int = 6, c: int = 10, scale: float = 3.0, seed: int = 0) -> tuple[Tensor, ...]:
    """Student logits (requiring grad), teacher logits, index labels and mixed soft labels."""
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(b, c, generator=g) * scale).requires_grad_(True)
    t = torch.randn(b, c, generator=g) * scale
    y = torch.randint(0, c, (b,), generator=g)
    # a mixup of two one-hot labels with smoothing, as timm's Mixup makes them
    lam, other = 0.7, torch.roll(y, 1)
    soft = 0.01 + 0.9 * (
        lam * nn.functional.one_hot(y, c) + (1 - lam) * nn.functional.one_hot(other, c)
    )
    return s, t, y, soft


def value_and_grad(loss: Callable[..., Tensor], s: Tensor, *rest: object) -> tuple[Tensor, Tensor]:
    """A loss's value and its gradient with respect to the student logits ``s``."""
    leaf = s.detach().clone().requires_grad_(True)
    out = loss(leaf, *rest)
    (grad,) = torch.autograd.grad(out, leaf)
    return out.detach(), grad


def assert_matches(ours: nn.Module, reference: nn.Module, s: Tensor, *rest: object) -> None:
    """Values and student gradients agree (float32 rounding only)."""
    v1, g1 = value_and_grad(ours, s, *rest)
    v2, g2 = value_and_grad(reference, s, *rest)
    torch.testing.assert_close(v1, v2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)
    assert g1.abs().sum() > 0


def assert_one_graph(module: nn.Module, *args: object) -> None:
    """``torch._dynamo.explain``: one graph, no break."""
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(module)(*args)
    assert explanation.graph_count == 1, explanation.break_reasons
    assert explanation.graph_break_count == 0, explanation.break_reasons


def assert_fp32_under_autocast(module: nn.Module, *args: Tensor) -> None:
    """bf16 logits under bf16 autocast: a 0-dim float32 loss, close to the fp32 one on the
    same (rounded) logits."""
    half = [a.detach().bfloat16() if a.is_floating_point() and a.dim() == 2 else a for a in args]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(*half)
    assert out.dtype == torch.float32 and out.dim() == 0
    full = module(*[a.float() if a.is_floating_point() else a for a in half])
    torch.testing.assert_close(out, full)


def assert_teacher_detached(module: nn.Module, s: Tensor, t: Tensor, *rest: object) -> None:
    t = t.detach().clone().requires_grad_(True)
    module(s.detach().clone().requires_grad_(True), t, *rest).backward()
    assert t.grad is None


def logit_recipe(term: str, *, teacher_head: str = "head = random", data: str = "") -> str:
    """A tiny recipe with one logit term (a teacher with a random head unless told)."""
    return (
        "teacher deit_small_patch16_224 { img_size = 16  patch_size = 4  depth = 1\n"
        f"    embed_dim = 32  num_heads = 2  num_classes = 10  {teacher_head} }}\n"
        f"student deit_tiny_patch16_224 {{ {TINY} }}\n"
        f"data synthetic {{ image_size = 16  batch_size = 8  size = 16 {data} }}\n"
        f"distill {{\n    {term}\n}}\n"
        "train { epochs = 2  compile = off  precision = fp32 }\n"
    )


def explain_text(capsys, path: Path) -> str:
    code, out, err = run(capsys, "explain", str(path))
    assert code == 0, err
    return " ".join(out.split())


def assert_refuses_an_untrained_teacher_head(tmp_path, monkeypatch, term: str) -> None:
    """As ``kd``: a teacher without weights has a random head, which a logit kind reads."""
    diags = _validate(tmp_path, monkeypatch, f"deit_small_patch16_224 {{ {TINY} }}", term)
    keyword = term.split()[0]
    errors = [d.message for d in diags if d.is_error]
    assert (
        f"{keyword} reads the teacher's logits, but the teacher has no weights: "
        "its head would be random" in errors
    )
    written = _validate(
        tmp_path, monkeypatch, f"deit_small_patch16_224 {{ {TINY}  head = random }}", term
    )
    assert not [d for d in written if d.is_error]  # meant: the recipe says so


# --------------------------------------------------------------------------------------------
# DKD


@pytest.mark.parametrize("tau", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("soft", [False, True], ids=["indices", "mixed"])
def test_matches_the_authors_formulation(tau: float, soft: bool) -> None:
    s, t, y, mixed = logits()
    target = mixed if soft else y
    for alpha, beta, warmup, epoch in ((1.0, 8.0, 20, 3), (0.5, 0.5, 1, 1), (2.0, 1.0, 5, 9)):
        args = (alpha, beta, tau, warmup, 0.7)
        ours, reference = DKD(*args), HandDKD(*args)
        assert_matches(ours, reference, s, t, target, torch.tensor(float(epoch)))
        assert_matches(ours, reference, s, t, target)  # no epoch: past the warm-up


def test_mixed_labels_read_as_their_argmax() -> None:
    s, t, y, mixed = logits()
    assert torch.equal(mixed.argmax(1), y)  # lam 0.7: the label's own class dominates
    dkd = DKD(1.0, 8.0, 4.0)
    torch.testing.assert_close(dkd(s, t, mixed), dkd(s, t, y))


def test_kd_is_tckd_plus_nckd_scaled_by_the_teachers_non_target_mass() -> None:
    """The paper's decomposition (its eq. 1): KD = TCKD + (1 - p_t[y]) NCKD, per sample; a
    check independent of either implementation's arithmetic."""
    for seed in range(4):
        s, t, y, _ = logits(b=1, seed=seed)
        for tau in (1.0, 3.0):
            p_target = torch.softmax(t / tau, 1)[0, y[0]]
            dkd = DKD(alpha=1.0, beta=float(1 - p_target), temperature=tau)
            torch.testing.assert_close(dkd(s, t, y), KD(tau)(s, t), rtol=1e-5, atol=1e-6)


def test_warm_up_ramps_with_the_epoch_counted_from_one() -> None:
    s, t, y, _ = logits()
    full = DKD(1.0, 8.0, 4.0, warmup_epochs=20)(s, t, y)
    for epoch, ramp in ((1, 1 / 20), (10, 0.5), (20, 1.0), (40, 1.0)):
        for e in (epoch, torch.tensor(float(epoch))):
            got = DKD(1.0, 8.0, 4.0, warmup_epochs=20)(s, t, y, e)
            torch.testing.assert_close(got, full * ramp)
    # warm-up 1 (the ImageNet setting) or 0: full weight from the first epoch
    for warmup in (0, 1):
        got = DKD(1.0, 8.0, 4.0, warmup_epochs=warmup)(s, t, y, torch.tensor(1.0))
        torch.testing.assert_close(got, full)


def test_extreme_logits_stay_finite_where_the_authors_log_is_not() -> None:
    s = torch.tensor([[200.0, -200.0, 0.0], [-150.0, 150.0, 0.0]], requires_grad=True)
    t = torch.tensor([[-200.0, 200.0, 0.0], [150.0, -150.0, 0.0]])
    y = torch.tensor([1, 0])
    assert not torch.isfinite(HandDKD()(s, t, y))  # log(0) of the student's target mass
    out = DKD()(s, t, y)
    out.backward()
    assert torch.isfinite(out) and out > 0 and torch.isfinite(s.grad).all()


def test_fp32_detached_one_graph() -> None:
    s, t, y, mixed = logits()
    dkd = DKD(1.0, 8.0, 4.0, warmup_epochs=20)
    assert_fp32_under_autocast(dkd, s, t, y)
    assert_teacher_detached(dkd, s, t, y, torch.tensor(2.0))
    assert_one_graph(dkd, s.detach(), t, y, torch.tensor(3.0))
    assert_one_graph(dkd, s.detach(), t, mixed, torch.tensor(3.0))
    with pytest.raises(ValueError, match="temperature"):
        DKD(temperature=0)


def test_get_strategy_with_the_issues_call() -> None:
    s, t, y, _ = logits()
    loss = get_strategy("dkd")(alpha=1.0, beta=8.0, temperature=4.0, weight=1.0)(s, t, y)
    torch.testing.assert_close(loss, HandDKD(1.0, 8.0, 4.0, 1, 1.0)(s, t, y))


DKD_TERM = "dkd { alpha = 1.0  beta = 8.0  temperature = 4.0  warmup_epochs = 20  weight = 0.5 }"


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_the_program_feeds_the_epoch_without_recompiling(tmp_path: Path, backend: str) -> None:
    """The epoch reaches the term as a buffer of the program: a compiled step called at two
    epochs compiles once, and the term follows the ramp."""
    from torch._dynamo.testing import CompileCounterWithBackend

    path = tmp_path / "dkd.vkd"
    path.write_text(logit_recipe(DKD_TERM))
    program = vitkdl.build(vitkdl.plan(vitkdl.load(path)), "cpu", load=False)
    program.eval()  # no drop path: the same values at both epochs
    images, labels = torch.randn(4, 3, 16, 16), torch.tensor([1, 2, 3, 4])
    eager = program.forward(images, labels)["dkd"]  # a program before training: epoch 1
    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    step = torch.compile(program.forward, backend=counter, fullgraph=True)
    first = step(images, labels)["dkd"]
    program.set_epoch(10)
    tenth = step(images, labels)["dkd"]
    program.set_epoch(25)
    past = step(images, labels)["dkd"]
    assert counter.frame_count == 1
    torch.testing.assert_close(first, eager)
    torch.testing.assert_close(tenth, first * 10)
    torch.testing.assert_close(past, first * 20)
    assert "epoch" not in program.state_dict() and "core.epoch" not in program.state_dict()


def test_the_loop_sets_each_epoch_counted_from_one(tmp_path: Path, monkeypatch, capsys) -> None:
    from vitkdl.program import Program

    seen: list[int] = []
    original = Program.set_epoch

    def spy(self: Program, epoch: int) -> None:
        seen.append(epoch)
        original(self, epoch)

    monkeypatch.setattr(Program, "set_epoch", spy)
    path = tmp_path / "dkd.vkd"
    path.write_text(logit_recipe(DKD_TERM))
    argv = ["run", str(path), "--out", str(tmp_path / "runs"), "--device", "cpu", "--quiet"]
    assert main([*argv, "--no-baseline"]) == 0
    assert seen == [1, 2]


def test_explain_checks_and_refusals(tmp_path: Path, monkeypatch, capsys) -> None:
    path = tmp_path / "dkd.vkd"
    path.write_text(logit_recipe(DKD_TERM))
    text = explain_text(capsys, path)
    assert "dkd (dkd) weight 0.5, coefficient 0.5" in text
    assert "alpha 1.0, beta 8.0, temperature 4.0, warmup_epochs 20" in text
    assert "0.5 * min(epoch / 20, 1) * 16 * (1 * KL(b_t || b_s) + 8 * KL(q_t || q_s))" in text
    assert "warm-up: epochs 1 to 20 ramp linearly, then 1" in text
    assert "mixed label" not in text
    # a recipe that mixes says how the target class is read; the default has no ramp
    path.write_text(logit_recipe("dkd { }", data="mixup = 0.8  cutmix = 1.0"))
    text = explain_text(capsys, path)
    assert "1 * 1 * (1 * KL(b_t || b_s) + 0.5 * KL(q_t || q_s))" in text
    assert "target argmax of the mixed label" in text and "min(epoch" not in text
    # positioned errors and the warm-up longer than the training
    path.write_text(
        logit_recipe("dkd { temperature = 0  beta = -1  warmup_epochs = -2 }").replace(
            "epochs = 2", "epochs = 1"
        )
    )
    _, diags, _ = vitkdl.validate(path)
    errors = {d.message for d in diags if d.is_error}
    assert errors == {
        "temperature must be > 0, got 0.0",
        "beta must be >= 0, got -1.0",
        "warmup_epochs must be >= 0, got -2",
    }
    assert all(d.span is not None and d.span.line == 6 for d in diags if d.is_error)
    path.write_text(logit_recipe("dkd { warmup_epochs = 5 }"))
    _, diags, _ = vitkdl.validate(path)
    assert [d.message for d in diags if "warmup_epochs" in d.message and not d.is_error] == [
        "warmup_epochs 5 is longer than the training (2 epochs): dkd never reaches its full weight"
    ]
    assert_refuses_an_untrained_teacher_head(tmp_path, monkeypatch, "dkd { }")


def test_the_benchmarks_hand_written_configuration_computes_what_the_program_does(
    tmp_path: Path,
) -> None:
    """``vitkdl bench``'s hooks configuration feeds each kind's hand-written reference through
    the kind (:class:`~vitkdl.bench.HandWrittenLoss`): the three logit kinds agree with the
    program's own terms on one batch, at an epoch inside DKD's warm-up."""
    from vitkdl.bench import HandWrittenLoss
    from vitkdl.terms import StepInputs

    path = tmp_path / "all.vkd"
    path.write_text(logit_recipe(f"{DKD_TERM}\n    dist {{ weight = 2.0 }}\n    wsld {{ }}"))
    plan = vitkdl.plan(vitkdl.load(path))
    program = vitkdl.build(plan, "cpu", load=False)
    program.eval()
    program.set_epoch(4)
    images, labels = torch.randn(4, 3, 16, 16), torch.tensor([1, 2, 3, 4])
    out = program.forward(images, labels)
    with torch.no_grad():
        s_logits, t_logits = program.student(images), program.teacher(images)
    hand = HandWrittenLoss(plan)(
        StepInputs(s_logits, {}, t_logits, {}, labels, None, torch.tensor(4.0))
    )
    for name in ("dkd", "dist", "wsld", "labels"):
        torch.testing.assert_close(hand[name], out[name], rtol=1e-5, atol=1e-6)
