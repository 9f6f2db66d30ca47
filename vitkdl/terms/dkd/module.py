"""The torch modules of ``dkd`` (imported when a module is built: the kind's declarations in
:mod:`vitkdl.terms.dkd` never import torch)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkdl.terms._torch import hard_labels

# Finite stand-in for -inf that drops the target column: exp() of it underflows to exactly 0
# in float32, and unlike -inf it never produces 0 * inf = nan (nor a nan gradient).
_NEG_LARGE = -1.0e9


def _ramp(epoch: Tensor | float | None, warmup_epochs: int) -> Tensor | float:
    """The authors' warm-up factor ``min(epoch / warmup, 1)``, epochs counted from 1; 1 with no
    epoch (past any warm-up) or no warm-up. A tensor epoch stays a tensor: no graph break."""
    if epoch is None or warmup_epochs <= 0:
        return 1.0
    if isinstance(epoch, Tensor):
        return torch.clamp(epoch.float() / warmup_epochs, max=1.0)
    return min(float(epoch) / warmup_epochs, 1.0)


class DKD(nn.Module):
    r"""Decoupled knowledge distillation (Zhao et al., CVPR 2022).

    With :math:`y` the target class (argmax of a soft label), :math:`p = \operatorname{softmax}
    (z/T)`, :math:`b = (p_y, 1 - p_y)` and :math:`q` the softmax at :math:`T` over the
    classes other than :math:`y`:

    .. math::
        \mathcal{L} = w\,r(e)\,T^2 \frac{1}{B}\sum_b \Big(\alpha\,
        \mathrm{KL}(b^t_b \,\|\, b^s_b) + \beta\,\mathrm{KL}(q^t_b \,\|\, q^s_b)\Big),
        \qquad r(e) = \min(e / E_w, 1)

    with :math:`e` the epoch counted from 1 (``epoch``: a 0-dim tensor, so a new epoch never
    recompiles; None: past the warm-up). Teacher logits are detached; arithmetic in fp32.
    ``log b`` comes from log-sum-exps (never ``log(0)``); the target column is dropped with a
    large negative logit (no dynamic indexing), exact in float32.
    """

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 0.5,
        temperature: float = 1.0,
        warmup_epochs: int = 1,
        weight: float = 1.0,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"DKD: temperature must be positive, got {temperature}")
        if warmup_epochs < 0:
            raise ValueError(f"DKD: warmup_epochs must be >= 0, got {warmup_epochs}")
        self.alpha: float = float(alpha)
        self.beta: float = float(beta)
        self.temperature: float = float(temperature)
        self.warmup_epochs: int = int(warmup_epochs)
        self.weight: float = float(weight)

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        target: Tensor,
        epoch: Tensor | float | None = None,
    ) -> Tensor:
        """The DKD loss for ``[B, C]`` logits, ``[B]`` indices or ``[B, C]`` soft labels."""
        tau = self.temperature
        s = student_logits.float() / tau
        t = teacher_logits.detach().float() / tau
        y = hard_labels(target).unsqueeze(1)  # [B, 1]
        is_target = torch.zeros_like(s, dtype=torch.bool).scatter(1, y, True)
        # TCKD: the binary distributions (p[y], 1 - p[y]) as log-probabilities
        s_nt, t_nt = torch.where(is_target, _NEG_LARGE, s), torch.where(is_target, _NEG_LARGE, t)
        lse_s, lse_t = s.logsumexp(1, keepdim=True), t.logsumexp(1, keepdim=True)
        log_bs = torch.cat([s.gather(1, y), s_nt.logsumexp(1, keepdim=True)], 1) - lse_s
        log_bt = torch.cat([t.gather(1, y), t_nt.logsumexp(1, keepdim=True)], 1) - lse_t
        tckd = (log_bt.exp() * (log_bt - log_bs)).sum(1).mean()
        # NCKD: the distributions over the non-target classes
        log_qs, log_qt = F.log_softmax(s_nt, dim=1), F.log_softmax(t_nt, dim=1)
        nckd = torch.where(is_target, 0.0, log_qt.exp() * (log_qt - log_qs)).sum(1).mean()
        loss = (self.alpha * tckd + self.beta * nckd) * (self.weight * tau * tau)
        return loss * _ramp(epoch, self.warmup_epochs)

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha:g}, beta={self.beta:g}, temperature={self.temperature:g}, "
            f"warmup_epochs={self.warmup_epochs}, weight={self.weight:g}"
        )


class HandDKD(nn.Module):
    """DKD as its authors' code writes it (mdistiller ``dkd_loss``): masks summing the
    probabilities, ``log`` of the sums, the target logit pushed down by 1000 for NCKD,
    ``F.kl_div`` summed and divided by the batch, and ``min(epoch / warmup, 1)``."""

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 0.5,
        temperature: float = 1.0,
        warmup_epochs: int = 1,
        weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.alpha, self.beta, self.t = alpha, beta, temperature
        self.warmup, self.weight = warmup_epochs, weight

    def forward(self, s: Tensor, t: Tensor, target: Tensor, epoch: Any = None) -> Any:
        s, t = s.float(), t.detach().float()
        label = target.argmax(1) if target.dim() > 1 else target
        gt = torch.zeros_like(s).scatter_(1, label.view(-1, 1), 1).bool()
        other = ~gt
        p_s, p_t = F.softmax(s / self.t, dim=1), F.softmax(t / self.t, dim=1)
        b_s = torch.cat([(p_s * gt).sum(1, keepdim=True), (p_s * other).sum(1, keepdim=True)], 1)
        b_t = torch.cat([(p_t * gt).sum(1, keepdim=True), (p_t * other).sum(1, keepdim=True)], 1)
        n = s.shape[0]
        tckd = F.kl_div(torch.log(b_s), b_t, reduction="sum") * self.t**2 / n
        q_t = F.softmax(t / self.t - 1000.0 * gt, dim=1)
        log_q_s = F.log_softmax(s / self.t - 1000.0 * gt, dim=1)
        nckd = F.kl_div(log_q_s, q_t, reduction="sum") * self.t**2 / n
        ramp = 1.0 if epoch is None or self.warmup <= 0 else min(float(epoch) / self.warmup, 1.0)
        return self.weight * ramp * (self.alpha * tckd + self.beta * nckd)
