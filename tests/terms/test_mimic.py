"""``mimic``'s losses against formulas written out here, and its options end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import vitkdl
from vitkdl.strategies import Mimic


def test_relation_is_the_squared_error_of_token_similarities() -> None:
    s, t = torch.randn(3, 5, 4), torch.randn(3, 5, 7)  # any widths: no adapter
    loss = Mimic(4, 7, loss="relation", weight=2.0)([s], [t])

    def cos(x: torch.Tensor) -> torch.Tensor:
        out = torch.empty(x.shape[0], x.shape[1], x.shape[1])
        for b in range(x.shape[0]):
            for i in range(x.shape[1]):
                for j in range(x.shape[1]):
                    out[b, i, j] = F.cosine_similarity(x[b, i], x[b, j], dim=0)
        return out

    want = 2.0 * ((cos(s) - cos(t)) ** 2).sum() / 3
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    assert not list(Mimic(4, 7, loss="relation").parameters())


def _maps(b: int, h: int, n: int) -> torch.Tensor:
    return torch.softmax(torch.randn(b, h, n, n), dim=-1)


def test_kl_on_attention_maps_pairs_heads_or_averages_them() -> None:
    s, t = _maps(2, 3, 4), _maps(2, 3, 4)
    got = Mimic(8, 8, loss="kl", weight=0.5)([s], [t])
    kl = (t * (t.log() - s.log())).sum(-1)  # per (batch, head, query)
    torch.testing.assert_close(got, 0.5 * kl.mean(), rtol=1e-5, atol=1e-6)
    t6 = _maps(2, 6, 4)  # another number of heads: averaged first
    got = Mimic(8, 8, loss="kl", heads="mean")([s], [t6])
    sm, tm = s.mean(1), t6.mean(1)
    want = (tm * (tm.log() - sm.log())).sum(-1).mean()
    torch.testing.assert_close(got, want * 3e-5, rtol=1e-5, atol=1e-9)
    # rows without the prefix columns are renormalised: scaling a row changes nothing
    torch.testing.assert_close(
        Mimic(8, 8, loss="kl")([s * 0.5], [t]), Mimic(8, 8, loss="kl")([s], [t])
    )


def _recipe(tmp_path: Path, distill: str) -> Path:
    model = (
        "{ img_size = 16  patch_size = 4  depth = 2  embed_dim = %d  num_heads = %d "
        "num_classes = 10 }"
    )
    path = tmp_path / "r.vkd"
    path.write_text(
        f"teacher deit_small_patch16_224 {model % (32, 4)}\n"
        f"student deit_tiny_patch16_224 {model % (16, 2)}\n"
        f"data synthetic {{ image_size = 16 }}\ndistill {{ {distill} }}\n"
    )
    return path


def test_mimic_options_validate_with_positioned_errors(tmp_path: Path) -> None:
    path = _recipe(tmp_path, "mimic student.blocks[0].attn_map -> teacher.blocks[0].attn_map")
    errors = [d for d in vitkdl.validate(path)[1] if d.is_error]
    assert [d.message for d in errors] == ["attention maps are compared with loss = kl, not mse"]
    path = _recipe(
        tmp_path, "mimic student.blocks[0].attn_map -> teacher.blocks[0].attn_map { loss = kl }"
    )
    errors = [d for d in vitkdl.validate(path)[1] if d.is_error]
    assert [d.message for d in errors] == [
        "heads = pair needs as many heads on both sides: the student has 2, the teacher 4"
    ]
    assert errors[0].hint == "write heads = mean (average the heads' maps first)"
    path = _recipe(tmp_path, "mimic student.blocks[0] -> teacher.blocks[0] { loss = kl }")
    errors = [d for d in vitkdl.validate(path)[1] if d.is_error]
    assert errors[0].message.startswith("loss = kl compares attention maps")
    assert errors[0].span.line == 4 and errors[0].span.column > 1


def test_mimic_plans_shapes_and_coefficients(tmp_path: Path) -> None:
    plan = vitkdl.plan(
        vitkdl.load(
            _recipe(
                tmp_path,
                "mimic student.blocks[0:2].attn_map -> teacher.blocks[0:2].attn_map "
                "{ loss = kl  heads = mean  weight = 0.1 }\n"
                "mimic student.blocks[1].attn -> teacher.blocks[1].attn as rel "
                "{ loss = relation  weight = 1e-3 }",
            )
        )
    )
    maps, rel = plan.terms[0], plan.terms[1]
    assert [p.key for p in maps.student] == ["blocks.0.attn_map", "blocks.1.attn_map"]
    assert maps.student_shape == [16, 16] and maps.adapters == []
    assert maps.coefficient == 0.1 * 2
    assert rel.teacher[0].key == "blocks.1.attn" and rel.adapters == []
    assert abs(rel.coefficient - 1e-3 * 16 * 16) < 1e-12


# --------------------------------------------------------------------------------------------
# loss = manifold (Hao et al., NeurIPS 2022)


def _manifold_by_hand(
    s: torch.Tensor, t: torch.Tensor, w: tuple[float, float, float], pick: torch.Tensor
) -> torch.Tensor:
    """The three relation maps of one layer written out entry by entry (cosine similarity
    of token pairs), each compared by its mean squared difference."""
    b, n, _ = s.shape

    def cos(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cosine_similarity(x, y, dim=0)

    intra = torch.stack(
        [
            (cos(s[i, p], s[i, q]) - cos(t[i, p], t[i, q])) ** 2
            for i in range(b)
            for p in range(n)
            for q in range(n)
        ]
    ).mean()
    inter = torch.stack(
        [
            (cos(s[i, p], s[j, p]) - cos(t[i, p], t[j, p])) ** 2
            for p in range(n)
            for i in range(b)
            for j in range(b)
        ]
    ).mean()
    fs, ft = s.reshape(b * n, -1)[pick], t.reshape(b * n, -1)[pick]
    rand = torch.stack(
        [
            (cos(fs[i], fs[j]) - cos(ft[i], ft[j])) ** 2
            for i in range(len(pick))
            for j in range(len(pick))
        ]
    ).mean()
    return w[0] * intra + w[1] * inter + w[2] * rand


def _drawn(b: int, n: int, k: int, seed: int) -> torch.Tensor:
    """The tokens the random map draws with ``seed`` (torch's generator, as in the step)."""
    torch.manual_seed(seed)
    return torch.randperm(b * n)[:k]


def test_manifold_matches_the_formula_values_and_gradients() -> None:
    torch.manual_seed(1)
    s = [torch.randn(3, 4, 5, requires_grad=True), torch.randn(3, 4, 5, requires_grad=True)]
    t = [torch.randn(3, 4, 7), torch.randn(3, 4, 7)]  # another width: the maps are width-free
    w = (4.0, 0.1, 0.2)
    module = Mimic([5, 5], [7, 7], loss="manifold", weight=0.5, intra=w[0], inter=w[1],
                   random=w[2], samples=6)  # fmt: skip
    assert not list(module.parameters())
    torch.manual_seed(7)
    got = module(s, t)
    # the module draws once per layer, in order, from the same generator
    torch.manual_seed(7)
    picks = [torch.randperm(12)[:6], torch.randperm(12)[:6]]
    s2 = [x.detach().clone().requires_grad_(True) for x in s]
    layers = zip(s2, t, picks, strict=True)
    want = 0.5 * sum(_manifold_by_hand(a, b, w, p) for a, b, p in layers) / 2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    got.backward()
    want.backward()
    for a, b in zip(s, s2, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7)


def test_manifold_matches_the_authors_layer_loss() -> None:
    from vitkdl.terms.mimic.module import HandManifold

    s, t = [torch.randn(4, 9, 6, requires_grad=True)], [torch.randn(4, 9, 10)]
    torch.manual_seed(3)
    got = Mimic(6, 10, loss="manifold", weight=1.0, samples=20)(s, t)
    torch.manual_seed(3)
    want = HandManifold(4.0, 0.1, 0.2, 20)(s, t)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_manifold_draws_from_torchs_generator_and_uses_every_token_when_k_exceeds_them() -> None:
    s, t = [torch.randn(2, 3, 4)], [torch.randn(2, 3, 4)]
    only_random = Mimic(4, 4, loss="manifold", weight=1.0, intra=0, inter=0, random=1, samples=2)
    torch.manual_seed(0)
    first = only_random(s, t)
    torch.manual_seed(0)
    assert torch.equal(only_random(s, t), first)  # the draw is the generator's: reproducible
    draws = {float(only_random(s, t)) for _ in range(8)}
    assert len(draws) > 1  # and a fresh one each step
    # K larger than B * N: every token, in some order (the map's mean is order-free)
    every = Mimic(4, 4, loss="manifold", weight=1.0, intra=0, inter=0, random=1, samples=99)
    pick = torch.arange(6)
    torch.testing.assert_close(every(s, t), _manifold_by_hand(s[0], t[0], (0, 0, 1), pick))


def test_manifold_is_fp32_under_autocast_and_one_graph() -> None:
    import torch._dynamo

    s, t = [torch.randn(2, 4, 8)], [torch.randn(2, 4, 8)]
    module = Mimic(8, 8, loss="manifold", weight=1.0, samples=5)
    torch.manual_seed(0)
    full = module(s, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(0)
        low = module([s[0].bfloat16()], [t[0].bfloat16()])
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, full, rtol=0.05, atol=1e-3)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(module)(s, t)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    torch.manual_seed(0)
    torch.testing.assert_close(compiled(s, t), full)


def test_manifold_validates_with_positioned_errors(tmp_path: Path) -> None:
    path = _recipe(
        tmp_path,
        "mimic student.blocks[0] -> teacher.blocks[0] { loss = manifold  intra = -1  samples = 0 }",
    )
    errors = [d for d in vitkdl.validate(path)[1] if d.is_error]
    assert [d.message for d in errors] == [
        "intra must be >= 0, got -1",
        "samples must be >= 1, got 0",
    ]
    line = path.read_text().splitlines()[3]
    assert errors[0].span.line == 4 and line[errors[0].span.column - 1 :].startswith("intra")
    assert line[errors[1].span.column - 1 :].startswith("samples")
    path = _recipe(tmp_path, "mimic student.blocks[0] -> teacher.blocks[0] { samples = 1.5 }")
    errors = [d for d in vitkdl.validate(path)[1] if d.is_error]
    assert [d.message for d in errors] == ["samples must be a whole number, got 1.5"]
    # manifold's fields under another loss, align under manifold: said, at the field
    path = _recipe(
        tmp_path,
        "mimic student.blocks[0] -> teacher.blocks[0] { inter = 0.5 }\n"
        "mimic student.blocks[1] -> teacher.blocks[1] as m { loss = manifold  align = mlp }",
    )
    _, diags, _ = vitkdl.validate(path)
    assert not [d for d in diags if d.is_error]
    warned = [d.message for d in diags]
    assert "inter is read by loss = manifold only, not by loss = mse" in warned
    assert "align is not used by loss = manifold (no adapter)" in warned
    path = _recipe(
        tmp_path,
        "mimic student.blocks[0].attn_map -> teacher.blocks[0].attn_map { loss = manifold }",
    )
    errors = [d for d in vitkdl.validate(path)[1] if d.is_error]
    assert [d.message for d in errors] == [
        "attention maps are compared with loss = kl, not manifold"
    ]


def test_manifold_plans_without_adapters_and_explains_its_coefficients(tmp_path: Path) -> None:
    path = _recipe(
        tmp_path,
        "mimic student.blocks[0, 1] -> teacher.blocks[0, 1] { loss = manifold  intra = 2  "
        "samples = 64 }",
    )
    plan = vitkdl.plan(vitkdl.load(path))
    entry = plan.terms[0]
    assert entry.weight == 1.0  # unwritten: 1 under manifold (the map weights carry the scale)
    assert entry.adapters == [] and entry.coefficient == 1.0
    assert entry.student_shape == [16, 16]
    o = entry.options
    assert (o.intra, o.inter, o.random, o.samples) == (
        2.0,
        0.1,
        0.2,
        64,
    )
    words = vitkdl.terms.KINDS["mimic"].words(entry)
    assert "2 * mean((R(s) - R(t))^2)_intra" in words.formula
    assert "0.1 * mean((R(s) - R(t))^2)_inter" in words.formula
    assert "0.2 * mean((R(s) - R(t))^2)_random" in words.formula
    assert "64 x 64 over 64 tokens" in words.reduction and "2 layers" in words.reduction
    module = vitkdl.terms.KINDS["mimic"].module(entry)
    assert module.manifold == (2.0, 0.1, 0.2) and module.samples == 64
    # a written weight stays as written
    path = _recipe(
        tmp_path, "mimic student.blocks[0] -> teacher.blocks[0] { loss = manifold  weight = 3 }"
    )
    assert vitkdl.plan(vitkdl.load(path)).terms[0].weight == 3.0


def test_manifold_in_a_program_is_one_graph(tmp_path: Path) -> None:
    import torch._dynamo

    path = _recipe(
        tmp_path,
        "mimic student.blocks[0, 1] -> teacher.blocks[0, 1] { loss = manifold  samples = 8 }",
    )
    program = vitkdl.build(vitkdl.plan(vitkdl.load(path)), device="cpu", load=False)
    images, labels = torch.randn(3, 3, 16, 16), torch.randint(0, 10, (3,))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(program.forward)(images, labels)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    torch._dynamo.reset()
    out = program.forward(images, labels)
    assert torch.isfinite(out["mimic"]) and out["mimic"] > 0
    out["loss"].backward()
    assert program.student.blocks[0].mlp.fc1.weight.grad is not None


@pytest.mark.slow
def test_manifold_under_inductor_draws_what_eager_draws() -> None:
    """The random map's draw compiles (inductor) and takes the generator's numbers as eager
    does: the same seed, the same loss."""
    module = Mimic([8], [12], loss="manifold", weight=1.0, samples=5)
    s, t = [torch.randn(2, 4, 8, requires_grad=True)], [torch.randn(2, 4, 12)]
    compiled = torch.compile(module, fullgraph=True)
    torch.manual_seed(0)
    got = compiled(s, t)
    got.backward()
    torch.manual_seed(0)
    torch.testing.assert_close(got, module(s, t))
    assert s[0].grad is not None
