"""The registry is the only list of kinds: every kind declares everything, and a kind added
in a test parses, validates, explains and builds without touching another file."""

from __future__ import annotations

import importlib
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import pytest
import torch

import vitkdl
from vitkdl.cli import main
from vitkdl.nodes import PairedTermSpec, TermSpec
from vitkdl.terms import KINDS, register
from vitkdl.terms.base import Context, Kind, StepInputs, TermPlan, Words, term_plan

ROOT = Path(__file__).resolve().parents[2]


def test_every_kind_declares_everything() -> None:
    assert list(KINDS) == [
        "mimic",
        "generate",
        "kd",
        "nkd",
        "token",
        "labels",
        "dkd",
        "dist",
        "wsld",
        "srrl",
    ]
    for keyword, kind in KINDS.items():
        assert kind.keyword == keyword and kind.summary
        assert issubclass(kind.spec, PairedTermSpec if kind.paired else TermSpec)
        assert kind.spec.model_fields["kind"].default == keyword
        for method in ("check", "plan", "words", "module_class", "module", "loss"):
            assert getattr(type(kind), method) is not getattr(Kind, method) or method == "check"
        # one home: the kind's folder, its declarations in __init__.py and its torch module
        # a top-level class of its module.py
        assert type(kind).__module__ == f"vitkdl.terms.{keyword}"
        module_class = kind.module_class()
        assert issubclass(module_class, torch.nn.Module)
        assert module_class.__module__ == f"vitkdl.terms.{keyword}.module"
        home = importlib.import_module(module_class.__module__)
        assert getattr(home, module_class.__qualname__) is module_class


def test_every_package_ships() -> None:
    """A kind's folder is a package: pyproject's package list names it (or a wheel would ship
    the registry without the kind)."""
    tomllib = pytest.importorskip("tomllib")
    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "vitkdl").rglob("__init__.py")
        if not p.parent.is_symlink() and "__pycache__" not in p.parts
    }
    assert found - set(listed) == set()
    assert {f"vitkdl.terms.{k}" for k in KINDS} <= set(listed)


def test_no_file_outside_the_kinds_spells_a_keyword() -> None:
    """What the issue asks: a kind's keyword appears as a string only in its own module."""
    offenders = []
    terms = ROOT / "vitkdl" / "terms"
    for path in (ROOT / "vitkdl").rglob("*.py"):
        home = path.relative_to(terms).parts[0] if path.is_relative_to(terms) else None
        text = path.read_text()
        for keyword in KINDS:
            if home == keyword:  # the kind's own folder
                continue
            for quoted in (f'"{keyword}"', f"'{keyword}'"):
                for line in text.splitlines():
                    if quoted in line and "``get_strategy" not in line:
                        offenders.append(f"{path.relative_to(ROOT)}: {line.strip()}")
    assert offenders == []


# --------------------------------------------------------------------------------------------
# A new kind, declared here only


class L2Spec(TermSpec):
    kind: Literal["l2"] = "l2"
    weight: float = 0.5


class L2Loss(torch.nn.Module):
    def __init__(self, weight: float) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.weight * (s.float() - t.detach().float()).pow(2).mean()


class L2(Kind):
    keyword = "l2"
    summary = "squared error between the two models' logits"
    spec = L2Spec
    reads_teacher_logits = True

    def plan(self, term: L2Spec, ctx: Context) -> TermPlan:
        assert ctx.student is not None
        n = ctx.student.num_classes
        return term_plan(term, ctx, student_shape=[n], teacher_shape=[n])

    def words(self, entry: TermPlan) -> Words:
        return Words(f"{entry.weight:g} * mean((s - t)^2)", "mean over batch and classes")

    def module_class(self) -> type[torch.nn.Module]:
        return L2Loss

    def module(self, entry: TermPlan) -> torch.nn.Module:
        return L2Loss(entry.weight)

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


EVERY_KIND = """
teacher deit_small_patch16_224 { img_size = 16  patch_size = 4  depth = 2  embed_dim = 32
    num_heads = 2  num_classes = 10  head = random }
student deit_tiny_distilled_patch16_224 { img_size = 16  patch_size = 4  depth = 2
    embed_dim = 16  num_heads = 2  num_classes = 10 }
data synthetic { image_size = 16 }
distill {
    mimic student.blocks[0] -> teacher.blocks[0] { }
    generate student.norm -> teacher.norm { }
    kd { }
    nkd { }
    token { }
    labels { }
    dkd { }
    dist { }
    wsld { }
    srrl student.pre_logits -> teacher.pre_logits { }
}
"""


def test_every_kinds_module_is_built_from_its_entry_and_pickles(tmp_path: Path) -> None:
    """A kind's module is a top-level class built from its plan entry alone (widths and typed
    options in the entry), so it pickles: a module sent to a worker process, or saved whole."""
    path = tmp_path / "every.vkd"
    path.write_text(EVERY_KIND)
    plan = vitkdl.plan(vitkdl.load(path))
    assert sorted(t.kind for t in plan.terms) == sorted(KINDS)
    for entry in plan.terms:
        module = KINDS[entry.kind].module(entry)
        clone = pickle.loads(pickle.dumps(module))
        assert type(clone) is type(module)
        assert type(module).__module__ == f"vitkdl.terms.{entry.kind}.module"
        state, cloned = module.state_dict(), clone.state_dict()
        assert state.keys() == cloned.keys()
        assert all(torch.equal(state[k], cloned[k]) for k in state)
        reference = KINDS[entry.kind].reference(entry)
        if reference is not None:  # the hand-written peers are top-level classes as well
            assert type(pickle.loads(pickle.dumps(reference))) is type(reference)
