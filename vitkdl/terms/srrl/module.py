"""The torch modules of ``srrl`` (imported when a module is built: the kind's declarations
in :mod:`vitkdl.terms.srrl` never import torch)."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from vitkdl.terms._torch import adapter_input


class SRRL(nn.Module):
    r"""Softmax regression representation learning (Yang et al., ICLR 2021).

    .. math::
        \mathcal{L} = w \big(\alpha\, \operatorname{mean}(c(f_s) - f_t)^2
        + \beta\, \operatorname{mean}(h_t(c(f_s)) - z_t)^2\big)

    with :math:`f_s \in \mathbb{R}^{B\times D_s}` the student's pooled pre-logits feature,
    :math:`f_t, z_t` the teacher's pooled feature and logits (detached), :math:`c` a
    ``Linear(Ds, Dt)`` connector (trained) and :math:`h_t` the teacher's classifier head,
    passed to :meth:`forward`: frozen (its parameters get no gradient, they do not require
    one), gradients flow through it to the connector and the student. The connector runs in
    the step's precision (bf16 under autocast), the errors and means in fp32.

    Args:
        student_dim, teacher_dim: the two pooled feature widths.
        features: :math:`\alpha`, the feature-matching weight.
        regression: :math:`\beta`, the softmax-regression weight.
        weight: :math:`w`.
    """

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        features: float = 1.0,
        regression: float = 2.0,
        weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.connector = nn.Linear(student_dim, teacher_dim)
        self.features, self.regression = float(features), float(regression)
        self.weight: float = float(weight)

    def forward(self, f_s: Tensor, f_t: Tensor, z_t: Tensor, head: nn.Module) -> Tensor:
        """The loss for pooled features ``[B, Ds]``, ``[B, Dt]``, the teacher's logits
        ``[B, C]`` and its classifier head."""
        if f_s.dim() != 2 or f_t.dim() != 2:
            raise ValueError(
                f"SRRL: expected pooled [B, D] features, got student {tuple(f_s.shape)} and "
                f"teacher {tuple(f_t.shape)}"
            )
        c = self.connector(adapter_input(f_s, self.connector))
        matching = (c.float() - f_t.detach().float()).pow(2).mean()
        # The teacher's head may be held in bf16 (teacher { precision }): outside autocast the
        # connected feature is cast to its dtype; the error is fp32 either way.
        z = head(adapter_input(c, head))
        regression = (z.float() - z_t.detach().float()).pow(2).mean()
        return (self.features * matching + self.regression * regression) * self.weight

    def extra_repr(self) -> str:
        return f"features={self.features:g}, regression={self.regression:g}, weight={self.weight:g}"


class HandSRRL(nn.Module):
    """SRRL as users write it after the authors (``F.mse_loss`` twice, the teacher's head
    called on the connected feature), independent of :class:`SRRL`: its reference in the
    tests and ``vitkdl bench``."""

    def __init__(
        self, d_s: int, d_t: int, features: float, regression: float, weight: float = 1.0
    ) -> None:
        super().__init__()
        self.conector = nn.Linear(d_s, d_t)  # the authors' spelling
        self.alpha, self.beta, self.weight = features, regression, weight

    def forward(self, feat_s: Tensor, feat_t: Tensor, pred_t: Tensor, fc_t: nn.Module) -> Any:
        feat_s = self.conector(feat_s.float())
        loss_stat = F.mse_loss(feat_s, feat_t.float())
        pred_sc = F.linear(feat_s, fc_t.weight.float(), fc_t.bias.float())
        return self.weight * (self.alpha * loss_stat + self.beta * F.mse_loss(pred_sc, pred_t))
