"""The teacher-output cache (vitkdl.train.cache): exact replay, keys, resume, top-k, checks."""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from vitkdl import pipeline
from vitkdl.cli import main
from vitkdl.planner import Plan, without_cache
from vitkdl.program import Program, build
from vitkdl.train.cache import CacheError, CacheReader, fill, topk_logits
from vitkdl.train.data import build_loaders, build_mixup, set_epoch, step_key

TINY = """
recipe {name}
student vit_tiny_patch16_224 {{
    img_size = 8  patch_size = 2  in_chans = 1  depth = 1  embed_dim = 16  num_heads = 2
    num_classes = 10  drop_path = 0.1
}}
teacher vit_tiny_patch16_224 {{
    img_size = 8  patch_size = 2  in_chans = 1  depth = 1  embed_dim = 16  num_heads = 2
    num_classes = 10  {teacher}
}}
data digits {{ batch_size = 64  augment = {augment}  mixup = 0.8  cutmix = 1.0 }}
distill {{ {terms} }}
train {{ epochs = {epochs}  log_every = 1 }}
"""


def recipe(
    tmp: Path,
    name: str = "kd",
    *,
    cache: str | None = "cache",
    topk: str = "all",
    teacher: str = "head = random",
    augment: str = "deit",
    terms: str = "kd",
    epochs: int = 2,
) -> Path:
    fields = teacher
    if cache is not None:
        fields += f' cache = "{tmp / cache}"  topk = {topk}'
    path = tmp / f"{name}.vkd"
    path.write_text(
        TINY.format(name=name, teacher=fields, augment=augment, terms=terms, epochs=epochs)
    )
    return path


def plan_of(path: Path, *overrides: str) -> Plan:
    return pipeline.plan(pipeline.load(path, list(overrides)))


CPU = torch.device("cpu")


@contextlib.contextmanager
def as_the_step(plan: Plan) -> Iterator[None]:
    """Compute with the thread count a run's step of ``plan`` uses (the sums' order)."""
    from vitkdl.train.step import cpu_threads

    before = torch.get_num_threads()
    torch.set_num_threads(cpu_threads(plan, CPU) or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_the_cache_holds_the_teachers_logits_of_every_batch_bit_for_bit(tmp_path) -> None:
    """With ``topk = all`` each step's stored logits are those the step's own teacher pass
    computes on that step's batch (augmentation, random erasing, mixup/cutmix on), for two
    epochs, whatever the global random streams did in between."""
    plan = plan_of(recipe(tmp_path))
    report = fill(plan, CPU, runs_dir=tmp_path)
    assert report.computed == [0, 1] and report.teacher_top1 is None
    reader = CacheReader(plan, CPU)

    torch.manual_seed(plan.seed)
    program = build(plan.model_copy(update={"cache": None}), CPU)
    train, _, classes = build_loaders(plan.data)
    mixup = build_mixup(plan.data, classes)
    assert mixup is not None
    torch.manual_seed(1234)  # the student's streams are not the stream's
    steps = 0
    for epoch in range(2):
        set_epoch(train, epoch, seed=plan.data.seed)
        for batch, (x, y) in enumerate(train):
            torch.rand(3), random.random(), np.random.rand()
            x, _ = mixup(x, y, step_key(plan.data.seed, epoch, batch))
            with torch.no_grad(), as_the_step(plan):
                logits, _ = program.teacher_pass(x)
            assert logits is not None
            assert torch.equal(reader.logits(epoch, batch), logits)
            steps += 1
    assert steps == 2 * (1437 // 64) == 2 * reader.steps_per_epoch


@pytest.mark.slow
def test_a_cached_run_trains_exactly_as_an_uncached_one(tmp_path) -> None:
    """``topk = all``: every step's losses and the final student equal the uncached run's
    (2 epochs, augmentation, random erasing, mixup/cutmix and drop path on); the cached run
    fills its cache first and never builds the teacher."""
    from safetensors.torch import load_file

    cached, plain = recipe(tmp_path, "cached"), recipe(tmp_path, "plain", cache=None)
    out = tmp_path / "runs"
    assert main(["run", str(cached), str(plain), "--out", str(out), "--quiet"]) == 0
    assert (tmp_path / "cache" / "epoch-00001.pt").is_file()

    def records(name: str) -> list[dict]:
        lines = (out / name / "metrics.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["kind"] == "train"]

    a, b = records("cached"), records("plain")
    assert len(a) == len(b) == 2 * (1437 // 64)
    for x, y in zip(a, b, strict=True):
        assert (x["kd"], x["labels"], x["loss"]) == (y["kd"], y["labels"], y["loss"])
    s, t = (
        load_file(out / "cached" / "student.safetensors"),
        load_file(out / "plain" / "student.safetensors"),
    )
    assert s.keys() == t.keys() and all(torch.equal(s[k], t[k]) for k in s)


def test_the_cache_pass_computes_with_the_threads_of_the_run(tmp_path, monkeypatch) -> None:
    """The thread count changes the order of float sums (the teacher's logits moved by 4e-8
    when the pass ran on 2 threads and the step on 1): the pass, a cached and an uncached run
    of one recipe all compute with the count the uncached step would use."""
    from vitkdl.train import step

    cached = plan_of(recipe(tmp_path))
    assert step.cpu_threads(cached, CPU) == step.cpu_threads(without_cache(cached), CPU) == 1
    assert step.cpu_threads(cached, torch.device("meta")) is None  # only the CPU's count
    seen: list[int] = []
    teacher_pass = Program.teacher_pass

    def record(self, images):
        seen.append(torch.get_num_threads())
        return teacher_pass(self, images)

    monkeypatch.setattr(Program, "teacher_pass", record)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fill(cached, CPU, runs_dir=tmp_path, epochs=1)
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 2  # given back
    finally:
        torch.set_num_threads(before)


def test_a_cached_program_has_no_teacher_and_takes_the_logits_from_the_batch(tmp_path) -> None:
    plan = plan_of(recipe(tmp_path))
    program = build(plan, CPU)
    assert program.teacher is None and plan.cost.teacher_forward == 0
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    t = torch.randn(4, 10)
    torch.manual_seed(0)
    out = program.step(x, y, cached=t)
    assert set(out) == {"kd", "labels", "loss"} and torch.isfinite(out["loss"])


def _weights(path: Path, seed: int) -> None:
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        img_size=8,
        patch_size=2,
        in_chans=1,
        depth=1,
        embed_dim=16,
        num_heads=2,
        num_classes=10,
    )
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def test_a_changed_transform_or_teacher_is_refused_naming_what_differs(tmp_path) -> None:
    weights = tmp_path / "teacher.safetensors"
    _weights(weights, 0)
    path = recipe(tmp_path, teacher=f'weights = "{weights}"', epochs=1)
    plan = plan_of(path)
    fill(plan, CPU, runs_dir=tmp_path)
    CacheReader(plan, CPU)  # the same key: accepted

    with pytest.raises(CacheError, match=r"transform\.augment \(built: deit, now: basic\)"):
        CacheReader(plan_of(path, "data.augment=basic"), CPU)
    with pytest.raises(CacheError, match=r"seed \(built: 0, now: 3\).*data \{ seed = N \}"):
        fill(plan_of(path, "data.seed=3"), CPU, runs_dir=tmp_path)
    with pytest.raises(CacheError, match=r"batch_size"):
        CacheReader(plan_of(path, "data.batch_size=32"), CPU)
    _weights(weights, 1)  # other weights in the same file
    with pytest.raises(CacheError, match=r"teacher\.weights\.sha256") as caught:
        CacheReader(plan, CPU)
    assert "Delete the folder" in str(caught.value)


def test_a_killed_pass_resumes_from_the_first_missing_epoch(tmp_path) -> None:
    plan = plan_of(recipe(tmp_path, epochs=3, topk="3"))
    written: list[int] = []

    def kill_after_first(epoch: int) -> None:
        written.append(epoch)
        raise KeyboardInterrupt  # killed once epoch 0's file is whole

    with pytest.raises(KeyboardInterrupt):
        fill(plan, CPU, runs_dir=tmp_path, on_epoch=kill_after_first)
    assert written == [0]
    assert sorted(p.name for p in (tmp_path / "cache").glob("epoch-*.pt")) == ["epoch-00000.pt"]
    with pytest.raises(CacheError, match=r"lacks epoch\(s\) 1, 2"):
        CacheReader(plan, CPU)

    again: list[int] = []
    report = fill(plan, CPU, runs_dir=tmp_path, on_epoch=again.append)
    assert again == report.computed == [1, 2] and report.kept == [0]
    # The resumed cache is the one an uninterrupted pass writes.
    fresh = plan.model_copy(
        update={"cache": plan.cache.model_copy(update={"path": str(tmp_path / "fresh")})}
    )  # type: ignore[union-attr]
    fill(fresh, CPU, runs_dir=tmp_path)
    for epoch in range(3):
        a = torch.load(tmp_path / "cache" / f"epoch-{epoch:05d}.pt", weights_only=True)
        b = torch.load(tmp_path / "fresh" / f"epoch-{epoch:05d}.pt", weights_only=True)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert fill(plan, CPU, runs_dir=tmp_path).computed == []
    (tmp_path / "cache" / "manifest.json").unlink()  # files of an unknown key
    with pytest.raises(CacheError, match=r"no manifest\.json"):
        fill(plan, CPU, runs_dir=tmp_path)


def test_topk_keeps_the_top_k_and_spreads_the_rest_as_tinyvit_does(tmp_path) -> None:
    plan = plan_of(recipe(tmp_path, topk="3", epochs=1))
    assert plan.cache is not None and plan.cache.topk == 3
    assert plan.cache.bytes_per_sample == 3 * (2 + 2)
    fill(plan, CPU, runs_dir=tmp_path)
    stored = torch.load(tmp_path / "cache" / "epoch-00000.pt", weights_only=True)
    assert stored["values"].dtype == torch.float16 and stored["indices"].dtype == torch.int16
    assert stored["values"].shape == (1, 1437 // 64, 64, 3)
    logits = CacheReader(plan, CPU).logits(0, 0)
    p = logits.softmax(-1)
    assert torch.allclose(p.sum(-1), torch.ones(64), atol=1e-5)
    top = p.topk(3, dim=-1)
    values = stored["values"][0, 0].float().exp()
    assert torch.allclose(top.values, values, atol=1e-6)
    rest = p.scatter(-1, top.indices, 0.0)
    expected = (1 - values.sum(-1, keepdim=True)) / 7
    assert torch.allclose(rest.sum(-1, keepdim=True), expected * 7, atol=1e-5)
    assert torch.allclose(rest.max(-1, keepdim=True).values, expected, atol=1e-5)

    # The same by hand: three known log-probabilities over five classes.
    v = torch.log(torch.tensor([[0.5, 0.2, 0.1]]))
    out = topk_logits(v, torch.tensor([[4, 0, 2]]), 5).softmax(-1)
    assert torch.allclose(out, torch.tensor([[0.2, 0.1, 0.1, 0.1, 0.5]]), atol=1e-6)


def test_cache_fields_are_checked_where_they_are_written(tmp_path) -> None:
    def errors(path: Path) -> list[str]:
        _, diags, _ = pipeline.validate(path)
        return [d.message for d in diags if d.is_error]

    feature = recipe(tmp_path, "f", terms="kd  mimic student.blocks[0] -> teacher.blocks[0]")
    assert any("mimic term 'mimic' reads the teacher's features" in e for e in errors(feature))
    too_many = recipe(tmp_path, "t", topk="11")
    assert any("topk = 11 is more than the teacher's 10 classes" in e for e in errors(too_many))
    lone = recipe(tmp_path, "l", cache=None, teacher="head = random topk = 5")
    assert any("topk is how many" in e for e in errors(lone))
    student = recipe(tmp_path, "s")
    student.write_text(student.read_text().replace("drop_path = 0.1", 'cache = "x"'))
    assert any("the student has none" in e for e in errors(student))
    _, diags, _ = pipeline.validate(recipe(tmp_path, "ok"))
    error = next(d for d in pipeline.validate(feature)[1] if "features" in d.message)
    assert error.span is not None  # at the teacher's cache field
    line = feature.read_text().splitlines()[error.span.line - 1]
    assert line[error.span.column - 1 :].startswith('cache = "')
    assert not [d for d in diags if d.is_error]


def test_explain_and_the_cache_command(tmp_path, capsys) -> None:
    path = recipe(tmp_path, topk="all", epochs=1)
    assert main(["explain", str(path)]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"teacher cache: {tmp_path / 'cache'}, all 10 logits in fp32 (exact): 40 bytes" in text
    assert "1,408 samples" in text and "teacher forward (cached: not run)" in text
    assert "data 0 (data.seed, else train.seed: order, augmentation" in text

    assert main(["cache", str(path), "--out", str(tmp_path / "runs"), "--quiet"]) == 0
    assert "1 epoch(s) computed" in capsys.readouterr().out
    assert main(["cache", str(path), "--out", str(tmp_path / "runs"), "--quiet"]) == 0
    assert "0 epoch(s) computed" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["teacher_top1"] is not None and manifest["steps_per_epoch"] == 1437 // 64

    assert main(["cache", str(path), "--set", "data.augment=none", "--quiet"]) == 2
    assert "transform.augment" in " ".join(capsys.readouterr().err.split())
    assert main(["cache", str(path), "--device", "tpu"]) == 2
    assert main(["cache", str(path), "--epochs", "0"]) == 2
    assert "unknown device 'tpu'" in capsys.readouterr().err
    plain = recipe(tmp_path, "plain", cache=None)
    assert main(["cache", str(plain)]) == 2
    assert "has no teacher cache" in " ".join(capsys.readouterr().err.split())


@pytest.mark.slow
def test_a_run_fills_only_the_epochs_it_reaches_and_reports_the_passes_top1(tmp_path) -> None:
    path = recipe(tmp_path, "short", epochs=3)
    out = tmp_path / "runs"
    assert main(["run", str(path), "--out", str(out), "--quiet", "--max-steps", "5"]) == 0
    assert sorted(p.name for p in (tmp_path / "cache").glob("epoch-*.pt")) == ["epoch-00000.pt"]
    summary = json.loads((out / "short" / "summary.json").read_text())
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert summary["teacher_top1"] == manifest["teacher_top1"] is not None
    assert summary["steps"] == 5


def test_probe_bench_and_compile_report_build_the_teacher_of_a_cached_plan(tmp_path) -> None:
    """What measures the teacher builds it: the plan without its cache, its cost counting the
    teacher's forward again."""
    plan = plan_of(recipe(tmp_path))
    full = without_cache(plan)
    assert plan.cost.teacher_forward == 0 and full.cache is None
    assert full.cost.teacher_forward == plan.teacher.forward_flops  # type: ignore[union-attr]
    assert full.cost.total == plan.cost.total + full.cost.teacher_forward
    assert build(full, CPU, load=False).teacher is not None


def test_a_cache_for_two_devices_holds_each_ranks_batches(tmp_path) -> None:
    """``--world-size 2``: the pass stores each rank's batches (its shard of the order, its
    mixup), as each process of the run will see them."""
    path = recipe(tmp_path, epochs=1)
    plan = pipeline.plan(pipeline.load(path), world_size=2)
    # The teacher's top-1 is measured on the whole validation split, as a run sums it.
    report = fill(plan, CPU, runs_dir=tmp_path, evaluate=lambda _, val: len(val.dataset))
    assert report.teacher_top1 == 360
    torch.manual_seed(plan.seed)
    program = build(without_cache(plan), CPU)
    for rank in (0, 1):
        reader = CacheReader(plan, CPU, rank)
        train, _, classes = build_loaders(plan.data, distributed=True, rank=rank, world_size=2)
        mixup = build_mixup(plan.data, classes)
        assert mixup is not None and reader.steps_per_epoch == len(train) == 1437 // 128
        set_epoch(train, 0, seed=plan.data.seed, rank=rank)
        for batch, (x, y) in enumerate(train):
            x, _ = mixup(x, y, step_key(plan.data.seed, 0, batch, rank))
            with torch.no_grad(), as_the_step(plan):
                assert torch.equal(reader.logits(0, batch), program.teacher_pass(x)[0])
    with pytest.raises(CacheError, match=r"world_size \(built: 2, now: 1\)"):
        CacheReader(plan_of(path), CPU)
