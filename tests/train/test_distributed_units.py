"""The process-group rules that need no second process."""

from __future__ import annotations

import torch

from vitkdl.program import fsdp_policy
from vitkdl.train.distributed import backend_for


def test_backend_follows_the_runs_device(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert backend_for(None) == "nccl" and backend_for("cuda:1") == "nccl"
    assert backend_for("cpu") == "gloo"  # --device cpu on a GPU machine
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert backend_for(None) == "gloo"


def test_fsdp_gathers_in_the_autocast_dtype_and_reduces_in_fp32() -> None:
    assert fsdp_policy(None) is None
    policy = fsdp_policy(torch.bfloat16)
    assert policy.param_dtype is torch.bfloat16 and policy.reduce_dtype is torch.float32
