"""Only as deep as read (issue 20, item 1): a teacher whose logits and later points no term
reads stops after its deepest tapped block, computing the very taps and terms of the full pass.

Eager on CPU, tiny models; the one-graph checks trace with dynamo only (no inductor).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch._dynamo
from torch.utils.flop_counter import FlopCounterMode

import vitkdl
from tests.conftest import RECIPES
from tests.test_program import batch, build, one_graph, tiny_model, tiny_recipe, write
from vitkdl.program import Program, create_model, tap_pass

#: The quickstart with its shallow mimicking term only: the teacher (4 blocks) is read at
#: blocks 0 and 1, nothing later.
SHALLOW = ["~distill.generate", "~distill.nkd"]


@pytest.fixture(autouse=True)
def _fresh() -> None:
    torch.manual_seed(0)
    torch._dynamo.reset()


def _blocks_run(program: Program, images: torch.Tensor) -> tuple[list[int], bool]:
    """Which teacher blocks one step runs (whole or in halves: each runs its first norm), and
    whether its head runs (hooks, eager only)."""
    assert program.teacher is not None
    ran: list[int] = []
    head: list[bool] = []
    hooks = [
        b.norm1.register_forward_hook(lambda m, a, o, i=i: ran.append(i))
        for i, b in enumerate(program.teacher.blocks)
    ]
    hooks.append(program.teacher.head.register_forward_hook(lambda m, a, o: head.append(True)))
    try:
        program.forward(images, torch.zeros(images.shape[0], dtype=torch.long))
    finally:
        for h in hooks:
            h.remove()
    return ran, bool(head)


def test_the_plan_records_the_depth_that_runs_and_its_flops() -> None:
    shallow = vitkdl.plan(vitkdl.load(RECIPES / "quickstart.vkd", overrides=SHALLOW))
    full = vitkdl.plan(vitkdl.load(RECIPES / "quickstart.vkd"))
    assert shallow.teacher is not None and full.teacher is not None
    assert shallow.teacher.depth == 4
    assert shallow.teacher_depth == 2  # blocks 0 and 1 are read
    assert full.teacher_depth == 4  # nkd reads the logits, generate the final norm
    # The cost counts the teacher's first two blocks: what FlopCounterMode counts for them on
    # the meta device (where the model facts' FLOPs are counted).
    s = shallow.teacher
    with torch.device("meta"), torch.no_grad():
        teacher = create_model(s, "meta").eval()
        x = torch.empty(1, s.in_chans, s.img_size, s.img_size)
        with FlopCounterMode(display=False) as counter:
            teacher.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
    assert shallow.cost.teacher_forward == counter.get_total_flops()
    assert full.cost.teacher_forward == full.teacher.forward_flops
    assert shallow.cost.teacher_forward < full.cost.teacher_forward


def test_early_exit_computes_the_full_pass_taps_and_terms_bit_identically() -> None:
    program = build(RECIPES / "quickstart.vkd", SHALLOW)
    program.train()
    images, targets = batch(program, b=4)
    ran, head = _blocks_run(program, images)
    assert ran == [0, 1] and not head  # blocks 2, 3, the final norm and head never run
    with torch.no_grad():
        logits, early = program.teacher_pass(images)
        _, full = tap_pass(
            program.teacher, program.teacher_input(images), program._teacher_points, 1
        )
    assert logits is None and set(early) == {"blocks.0", "blocks.1"}
    for key, tensor in early.items():
        assert torch.equal(tensor, full[key])
    # The same step with the full teacher pass: the same terms, bit for bit.
    torch.manual_seed(1)
    out = program.forward(images, targets)
    program._teacher_stop = None
    torch.manual_seed(1)
    reference = program.forward(images, targets)
    assert set(out) == set(reference) == {"mimic", "labels", "loss"}
    for name in out:
        assert torch.equal(out[name], reference[name]), name


def test_taps_inside_blocks_stop_early_too(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "inside",
        tiny_recipe(
            tiny_model("deit3_small_patch16_224", width=48, depth=4),
            tiny_model("vit_tiny_patch16_224", width=32, depth=2),
            "mimic student.blocks[0].attn -> teacher.blocks[1].attn { weight = 1e-3 }\n"
            "mimic student.blocks[1].attn_map -> teacher.blocks[2].attn_map as maps "
            "{ loss = kl  heads = mean }",
        ),
    )
    program = build(path)
    assert program.plan.teacher_depth == 3
    images, _ = batch(program)
    assert _blocks_run(program, images) == ([0, 1, 2], False)
    with torch.no_grad():
        _, early = program.teacher_pass(images)
        _, full = tap_pass(
            program.teacher, program.teacher_input(images), program._teacher_points, 1
        )
    assert set(early) == {"blocks.1.attn", "blocks.2.attn_map"}
    for key, tensor in early.items():
        assert torch.equal(tensor, full[key])


def test_a_recipe_with_a_logit_term_runs_the_full_teacher() -> None:
    program = build(RECIPES / "quickstart.vkd", ["~distill.generate"])  # mimic + nkd
    assert program.plan.teacher_depth == 4
    images, _ = batch(program)
    assert _blocks_run(program, images) == ([0, 1, 2, 3], True)
    with torch.no_grad():
        logits, taps = program.teacher_pass(images)
    assert logits is not None and logits.shape == (2, 10)
    assert "norm" in taps


@pytest.mark.slow
def test_the_early_teacher_pass_and_the_step_stay_one_graph() -> None:
    program = build(RECIPES / "quickstart.vkd", SHALLOW)
    images, targets = batch(program)
    e = torch._dynamo.explain(program.teacher_pass)(images)
    assert (e.graph_count, e.graph_break_count) == (1, 0)
    torch._dynamo.reset()
    graphs: list[object] = []

    def count(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return gm.forward

    taps = torch.compile(program.teacher_pass, backend="aot_eager", fullgraph=True)(images)[1]
    with torch.no_grad():
        assert torch.equal(taps["blocks.1"], program.teacher_pass(images)[1]["blocks.1"])
    torch._dynamo.reset()
    torch.compile(program.teacher_pass, backend=count, fullgraph=True)(images)
    assert len(graphs) == 1
    one_graph(program, images, targets)


def test_explain_shows_the_depth_only_when_the_teacher_stops_early(capsys) -> None:
    from vitkdl.cli import main
    from vitkdl.cli.explain import _n

    args = ["explain", str(RECIPES / "quickstart.vkd")]
    assert main([*args, "--set", "~distill.generate", "--set", "~distill.nkd"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    plan = vitkdl.plan(vitkdl.load(RECIPES / "quickstart.vkd", overrides=SHALLOW))
    assert plan.teacher is not None
    assert "teacher depth: 2 of 4 blocks run" in out
    early, full = _n(plan.cost.teacher_forward), _n(plan.teacher.forward_flops)
    assert f"{early} FLOPs per image instead of {full}" in out
    assert main(args) == 0
    assert "teacher depth" not in capsys.readouterr().out
