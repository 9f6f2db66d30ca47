"""The torch modules of ``wsld`` (imported when a module is built: the kind's declarations in
:mod:`vitkdl.terms.wsld` never import torch)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The authors' guard on the teacher's cross-entropy (a teacher certain of the label has CE 0).
_EPS = 1e-7


def _label_ce(log_p: Tensor, target: Tensor) -> Tensor:
    """Per-sample cross-entropy with ``[B]`` class indices or ``[B, C]`` soft labels."""
    if target.dim() == 2:
        return -(target.float() * log_p).sum(dim=1)
    return -log_p.gather(1, target.long().unsqueeze(1)).squeeze(1)


class WSLD(nn.Module):
    r"""Weighted soft label distillation (Zhou et al., ICLR 2021).

    With :math:`p = \operatorname{softmax}(z/T)` and the label cross-entropies at
    :math:`T = 1`, :math:`\mathrm{CE}^s_b` and :math:`\mathrm{CE}^t_b` (no gradient):

    .. math::
        \mathcal{L} = w\,T^2 \frac{1}{B}\sum_b \omega_b \Big(-\sum_c p^t_{b,c}
        \log p^s_{b,c}\Big), \qquad
        \omega_b = 1 - \exp\!\big(-\max(\mathrm{CE}^s_b / (\mathrm{CE}^t_b + 10^{-7}),
        0)\big)

    Teacher logits are detached; arithmetic in fp32. ``target`` is ``[B]`` class indices or
    ``[B, C]`` soft labels (their soft cross-entropies).
    """

    def __init__(self, temperature: float = 2.0, weight: float = 1.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"WSLD: temperature must be positive, got {temperature}")
        self.temperature: float = float(temperature)
        self.weight: float = float(weight)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor) -> Tensor:
        """The WSLD loss for ``[B, C]`` logits and ``[B]`` indices or ``[B, C]`` soft
        labels."""
        tau = self.temperature
        s = student_logits.float()
        t = teacher_logits.detach().float()
        soft_ce = -(F.softmax(t / tau, dim=1) * F.log_softmax(s / tau, dim=1)).sum(dim=1)
        with torch.no_grad():  # the weight steers the term; it is not trained
            ce_s = _label_ce(F.log_softmax(s.detach(), dim=1), target)
            ce_t = _label_ce(F.log_softmax(t, dim=1), target)
            w = 1 - torch.exp(-torch.clamp(ce_s / (ce_t + _EPS), min=0))
        return (w * soft_ce).mean() * (self.weight * tau * tau)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature:g}, weight={self.weight:g}"


class HandWSLD(nn.Module):
    """WSLD as its authors' code writes it (``WSLDistiller.forward``): ``[B, 1]`` losses
    with ``keepdim``, a one-hot label (a soft label as it is), ``torch.max`` against a zero
    tensor."""

    def __init__(self, temperature: float = 2.0, weight: float = 1.0) -> None:
        super().__init__()
        self.t, self.weight = temperature, weight

    def forward(self, s: Tensor, t: Tensor, target: Tensor) -> Any:
        s, t = s.float(), t.detach().float()
        t_soft = F.softmax(t / self.t, dim=1)
        softmax_loss = -torch.sum(t_soft * F.log_softmax(s / self.t, dim=1), 1, keepdim=True)
        log_s, log_t = F.log_softmax(s.detach(), dim=1), F.log_softmax(t, dim=1)
        if target.dim() == 2:
            label = target.float()
        else:
            label = F.one_hot(target, num_classes=s.shape[1]).float()
        ce_s = -torch.sum(label * log_s, 1, keepdim=True)
        ce_t = -torch.sum(label * log_t, 1, keepdim=True)
        focal = torch.max(ce_s / (ce_t + 1e-7), torch.zeros(1, device=s.device))
        focal = 1 - torch.exp(-focal)
        return self.weight * self.t**2 * torch.mean(focal * softmax_loss)
