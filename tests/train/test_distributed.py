"""Two processes on CPU (gloo): in sync with each other and with one process at the same
global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT
from vitkdl.cli import main

pytestmark = pytest.mark.slow  # each test starts torchrun with 2 processes

TEACHER = """
recipe pair_teacher
student vit_tiny_patch16_224 {
    img_size = 8  patch_size = 2  in_chans = 1  depth = 1  embed_dim = 16  num_heads = 2
    num_classes = 10
}
data digits { batch_size = 32 }
train { epochs = 1 }
"""

STUDENT = """
recipe pair
teacher from "teacher.vkd"
student vit_tiny_patch16_224 {
    img_size = 8  patch_size = 2  in_chans = 1  depth = 1  embed_dim = 16  num_heads = 2
    num_classes = 10  drop_path = 0
}
data digits { batch_size = 16  mixup = 0  cutmix = 0 }
distill {
    mimic student.blocks[0] -> teacher.blocks[0] { weight = 1e-3 }
    nkd
}
train { epochs = 1  log_every = 5 }
"""


def run_two(student, runs, *args: str) -> subprocess.CompletedProcess[str]:
    """`vitkdl run ... --nproc-per-node 2` as a user types it (torchrun under the hood)."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "vitkdl",
            "run",
            str(student),
            "--nproc-per-node",
            "2",
            "--out",
            str(runs),
            *args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_two_processes_match_one_process_at_the_same_global_batch(tmp_path, capsys) -> None:
    (tmp_path / "teacher.vkd").write_text(TEACHER)
    student = tmp_path / "student.vkd"
    student.write_text(STUDENT)
    runs = tmp_path / "runs"
    proc = run_two(student, runs, "--max-steps", "12", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    two = json.loads((runs / "pair" / "summary.json").read_text())
    assert two["world_size"] == 2 and two["global_batch"] == 32 and two["ranks_in_sync"]

    # One process, batch 32: the same global batches (the sampler's order does not depend on
    # the world size) and the same teacher (reused from the first run).
    assert (
        main(
            [
                "run",
                str(student),
                "--out",
                str(runs),
                "--max-steps",
                "12",
                "--quiet",
                "--set",
                "recipe.name=pair_single",
                "--set",
                "data.batch_size=32",
            ]
        )
        == 0
    )
    one = json.loads((runs / "pair_single" / "summary.json").read_text())
    assert one["world_size"] == 1 and one["steps"] == two["steps"] == 12
    a = load_file(str(runs / "pair" / "student.safetensors"))
    b = load_file(str(runs / "pair_single" / "student.safetensors"))
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=1e-4), key
    assert abs(one["top1"] - two["top1"]) < 0.3  # at most one of 360 images apart


def rank_rng(folder) -> list[dict]:
    """The per-rank RNG states in a run's last checkpoint."""
    return torch.load(folder / "last.pt", weights_only=True)["rng"]


def test_resume_on_another_world_size(tmp_path) -> None:
    (tmp_path / "teacher.vkd").write_text(TEACHER)
    student = tmp_path / "student.vkd"
    student.write_text(STUDENT.replace("epochs = 1", "epochs = 2"))
    runs = tmp_path / "runs"
    assert main(["run", str(student), "--out", str(runs), "--max-steps", "10", "--quiet"]) == 0
    assert len(rank_rng(runs / "pair")) == 1
    proc = run_two(student, runs, "--resume")
    assert proc.returncode == 0, proc.stderr
    # One process's streams do not map onto two ranks: fresh ones, per rank, and it says so.
    assert "fresh per-rank random states" in " ".join(proc.stderr.split())
    summary = json.loads((runs / "pair" / "summary.json").read_text())
    # 10 steps at global batch 16 are 5 at 32; then the rest of two epochs of 44 steps
    assert summary["world_size"] == 2 and summary["epochs"] == 2
    assert summary["steps"] == 2 * ((1437 // 2) // 16)
    states = rank_rng(runs / "pair")
    assert len(states) == 2 and not torch.equal(states[0]["torch"], states[1]["torch"])


RANDOM = STUDENT.replace("drop_path = 0", "drop_path = 0.2").replace(
    "nkd\n", "generate student.norm -> teacher.norm { mask = 0.5  weight = 1e-3 }\n    nkd\n"
)


def test_two_process_resume_is_bit_exact_and_ranks_keep_their_own_streams(tmp_path) -> None:
    (tmp_path / "teacher.vkd").write_text(TEACHER)
    student = tmp_path / "student.vkd"
    student.write_text(RANDOM)  # generation masks and drop path draw from each rank's RNG
    runs = tmp_path / "runs"
    whole = run_two(student, runs, "--quiet", "--set", "recipe.name=whole")
    assert whole.returncode == 0, whole.stderr
    cut = run_two(student, runs, "--quiet", "--max-steps", "10")  # mid-epoch
    assert cut.returncode == 0, cut.stderr
    before = rank_rng(runs / "pair")
    assert len(before) == 2 and not torch.equal(before[0]["torch"], before[1]["torch"])
    resumed = run_two(student, runs, "--quiet", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(str(runs / "whole" / "student.safetensors"))
    b = load_file(str(runs / "pair" / "student.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-exact, not merely close
    after = rank_rng(runs / "pair")
    assert not torch.equal(after[0]["torch"], after[1]["torch"])


def test_fsdp_checkpoints_load_on_one_device(tmp_path) -> None:
    (tmp_path / "teacher.vkd").write_text(TEACHER)
    student = tmp_path / "student.vkd"
    # clip_grad small enough to clip every step: the norm is taken over sharded gradients.
    student.write_text(
        STUDENT.replace("epochs = 1", "epochs = 2  shard = fsdp  clip_grad = 0.05").replace(
            "depth = 1  embed_dim = 16  num_heads = 2\n    num_classes = 10  drop_path = 0",
            "depth = 2  embed_dim = 16  num_heads = 2\n    num_classes = 10  drop_path = 0",
        )
    )
    runs = tmp_path / "runs"
    proc = run_two(student, runs, "--max-steps", "6", "--quiet")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((runs / "pair" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_in_sync"] is None  # shards differ
    exported = load_file(str(runs / "pair" / "student.safetensors"))
    assert exported["blocks.1.attn.qkv.weight"].shape == (48, 16)  # full, not a shard
    # The same 6 steps in one unsharded process at the same global batch: the same weights,
    # so clipping saw the global gradient norm.
    args = [
        "--set",
        "recipe.name=single",
        "--set",
        "data.batch_size=32",
        "--set",
        "train.shard=none",
    ]
    assert (
        main(["run", str(student), "--out", str(runs), "--quiet", "--max-steps", "6", *args]) == 0
    )
    single = load_file(str(runs / "single" / "student.safetensors"))
    for key in exported:
        assert torch.allclose(exported[key], single[key], atol=1e-5, rtol=1e-4), key
    # The sharded run's checkpoint continues in one process.
    assert (
        main(["run", str(student), "--out", str(runs), "--resume", "--quiet", "--max-steps", "16"])
        == 0
    )
    assert json.loads((runs / "pair" / "summary.json").read_text())["steps"] == 16


DDP_COMPILE = """
import json, os, sys, torch, torch.distributed as dist
import vitkdl
from vitkdl.train.step import Update, configure_optimizer, model_param_groups, train_step
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
dist.init_process_group("gloo", rank=0, world_size=1)
plan = vitkdl.plan(vitkdl.load(sys.argv[2], overrides={"data.source": "synthetic",
                                                        "teacher.depth": 2}, strict=False))
x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
losses = {}
for name in ("plain", "ddp"):
    torch.manual_seed(0)
    p = vitkdl.build(plan, "cpu", load=False, compile="default")
    if name == "ddp":
        p.distribute(None)
    groups = model_param_groups(p.student, p.terms.named_parameters(), 0.05)
    u = Update(configure_optimizer(plan, groups), p.trainable_parameters(), 1.0,
               torch.device("cpu"), None)
    torch.manual_seed(1)
    losses[name] = [float(train_step(p.step, u, x, y)["loss"].detach()) for _ in range(3)]
print(json.dumps(losses))
dist.destroy_process_group()
"""


def test_ddp_with_torch_compile_matches_the_compiled_step(tmp_path) -> None:
    """DDP's graph splitting (dynamo's DDP optimizer) with inductor, in one gloo process:
    the same losses as the plain compiled step (this failed in backward before term values
    were stacked; see program.term_losses)."""
    script = tmp_path / "ddp_compile.py"
    script.write_text(DDP_COMPILE)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    proc = subprocess.run(
        [sys.executable, str(script), "29561", str(ROOT / "recipes" / "quickstart.vkd")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = json.loads(proc.stdout.strip().splitlines()[-1])
    plain, ddp = losses["plain"], losses["ddp"]
    assert plain == pytest.approx(ddp, rel=1e-6) and len(plain) == 3


def test_two_processes_save_by_steps_and_stop_together_on_sigterm(tmp_path) -> None:
    """Checkpoints every N steps and a SIGTERM to the launcher: both ranks save at the same
    step (no rank waits for the other), the launcher exits 75, --resume finishes the run."""
    import os
    import signal
    import time

    (tmp_path / "teacher.vkd").write_text(TEACHER)
    student = tmp_path / "student.vkd"
    student.write_text(
        STUDENT.replace(
            "epochs = 1  log_every = 5", 'epochs = 3  log_every = 1  checkpoint_every = "7 steps"'
        )
    )
    runs = tmp_path / "runs"
    assert main(["run", str(tmp_path / "teacher.vkd"), "--out", str(runs), "--quiet"]) == 0
    cmd = [sys.executable, "-m", "vitkdl", "run", str(student), "--nproc-per-node", "2"]
    cmd += ["--out", str(runs), "--quiet"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    metrics = runs / "pair" / "metrics.jsonl"
    deadline = time.time() + 200
    while time.time() < deadline:
        if metrics.exists() and metrics.read_text().count('"train"') >= 50:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    assert "stopped by SIGTERM" in err
    saved = torch.load(runs / "pair" / "last.pt", weights_only=True)
    assert saved["step"] >= 50 and saved["step"] % 10 == 0  # where the ranks agreed to stop
    assert len(saved["rng"]) == 2
    resumed = run_two(student, runs, "--quiet", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((runs / "pair" / "summary.json").read_text())
    assert summary["steps"] == 3 * ((1437 // 2) // 16) and summary["ranks_in_sync"]


@pytest.mark.parametrize("to_group", [True, False], ids=["ctrl-c", "kill-int-pid"])
def test_ctrl_c_to_the_process_group_stops_both_ranks_at_one_step(tmp_path, to_group) -> None:
    """Ctrl-C (SIGINT to the terminal's whole process group: launcher, torchrun, workers) is
    one press: both ranks save at the step they agree on and the launcher exits 130. The same
    for SIGINT to the launcher's PID alone (torchrun and the workers have it from it)."""
    import os
    import signal
    import time

    (tmp_path / "teacher.vkd").write_text(TEACHER)
    student = tmp_path / "student.vkd"
    student.write_text(STUDENT.replace("epochs = 1  log_every = 5", "epochs = 3  log_every = 1"))
    runs = tmp_path / "runs"
    assert main(["run", str(tmp_path / "teacher.vkd"), "--out", str(runs), "--quiet"]) == 0
    cmd = [sys.executable, "-m", "vitkdl", "run", str(student), "--nproc-per-node", "2"]
    cmd += ["--out", str(runs), "--quiet"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    metrics = runs / "pair" / "metrics.jsonl"
    deadline = time.time() + 200
    while time.time() < deadline:
        if metrics.exists() and metrics.read_text().count('"train"') >= 30:
            break
        time.sleep(0.05)
    if to_group:
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "stopped by SIGINT" in err and "aborted" not in err
    assert not (runs / "pair" / "summary.json").exists()  # it did not train on to the end
    saved = torch.load(runs / "pair" / "last.pt", weights_only=True)
    assert saved["step"] >= 30 and saved["step"] % 10 == 0  # where the ranks agreed to stop
    assert len(saved["rng"]) == 2


def test_a_held_folder_refuses_every_rank_together(tmp_path) -> None:
    """Rank 0 alone takes the folder's lock; its refusal reaches rank 1 (no rank waits at a
    barrier for a rank that left)."""
    import os

    import vitkdl
    from vitkdl.runs import hold, run_dir

    recipe = tmp_path / "teacher.vkd"
    recipe.write_text(TEACHER)
    runs = tmp_path / "runs"
    folder = run_dir(runs, "pair_teacher", vitkdl.load(recipe).hash())
    folder.mkdir(parents=True)
    with hold(folder):
        proc = run_two(recipe, runs, "--quiet")
    err = " ".join(proc.stderr.split())
    assert err.count(f"in use by process {os.getpid()}") == 1, proc.stderr  # rank 0 says it
    assert proc.returncode == 75 and "worker process failed" not in err, proc.stderr
    assert not (folder / "metrics.jsonl").exists()
