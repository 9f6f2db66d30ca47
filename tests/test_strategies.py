"""Tests for vitkdl.strategies: every loss against an independently written-out formula."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vitkdl.strategies import KD, NKD, Generate, LabelLoss, Mimic, get_strategy

ATOL = 1e-5
RTOL = 1e-4


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def close(a: torch.Tensor, b: torch.Tensor | float) -> bool:
    return torch.allclose(a.double(), torch.as_tensor(b, dtype=torch.float64), rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------------------------
# Mimic
# ----------------------------------------------------------------------------------------------


def _mimic_reference(mod: Mimic, s_list, t_list, kind: str) -> float:
    total = 0.0
    for layer, (s, t) in enumerate(zip(s_list, t_list, strict=True)):
        lin = mod.align[layer]
        b, n, _ = s.shape
        acc = 0.0
        for bi in range(b):
            for ni in range(n):
                pred = (
                    lin.weight @ s[bi, ni] + lin.bias if isinstance(lin, nn.Linear) else s[bi, ni]
                )
                acc += float(((pred - t[bi, ni]) ** 2).sum())
        if kind == "mse":
            total += acc / b
        else:
            total += acc / (b * n * t.shape[2])
    return total * mod.weight


@pytest.mark.parametrize("kind", ["mse", "mse_mean"])
def test_mimic_matches_formula(kind: str) -> None:
    mod = Mimic([8, 8], [12, 12], loss=kind, weight=0.7)
    assert isinstance(mod.align, nn.ModuleList)
    assert all(isinstance(a, nn.Linear) and a.bias is not None for a in mod.align)
    s = [torch.randn(3, 5, 8) for _ in range(2)]
    t = [torch.randn(3, 5, 12) for _ in range(2)]
    out = mod(s, t)
    assert out.dim() == 0 and out.dtype == torch.float32
    with torch.no_grad():
        ref = _mimic_reference(mod, s, t, kind)
    assert close(out, ref)


def test_mimic_sum_vs_mean_relation() -> None:
    b, n, d = 4, 9, 6
    s, t = [torch.randn(b, n, d)], [torch.randn(b, n, d)]
    a = Mimic(d, d, align="identity", loss="mse", weight=1.0)(s, t)
    m = Mimic(d, d, align="identity", loss="mse_mean", weight=1.0)(s, t)
    assert close(a, m * n * d)


def test_mimic_identity_align() -> None:
    mod = Mimic(6, 6, align="identity", weight=2.0)
    assert isinstance(mod.align[0], nn.Identity)
    s, t = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    assert close(mod([s], [t]), 2.0 * ((s - t) ** 2).sum() / 2)
    with pytest.raises(ValueError):
        Mimic(6, 8, align="identity")


def test_mimic_mlp_and_auto_align() -> None:
    mlp = Mimic([4], [6], align="mlp")
    seq = mlp.align[0]
    assert isinstance(seq, nn.Sequential)
    assert [type(x) for x in seq] == [nn.Linear, nn.GELU, nn.Linear]
    assert seq[0].in_features == 4 and seq[2].out_features == 6 and seq[2].in_features == 6
    auto = Mimic([6, 4], [6, 6], align="auto")
    assert isinstance(auto.align[0], nn.Identity) and isinstance(auto.align[1], nn.Linear)


def test_mimic_bad_args() -> None:
    with pytest.raises(ValueError):
        Mimic([4, 4], [6])
    with pytest.raises(ValueError):
        Mimic(4, 6, loss="l1")
    with pytest.raises(ValueError):
        Mimic(4, 6, align="conv")
    mod = Mimic([4, 4], [6, 6])
    with pytest.raises(ValueError):
        mod([torch.randn(2, 3, 4)], [torch.randn(2, 3, 6)])


def test_mimic_gradients() -> None:
    mod = Mimic([4, 4], [6, 6])
    s = [torch.randn(2, 3, 4, requires_grad=True) for _ in range(2)]
    t = [torch.randn(2, 3, 6, requires_grad=True) for _ in range(2)]
    mod(s, t).backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in s)
    assert all(x.grad is None for x in t)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mod.parameters())


def test_mimic_bf16_inputs_float32_loss() -> None:
    mod = Mimic(4, 6)
    s, t = torch.randn(2, 4, 4), torch.randn(2, 4, 6)
    out = mod([s.bfloat16()], [t.bfloat16()])
    assert out.dtype == torch.float32
    assert close(out, mod([s.bfloat16().float()], [t.bfloat16().float()]))


# ----------------------------------------------------------------------------------------------
# Generate
# ----------------------------------------------------------------------------------------------


def _generate_reference(mod: Generate, s, t, mask, ratio: float) -> torch.Tensor:
    b, n, _ = s.shape
    side = math.isqrt(n)
    dt = mod.teacher_dim
    lin = mod.align
    conv1, conv2 = mod.generator[0], mod.generator[2]
    grid = torch.zeros(b, dt, side, side)
    for bi in range(b):
        for ni in range(n):
            row, col = divmod(ni, side)  # row-major layout
            if mask[bi, ni]:
                grid[bi, :, row, col] = mod.mask_token[0, 0]
            else:
                grid[bi, :, row, col] = lin.weight @ s[bi, ni] + lin.bias
    h = F.relu(F.conv2d(grid, conv1.weight, conv1.bias, padding=1))
    out = F.conv2d(h, conv2.weight, conv2.bias, padding=1)
    acc = torch.zeros((), dtype=torch.float64)
    for bi in range(b):
        for ni in range(n):
            if mask[bi, ni]:
                row, col = divmod(ni, side)
                acc += ((out[bi, :, row, col] - t[bi, ni]) ** 2).sum().double()
    return acc / (b * ratio) * mod.weight


def test_generate_submodules() -> None:
    mod = Generate(8, 12)
    assert isinstance(mod.align, nn.Linear) and mod.align.bias is not None
    assert isinstance(mod.mask_token, nn.Parameter)
    assert mod.mask_token.shape == (1, 1, 12) and torch.all(mod.mask_token == 0)
    g = mod.generator
    assert isinstance(g, nn.Sequential) and len(g) == 3
    assert isinstance(g[0], nn.Conv2d) and isinstance(g[2], nn.Conv2d)
    assert isinstance(g[1], nn.ReLU) and not g[1].inplace
    for c in (g[0], g[2]):
        assert c.in_channels == c.out_channels == 12
        assert c.kernel_size == (3, 3) and c.padding == (1, 1)
    assert mod.mask_ratio == 0.5
    assert isinstance(Generate(12, 12, align="identity").align, nn.Identity)
    with pytest.raises(ValueError):
        Generate(8, 12, align="identity")
    with pytest.raises(ValueError):
        Generate(8, 12, generator="mlp")
    with pytest.raises(ValueError):
        Generate(8, 12, mask=0.0)


@pytest.mark.parametrize("ratio", [0.5, 0.3])
def test_generate_pinned_mask_matches_formula(ratio: float) -> None:
    b, n, ds, dt = 2, 16, 5, 6
    mod = Generate(ds, dt, mask=ratio, weight=0.25)
    with torch.no_grad():
        mod.mask_token.normal_()  # non-zero so that the mask token matters
    s, t = torch.randn(b, n, ds), torch.randn(b, n, dt)
    mask = torch.rand(b, n) < ratio
    mask[0, 0] = True
    out = mod([s], [t], mask=mask)
    assert out.dim() == 0 and out.dtype == torch.float32
    with torch.no_grad():
        ref = _generate_reference(mod, s, t, mask, ratio)
    assert close(out, ref)
    # bare tensors are accepted too
    assert close(mod(s, t, mask=mask), ref)


def test_generate_unmasked_tokens_do_not_count() -> None:
    mod = Generate(4, 4, mask=0.5)
    s, t = torch.randn(1, 4, 4), torch.randn(1, 4, 4)
    mask = torch.tensor([[True, False, False, False]])
    base = mod([s], [t], mask=mask)
    t2 = t.clone()
    t2[0, 1:] += 100.0  # change only the teacher at unmasked positions
    assert close(mod([s], [t2], mask=mask), base)


@pytest.mark.parametrize("n", [1, 4, 9, 49, 196])
@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
def test_generate_mask_count_exact(n: int, ratio: float) -> None:
    """The kept tokens are rounded down (MGD's ``int(N * (1 - ratio))``), so the masked
    ones are the ratio's share rounded up: never fewer, less than one token more, never
    none; every sample masks exactly that many."""
    mod = Generate(4, 4, mask=ratio)
    count = mod.num_masked(n)
    assert n * ratio - 1e-9 <= count < n * ratio + 1 and 1 <= count <= n
    if ratio == 1.0:
        assert count == n
    m = mod.make_mask(7, n, torch.device("cpu"))
    assert m.dtype == torch.bool and m.shape == (7, n)
    assert m.sum(dim=1).tolist() == [count] * 7


def test_generate_mask_counts_of_the_papers_grids() -> None:
    assert Generate(4, 4, mask=0.5).num_masked(196) == 98  # ViTKD's 14x14 grid, half
    assert Generate(4, 4, mask=0.5).num_masked(49) == 25  # 24.5 rounded up
    assert Generate(4, 4, mask=0.75).num_masked(196) == 147


def test_generate_mask_is_fresh_and_uniform() -> None:
    mod = Generate(4, 4, mask=0.5)
    a, b = mod.make_mask(4, 196, "cpu"), mod.make_mask(4, 196, "cpu")
    assert not torch.equal(a, b)
    assert not torch.equal(a[0], a[1])  # per-sample masks
    # every position gets masked about half the time
    freq = mod.make_mask(4000, 16, "cpu").float().mean(dim=0)
    assert torch.all((freq - 0.5).abs() < 0.05)


def test_generate_forward_uses_make_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = Generate(4, 6, mask=0.5)
    s, t = torch.randn(2, 9, 4), torch.randn(2, 9, 6)
    fixed = mod.make_mask(2, 9, "cpu")
    monkeypatch.setattr(mod, "make_mask", lambda batch, n, device=None: fixed)
    assert close(mod([s], [t]), mod([s], [t], mask=fixed))
    monkeypatch.undo()
    # with a fresh random mask the loss changes between calls
    vals = {round(float(mod([s], [t]).detach()), 8) for _ in range(5)}
    assert len(vals) > 1


def test_generate_rejects_non_square_and_bad_taps() -> None:
    mod = Generate(4, 6)
    with pytest.raises(ValueError):
        mod([torch.randn(2, 10, 4)], [torch.randn(2, 10, 6)])
    with pytest.raises(ValueError):  # cls token left in
        mod([torch.randn(2, 197, 4)], [torch.randn(2, 197, 6)])
    with pytest.raises(ValueError):
        mod([torch.randn(2, 9, 4)] * 2, [torch.randn(2, 9, 6)] * 2)


def test_generate_gradients() -> None:
    mod = Generate(4, 6)
    s = torch.randn(2, 9, 4, requires_grad=True)
    t = torch.randn(2, 9, 6, requires_grad=True)
    mod([s], [t]).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None
    assert mod.mask_token.grad is not None and mod.mask_token.grad.abs().sum() > 0
    for p in [*mod.align.parameters(), *mod.generator.parameters()]:
        assert p.grad is not None and p.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------
# KD
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_kd_matches_explicit_kl(tau: float) -> None:
    s, t = torch.randn(5, 7), torch.randn(5, 7)
    mod = KD(temperature=tau, weight=0.5)
    ref = 0.0
    for b in range(5):
        ps = [math.exp(v / tau) for v in s[b].tolist()]
        pt = [math.exp(v / tau) for v in t[b].tolist()]
        zs, zt = sum(ps), sum(pt)
        ref += sum((q / zt) * math.log((q / zt) / (p / zs)) for p, q in zip(ps, pt, strict=True))
    ref = 0.5 * tau**2 * ref / 5
    out = mod(s, t, torch.zeros(5, dtype=torch.long))
    assert out.dim() == 0 and close(out, ref)
    assert close(mod(s, t), ref)


def test_kd_gradients() -> None:
    s = torch.randn(3, 4, requires_grad=True)
    t = torch.randn(3, 4, requires_grad=True)
    KD(2.0)(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None


# ----------------------------------------------------------------------------------------------
# NKD
# ----------------------------------------------------------------------------------------------


def _nkd_reference(s, t, y, tau: float, gamma: float, weight: float) -> float:
    b, c = s.shape
    target_terms, non_terms = [], []
    for i in range(b):
        yi = int(y[i])
        es = [math.exp(v) for v in s[i].tolist()]
        et = [math.exp(v) for v in t[i].tolist()]
        ps_y = es[yi] / sum(es)
        pt_y = et[yi] / sum(et)
        target_terms.append(-pt_y * math.log(ps_y))
        others = [j for j in range(c) if j != yi]
        qs = [math.exp(float(s[i, j]) / tau) for j in others]
        qt = [math.exp(float(t[i, j]) / tau) for j in others]
        zs, zt = sum(qs), sum(qt)
        non_terms.append(-sum((b_ / zt) * math.log(a / zs) for a, b_ in zip(qs, qt, strict=True)))
    return weight * (sum(target_terms) / b + gamma * tau**2 * sum(non_terms) / b)


@pytest.mark.parametrize(("tau", "gamma"), [(1.0, 1.0), (2.0, 1.5), (0.5, 0.7)])
def test_nkd_index_targets(tau: float, gamma: float) -> None:
    s, t = torch.randn(6, 9) * 3, torch.randn(6, 9) * 3
    y = torch.randint(0, 9, (6,))
    mod = NKD(temperature=tau, gamma=gamma, weight=0.8)
    out = mod(s, t, y)
    assert out.dim() == 0 and out.dtype == torch.float32
    assert torch.isfinite(out)
    assert close(out, _nkd_reference(s, t, y, tau, gamma, 0.8))


def test_nkd_soft_targets_use_argmax() -> None:
    s, t = torch.randn(4, 6), torch.randn(4, 6)
    y1, y2 = torch.tensor([0, 3, 5, 2]), torch.tensor([1, 1, 4, 0])
    lam = 0.7
    soft = lam * F.one_hot(y1, 6).float() + (1 - lam) * F.one_hot(y2, 6).float()
    soft = soft * 0.9 + 0.1 / 6  # smoothed, as timm's Mixup produces
    mod = NKD(temperature=2.0, gamma=1.2)
    assert close(mod(s, t, soft), _nkd_reference(s, t, y1, 2.0, 1.2, 1.0))


def test_nkd_gradients_and_bf16() -> None:
    s = torch.randn(3, 5, requires_grad=True)
    t = torch.randn(3, 5, requires_grad=True)
    y = torch.tensor([0, 2, 4])
    NKD(2.0)(s, t, y).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is None
    out = NKD()(s.detach().bfloat16(), t.detach().bfloat16(), y)
    assert out.dtype == torch.float32 and torch.isfinite(out)


# ----------------------------------------------------------------------------------------------
# LabelLoss
# ----------------------------------------------------------------------------------------------


def test_label_loss_hard_targets() -> None:
    z, y = torch.randn(5, 8), torch.randint(0, 8, (5,))
    mod = LabelLoss(smoothing=0.1, weight=2.0)
    ref = 2.0 * F.cross_entropy(z, y, label_smoothing=0.1)
    assert close(mod(z, y), ref)
    # written out: smoothed one-hot target (1 - eps) * onehot + eps / C
    logp = F.log_softmax(z, dim=1)
    manual = 0.0
    for b in range(5):
        for c in range(8):
            q = 0.9 * (c == int(y[b])) + 0.1 / 8
            manual -= q * float(logp[b, c])
    assert close(mod(z, y), 2.0 * manual / 5)


def test_label_loss_soft_targets_not_smoothed_twice() -> None:
    z = torch.randn(4, 6)
    soft = torch.softmax(torch.randn(4, 6), dim=1)
    mod = LabelLoss(smoothing=0.1)
    logp = F.log_softmax(z, dim=1)
    ref = -sum(float(soft[b, c] * logp[b, c]) for b in range(4) for c in range(6)) / 4
    assert close(mod(z, soft), ref)
    assert mod(z.bfloat16(), soft).dtype == torch.float32


def test_label_loss_gradient() -> None:
    z = torch.randn(3, 4, requires_grad=True)
    LabelLoss()(z, torch.tensor([0, 1, 2])).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------
# Registry, autocast, dynamo
# ----------------------------------------------------------------------------------------------


def test_registry() -> None:
    assert get_strategy("NKD") is NKD and get_strategy("labels") is LabelLoss
    with pytest.raises(ValueError):
        get_strategy("nope")


def test_autocast_bf16_returns_float32() -> None:
    mimic, gen = Mimic(4, 6), Generate(4, 6)
    s, t = torch.randn(2, 9, 4), torch.randn(2, 9, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = [mimic([s], [t]), gen([s], [t]), KD()(s[:, 0], t[:, 0, :4])]
    assert all(o.dtype == torch.float32 and o.dim() == 0 for o in outs)


def _explain_cases() -> list[tuple[str, nn.Module, tuple]]:
    s4, t6 = torch.randn(2, 9, 4), torch.randn(2, 9, 6)
    z, zt = torch.randn(3, 5), torch.randn(3, 5)
    y = torch.tensor([0, 3, 1])
    soft = torch.softmax(torch.randn(3, 5), dim=1)
    return [
        ("mimic", Mimic([4, 4], [6, 6]), ([s4, s4], [t6, t6])),
        ("generate", Generate(4, 6), ([s4], [t6])),
        ("generate_pinned", Generate(4, 6), ([s4], [t6], torch.rand(2, 9) < 0.5)),
        ("kd", KD(2.0), (z, zt)),
        ("nkd", NKD(2.0, 1.5), (z, zt, y)),
        ("nkd_soft", NKD(), (z, zt, soft)),
        ("label", LabelLoss(), (z, y)),
        ("label_soft", LabelLoss(), (z, soft)),
    ]


@pytest.mark.parametrize("idx", range(8), ids=[c[0] for c in _explain_cases()])
def test_dynamo_single_graph(idx: int) -> None:
    _, mod, args = _explain_cases()[idx]
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(mod)(*args)
    assert explanation.graph_count == 1, explanation.break_reasons
    assert explanation.graph_break_count == 0, explanation.break_reasons
