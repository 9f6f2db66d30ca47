"""`vitkdl run` end to end on tiny recipes: outputs, exact resume, faults, dependencies."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT
from vitkdl.cli import main
from vitkdl.train.checkpoint import load_checkpoint

TINY = """
recipe {name}
student vit_tiny_patch16_224 {{
    img_size = 8
    patch_size = 2
    in_chans = 1
    depth = 1
    embed_dim = 16
    num_heads = 2
    num_classes = 10
}}
data digits {{ batch_size = 32 }}
train {{
    epochs = {epochs}
    optimizer = adamw(lr = 2e-3, weight_decay = 0.05)
    schedule = cosine(warmup_epochs = 1, min_lr = 1e-5)
    eval_every = 1
    log_every = {log_every}
    ema = 0.99
    clip_grad = 1.0
}}
"""

STUDENT = """
recipe {name}
teacher from "teacher.vkd"
student vit_tiny_patch16_224 {{
    img_size = 8
    patch_size = 2
    in_chans = 1
    depth = 1
    embed_dim = 8
    num_heads = 2
    num_classes = 10
}}
data digits {{ batch_size = 32 }}
distill {{
    mimic student.blocks[0] -> teacher.blocks[0] {{ weight = 1e-3 }}
    generate student.norm -> teacher.norm {{ weight = 1e-4 }}
    nkd
}}
train {{ epochs = 1 log_every = 10 }}
"""


def write(tmp: Path, name: str, text: str) -> Path:
    path = tmp / name
    path.write_text(text)
    return path


def run(*argv: str) -> int:
    return main(["run", *argv, "--quiet"])


def test_tiny_run_writes_every_output_and_exports_a_timm_student(tmp_path, capsys) -> None:
    recipe = write(tmp_path, "tiny.vkd", TINY.format(name="tiny", epochs=2, log_every=10))
    assert run(str(recipe), "--out", str(tmp_path / "runs")) == 0
    out = tmp_path / "runs" / "tiny"
    for name in (
        "recipe.json",
        "plan.json",
        "metrics.jsonl",
        "curves.png",
        "last.pt",
        "best.pt",
        "student.safetensors",
        "student_ema.safetensors",
        "summary.json",
    ):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    for key in (
        "recipe",
        "top1",
        "top5",
        "best_top1",
        "teacher_top1",
        "epochs",
        "steps",
        "images_per_second",
        "wall_seconds",
        "peak_memory_mb",
        "world_size",
        "compile",
    ):
        assert key in summary, key
    assert summary["epochs"] == 2 and summary["steps"] == 2 * (1437 // 32)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"]  # it learns
    assert {"loss", "labels", "lr", "images_per_second"} <= set(train[0])
    assert [r["epoch"] for r in records if r["kind"] == "eval"] == [0, 1]

    import timm

    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=True,
        img_size=8,
        patch_size=2,
        in_chans=1,
        depth=1,
        embed_dim=16,
        num_heads=2,
        num_classes=10,
        pretrained_cfg_overlay={"file": str(out / "student.safetensors"), "num_classes": 10},
    )
    assert summary["timm"]["kwargs"]["embed_dim"] == 16
    from safetensors.torch import load_file

    saved = load_file(str(out / "student.safetensors"))
    assert torch.equal(model.head.weight, saved["head.weight"])


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _assert_same_run(whole: Path, resumed: Path) -> None:
    """A stopped-and-resumed run ended where the uninterrupted one did, weights bit for bit."""
    from safetensors.torch import load_file

    a, b = _summary(whole), _summary(resumed)
    for key in ("top1", "top5", "best_top1", "ema_top1", "epochs", "steps"):
        assert a[key] == b[key], key
    wa = load_file(str(whole / "student.safetensors"))
    wb = load_file(str(resumed / "student.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path) -> None:
    recipe = write(tmp_path, "tiny.vkd", TINY.format(name="tiny", epochs=3, log_every=1))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "vitkdl", "run", str(recipe), "--quiet"]
    subprocess.run(
        [*cmd, "--out", str(tmp_path / "whole")], check=True, env=env, cwd=ROOT, capture_output=True
    )

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [*cmd, "--out", str(killed)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics = killed / "tiny" / "metrics.jsonl"
    steps_per_epoch = 1437 // 32
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until the run is a few steps into epoch 1
        if metrics.exists() and (killed / "tiny" / "last.pt").exists():
            lines = metrics.read_text().splitlines()
            steps = [json.loads(x)["step"] for x in lines[-3:] if x.strip().endswith("}")]
            if steps and max(steps) >= steps_per_epoch + 5:
                break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "tiny" / "summary.json").exists()

    subprocess.run(
        [*cmd, "--out", str(killed), "--resume"], check=True, env=env, cwd=ROOT, capture_output=True
    )
    a, b = _summary(tmp_path / "whole" / "tiny"), _summary(killed / "tiny")
    for key in ("top1", "top5", "best_top1", "ema_top1", "epochs", "steps"):
        assert a[key] == b[key], key
    from safetensors.torch import load_file

    wa = load_file(str(tmp_path / "whole" / "tiny" / "student.safetensors"))
    wb = load_file(str(killed / "tiny" / "student.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_run_resumed_at_its_end_counts_the_epochs_it_has(tmp_path, capsys) -> None:
    """A 2-epoch run whose last checkpoint is its end (it died before its summary was
    written): --resume trains nothing more, and the summary says 2 epochs, not 3."""
    recipe = write(tmp_path, "tiny.vkd", TINY.format(name="tiny", epochs=2, log_every=50))
    out = tmp_path / "runs"
    assert run(str(recipe), "--out", str(out)) == 0
    whole = _summary(out / "tiny")
    (out / "tiny" / "summary.json").unlink()
    assert run(str(recipe), "--out", str(out), "--resume") == 0
    resumed = _summary(out / "tiny")
    assert resumed["steps"] == whole["steps"] == 2 * (1437 // 32)
    assert resumed["epochs"] == whole["epochs"] == 2


def test_resume_refuses_a_changed_recipe_unless_forced(tmp_path, capsys) -> None:
    recipe = write(tmp_path, "tiny.vkd", TINY.format(name="tiny", epochs=1, log_every=10))
    out = str(tmp_path / "runs")
    assert run(str(recipe), "--out", out, "--max-steps", "3") == 0
    capsys.readouterr()
    # A refusal (exit status 2): nothing failed, the command needs --force.
    assert run(str(recipe), "--out", out, "--resume", "--set", "train.epochs=2") == 2
    assert "different version of the recipe" in " ".join(capsys.readouterr().err.split())
    assert run(str(recipe), "--out", out, "--resume", "--force", "--set", "train.epochs=2") == 0


def test_corrupt_checkpoint_and_missing_checkpoint(tmp_path, capsys) -> None:
    recipe = write(tmp_path, "tiny.vkd", TINY.format(name="tiny", epochs=1, log_every=10))
    out = tmp_path / "runs"
    assert run(str(recipe), "--out", str(out), "--resume") == 2  # a refusal: nothing to resume
    assert "no checkpoint at" in capsys.readouterr().err
    assert run(str(recipe), "--out", str(out), "--max-steps", "2") == 0
    folder = (out / "tiny").resolve()  # runs/tiny: the latest
    (folder / "last.pt").write_bytes(b"PK\x03\x04 truncated")
    # best.pt still loads: --resume falls back to it, and says so.
    assert run(str(recipe), "--out", str(out), "--resume", "--max-steps", "3") == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "cannot be read" in err and f"resuming from {folder / 'best.pt'} instead" in err
    assert _summary(folder)["steps"] == 3
    for name in ("last.pt", "best.pt"):
        (folder / name).write_bytes(b"PK\x03\x04 truncated")
    assert run(str(recipe), "--out", str(out), "--resume") == 1
    err = " ".join(capsys.readouterr().err.split())
    assert err.count("cannot be read") == 2 and "Traceback" not in err


@pytest.mark.slow
def test_resume_falls_back_past_a_last_pt_with_corrupted_bytes(tmp_path, capsys) -> None:
    recipe = write(tmp_path, "tiny.vkd", TINY.format(name="tiny", epochs=1, log_every=10))
    out = tmp_path / "runs"
    assert run(str(recipe), "--out", str(out), "--max-steps", "2") == 0
    folder = (out / "tiny").resolve()
    last = folder / "last.pt"
    data = bytearray(last.read_bytes())
    middle = len(data) // 2  # 16 bytes inside the weights: the file still unpickles
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    last.write_bytes(bytes(data))
    capsys.readouterr()
    assert run(str(recipe), "--out", str(out), "--resume", "--max-steps", "3") == 0
    err = " ".join(capsys.readouterr().err.split())
    assert f"checkpoint {last} is corrupted" in err and "last.pt.sha256" in err
    assert f"resuming from {folder / 'best.pt'} instead" in err
    assert _summary(folder)["steps"] == 3
    assert load_checkpoint(last)["step"] == 3  # rewritten, with a checksum that matches


def test_nan_loss_names_the_term_and_keeps_the_checkpoint(tmp_path, capsys) -> None:
    write(tmp_path, "teacher.vkd", TINY.format(name="teacher", epochs=1, log_every=10))
    student = write(tmp_path, "student.vkd", STUDENT.format(name="student"))
    code = run(
        str(student),
        "--out",
        str(tmp_path / "runs"),
        "--set",
        "distill.mimic.weight=1e38",
        "--set",
        "train.epochs=2",
    )
    err = " ".join(capsys.readouterr().err.split())
    assert code == 1
    assert "at step 1 (epoch 0) in term mimic;" in err and "stopped" in err
    # the first term only: the others went NaN after it, from the weights it broke
    assert "generate" not in err and "nkd" not in err


def test_non_finite_names_the_first_step_and_its_first_term(tmp_path) -> None:
    from vitkdl.train.loop import TrainError, _stop_if_not_finite

    names = ["kd", "mimic", "generate", "loss"]
    saved = (tmp_path / "last.pt", None)
    cpu = torch.device("cpu")
    _stop_if_not_finite(torch.zeros(4, dtype=torch.int64), names, 9, 4, saved, cpu)  # all finite
    with pytest.raises(TrainError) as info:
        _stop_if_not_finite(torch.tensor([0, 7, 6, 6]), names, 9, 4, saved, cpu)
    message = str(info.value)
    assert "at step 6 (epoch 1) in term generate;" in message and "stopped at step 9" in message
    assert "mimic" not in message and "kd" not in message
    assert "no checkpoint was written before step 6" in message
    (tmp_path / "last.pt").write_bytes(b"")
    with pytest.raises(TrainError) as info:  # a sum of finite terms overflowed
        _stop_if_not_finite(torch.tensor([0, 0, 0, 3]), names, 4, 4, (saved[0], 2), cpu)
    message = str(info.value)
    assert "at step 3 (epoch 0) in the total loss" in message
    assert f"{tmp_path / 'last.pt'} (step 2)" in message and "--resume" in message


@pytest.mark.slow
def test_a_huge_learning_rate_names_only_the_first_term(tmp_path, capsys) -> None:
    write(tmp_path, "teacher.vkd", TINY.format(name="teacher", epochs=1, log_every=10))
    student = write(tmp_path, "student.vkd", STUDENT.format(name="student"))
    code = run(str(student), "--out", str(tmp_path / "runs"), "--set", "train.optimizer.lr=1e3")
    err = " ".join(capsys.readouterr().err.split())
    assert code == 1 and "the loss became NaN or infinite at step" in err
    named = [t for t in ("mimic", "generate", "nkd") if f"in term {t};" in err]
    assert len(named) == 1
    assert [t for t in ("mimic", "generate", "nkd") if t in err] == named


@pytest.mark.slow
def test_a_data_worker_error_saves_the_last_step_and_resume_finishes(tmp_path, capsys) -> None:
    """A DataLoader worker raises mid-epoch (as Pillow 13's posterize did): the run stops with
    a checkpoint of its last completed step and a clean message, and --resume, once the cause
    is gone, ends with the weights of a run that never failed."""
    from vitkdl.train.data import DigitsDataset

    text = TINY.format(name="tiny", epochs=1, log_every=10).replace(
        "batch_size = 32", "batch_size = 32 workers = 2"
    )
    recipe = write(tmp_path, "tiny.vkd", text)
    assert run(str(recipe), "--out", str(tmp_path / "clean")) == 0
    capsys.readouterr()

    real = DigitsDataset.__getitem__

    def failing_after(batches: int):  # type: ignore[no-untyped-def]
        calls = [0]  # per process: each forked worker counts its own

        def faulty(self, index):  # type: ignore[no-untyped-def]
            if len(self) == 1437:  # the train split
                calls[0] += 1
                if calls[0] > batches * 32:
                    raise ValueError("bits must be between or equal to 1 and 8")
            return real(self, index)

        return faulty

    def run_failing(batches: int, *args: str) -> int:
        mp = pytest.MonkeyPatch()
        mp.setattr(DigitsDataset, "__getitem__", failing_after(batches))
        try:
            return run(str(recipe), "--out", str(tmp_path / "runs"), *args)
        finally:
            mp.undo()

    code = run_failing(3)  # each worker's 4th batch: batch 6 (worker 0's) comes first
    err = " ".join(capsys.readouterr().err.split())
    assert code == 1
    assert "the data pipeline failed at step 7 (epoch 0, batch 6): ValueError: bits must" in err
    assert "the last completed step" in err and "--resume" in err
    assert "Traceback" not in err and "internal error" not in err
    folder = (tmp_path / "runs" / "tiny").resolve()
    assert "Traceback" in (folder / "error.txt").read_text()
    last = torch.load(folder / "last.pt", weights_only=True)
    assert (last["epoch"], last["batch"], last["step"]) == (0, 6, 6)

    # failing again while the resumed run skips the 6 batches done: the checkpoint stands
    assert run_failing(2, "--resume") == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "while skipping to batch 6 of epoch 0" in err and "resumed from is unchanged" in err
    last = torch.load(folder / "last.pt", weights_only=True)
    assert (last["epoch"], last["batch"], last["step"]) == (0, 6, 6)

    assert run(str(recipe), "--out", str(tmp_path / "runs"), "--resume") == 0
    assert _summary(folder)["steps"] == 1437 // 32
    from safetensors.torch import load_file

    resumed = load_file(str(folder / "student.safetensors"))
    clean = load_file(str((tmp_path / "clean" / "tiny").resolve() / "student.safetensors"))
    assert resumed.keys() == clean.keys()
    assert all(torch.equal(resumed[k], clean[k]) for k in clean)


def test_teacher_from_trains_the_dependency_first_then_reuses_it(tmp_path, capsys) -> None:
    write(tmp_path, "teacher.vkd", TINY.format(name="teacher", epochs=1, log_every=10))
    student = write(tmp_path, "student.vkd", STUDENT.format(name="student"))
    runs = tmp_path / "runs"
    assert main(["run", str(student), "--out", str(runs)]) == 0
    assert "training it first" in " ".join(capsys.readouterr().err.split())
    teacher_summary = _summary(runs / "teacher")
    student_summary = _summary(runs / "student")
    assert student_summary["teacher_top1"] == teacher_summary["top1"]
    assert main(["run", str(student), "--out", str(runs), "--set", "train.epochs=1"]) == 0
    assert "is up to date" in " ".join(capsys.readouterr().err.split())


def test_several_recipes_end_with_a_comparison(tmp_path, capsys) -> None:
    a = write(tmp_path, "a.vkd", TINY.format(name="a", epochs=1, log_every=10))
    b = write(tmp_path, "b.vkd", TINY.format(name="b", epochs=1, log_every=10))
    assert main(["run", str(a), str(b), "--out", str(tmp_path / "runs"), "--max-steps", "5"]) == 0
    assert "comparison" in capsys.readouterr().out  # the tables go to stdout
    assert (tmp_path / "runs" / "comparison.png").is_file()


def test_missing_data_root_and_unwritable_output(tmp_path, capsys) -> None:
    recipe = write(
        tmp_path,
        "img.vkd",
        TINY.format(name="img", epochs=1, log_every=10).replace(
            "data digits", 'data imagefolder { root = "nowhere" } #'
        ),
    )
    assert run(str(recipe), "--out", str(tmp_path / "runs")) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "data root nowhere does not exist" in err and "--set data.root=" in err
    blocker = tmp_path / "file"
    blocker.write_text("")
    ok = write(tmp_path, "ok.vkd", TINY.format(name="ok", epochs=1, log_every=10))
    assert run(str(ok), "--out", str(blocker / "runs")) == 74  # EX_IOERR, named
    err = " ".join(capsys.readouterr().err.split())
    assert f"cannot write {blocker / 'runs'}" in err and "pass --out DIR" in err


def test_imagefolder_of_your_own_images_trains(tmp_path, capsys) -> None:
    from PIL import Image

    root = tmp_path / "data"
    for split in ("train", "val"):
        for c, colour in enumerate(((255, 0, 0), (0, 0, 255))):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(8):
                Image.new("RGB", (20, 20), colour).save(folder / f"{i}.png")
    (root / "train" / "class0" / "broken.jpg").write_bytes(b"not an image")
    recipe = write(
        tmp_path,
        "folder.vkd",
        f"""
        student vit_tiny_patch16_224 {{
            img_size = 16  patch_size = 4  depth = 1  embed_dim = 16  num_heads = 2
            num_classes = 2
        }}
        data imagefolder {{ root = "{root}" batch_size = 4 augment = basic workers = 0 }}
        train {{ epochs = 2 }}""",
    )
    with pytest.warns(RuntimeWarning, match="broken.jpg"):
        assert run(str(recipe), "--out", str(tmp_path / "runs")) == 0
    assert _summary(tmp_path / "runs" / "folder")["top1"] is not None


@pytest.mark.slow
def test_smoke_runs_a_paper_recipe_without_its_data(tmp_path, capsys) -> None:
    code = run(
        str(ROOT / "recipes" / "deit_tiny_vitkd_kd.vkd"),
        "--smoke",
        "--out",
        str(tmp_path / "runs"),
        "--set",
        "student.depth=2",
        "--set",
        "teacher.depth=2",
    )
    assert code == 0, capsys.readouterr().err
    summary = _summary(tmp_path / "runs" / "deit_tiny_vitkd_kd")
    assert summary["steps"] == 3


DESIGN_SPACE = """
recipe design
teacher vit_small_patch16_224 {
    img_size = 8  patch_size = 2  in_chans = 1  depth = 2  embed_dim = 32  num_heads = 4
    num_classes = 10  head = random
}
student vit_tiny_patch16_224 {
    img_size = 8  patch_size = 2  in_chans = 1  depth = 2  embed_dim = 16  num_heads = 2
    num_classes = 10
}
data digits { batch_size = 32 }
distill {
    mimic student.blocks[0].attn -> teacher.blocks[0].attn as mha { weight = 1e-3 }
    mimic student.blocks[1].mlp -> teacher.blocks[1].mlp as rel { loss = relation }
    mimic student.blocks[0:2].attn_map -> teacher.blocks[0:2].attn_map as maps {
        loss = kl  heads = mean }
    generate student.norm -> teacher.norm as gen { generator = attention  weight = 1e-4 }
    generate student.blocks[1] -> teacher.blocks[1] as lin { generator = linear }
    nkd
}
train { epochs = 1  log_every = 1 }
"""


def test_the_papers_design_space_trains(tmp_path, capsys) -> None:
    """Taps inside blocks, relations, attention maps and every generator, in one run."""
    recipe = write(tmp_path, "design.vkd", DESIGN_SPACE)
    assert run(str(recipe), "--out", str(tmp_path / "runs"), "--max-steps", "3") == 0
    records = [
        json.loads(line)
        for line in (tmp_path / "runs" / "design" / "metrics.jsonl").read_text().splitlines()
    ]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    for name in ("mha", "rel", "maps", "gen", "lin", "nkd", "labels"):
        assert all(r[name] >= 0 for r in train), name


def test_evaluation_counts_only_readable_images_and_reports_the_skipped(tmp_path) -> None:
    """A corrupt validation image is left out (not replaced by its neighbour, which would
    count that one twice) and reported; the padded last batch still never counts."""
    import numpy as np
    from PIL import Image

    from tests.train.plans import data_plan
    from vitkdl.train.data import build_loaders
    from vitkdl.train.loop import evaluate

    root = tmp_path / "data"
    for split in ("train", "val"):
        for cls in ("a", "b"):
            for i in range(2):
                (root / split / cls).mkdir(parents=True, exist_ok=True)
                pixels = np.full((8, 8, 3), 40 * i, dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")
    (root / "val" / "a" / "0.png").write_bytes(b"\x89PNG cut short")
    cfg = data_plan("imagefolder", root=str(root), image_size=8, batch_size=3)
    _, val, _ = build_loaders(cfg)

    def always_a(images: torch.Tensor) -> torch.Tensor:  # class 0 ("a") for every image
        return torch.tensor([1.0, 0.0]).expand(images.shape[0], 2)

    with pytest.warns(RuntimeWarning, match=r"0\.png"):
        result = evaluate(always_a, val, torch.device("cpu"))
    # readable: a/1, b/0, b/1, one of them an "a": 1 of 3 (replacing a/0 by a/1: 2 of 4)
    assert result.top1 == pytest.approx(100 / 3) and result.top5 == pytest.approx(100.0)
    assert (result.counted, result.skipped) == (3, 1)
    # Two ranks: each evaluates its own share, nothing padded, so the counts add up exactly
    # (all_reduce_sum adds them; here, in one process, the test does).
    shares = []
    for rank in (0, 1):
        half = cfg.model_copy(update={"batch_size": 2})  # 2 training images per rank
        _, share, _ = build_loaders(half, distributed=True, rank=rank, world_size=2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            shares.append(evaluate(always_a, share, torch.device("cpu")))
    assert sum(r.counted for r in shares) == 3 and sum(r.skipped for r in shares) == 1
    hits = sum(r.top1 * r.counted for r in shares) / 100
    assert hits == pytest.approx(1.0)


def test_evaluation_pads_the_last_batch_into_one_graph() -> None:
    """360 digits at batch 32 leave a last batch of 8: padded, so a compiled predictor sees
    one shape (one graph), and the padding never counts."""
    from tests.train.plans import data_plan
    from vitkdl.train.data import build_loaders
    from vitkdl.train.loop import evaluate

    _, val, _ = build_loaders(data_plan("digits", image_size=8, in_chans=1, batch_size=32))
    graphs: list[object] = []

    def backend(gm, example_inputs):  # type: ignore[no-untyped-def]
        graphs.append(gm)
        return gm.forward

    weights = torch.randn(64, 10)
    torch._dynamo.reset()
    predict = torch.compile(lambda x: x.flatten(1) @ weights, backend=backend, fullgraph=True)
    result = evaluate(predict, val, torch.device("cpu"))
    top1, top5 = result.top1, result.top5
    assert len(graphs) == 1 and (result.counted, result.skipped) == (360, 0)
    expected = [], []
    for images, labels in val:
        top = (images.flatten(1) @ weights).topk(5, dim=-1).indices
        expected[0].append(top[:, 0].eq(labels))
        expected[1].append(top.eq(labels[:, None]).any(dim=-1))
    assert top1 == pytest.approx(100 * float(torch.cat(expected[0]).float().mean()))
    assert top5 == pytest.approx(100 * float(torch.cat(expected[1]).float().mean()))


@pytest.mark.slow
def test_a_resnet_teacher_trains_a_distilled_deit_through_its_token(tmp_path, capsys) -> None:
    """DeiT's setting in small: a CNN teacher (its own statistics and resolution, resized in
    the step) teaches the distillation head; the class head learns the labels; the summary
    reports each head."""
    recipe = write(
        tmp_path,
        "token.vkd",
        """
        teacher resnet18 { img_size = 24  head = random }
        student deit_tiny_distilled_patch16_224 {
            img_size = 16  patch_size = 4  depth = 1  embed_dim = 16  num_heads = 2
        }
        data synthetic { batch_size = 8  size = 32  classes = 10 }
        distill {
            token { mode = hard  weight = 0.5 }
            kd { temperature = 2.0  weight = 0.5 }
            labels { weight = 0.5 }
        }
        train { epochs = 1  log_every = 1 }
        """,
    )
    assert run(str(recipe), "--out", str(tmp_path / "runs"), "--max-steps", "2") == 0
    summary = _summary(tmp_path / "runs" / "token")
    assert summary["steps"] == 2 and summary["teacher_top1"] is not None
    assert summary["class_head_top1"] is not None and summary["dist_head_top1"] is not None
    records = [json.loads(x) for x in (tmp_path / "runs" / "token" / "metrics.jsonl").open()]
    assert {"token", "kd", "labels"} <= set(records[0])


@pytest.mark.slow
def test_a_dinov2_teacher_on_another_grid_trains(tmp_path, capsys) -> None:
    from tests.test_program import DINO

    recipe = write(tmp_path, "dino.vkd", DINO + "train { epochs = 1  log_every = 1 }\n")
    assert run(str(recipe), "--out", str(tmp_path / "runs"), "--max-steps", "2") == 0
    records = [json.loads(x) for x in (tmp_path / "runs" / "dino" / "metrics.jsonl").open()]
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == 2 and all(r["mimic"] > 0 and r["generate"] > 0 for r in train)


def _saves(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every checkpoint written: (file name, step)."""
    from vitkdl.train import loop

    saved: list[tuple[str, int]] = []
    real = loop.save_atomic

    def recording(state, path):  # type: ignore[no-untyped-def]
        saved.append((Path(path).name, state["step"]))
        real(state, path)

    monkeypatch.setattr(loop, "save_atomic", recording)
    return saved


def test_checkpoint_every_steps(tmp_path, monkeypatch) -> None:
    recipe = write(tmp_path, "tiny.vkd", TINY.format(name="tiny", epochs=1, log_every=10))
    saved = _saves(monkeypatch)
    args = ["--out", str(tmp_path / "runs"), "--max-steps", "12"]
    assert run(str(recipe), *args, "--set", "train.checkpoint_every=5 steps") == 0
    # the run's end: once before the evaluation (nothing lost if it fails), once after it
    assert [step for name, step in saved if name == "last.pt"] == [5, 10, 12, 12]
    last = torch.load(tmp_path / "runs" / "tiny" / "last.pt", weights_only=True)
    assert (last["epoch"], last["batch"], last["step"]) == (0, 12, 12)  # mid-epoch


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_stops_at_the_step_boundary_and_twice_aborts_unsaved(
    tmp_path, monkeypatch, capsys, presses
) -> None:
    """Ctrl-C during step 7: once, the run finishes that step, saves it and exits 130; twice,
    it aborts there and then, keeping only the checkpoint of step 5 and saying so."""
    from vitkdl.train import loop

    recipe = write(tmp_path, "tiny.vkd", TINY.format(name="tiny", epochs=1, log_every=10))
    saved = _saves(monkeypatch)
    real = loop.Run._report

    def report(self, result):  # type: ignore[no-untyped-def]
        if self.step == 7:  # inside the step, before the loop checks for a stop
            for _ in range(presses):
                os.kill(os.getpid(), signal.SIGINT)
        real(self, result)

    monkeypatch.setattr(loop.Run, "_report", report)
    args = ["--out", str(tmp_path / "runs"), "--max-steps", "12"]
    assert run(str(recipe), *args, "--set", "train.checkpoint_every=5 steps") == 130
    err = capsys.readouterr().err
    assert "Ctrl-C again to abort now" in err
    last = torch.load(tmp_path / "runs" / "tiny" / "last.pt", weights_only=True)
    if presses == 1:
        assert [step for _, step in saved] == [5, 7] and last["step"] == 7
        assert "stopped by SIGINT at step 7" in err
    else:
        assert [step for _, step in saved] == [5] and last["step"] == 5
        assert "aborted by a second Ctrl-C at step 7, without a checkpoint" in err


def test_checkpoint_every_minutes(tmp_path) -> None:
    """A clock that moves 25 s per step: with "1 min", a checkpoint every third step."""
    import vitkdl
    from vitkdl.train import loop

    recipe = write(tmp_path, "tiny.vkd", TINY.format(name="tiny", epochs=1, log_every=10))
    spec = vitkdl.load(recipe, ["train.checkpoint_every=1 min"])
    plan = vitkdl.plan(spec)
    assert (plan.checkpoint_every, plan.checkpoint_unit) == (1.0, "minutes")
    clock = [0.0]
    steps: list[int] = []
    real_save = loop.Run.save

    def save(self, epoch, batch, name="last.pt"):  # type: ignore[no-untyped-def]
        if name == "last.pt":
            steps.append(self.step)
        real_save(self, epoch, batch, name)

    def tick(step: int, total: int, epoch: int) -> None:
        clock[0] += 25.0

    opts = loop.RunOptions(out_dir=tmp_path / "out", max_steps=10, quiet=True, on_step=tick)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop.time, "monotonic", lambda: clock[0])
        mp.setattr(loop.Run, "save", save)
        loop.train(plan, opts)
    # 75 s, 150 s, 225 s after the last save; the stop, before and after its evaluation
    assert steps == [3, 6, 9, 10, 10]


@pytest.mark.slow
def test_sigterm_and_sigusr1_mid_epoch_save_and_resume_to_the_same_weights(tmp_path) -> None:
    """SIGTERM (preemption) and SIGUSR1 (sbatch --signal) stop a run at its next step with a
    checkpoint and exit 75; --resume continues it to the weights of an uninterrupted run."""
    recipe = write(tmp_path, "tiny.vkd", TINY.format(name="tiny", epochs=3, log_every=1))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "vitkdl", "run", str(recipe), "--quiet"]
    subprocess.run(
        [*cmd, "--out", str(tmp_path / "whole")], check=True, env=env, cwd=ROOT, capture_output=True
    )
    out = tmp_path / "signalled"
    metrics = out / "tiny" / "metrics.jsonl"
    steps_per_epoch = 1437 // 32
    for sig, after, resume in (
        (signal.SIGTERM, steps_per_epoch + 5, []),
        (signal.SIGUSR1, 2 * steps_per_epoch + 7, ["--resume"]),
    ):
        proc = subprocess.Popen(
            [*cmd, "--out", str(out), *resume],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.time() + 120
        while time.time() < deadline:  # wait until the run is a few steps into the epoch
            if metrics.exists():
                lines = metrics.read_text().splitlines()
                steps = [json.loads(x)["step"] for x in lines[-3:] if x.strip().endswith("}")]
                if steps and max(steps) >= after:
                    break
            time.sleep(0.02)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 75, err
        assert f"stopped by {sig.name}" in err and "--resume" in err
        saved = torch.load(out / "tiny" / "last.pt", weights_only=True)
        assert saved["step"] >= after and saved["batch"] not in (0, steps_per_epoch)  # mid-epoch
        assert not (out / "tiny" / "summary.json").exists()

    subprocess.run(
        [*cmd, "--out", str(out), "--resume"], check=True, env=env, cwd=ROOT, capture_output=True
    )
    _assert_same_run(tmp_path / "whole" / "tiny", out / "tiny")


@pytest.mark.slow
def test_ctrl_c_mid_epoch_stops_at_a_step_and_resume_matches_with_drop_path(tmp_path) -> None:
    """The first Ctrl-C stops a run with drop path (random per step) at its next step with a
    checkpoint and exits 130; --resume continues it to the weights of an uninterrupted run
    (a checkpoint taken mid-step would hold the RNG state of that moment and diverge)."""
    text = TINY.format(name="tiny", epochs=2, log_every=1)
    text = text.replace("num_classes = 10\n}", "num_classes = 10\n    drop_path_rate = 0.2\n}", 1)
    assert "drop_path_rate" in text
    recipe = write(tmp_path, "tiny.vkd", text)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "vitkdl", "run", str(recipe), "--quiet"]
    subprocess.run(
        [*cmd, "--out", str(tmp_path / "whole")], check=True, env=env, cwd=ROOT, capture_output=True
    )
    out = tmp_path / "interrupted"
    metrics = out / "tiny" / "metrics.jsonl"
    steps_per_epoch = 1437 // 32
    after = steps_per_epoch + 5
    proc = subprocess.Popen(
        [*cmd, "--out", str(out)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until the run is a few steps into the epoch
        if metrics.exists():
            lines = metrics.read_text().splitlines()
            steps = [json.loads(x)["step"] for x in lines[-3:] if x.strip().endswith("}")]
            if steps and max(steps) >= after:
                break
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Ctrl-C again to abort now" in err
    assert "stopped by SIGINT" in err and "--resume" in err and "Traceback" not in err
    saved = torch.load(out / "tiny" / "last.pt", weights_only=True)
    assert saved["step"] >= after and saved["batch"] not in (0, steps_per_epoch)  # mid-epoch
    assert not (out / "tiny" / "summary.json").exists()

    subprocess.run(
        [*cmd, "--out", str(out), "--resume"], check=True, env=env, cwd=ROOT, capture_output=True
    )
    _assert_same_run(tmp_path / "whole" / "tiny", out / "tiny")


def test_runs_in_one_process_do_not_inherit_each_others_settings(tmp_path) -> None:
    """A tiny run drops to one CPU thread; the next run in the same process starts from the
    threads it was given, and counts only the graphs it compiled."""
    threads = torch.get_num_threads()
    recipe = write(tmp_path, "tiny.vkd", TINY.format(name="tiny", epochs=1, log_every=10))
    assert run(str(recipe), "--out", str(tmp_path / "runs"), "--max-steps", "2") == 0
    assert torch.get_num_threads() == threads
    assert _summary(tmp_path / "runs" / "tiny")["compile"]["graphs_compiled"] == 0  # eager


def test_a_headless_teacher_has_no_top1_rather_than_zero() -> None:
    """A teacher built without a classifier (num_classes 0: its outputs are features) is not
    evaluated as a classifier: "n/a", and no 0.00 % in the summary."""
    from types import SimpleNamespace

    from vitkdl.train.loop import Run

    notes: list[str] = []
    run = SimpleNamespace(
        plan=SimpleNamespace(teacher_used=True, teacher=SimpleNamespace(num_classes=0)),
        teacher_top1=None,
        cache=None,  # no teacher cache: the teacher itself is evaluated
        progress=SimpleNamespace(note=notes.append),
    )
    Run.evaluate_teacher(run)  # type: ignore[arg-type]
    assert run.teacher_top1 is None
    assert notes == ["  teacher top-1 n/a (the teacher has no classifier head)"]


@pytest.mark.slow
def test_two_runs_into_one_folder_the_second_refuses_naming_the_first(tmp_path, capsys) -> None:
    from vitkdl.runs import holder

    recipe = write(tmp_path, "tiny.vkd", TINY.format(name="tiny", epochs=50, log_every=1))
    out = tmp_path / "runs"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "vitkdl", "run", str(recipe), "--quiet", "--out", str(out)]
    first = subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        folder = out / "tiny"  # the latest link, made once the first run holds its folder
        deadline = time.time() + 120
        while time.time() < deadline and not (
            (folder / "metrics.jsonl").exists() and holder(folder) == first.pid
        ):
            time.sleep(0.05)
        assert holder(folder) == first.pid and first.poll() is None  # training: 50 epochs
        capsys.readouterr()
        assert run(str(recipe), "--out", str(out)) == 75
        err = " ".join(capsys.readouterr().err.split())
        assert f"in use by process {first.pid}" in err
        assert first.poll() is None  # the first run was left alone
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # The OS released the lock of the killed run (whether or not it had saved a checkpoint
    # yet): this process may train the run now.
    capsys.readouterr()
    assert run(str(recipe), "--out", str(out), "--force", "--max-steps", "3") == 0
    assert "in use" not in capsys.readouterr().err


@pytest.mark.slow
def test_a_torn_last_metrics_line_does_not_block_resume(tmp_path, capsys) -> None:
    recipe = write(tmp_path, "tiny.vkd", TINY.format(name="tiny", epochs=1, log_every=1))
    out = tmp_path / "runs"
    assert run(str(recipe), "--out", str(out), "--max-steps", "3") == 0
    metrics = (out / "tiny").resolve() / "metrics.jsonl"
    with metrics.open("a") as f:
        f.write('{"step": 4, "kind": "tra')  # a crash in the middle of a write
    capsys.readouterr()
    assert run(str(recipe), "--out", str(out), "--resume", "--max-steps", "5") == 0
    assert "dropped 1 unreadable line(s)" in " ".join(capsys.readouterr().err.split())
    records = [json.loads(line) for line in metrics.read_text().splitlines()]  # all JSON
    steps = [r["step"] for r in records if r.get("kind") != "eval"]
    assert steps == [1, 2, 3, 4, 5], records


@pytest.mark.slow
def test_an_evaluation_failure_keeps_the_epochs_last_pt(tmp_path, monkeypatch, capsys) -> None:
    """Evaluation raises after the steps: last.pt of those steps was saved before it, the
    message is one clean line, and --resume from it finishes."""
    from vitkdl.train import loop

    recipe = write(tmp_path, "tiny.vkd", TINY.format(name="tiny", epochs=1, log_every=10))
    real = loop.evaluate

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError("Caught OSError in DataLoader worker process 0.\nOSError: val/3.jpg gone")

    monkeypatch.setattr(loop, "evaluate", broken)
    args = ["--out", str(tmp_path / "runs"), "--max-steps", "3"]
    assert run(str(recipe), *args) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "evaluation after epoch 0 failed: OSError: val/3.jpg gone" in err
    assert "before evaluating" in err and "Traceback" not in err
    last = torch.load(tmp_path / "runs" / "tiny" / "last.pt", weights_only=True)
    assert (last["epoch"], last["batch"], last["step"], last["history"]) == (0, 3, 3, [])
    monkeypatch.setattr(loop, "evaluate", real)
    assert run(str(recipe), *args, "--resume") == 0
    assert _summary(tmp_path / "runs" / "tiny")["top1"] is not None


@pytest.mark.slow
def test_an_unreadable_validation_split_stops_the_run_before_any_step(tmp_path, capsys) -> None:
    root = tmp_path / "data"
    for split in ("train", "val"):
        for c in range(2):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(4):
                if split == "train":
                    from PIL import Image

                    Image.new("RGB", (20, 20), (200 * c, 0, 0)).save(folder / f"{i}.png")
                else:
                    (folder / f"{i}.jpg").write_bytes(b"not an image")
    recipe = write(
        tmp_path,
        "folder.vkd",
        f"""
        student vit_tiny_patch16_224 {{
            img_size = 16  patch_size = 4  depth = 1  embed_dim = 16  num_heads = 2
            num_classes = 2
        }}
        data imagefolder {{ root = "{root}" batch_size = 4 workers = 0 }}
        train {{ epochs = 1 }}""",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # one per unreadable file
        assert run(str(recipe), "--out", str(tmp_path / "runs")) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert f"validation data (imagefolder {root}/val) cannot be used" in err
    assert "none of its 8 images could be read" in err and "Traceback" not in err
    assert not (tmp_path / "runs" / "folder" / "last.pt").exists()
