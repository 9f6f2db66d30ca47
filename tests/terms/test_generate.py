"""``generate``'s generators: shapes, parameter counts as planned, and a grid that need not be
square for the ones without convolutions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import vitkdl
from vitkdl.strategies import Generate


@pytest.mark.parametrize("generator", ["conv", "attention", "linear"])
def test_each_generator_counts_masked_tokens_only(generator: str) -> None:
    torch.manual_seed(0)
    gen = Generate(8, 16, mask=0.5, generator=generator, weight=1.0, heads=2)
    s, t = torch.randn(2, 16, 8), torch.randn(2, 16, 16)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :8] = True
    loss = gen([s], [t], mask=mask)
    # by hand: align, mask token, the generator, squared error on masked tokens / (B x 0.5)
    x = gen.align(s)
    x = torch.where(mask[..., None], gen.mask_token, x)
    if generator == "conv":
        y = gen.generator(x.transpose(1, 2).reshape(2, 16, 4, 4)).flatten(2).transpose(1, 2)
    else:
        y = gen.generator(x)
    want = ((y - t) ** 2 * mask[..., None]).sum() / (2 * 0.5)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("generator", ["conv", "attention", "linear"])
def test_planned_parameters_match_the_module(tmp_path: Path, generator: str) -> None:
    model = (
        "{ img_size = 16  patch_size = 4  depth = 2  embed_dim = %d  num_heads = %d "
        "num_classes = 10 }"
    )
    path = tmp_path / "g.vkd"
    path.write_text(
        f"teacher deit_small_patch16_224 {model % (32, 4)}\n"
        f"student deit_tiny_patch16_224 {model % (16, 2)}\n"
        "data synthetic { image_size = 16 }\n"
        f"distill {{ generate student.norm -> teacher.norm "
        f"{{ generator = {generator} }} }}\n"
    )
    plan = vitkdl.plan(vitkdl.load(path))
    term = plan.terms[0]
    program = vitkdl.build(plan, "cpu", load=False)
    module = program.terms["generate"]
    assert term.adapter_params == sum(p.numel() for p in module.parameters())
    planned = next(a for a in term.adapters if a.name == "generator")
    assert planned.params == sum(p.numel() for p in module.generator.parameters())


def test_a_non_square_grid_needs_a_generator_without_convolutions(tmp_path: Path) -> None:
    model = "{ img_size = [16, 12]  patch_size = 4  depth = 1  embed_dim = 16  num_heads = 2 }"
    path = tmp_path / "g.vkd"
    text = (
        f"teacher deit_small_patch16_224 {model}\nstudent deit_tiny_patch16_224 {model}\n"
        "data synthetic { }\ndistill { generate student.norm -> teacher.norm %s }\n"
    )
    path.write_text(text % "")
    errors = [d.message for d in vitkdl.validate(path)[1] if d.is_error]
    assert errors == [
        "generate 'generate' with generator = conv needs a square token grid, the teacher's is 4x3"
    ]
    path.write_text(text % "{ generator = attention }")
    assert not [d for d in vitkdl.validate(path)[1] if d.is_error]
