"""The torch modules of ``nkd`` (imported when a module is built: the kind's declarations
in :mod:`vitkdl.terms.nkd` never import torch)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkdl.terms._torch import hard_labels

# Finite stand-in for -inf used to drop the target column: exp() of it underflows to exactly 0
# in float32, and unlike -inf it never produces 0 * inf = nan.
_NEG_LARGE = -1.0e9


class NKD(nn.Module):
    r"""Normalized knowledge distillation (Yang et al., "From Knowledge Distillation to
    Self-Knowledge Distillation: A Unified Approach with Normalized Loss and Customized
    Soft Labels").

    With :math:`y` the target class (argmax of the soft label under mixup),
    :math:`p = \operatorname{softmax}(z)` at :math:`T=1` and :math:`q` the softmax at
    temperature :math:`T` over the non-target classes only:

    .. math::
        \mathcal{L} = w \Big[ -\frac{1}{B}\sum_b p^t_{b,y_b} \log p^s_{b,y_b}
        \;+\; \gamma T^2 \frac{1}{B}\sum_b \Big(-\sum_{c\neq y_b} q^t_{b,c}
        \log q^s_{b,c}\Big) \Big]

    Teacher probabilities are detached. The target column is dropped by setting its logit
    to a large negative value (no dynamic indexing), which is exact in float32.
    """

    def __init__(self, temperature: float = 1.0, gamma: float = 1.0, weight: float = 1.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"NKD: temperature must be positive, got {temperature}")
        self.temperature: float = float(temperature)
        self.gamma: float = float(gamma)
        self.weight: float = float(weight)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor) -> Tensor:
        """The NKD loss for ``[B, C]`` logits and ``[B]`` indices or ``[B, C]`` soft
        labels."""
        s = student_logits.float()
        t = teacher_logits.detach().float()
        y = hard_labels(target).unsqueeze(1)  # [B, 1]
        log_ps = F.log_softmax(s, dim=1)  # target-class term, T = 1
        pt = F.softmax(t, dim=1)
        loss_t = -(pt.gather(1, y) * log_ps.gather(1, y)).mean()
        # non-target term at temperature T, target column masked out
        is_target = torch.zeros_like(s, dtype=torch.bool).scatter(1, y, True)
        tau = self.temperature
        s_nt = torch.where(is_target, _NEG_LARGE, s / tau)
        t_nt = torch.where(is_target, _NEG_LARGE, t / tau)
        log_qs = F.log_softmax(s_nt, dim=1)
        qt = F.softmax(t_nt, dim=1)
        prod = torch.where(is_target, 0.0, qt * log_qs)
        loss_nt = -prod.sum(dim=1).mean() * (self.gamma * tau * tau)
        return (loss_t + loss_nt) * self.weight

    def extra_repr(self) -> str:
        return f"temperature={self.temperature:g}, gamma={self.gamma:g}, weight={self.weight:g}"


class HandNKD(nn.Module):
    """NKD as in its authors' code (boolean-mask indexing drops the target column)."""

    def __init__(self, temperature: float = 1.0, gamma: float = 1.0, weight: float = 1.0) -> None:
        super().__init__()
        self.t, self.gamma, self.weight = temperature, gamma, weight

    def forward(self, s: Tensor, t: Tensor, target: Tensor) -> Any:
        s, t = s.float(), t.float()
        label = target.argmax(1, keepdim=True) if target.dim() > 1 else target.view(-1, 1)
        n = s.shape[0]
        s_t = torch.gather(F.log_softmax(s, dim=1), 1, label)
        t_t = torch.gather(F.softmax(t, dim=1), 1, label).detach()
        loss_t = -(t_t * s_t).mean()
        keep = torch.ones_like(s).scatter_(1, label, 0).bool()
        s_non = F.log_softmax(s[keep].reshape(n, -1) / self.t, dim=1)
        t_non = F.softmax(t[keep].reshape(n, -1) / self.t, dim=1)
        loss_non = -self.gamma * self.t**2 * (t_non * s_non).sum(dim=1).mean()
        return self.weight * (loss_t + loss_non)
