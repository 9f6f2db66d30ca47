"""``srrl`` (Yang et al., ICLR 2021): the module against a hand-written reference (values and
gradients), the ``pre_logits`` tap it reads, the frozen teacher head in the step, its checks
and its words."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torch._dynamo
import torch.nn.functional as F

import vitkdl
from vitkdl.planner import TapPoint
from vitkdl.program import head_pass
from vitkdl.terms import KINDS
from vitkdl.terms.srrl.module import SRRL, HandSRRL

MODEL = (
    "{ img_size = 16  patch_size = 4  depth = 2  embed_dim = %d  num_heads = %d  "
    "num_classes = 10%s }"
)


def _recipe(
    tmp_path: Path, distill: str, teacher: str = "  head = random", student: str = ""
) -> Path:
    path = tmp_path / "r.vkd"
    path.write_text(
        f"teacher deit_small_patch16_224 {MODEL % (32, 4, teacher)}\n"
        f"student deit_tiny_patch16_224 {MODEL % (16, 2, student)}\n"
        f"data synthetic {{ image_size = 16 }}\ndistill {{ {distill} }}\n"
    )
    return path


SRRL_TERM = "srrl student.pre_logits -> teacher.pre_logits"


def _errors(path: Path) -> list:
    return [d for d in vitkdl.validate(path)[1] if d.is_error]


# --------------------------------------------------------------------------------------------
# The module


@pytest.mark.parametrize("features, regression, weight", [(1.0, 2.0, 1.0), (0.5, 0.0, 3.0)])
def test_srrl_matches_the_reference_values_and_gradients(
    features: float, regression: float, weight: float
) -> None:
    torch.manual_seed(0)
    head = torch.nn.Linear(12, 7).requires_grad_(False)
    f_s = torch.randn(5, 8, requires_grad=True)
    f_t, z_t = torch.randn(5, 12), torch.randn(5, 7)
    module = SRRL(8, 12, features=features, regression=regression, weight=weight)
    hand = HandSRRL(8, 12, features, regression, weight)
    hand.conector.load_state_dict(module.connector.state_dict())
    f_s2 = f_s.detach().clone().requires_grad_(True)
    got, want = module(f_s, f_t, z_t, head), hand(f_s2, f_t, z_t, head)
    torch.testing.assert_close(got, want)
    # and the formula written out: two means over batch and channels / classes
    c = f_s.detach() @ module.connector.weight.T + module.connector.bias
    by_hand = weight * (
        features * ((c - f_t) ** 2).sum() / (5 * 12)
        + regression * ((c @ head.weight.T + head.bias - z_t) ** 2).sum() / (5 * 7)
    )
    torch.testing.assert_close(got.detach(), by_hand)
    got.backward()
    want.backward()
    torch.testing.assert_close(f_s.grad, f_s2.grad)
    torch.testing.assert_close(module.connector.weight.grad, hand.conector.weight.grad)
    assert head.weight.grad is None  # the teacher's head is frozen


def test_gradients_flow_through_the_frozen_head() -> None:
    """With the feature term off, the connector and the student learn through the head."""
    head = torch.nn.Linear(6, 4).requires_grad_(False)
    f_s = torch.randn(3, 5, requires_grad=True)
    module = SRRL(5, 6, features=0.0, regression=1.0)
    module(f_s, torch.randn(3, 6), torch.randn(3, 4), head).backward()
    assert f_s.grad is not None and f_s.grad.abs().sum() > 0
    assert module.connector.weight.grad.abs().sum() > 0
    assert head.weight.grad is None


def test_srrl_is_fp32_under_autocast_with_a_bf16_head() -> None:
    torch.manual_seed(0)
    head = torch.nn.Linear(12, 7).requires_grad_(False)
    f_s, f_t, z_t = torch.randn(4, 8), torch.randn(4, 12), torch.randn(4, 7)
    module = SRRL(8, 12)
    full = module(f_s, f_t, z_t, head)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = module(f_s.bfloat16(), f_t.bfloat16(), z_t.bfloat16(), head)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, full, rtol=0.05, atol=0.05)
    # a teacher held in bf16 (teacher { precision = bf16 }) outside autocast: cast to its dtype
    held = torch.nn.Linear(12, 7).to(torch.bfloat16).requires_grad_(False)
    assert module(f_s, f_t, z_t, held).dtype == torch.float32


def test_srrl_module_is_one_graph() -> None:
    head = torch.nn.Linear(12, 7).requires_grad_(False)
    args = (torch.randn(4, 8), torch.randn(4, 12), torch.randn(4, 7), head)
    module = SRRL(8, 12)
    torch._dynamo.reset()
    e = torch._dynamo.explain(module)(*args)
    assert (e.graph_count, e.graph_break_count) == (1, 0)
    torch._dynamo.reset()
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(*args), module(*args))


# --------------------------------------------------------------------------------------------
# The pre_logits tap


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("vit_tiny_patch16_224", {"img_size": 32, "depth": 2}),
        ("vit_tiny_patch16_224", {"img_size": 32, "depth": 2, "global_pool": "avg"}),
        ("resnet18", {}),
        ("deit_tiny_distilled_patch16_224", {"img_size": 32, "depth": 2}),
    ],
)
def test_pre_logits_is_the_feature_the_head_reads(name: str, kwargs: dict) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **kwargs).eval()
    images = torch.randn(2, 3, 32, 32)
    prefix = getattr(model, "num_prefix_tokens", 0)
    with torch.no_grad():
        logits, taps = head_pass(model, images, [TapPoint(point="pre_logits")], prefix)
        want = model.forward_head(model.forward_features(images), pre_logits=True)
        torch.testing.assert_close(taps["pre_logits"], want)
        torch.testing.assert_close(logits, model(images))  # the logits are unchanged
    assert taps["pre_logits"].shape == (2, model.num_features)


# --------------------------------------------------------------------------------------------
# In a program


def test_srrl_in_a_program_one_graph_head_frozen(tmp_path: Path) -> None:
    plan = vitkdl.plan(vitkdl.load(_recipe(tmp_path, SRRL_TERM)))
    program = vitkdl.build(plan, device="cpu", load=False)
    images, labels = torch.randn(3, 3, 16, 16), torch.randint(0, 10, (3,))
    torch._dynamo.reset()
    e = torch._dynamo.explain(program.forward)(images, labels)
    assert (e.graph_count, e.graph_break_count) == (1, 0)
    torch._dynamo.reset()
    # the head is the teacher's own module, and no submodule of the trained side
    assert program.core.teacher_head[0] is program.teacher.head
    trained = {id(p) for p in program.trainable_parameters()}
    assert id(program.teacher.head.weight) not in trained
    assert id(program.terms["srrl"].connector.weight) in trained
    out = program.forward(images, labels)
    out["loss"].backward()
    assert program.teacher.head.weight.grad is None
    assert program.terms["srrl"].connector.weight.grad is not None
    assert program.student.blocks[0].mlp.fc1.weight.grad is not None
    # the term's value is the reference's on the step's own tensors
    with torch.no_grad():
        t_logits, t_taps = program.teacher_pass(images)
        inputs = program.core.step_inputs(images, labels, t_logits, t_taps)
        entry = plan.terms[0]
        hand = KINDS["srrl"].reference(entry)
        hand.conector.load_state_dict(program.terms["srrl"].connector.state_dict())
        torch.testing.assert_close(
            KINDS["srrl"].loss(program.terms["srrl"], entry, inputs),
            KINDS["srrl"].loss(hand, entry, inputs),
        )


def test_no_head_without_a_term_that_reads_it(tmp_path: Path) -> None:
    path = _recipe(tmp_path, "kd { temperature = 2 }")
    program = vitkdl.build(vitkdl.plan(vitkdl.load(path)), device="cpu", load=False)
    assert program.core.teacher_head == ()


# --------------------------------------------------------------------------------------------
# Checks, plan, words


def test_srrl_needs_pre_logits_taps_at_their_positions(tmp_path: Path) -> None:
    path = _recipe(tmp_path, "srrl student.norm -> teacher.pre_logits")
    errors = _errors(path)
    assert [d.message for d in errors] == [
        "srrl 'srrl' reads the pooled feature the classifier head reads, not student.norm"
    ]
    line = path.read_text().splitlines()[3]
    assert line[errors[0].span.column - 1 :].startswith("student.norm")
    assert errors[0].hint == "write srrl student.pre_logits -> teacher.pre_logits"
    # pre_logits in a kind that does not read it
    path = _recipe(tmp_path, "mimic student.pre_logits -> teacher.pre_logits")
    errors = _errors(path)
    assert errors and errors[0].message.startswith(
        "student.pre_logits is the pooled feature the classifier head reads, and mimic"
    )
    assert "srrl" in errors[0].expected
    # pre_logits takes no index
    path = _recipe(tmp_path, "srrl student.pre_logits[0] -> teacher.pre_logits")
    assert [d.message for d in _errors(path)] == ["pre_logits is one tap and takes no index"]


def test_srrl_values_and_teacher_are_checked(tmp_path: Path) -> None:
    path = _recipe(tmp_path, SRRL_TERM + " { features = -1  regression = -2 }")
    assert [d.message for d in _errors(path)] == [
        "features must be >= 0, got -1",
        "regression must be >= 0, got -2",
    ]
    path = tmp_path / "alone.vkd"
    path.write_text(
        f"student deit_tiny_patch16_224 {MODEL % (16, 2, '')}\n"
        f"data synthetic {{ image_size = 16 }}\ndistill {{ {SRRL_TERM} }}\n"
    )
    assert [d.message for d in _errors(path)] == [
        "the srrl term 'srrl' needs a teacher, and the recipe has none"
    ]


def test_srrl_refuses_an_untrained_teacher_head(tmp_path: Path) -> None:
    """The regression target is the teacher's logits: a head that starts random is refused
    (``head = random`` says it is meant)."""
    path = _recipe(tmp_path, SRRL_TERM, teacher="")
    errors = _errors(path)
    assert [d.message for d in errors] == [
        "srrl reads the teacher's logits, but the teacher has no weights: its head would be random"
    ]
    assert errors[0].span.line == 1
    assert _errors(_recipe(tmp_path, SRRL_TERM)) == []  # head = random: meant


def test_srrl_refuses_a_distilled_teacher_and_an_fp8_teacher(tmp_path: Path) -> None:
    path = tmp_path / "d.vkd"
    path.write_text(
        f"teacher deit_small_distilled_patch16_224 {MODEL % (32, 4, '  head = random')}\n"
        f"student deit_tiny_distilled_patch16_224 {MODEL % (16, 2, '')}\n"
        f"data synthetic {{ image_size = 16 }}\ndistill {{ {SRRL_TERM} }}\n"
    )
    messages = [d.message for d in _errors(path)]
    assert len(messages) == 1  # a distilled student's pre_logits is timm's: the tokens' mean
    assert messages[0].startswith("teacher.pre_logits: deit_small_distilled_patch16_224 has two")
    path.write_text(
        f"teacher deit_small_patch16_224 {MODEL % (32, 4, '  head = random  precision = fp8')}\n"
        f"student deit_tiny_patch16_224 {MODEL % (16, 2, '')}\n"
        f"data synthetic {{ image_size = 16 }}\ndistill {{ {SRRL_TERM} }}\n"
    )
    messages = [d.message for d in _errors(path)]
    assert (
        "srrl 'srrl' trains through the teacher's classifier head, and precision = fp8 "
        "quantises it for inference only"
    ) in messages


def test_srrl_plans_its_connector_and_explains_its_coefficients(tmp_path: Path) -> None:
    path = _recipe(tmp_path, SRRL_TERM + " { features = 0.5  regression = 3 }")
    plan = vitkdl.plan(vitkdl.load(path))
    entry = plan.terms[0]
    assert [p.key for p in entry.student] == ["pre_logits"] == [p.key for p in entry.teacher]
    assert (entry.student_shape, entry.teacher_shape) == ([16], [32])
    assert [a.name for a in entry.adapters] == ["connector"]
    assert entry.adapter_params == 16 * 32 + 32
    assert entry.coefficient == 1.0
    assert plan.teacher_depth == plan.teacher.depth  # the whole teacher runs: its logits
    words = KINDS["srrl"].words(entry)
    assert words.formula == (
        "1 * (0.5 * mean((c(f_s) - f_t)^2) + 3 * mean((head_t(c(f_s)) - z_t)^2))"
    )
    assert "batch x 32 channels and batch x 10 classes" in words.reduction
    assert "Linear(16, 32)" in words.notes[0] and "frozen" in words.notes[0]
    from vitkdl.cli import main

    assert main(["explain", str(path)]) == 0


def test_srrl_defaults_are_the_issue_settings() -> None:
    spec = KINDS["srrl"].spec
    assert spec.model_fields["features"].default == 1.0
    assert spec.model_fields["regression"].default == 2.0
    assert spec.model_fields["weight"].default == 1.0


def test_the_hand_reference_is_the_mse_the_authors_write() -> None:
    hand = HandSRRL(3, 4, 1.0, 1.0)
    head = torch.nn.Linear(4, 2)
    f_s, f_t, z_t = torch.randn(2, 3), torch.randn(2, 4), torch.randn(2, 2)
    c = hand.conector(f_s)
    want = F.mse_loss(c, f_t) + F.mse_loss(head(c), z_t)
    torch.testing.assert_close(hand(f_s, f_t, z_t, head), want)


@pytest.mark.slow
def test_bench_times_srrl_and_says_why_hooks_cannot(tmp_path: Path) -> None:
    """``vitkdl bench``'s breakdown feeds the teacher's head to the term like the step does;
    its hook-based peer cannot tap pre_logits and says so."""
    from vitkdl.bench import run_bench

    result = run_bench(
        _recipe(tmp_path, SRRL_TERM),
        steps=1,
        warmup=1,
        device="cpu",
        compile_backend="eager",
        batch=4,
        loader=False,
    )
    assert result.breakdown is not None and result.breakdown["adapters_losses_ms"] > 0
    assert any("pre_logits" in note for note in result.notes)


@pytest.mark.slow
def test_srrl_with_a_cnn_teacher_one_graph(tmp_path: Path) -> None:
    """The paper's teachers are ResNets: pre_logits needs no ViT blocks (a ResNet's is its
    pooled feature, 512 wide for resnet18), and the step stays one graph."""
    path = tmp_path / "cnn.vkd"
    path.write_text(
        "teacher resnet18 { num_classes = 10  head = random  img_size = 32 }\n"
        "student deit_tiny_patch16_224 { img_size = 32  patch_size = 8  depth = 1  "
        "embed_dim = 16  num_heads = 2  num_classes = 10 }\n"
        f"data synthetic {{ image_size = 32 }}\ndistill {{ {SRRL_TERM} }}\n"
    )
    plan = vitkdl.plan(vitkdl.load(path))
    assert plan.terms[0].teacher_shape == [512]
    program = vitkdl.build(plan, device="cpu", load=False)
    images, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    torch._dynamo.reset()
    e = torch._dynamo.explain(program.forward)(images, labels)
    assert (e.graph_count, e.graph_break_count) == (1, 0)
    torch._dynamo.reset()
    assert program.core.teacher_head[0] is program.teacher.fc
    out = program.forward(images, labels)
    out["loss"].backward()
    assert program.terms["srrl"].connector.weight.grad is not None
