"""The torch modules of ``dist`` (imported when a module is built: the kind's declarations in
:mod:`vitkdl.terms.dist` never import torch)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

# The authors' guard on the product of the norms (a constant distribution has norm 0 once
# centred: its correlation is then 0, not nan).
_EPS = 1e-8


def _pearson_rows(a: Tensor, b: Tensor) -> Tensor:
    """The Pearson correlation of each row of ``a`` with the same row of ``b``: ``[R]``."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + _EPS)


class DIST(nn.Module):
    r"""DIST (Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022).

    With :math:`P = \operatorname{softmax}(Z/T)` for each model's ``[B, C]`` logits and
    :math:`\rho` the Pearson correlation:

    .. math::
        \mathcal{L} = w\,T^2 \Big(\beta\,\big(1 - \tfrac{1}{B}\textstyle\sum_i
        \rho(P^s_{i,:}, P^t_{i,:})\big) + \gamma\,\big(1 - \tfrac{1}{C}\textstyle\sum_c
        \rho(P^s_{:,c}, P^t_{:,c})\big)\Big)

    Teacher logits are detached; arithmetic in fp32. ``target`` is accepted (a uniform call
    signature) and ignored. The intra-class term correlates over the batch, so it needs at
    least two samples.
    """

    def __init__(
        self, beta: float = 1.0, gamma: float = 1.0, temperature: float = 1.0, weight: float = 1.0
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"DIST: temperature must be positive, got {temperature}")
        self.beta: float = float(beta)
        self.gamma: float = float(gamma)
        self.temperature: float = float(temperature)
        self.weight: float = float(weight)

    def forward(
        self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor | None = None
    ) -> Tensor:
        """The DIST loss for ``[B, C]`` logits."""
        tau = self.temperature
        p_s = (student_logits.float() / tau).softmax(dim=1)
        p_t = (teacher_logits.detach().float() / tau).softmax(dim=1)
        inter = 1 - _pearson_rows(p_s, p_t).mean()
        intra = 1 - _pearson_rows(p_s.t(), p_t.t()).mean()
        return (self.beta * inter + self.gamma * intra) * (self.weight * tau * tau)

    def extra_repr(self) -> str:
        return (
            f"beta={self.beta:g}, gamma={self.gamma:g}, temperature={self.temperature:g}, "
            f"weight={self.weight:g}"
        )


class HandDIST(nn.Module):
    """DIST as its authors' code writes it (``dist_kd.py``): cosine similarity of the centred
    vectors, ``inter_class_relation`` and ``intra_class_relation`` on the transpose, each
    times ``tau ** 2``."""

    def __init__(
        self, beta: float = 1.0, gamma: float = 1.0, temperature: float = 1.0, weight: float = 1.0
    ) -> None:
        super().__init__()
        self.beta, self.gamma, self.tau, self.weight = beta, gamma, temperature, weight

    @staticmethod
    def _relation(y_s: Tensor, y_t: Tensor) -> Tensor:
        a = y_s - y_s.mean(1).unsqueeze(1)
        b = y_t - y_t.mean(1).unsqueeze(1)
        cosine = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + 1e-8)
        return 1 - cosine.mean()

    def forward(self, s: Tensor, t: Tensor, target: Any = None) -> Any:
        y_s = (s.float() / self.tau).softmax(dim=1)
        y_t = (t.detach().float() / self.tau).softmax(dim=1)
        inter = self.tau**2 * self._relation(y_s, y_t)
        intra = self.tau**2 * self._relation(y_s.transpose(0, 1), y_t.transpose(0, 1))
        return self.weight * (self.beta * inter + self.gamma * intra)
