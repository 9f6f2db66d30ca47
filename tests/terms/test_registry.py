"""The registry is the only list of kinds: every kind declares everything, and a kind added
in a test parses, validates, explains and builds without touching another file."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import pytest
import torch

import vitkdl
from vitkdl.cli import main
from vitkdl.spec import PairedTermSpec, TermSpec
from vitkdl.terms import KINDS, register
from vitkdl.terms.base import Kind, StepInputs, TermPlan, Words, term_plan

ROOT = Path(__file__).resolve().parents[2]


def test_every_kind_declares_everything() -> None:
    assert list(KINDS) == ["mimic", "generate", "kd", "nkd", "token", "labels"]
    for keyword, kind in KINDS.items():
        assert kind.keyword == keyword and kind.summary
        assert issubclass(kind.spec, PairedTermSpec if kind.paired else TermSpec)
        assert kind.spec.model_fields["kind"].default == keyword
        for method in ("check", "plan", "words", "module_class", "module", "loss"):
            assert getattr(type(kind), method) is not getattr(Kind, method) or method == "check"
        assert issubclass(kind.module_class(), torch.nn.Module)


def test_no_file_outside_the_kinds_spells_a_keyword() -> None:
    """What the issue asks: a kind's keyword appears as a string only in its own module."""
    offenders = []
    for path in (ROOT / "vitkdl").rglob("*.py"):
        if path.parent.name == "terms":
            continue
        text = path.read_text()
        for keyword in KINDS:
            for quoted in (f'"{keyword}"', f"'{keyword}'"):
                for line in text.splitlines():
                    if quoted in line and "``get_strategy" not in line:
                        offenders.append(f"{path.name}: {line.strip()}")
    assert offenders == []


# --------------------------------------------------------------------------------------------
# A new kind, declared here only


class L2Spec(TermSpec):
    kind: Literal["l2"] = "l2"
    weight: float = 0.5


@functools.cache
def _l2_class() -> type[torch.nn.Module]:
    class L2(torch.nn.Module):
        def __init__(self, weight: float) -> None:
            super().__init__()
            self.weight = weight

        def forward(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.weight * (s.float() - t.detach().float()).pow(2).mean()

    return L2


class L2(Kind):
    keyword = "l2"
    summary = "squared error between the two models' logits"
    spec = L2Spec
    reads_teacher_logits = True

    def plan(self, term: L2Spec, ctx) -> TermPlan:  # type: ignore[no-untyped-def]
        n = ctx.student.num_classes
        return term_plan(term, student_shape=[n], teacher_shape=[n])

    def words(self, entry: TermPlan) -> Words:
        return Words(f"{entry.weight:g} * mean((s - t)^2)", "mean over batch and classes")

    def module_class(self) -> type[torch.nn.Module]:
        return _l2_class()

    def module(self, entry, plan) -> torch.nn.Module:  # type: ignore[no-untyped-def]
        return _l2_class()(entry.weight)

    def loss(self, module, entry, inputs: StepInputs) -> torch.Tensor:  # type: ignore[no-untyped-def]
        return module(inputs.s_logits, inputs.t_logits)


@pytest.fixture
def l2_kind() -> Iterator[Kind]:
    kind = register(L2())
    yield kind
    del KINDS["l2"]


def test_a_new_kind_needs_no_other_file(l2_kind: Kind, tmp_path: Path, capsys) -> None:
    model = (
        "{ img_size = 16  patch_size = 4  depth = 1  embed_dim = 16  num_heads = 2 "
        "num_classes = 10 }"
    )
    path = tmp_path / "l2.vkd"
    path.write_text(
        f"teacher deit_small_patch16_224 {model[:-1]} head = random }}\n"
        f"student deit_tiny_patch16_224 {model}\n"
        "data synthetic { image_size = 16 }\n"
        "distill { l2 as logits { weight = 0.25 } }\n"
    )
    assert main(["validate", str(path)]) == 0
    assert main(["explain", str(path)]) == 0
    out = capsys.readouterr().out
    assert "logits (l2)" in out and "0.25 * mean((s - t)^2)" in out
    plan = vitkdl.plan(vitkdl.load(path))
    assert [t.kind for t in plan.terms] == ["l2", "labels"] and plan.teacher_used
    program = vitkdl.build(plan, "cpu", load=False)
    out = program.forward(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]))
    assert set(out) == {"logits", "labels", "loss"} and out["logits"] > 0
    # a misspelt keyword is suggested from the registry, which now has it
    path.write_text(path.read_text().replace("l2 as", "l3 as"))
    _, diags, _ = vitkdl.validate(path)
    assert any(d.message == "unknown distill term 'l3'" for d in diags)
