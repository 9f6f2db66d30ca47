"""The torch modules of ``kd`` (imported when a module is built: the kind's declarations
in :mod:`vitkdl.terms.kd` never import torch)."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn


class KD(nn.Module):
    r"""Hinton knowledge distillation.

    .. math::
        \mathcal{L} = w\, T^2 \, \frac{1}{B}\sum_b \sum_c p^t_{b,c}
        \big(\log p^t_{b,c} - \log p^s_{b,c}\big), \quad p = \operatorname{softmax}(z/T)

    Teacher logits are detached; ``target`` is accepted (a uniform call signature) and
    ignored.
    """

    def __init__(self, temperature: float = 1.0, weight: float = 1.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"KD: temperature must be positive, got {temperature}")
        self.temperature: float = float(temperature)
        self.weight: float = float(weight)

    def forward(
        self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor | None = None
    ) -> Tensor:
        """The KD loss for ``[B, C]`` logits."""
        tau = self.temperature
        log_ps = F.log_softmax(student_logits.float() / tau, dim=-1)
        log_pt = F.log_softmax(teacher_logits.detach().float() / tau, dim=-1)
        kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=-1)
        return kl.mean() * (self.weight * tau * tau)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature:g}, weight={self.weight:g}"


class HandKD(nn.Module):
    """KD with ``F.kl_div(..., reduction="batchmean")``, as users write it."""

    def __init__(self, temperature: float = 1.0, weight: float = 1.0) -> None:
        super().__init__()
        self.t, self.weight = temperature, weight

    def forward(self, s: Tensor, t: Tensor, target: Tensor) -> Any:
        kl = F.kl_div(
            F.log_softmax(s.float() / self.t, dim=1),
            F.softmax(t.float() / self.t, dim=1),
            reduction="batchmean",
        )
        return self.weight * kl * self.t**2
