"""The torch modules of ``labels`` (imported when a module is built: the kind's declarations
in :mod:`vitkdl.terms.labels` never import torch)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LabelLoss(nn.Module):
    r"""Supervised loss on the ground truth, times ``weight``.

    * ``target`` class indices ``[B]``: cross-entropy with label smoothing
      :math:`\epsilon` (``F.cross_entropy(..., label_smoothing=smoothing)``).
    * ``target`` soft labels ``[B, C]`` (timm's Mixup, which already folds the smoothing
      in): :math:`-\frac{1}{B}\sum_b \sum_c y_{b,c} \log\operatorname{softmax}(z)_{b,c}`.
    """

    def __init__(self, smoothing: float = 0.1, weight: float = 1.0) -> None:
        super().__init__()
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"LabelLoss: smoothing must be in [0, 1), got {smoothing}")
        self.smoothing: float = float(smoothing)
        self.weight: float = float(weight)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """The label loss for ``[B, C]`` logits."""
        z = logits.float()
        if target.dim() == z.dim():
            loss = -(target.float() * F.log_softmax(z, dim=-1)).sum(dim=-1).mean()
        else:
            loss = F.cross_entropy(z, target.long(), label_smoothing=self.smoothing)
        return loss * self.weight

    def extra_repr(self) -> str:
        return f"smoothing={self.smoothing:g}, weight={self.weight:g}"


class HandLabels(nn.Module):
    """Cross-entropy on hard labels (smoothed) or on soft mixup targets, as users write it."""

    def __init__(self, smoothing: float = 0.1, weight: float = 1.0) -> None:
        super().__init__()
        self.smoothing, self.weight = smoothing, weight

    def forward(self, s: Tensor, target: Tensor) -> Any:
        if target.dim() > 1:
            loss = torch.sum(-target * F.log_softmax(s.float(), dim=-1), dim=-1).mean()
        else:
            loss = F.cross_entropy(s.float(), target, label_smoothing=self.smoothing)
        return self.weight * loss
