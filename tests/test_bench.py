"""`vitkdl bench`: the four figures and the ratios on a tiny recipe (never inductor here), the
hand-written hook implementation computing the same losses as the strategies, CLI errors."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch._dynamo
from rich.console import Console

import vitkdl
from tests.conftest import ROOT
from vitkdl.bench import (
    CONFIGURATIONS,
    TEACHER_CONFIGURATIONS,
    Bench,
    BenchError,
    ConfigResult,
    HandWrittenLoss,
    _ratios,
    bench_plan,
    register_feature_hooks,
    run_bench,
    teacher_variant,
    timm_task_kwargs,
)
from vitkdl.cli import main
from vitkdl.cli.bench import render
from vitkdl.planner import TapPoint
from vitkdl.program import tap_pass
from vitkdl.terms import StepInputs

TINY = """recipe tiny_bench

teacher vit_tiny_patch16_224 {
    img_size = 16
    patch_size = 4
    depth = 1
    embed_dim = 48
    num_heads = 2
    num_classes = 10
    head = random
}
student vit_tiny_patch16_224 {
    img_size = 16
    patch_size = 4
    depth = 1
    embed_dim = 32
    num_heads = 2
    num_classes = 10
}
distill {
    mimic student.blocks[0] -> teacher.blocks[0] { weight = 1e-3 }
    generate student.norm -> teacher.norm { mask = 0.5  weight = 1e-4 }
    nkd { temperature = 1.0  gamma = 1.0 }
}
data synthetic { batch_size = 8  size = 32 }
train { epochs = 1  precision = fp32  compile = off }
"""

CONFIGS = ("compiled", "eager", "hooks", "floor")


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.vkd"
    path.write_text(TINY)
    return path


@pytest.fixture(autouse=True)
def _fresh() -> None:
    torch.manual_seed(0)
    torch._dynamo.reset()


@pytest.mark.slow
def test_python_api_four_figures_and_ratios(tiny: Path) -> None:
    threads = torch.get_num_threads()
    result = run_bench(tiny, steps=2, warmup=1, device="cpu", compile_backend="aot_eager")
    assert torch.get_num_threads() == threads  # restored
    # the plain teacher is the recipe's own step here (reported as it, not built twice)
    assert set(result.configs) == {*CONFIGS, "teacher_plain"}
    assert result.configs["teacher_plain"].details["same_as"] == "compiled"
    for name in CONFIGS:
        c = result.configs[name]
        assert c.images_per_second > 0 and c.ms_per_step > 0, name
        # peak memory on CPU is RSS growth: 0 when the process was already at its peak
        assert len(c.ms_steps) == 2 and c.peak_memory_mb >= 0
    assert result.configs["compiled"].compile_seconds is not None
    assert result.configs["eager"].compile_seconds is None
    for key in ("compiled_vs_eager", "compiled_vs_hooks", "overhead_vs_floor"):
        assert result.ratios[key] is not None and result.ratios[key] > -1
    a, b = result.configs["compiled"], result.configs["eager"]
    assert result.ratios["compiled_vs_eager"] == pytest.approx(b.ms_per_step / a.ms_per_step)
    floor = result.configs["floor"]
    assert floor.ms_per_step == pytest.approx(
        floor.details["student_step_ms"] + floor.details["teacher_inference_ms"]
    )
    parts = result.breakdown
    assert parts is not None
    for key in (
        "teacher_forward_ms",
        "student_forward_backward_ms",
        "adapters_losses_ms",
        "optimizer_ms",
    ):
        assert parts[key] > 0
    assert result.loader is not None and result.loader["images_per_second"] > 0
    assert result.batch == 8 and result.precision == "fp32" and result.threads == 1
    assert result.configs["compiled"].mfu is None  # CPU: no MFU
    json.dumps(result.to_dict())  # JSON-able


@pytest.mark.slow
def test_cli_json(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "bench",
            str(tiny),
            "--json",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--backend",
            "eager",
            "--no-breakdown",
            "--batch",
            "4",
            "--device",
            "cpu",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    data = json.loads(out)
    assert data["batch"] == 4 and data["backend"] == "eager" and data["breakdown"] is None
    for name in CONFIGS:
        assert data["configs"][name]["images_per_second"] > 0
    assert data["ratios"]["compiled_vs_hooks"] > 0
    assert data["loader"]["source"] == "synthetic"


def test_hand_written_loss_matches_the_strategies(tiny: Path) -> None:
    """(c) is written independently of vitkdl.strategies but computes the same terms."""
    plan = vitkdl.plan(vitkdl.load(tiny))
    program = vitkdl.build(plan, "cpu", load=False, compile="off")
    hand = HandWrittenLoss(plan)
    hand.losses["mimic"].proj.load_state_dict(program.terms["mimic"].align.state_dict())
    gen, hgen = program.terms["generate"], hand.losses["generate"]
    hgen.proj.load_state_dict(gen.align.state_dict())
    hgen.generation.load_state_dict(gen.generator.state_dict())
    with torch.no_grad():
        gen.mask_token.normal_()
        hgen.mask_token.copy_(gen.mask_token)
    images = torch.randn(4, 3, 16, 16)
    targets = torch.tensor([1, 2, 3, 4])

    feats: dict[str, torch.Tensor] = {}
    points = [TapPoint(block=0, point="mlp"), TapPoint(point="norm")]
    handles = register_feature_hooks(program.student, points, 1, feats)
    s_logits = program.student(images)
    for h in handles:
        h.remove()
    ref_logits, ref_taps = tap_pass(program.student, images, points[:1], 1)
    torch.testing.assert_close(s_logits, ref_logits)
    for key in ("blocks.0", "norm"):
        torch.testing.assert_close(feats[key], ref_taps[key])

    t_logits, t_taps = tap_pass(program.teacher, images, points[:1], 1)
    mask = torch.zeros(4, 16, dtype=torch.bool)
    mask[:, ::2] = True
    torch.testing.assert_close(
        hgen([feats["norm"]], [t_taps["norm"]], mask=mask),
        gen([feats["norm"]], [t_taps["norm"]], mask=mask),
    )
    out = hand(StepInputs(s_logits, feats, t_logits, t_taps, targets))
    torch.testing.assert_close(
        out["mimic"], program.terms["mimic"]([feats["blocks.0"]], [t_taps["blocks.0"]])
    )
    for name in ("nkd", "labels"):
        want = (
            program.terms[name](s_logits, t_logits, targets)
            if name == "nkd"
            else program.terms[name](s_logits, targets)
        )
        torch.testing.assert_close(out[name], want)
    soft = torch.softmax(torch.randn(4, 10), dim=1)
    torch.testing.assert_close(
        hand.losses["nkd"](s_logits, t_logits, soft), program.terms["nkd"](s_logits, t_logits, soft)
    )


def test_bad_recipe_exits_2_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.vkd"
    bad.write_text(
        TINY.replace(
            "vit_tiny_patch16_224 {\n    img_size = 16\n    patch_size = 4"
            "\n    depth = 1\n    embed_dim = 32",
            "vit_tiny_patch16_22 {\n    img_size = 16\n    patch_size = 4"
            "\n    depth = 1\n    embed_dim = 32",
        )
    )
    code = main(["bench", str(bad), "--backend", "eager"])
    _, err = capsys.readouterr()
    assert code == 2 and "error" in err and "Traceback" not in err
    code = main(["bench", str(ROOT / "recipes" / "quickstart.vkd"), "--device", "nosuch"])
    _, err = capsys.readouterr()
    assert code == 2 and "nosuch" in err and "Traceback" not in err


def test_bench_options_are_torch_free_and_the_parser_uses_them() -> None:
    """Every command builds the parser, bench's options included: one torch-free source."""
    code = (
        "import sys; from vitkdl.cli import build_parser; "
        "from vitkdl.bench_options import BACKENDS, FLOOR_MODES; "
        "bench = build_parser()._subparsers._group_actions[0].choices['bench']; "
        "choices = {a.dest: a.choices for a in bench._actions}; "
        "assert tuple(choices['backend']) == BACKENDS and tuple(choices['floor']) == FLOOR_MODES; "
        "print('torch' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def _config(name: str, ms: float) -> ConfigResult:
    return ConfigResult(name, 1e3 / ms, ms, [ms], 0.0)


def test_ratios_are_keyed_by_configuration_name(tiny: Path) -> None:
    """A ratio reads its two configurations by name; one not measured gives None, whatever
    else is missing."""
    plan = vitkdl.plan(vitkdl.load(tiny))
    measured = {n: _config(n, ms) for n, ms in (("compiled", 10.0), ("eager", 25.0))}
    measured["floor"] = _config("floor", 4.0)
    ratios = _ratios(plan, measured, {"adapters_losses_ms": 1.0})
    assert ratios["compiled_vs_eager"] == pytest.approx(2.5)
    assert ratios["compiled_vs_hooks"] is None and ratios["eager_vs_hooks"] is None
    assert ratios["compiled_vs_timm"] is None
    assert ratios["overhead_vs_floor"] == pytest.approx(10 / 4 - 1)
    assert ratios["overhead_vs_floor_plus_losses"] == pytest.approx(10 / 5 - 1)
    measured["timm"] = _config("timm", 30.0)
    assert _ratios(plan, measured, None)["compiled_vs_timm"] == pytest.approx(3.0)
    assert _ratios(plan, measured, None)["overhead_vs_floor_plus_losses"] is None


@pytest.mark.slow
def test_configurations_are_named_and_built_in_order(tiny: Path) -> None:
    """The bench is a class: setup, build (each named configuration), time, results; a
    configuration that cannot be built for this recipe is left out by name."""
    assert [c.name for c in CONFIGURATIONS] == [
        "compiled",
        "eager",
        "hooks",
        "timm",
        "floor",
        *TEACHER_CONFIGURATIONS,
    ]
    plan = vitkdl.plan(vitkdl.load(tiny))
    lines: list[str] = []
    bench = Bench(
        plan,
        steps=1,
        warmup=1,
        device="cpu",
        compile_backend="eager",
        breakdown=False,
        loader=False,
        progress=lines.append,
    )
    bench.setup()
    try:
        bench.build()
        # timm cannot express the mimic term; the teacher's options are not for this recipe
        # (its features are read, its logits too) or not for a CPU
        assert set(bench.skipped) == {"timm", *TEACHER_CONFIGURATIONS[1:]}
        assert bench.same_as == {"teacher_plain": "compiled"}
        assert list(bench.peak_mb) == ["compiled", "eager", "hooks", "floor"]
        bench.time()
    finally:
        torch.set_num_threads(bench.threads_before)
    assert all(len(t.times) == 1 for t in bench.timers.values())
    result = bench.results()
    assert list(result.configs) == [*bench.peak_mb, "teacher_plain"]
    assert lines[0].startswith("build and warm up: compiled step (eager;")
    assert lines[1:4] == [f"build and warm up: {n}" for n in ("eager", "hooks", "timm")]
    assert lines[4] == "build and warm up: floor: student step and teacher inference"
    assert lines[5:-1] == [f"build and warm up: {n} (eager)" for n in TEACHER_CONFIGURATIONS]


def test_bad_options_raise_bench_error(tiny: Path) -> None:
    plan = vitkdl.plan(vitkdl.load(tiny))
    with pytest.raises(BenchError, match="at least 1"):
        bench_plan(plan, steps=0)
    with pytest.raises(BenchError, match="backend"):
        bench_plan(plan, compile_backend="tvm")
    # --batch and --set data.batch_size are one path given twice, not "the last wins".
    with pytest.raises(BenchError, match="both set the batch"):
        run_bench(tiny, ["data.batch_size=4"], batch=2)


@pytest.mark.slow
def test_recipes_without_a_hand_written_peer_are_benched_without_it(tmp_path: Path) -> None:
    """Taps inside blocks have no hook-based equivalent: (c) is left out and the result says
    why; (a), (b) and (d) are measured as ever."""
    path = tmp_path / "sub.vkd"
    path.write_text(
        TINY.replace(
            "student.blocks[0] -> teacher.blocks[0]",
            "student.blocks[0].attn -> teacher.blocks[0].attn",
        )
    )
    result = run_bench(
        path,
        steps=1,
        warmup=1,
        device="cpu",
        compile_backend="eager",
        breakdown=False,
        loader=False,
    )
    assert set(result.configs) == {"compiled", "eager", "floor", "teacher_plain"}
    assert result.ratios["compiled_vs_hooks"] is None
    assert any(n.startswith("hooks not measured") and "blocks.0.attn" in n for n in result.notes)
    console = Console(record=True, width=200)
    render(result.to_dict(), console)
    text = console.export_text()
    assert "(a) vitkdl compiled" in text and "(d) floor" in text and "(c) hooks" not in text
    assert "compiled vs hooks -x" in text and "part by part" not in text
    assert "hooks not measured" in text and "data loader" not in text


def test_peak_flops_match_cards_strictly() -> None:
    from vitkdl.bench import peak_flops_of

    assert peak_flops_of("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_of("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_of("NVIDIA H100 NVL") == 835e12
    assert peak_flops_of("NVIDIA H200") == 989e12
    assert peak_flops_of("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_of("NVIDIA H100 XYZ") is None  # unknown variant: no MFU, not a guess
    assert peak_flops_of("NVIDIA GeForce RTX 4090") is None


TOKEN = """recipe token_bench
teacher vit_tiny_patch16_224 {
    img_size = 16  patch_size = 4  depth = 1  embed_dim = 48  num_heads = 2  num_classes = 10
    head = random
}
student deit_tiny_distilled_patch16_224 {
    img_size = 16  patch_size = 4  depth = 1  embed_dim = 32  num_heads = 2  num_classes = 10
}
distill {
    token { mode = soft  temperature = 2.0  weight = 0.5 }
    labels { weight = 0.5 }
}
data synthetic { batch_size = 8  size = 32 }
train { epochs = 1  precision = fp32  compile = off }
"""


def test_what_timms_own_tasks_can_express(tmp_path: Path, tiny: Path) -> None:
    path = tmp_path / "token.vkd"
    path.write_text(TOKEN)
    plan = vitkdl.plan(vitkdl.load(path))
    assert timm_task_kwargs(plan) == {
        "task": "TokenDistillationTask",
        "distill_type": "soft",
        "temperature": 2.0,
        "distill_loss_weight": 0.5,
        "task_loss_weight": 0.5,
        "smoothing": 0.0,
    }
    path.write_text(
        TOKEN.replace("token { mode = soft  temperature = 2.0", "kd { temperature = 3.0")
    )
    assert timm_task_kwargs(vitkdl.plan(vitkdl.load(path)))["task"] == "LogitDistillationTask"
    with pytest.raises(BenchError, match="cannot express the mimic term 'mimic'"):
        timm_task_kwargs(vitkdl.plan(vitkdl.load(tiny)))
    path.write_text(
        TOKEN.replace(
            "img_size = 16  patch_size = 4  depth = 1  embed_dim = 48",
            "img_size = 32  patch_size = 4  depth = 1  embed_dim = 48",
        )
    )
    with pytest.raises(BenchError, match="resizes the teacher's input to 32x32"):
        timm_task_kwargs(vitkdl.plan(vitkdl.load(path)))


def test_timms_token_task_computes_the_same_loss(tmp_path: Path) -> None:
    import timm.task

    path = tmp_path / "token.vkd"
    path.write_text(TOKEN)
    plan = vitkdl.plan(vitkdl.load(path))
    program = vitkdl.build(plan, "cpu", load=False)
    program.train()
    images, labels = torch.randn(4, 3, 16, 16), torch.tensor([1, 2, 3, 4])
    ours = program.forward(images, labels)["loss"]
    task = timm.task.TokenDistillationTask(
        program.student,
        program.teacher,
        criterion=torch.nn.CrossEntropyLoss(),
        distill_type="soft",
        temperature=2.0,
        distill_loss_weight=0.5,
        task_loss_weight=0.5,
        verbose=False,
    )
    task.train()
    torch.testing.assert_close(task(images, labels)["loss"], ours, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_bench_measures_timms_own_task_as_a_peer(tmp_path: Path) -> None:
    path = tmp_path / "token.vkd"
    path.write_text(TOKEN)
    result = run_bench(
        path,
        steps=1,
        warmup=1,
        device="cpu",
        compile_backend="eager",
        breakdown=False,
        loader=False,
        configs=["eager", "hooks", "timm"],
    )
    assert set(result.configs) == {"compiled", "eager", "hooks", "timm", "floor"}
    assert result.ratios["compiled_vs_timm"] > 0


# --------------------------------------------------------------------------------------------
# The teacher's options (issue 20): each a configuration where the recipe allows it


def _teacher_bench(path: Path, overrides: list[str] | None = None) -> Bench:
    """Build, warm up and time once (eager) every teacher configuration of a recipe."""
    plan = vitkdl.plan(vitkdl.load(path, overrides))
    names = list(TEACHER_CONFIGURATIONS)
    bench = Bench(plan, steps=1, warmup=1, device="cpu", compile_backend="eager", configs=names)
    bench.breakdown = bench.loader = False
    bench.setup()
    try:
        bench.build()
        bench.time()
    finally:
        torch.set_num_threads(bench.threads_before)
    return bench


@pytest.mark.slow
def test_teacher_configurations_are_measured_where_the_recipe_allows_them(tiny: Path) -> None:
    """A logit-only recipe: the cached step and the masked teacher are built; early exit is
    not (the logits need the whole teacher), bf16 and fp8 not on a CPU. The plain teacher is
    the recipe's own step, reported as it."""
    bench = _teacher_bench(tiny, ["~distill.mimic", "~distill.generate"])
    assert {"cached_logits", "masked"} <= set(bench.timers)
    assert "logits" in bench.skipped["early_exit"]
    assert bench.skipped["teacher_bf16"].startswith("CUDA only")
    assert bench.skipped["teacher_fp8"].startswith("CUDA only")
    assert bench.same_as == {"teacher_plain": "compiled"}
    result = bench.results()
    assert set(result.configs) >= {"compiled", "floor", "teacher_plain", "cached_logits", "masked"}
    for name in ("cached_logits_vs_plain", "masked_vs_plain", "cached_vs_student_only"):
        assert result.ratios[name] is not None, name
    assert result.ratios["teacher_share_of_plain"] is not None
    assert result.ratios["early_exit_vs_plain"] is None
    assert result.configs["masked"].details["teacher_tokens"] == 8  # of 16
    assert result.configs["teacher_plain"].details["same_as"] == "compiled"
    # (k) is the plain teacher on half its 16 patches; (j) holds no teacher at all
    plan = bench.plan
    masked = teacher_variant(plan, "masked", torch.device("cpu"))
    assert masked.teacher_keep == 8 and masked.teacher is not None
    assert masked.teacher.precision == "fp32" and plan.teacher_keep is None
    assert masked.cost.teacher_forward < plan.cost.teacher_forward


@pytest.mark.slow
def test_feature_recipes_get_early_exit_and_no_cache_or_mask(tiny: Path) -> None:
    """Only shallow mimicking: the recipe's step already stops early (early exit is the
    compiled step); the plain teacher runs whole; logits cannot stand for the features."""
    bench = _teacher_bench(tiny, ["~distill.generate", "~distill.nkd", "teacher.depth=2"])
    assert bench.plan.teacher_depth == 1
    assert bench.same_as == {"early_exit": "compiled"}
    assert "teacher_plain" in bench.timers
    assert "reads the teacher's features" in bench.skipped["cached_logits"]
    assert "reads the teacher's features" in bench.skipped["masked"]  # the recipe's own check
    plain = teacher_variant(bench.plan, "teacher_plain", torch.device("cpu"))
    assert plain.teacher_depth == 2 and bench.plan.teacher_depth == 1


@pytest.mark.slow
def test_a_recipe_that_keeps_tokens_is_its_own_masked_configuration(tiny: Path) -> None:
    over = ["~distill.mimic", "~distill.generate", "teacher.keep=0.25"]
    bench = _teacher_bench(tiny, over)
    assert bench.same_as == {"masked": "compiled"}
    assert "teacher_plain" in bench.timers  # every token: not the recipe's step
    assert bench.plan.teacher_keep == 4


def test_bf16_and_fp8_teachers_are_gpu_configurations(tiny: Path) -> None:
    plan = vitkdl.plan(vitkdl.load(tiny))
    held = teacher_variant(plan, "teacher_bf16", torch.device("cuda"))  # no CUDA call made
    assert held.teacher is not None and held.teacher.precision == "bf16"
    assert teacher_variant(plan, "teacher_plain", torch.device("cpu")).teacher.precision == "fp32"
    with pytest.raises(BenchError, match="CUDA only"):
        teacher_variant(plan, "teacher_fp8", torch.device("cpu"))


def test_configs_option_selects_and_checks_names(tiny: Path) -> None:
    plan = vitkdl.plan(vitkdl.load(tiny))
    with pytest.raises(BenchError, match="unknown configuration 'cache'"):
        Bench(plan, configs=["cache"])
    bench = Bench(plan, configs=["eager"])
    assert bench.selected == {"compiled", "floor", "eager"}
    bench = Bench(plan, configs=["masked"])  # an option's ratio is against the plain teacher
    assert bench.selected == {"compiled", "floor", "masked", "teacher_plain"}


def test_teacher_ratios_are_speed_ups_over_the_plain_teacher(tiny: Path) -> None:
    plan = vitkdl.plan(vitkdl.load(tiny))
    measured = {n: _config(n, ms) for n, ms in (("compiled", 10.0), ("teacher_plain", 12.0))}
    measured["floor"] = ConfigResult(
        "floor", 1.0, 8.0, [8.0], 0.0, details={"student_step_ms": 5.0}
    )
    measured["cached_logits"] = _config("cached_logits", 6.0)
    measured["masked"] = _config("masked", 8.0)
    parts = {"teacher_forward_ms": 3.0, "sum_of_parts_ms": 12.0, "adapters_losses_ms": 1.0}
    ratios = _ratios(plan, measured, parts)
    assert ratios["cached_logits_vs_plain"] == pytest.approx(2.0)
    assert ratios["masked_vs_plain"] == pytest.approx(1.5)
    assert ratios["early_exit_vs_plain"] is None and ratios["teacher_bf16_vs_plain"] is None
    assert ratios["teacher_share"] == pytest.approx(0.25)
    assert ratios["teacher_share_of_plain"] == pytest.approx(0.5)
    assert ratios["cached_vs_student_only"] == pytest.approx(6.0 / 5.0)


@pytest.mark.slow
def test_a_lower_precision_teacher_reports_its_fidelity(
    tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(h) measures what bf16 changes, as the probe does, on the bench batch (bf16 is a GPU
    configuration: allowed on the CPU here to measure it)."""
    import vitkdl.bench as bench_module
    from vitkdl.probe import FidelityMeter

    monkeypatch.setattr(bench_module, "_precision_problem", lambda name, device: None)
    plan = vitkdl.plan(vitkdl.load(tiny))
    bench = Bench(plan, steps=1, warmup=1, device="cpu", compile_backend="eager")
    bench.selected = {"compiled", "floor", "teacher_bf16"}
    bench.breakdown = bench.loader = False
    result = bench.run()
    f = result.configs["teacher_bf16"].details["fidelity"]
    assert (f["held"], f["reference"]) == ("bf16", "fp32")
    assert set(f["cosine"]) == {"blocks.0", "norm"}  # what mimic and generate tap
    # The probe's own measurement on the same batch and the same variant.
    torch.manual_seed(plan.seed)
    variant = teacher_variant(plan, "teacher_bf16", torch.device("cuda"))
    program = vitkdl.build(variant, "cpu", load=False, compile="off", reference=True)
    meter = FidelityMeter()
    meter.add(program, bench.work.images)
    assert f == asdict(meter.fidelity(program))
    assert all(0.99 < c < 1.0 for c in f["cosine"].values())
    out = Console(record=True, width=120)
    render(result.to_dict(), out)
    text = out.export_text()
    assert "teacher in bf16 against fp32" in text and "cosine of teacher.norm" in text
