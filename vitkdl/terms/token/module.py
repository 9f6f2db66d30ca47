"""The torch modules of ``token`` (imported when a module is built: the kind's declarations
in :mod:`vitkdl.terms.token` never import torch)."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn


class TokenDistillation(nn.Module):
    r"""DeiT's distillation-token loss on the student's distillation head.

    ``mode="hard"``: :math:`w\,\mathrm{CE}(z^{dist}, \arg\max_c z^t_c)`, batch mean.
    ``mode="soft"``: :math:`w\,T^2 \frac{1}{B}\sum_b \sum_c p^t_{b,c}(\log p^t_{b,c} -
    \log p^{dist}_{b,c})` with :math:`p = \operatorname{softmax}(z/T)`. Teacher logits
    are detached.
    """

    def __init__(self, mode: str = "hard", temperature: float = 1.0, weight: float = 1.0):
        super().__init__()
        if mode not in ("hard", "soft"):
            raise ValueError(f"TokenDistillation: mode must be 'hard' or 'soft', got {mode!r}")
        if temperature <= 0:
            raise ValueError(f"TokenDistillation: temperature must be > 0, got {temperature}")
        self.mode: str = mode
        self.temperature: float = float(temperature)
        self.weight: float = float(weight)

    def forward(self, dist_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        """The loss for the distillation head's ``[B, C]`` logits."""
        z, t = dist_logits.float(), teacher_logits.detach().float()
        if self.mode == "hard":
            return F.cross_entropy(z, t.argmax(dim=-1)) * self.weight
        tau = self.temperature
        log_ps = F.log_softmax(z / tau, dim=-1)
        log_pt = F.log_softmax(t / tau, dim=-1)
        kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=-1)
        return kl.mean() * (self.weight * tau * tau)

    def extra_repr(self) -> str:
        return f"mode={self.mode}, temperature={self.temperature:g}, weight={self.weight:g}"


class HandToken(nn.Module):
    """facebookresearch/deit's ``DistillationLoss`` term as users write it (batch-mean KL)."""

    def __init__(self, mode: str = "hard", tau: float = 1.0, weight: float = 1.0) -> None:
        super().__init__()
        self.mode, self.tau, self.weight = mode, tau, weight

    def forward(self, outputs_kd: Tensor, teacher_outputs: Tensor) -> Any:
        if self.mode == "soft":
            t = self.tau
            loss = (
                F.kl_div(
                    F.log_softmax(outputs_kd.float() / t, dim=1),
                    F.log_softmax(teacher_outputs.float() / t, dim=1),
                    reduction="batchmean",
                    log_target=True,
                )
                * t
                * t
            )
        else:
            loss = F.cross_entropy(outputs_kd.float(), teacher_outputs.argmax(dim=1))
        return self.weight * loss
