"""``mimic``'s losses against formulas written out here, and its options end to end."""

from __future__ import annotations

from pathlib import Path

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
