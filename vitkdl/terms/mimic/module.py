"""The torch modules of ``mimic`` (imported when a module is built: the kind's declarations
in :mod:`vitkdl.terms.mimic` never import torch)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkdl.terms._torch import adapter_input, as_list, check_tokens, make_align


class Mimic(nn.Module):
    r"""ViTKD feature mimicking.

    For each paired layer :math:`l` the student patch tokens :math:`S_l \in
    \mathbb{R}^{B\times N\times D_s}` go through their own adapter :math:`f_l`
    (``Linear(Ds, Dt)`` by default) and are compared with the teacher tokens
    :math:`T_l \in \mathbb{R}^{B\times N\times D_t}`:

    ``loss="mse"`` (the paper's):
    :math:`\alpha \sum_l \frac{1}{B}\sum_{b,n,c} (f_l(S_l) - T_l)_{b,n,c}^2`;
    ``loss="mse_mean"``: :math:`\alpha \sum_l \operatorname{mean}(f_l(S_l) - T_l)^2`;
    ``loss="relation"``: :math:`\alpha \sum_l \frac{1}{B}\sum (R(S_l) - R(T_l))^2` with
    :math:`R(X)_{ij} = \cos(x_i, x_j)` (no adapter);
    ``loss="kl"``: attention maps ``[B, H, N, N]`` (rows are distributions),
    :math:`\alpha \sum_l \operatorname{mean}_{b,h,i} \mathrm{KL}(A^t_{bhi} \| A^s_{bhi})`,
    heads averaged first with ``heads="mean"``.

    Args:
        student_dims: student width per paired layer (an int means a single layer).
        teacher_dims: teacher width per paired layer (an int is broadcast).
        align: ``"linear"`` (default), ``"identity"`` (widths must match), ``"mlp"`` or
            ``"auto"`` (identity where widths match, else linear). Unused by ``relation``
            and ``kl``.
        loss: ``"mse"``, ``"mse_mean"``, ``"relation"`` or ``"kl"``.
        heads: ``"pair"`` or ``"mean"`` (``kl`` only).
        weight: the multiplier :math:`\alpha` (3e-5 in the paper, for ``"mse"``).
    """

    def __init__(
        self,
        student_dims: Sequence[int] | int,
        teacher_dims: Sequence[int] | int,
        align: str = "linear",
        loss: str = "mse",
        weight: float = 3e-5,
        heads: str = "pair",
    ) -> None:
        super().__init__()
        s_dims = [student_dims] if isinstance(student_dims, int) else list(student_dims)
        t_dims = [teacher_dims] if isinstance(teacher_dims, int) else list(teacher_dims)
        if isinstance(student_dims, int) and len(t_dims) > 1:
            s_dims = s_dims * len(t_dims)
        if isinstance(teacher_dims, int) and len(s_dims) > 1:
            t_dims = t_dims * len(s_dims)
        if len(s_dims) != len(t_dims):
            raise ValueError(
                f"Mimic: {len(s_dims)} student widths but {len(t_dims)} teacher widths"
            )
        if not s_dims:
            raise ValueError("Mimic: needs at least one paired layer")
        if loss not in ("mse", "mse_mean", "relation", "kl"):
            raise ValueError(
                f"Mimic: unknown loss {loss!r}; expected 'mse', 'mse_mean', 'relation' or 'kl'"
            )
        if heads not in ("pair", "mean"):
            raise ValueError(f"Mimic: heads must be 'pair' or 'mean', got {heads!r}")
        self.student_dims: list[int] = s_dims
        self.teacher_dims: list[int] = t_dims
        self.loss_kind: str = loss
        self.heads: str = heads
        self.weight: float = float(weight)
        adapters = loss in ("mse", "mse_mean")
        self.align = nn.ModuleList(
            make_align(align, ds, dt) if adapters else nn.Identity()
            for ds, dt in zip(s_dims, t_dims, strict=True)
        )

    @property
    def num_layers(self) -> int:
        """Number of paired layers."""
        return len(self.align)

    def forward(
        self, student: Sequence[Tensor] | Tensor, teacher: Sequence[Tensor] | Tensor
    ) -> Tensor:
        """The loss for one tensor per paired layer on each side (tokens ``[B, N, D]``;
        attention maps ``[B, H, N, N]`` under ``kl``)."""
        s_list, t_list = as_list(student), as_list(teacher)
        if len(s_list) != len(self.align) or len(t_list) != len(self.align):
            raise ValueError(
                f"Mimic: expected {len(self.align)} tensors per side, got "
                f"{len(s_list)} student and {len(t_list)} teacher"
            )
        total = s_list[0].new_zeros((), dtype=torch.float32)
        for adapter, s, t in zip(self.align, s_list, t_list, strict=True):
            total = total + self._layer(adapter, s, t.detach())
        return total * self.weight

    def _layer(self, adapter: nn.Module, s: Tensor, t: Tensor) -> Tensor:
        if self.loss_kind == "kl":
            s, t = s.float(), t.float()
            if self.heads == "mean":
                s, t = s.mean(dim=1), t.mean(dim=1)
            # Maps over patch tokens (prefix columns dropped): rows renormalised to sum 1.
            s = s / s.sum(dim=-1, keepdim=True).clamp_min(1e-12)
            t = t / t.sum(dim=-1, keepdim=True).clamp_min(1e-12)
            log_s = s.clamp_min(1e-12).log()
            log_t = t.clamp_min(1e-12).log()
            return (t * (log_t - log_s)).sum(dim=-1).mean()
        check_tokens("Mimic", s, t)
        if self.loss_kind == "relation":
            # Similarities in fp32 even under autocast: their squared differences are small.
            with torch.autocast(s.device.type, enabled=False):
                rs, rt = relation(s.float()), relation(t.float())
                return (rs - rt).pow(2).sum() / s.shape[0]
        # The adapter runs in the step's precision (bf16 matmuls under autocast); the error
        # and its reduction in fp32.
        sq = (adapter(adapter_input(s, adapter)).float() - t.float()).pow(2)
        return sq.sum() / s.shape[0] if self.loss_kind == "mse" else sq.mean()

    def extra_repr(self) -> str:
        return f"loss={self.loss_kind!r}, weight={self.weight:g}"


def relation(x: Tensor) -> Tensor:
    """Cosine similarity of every pair of tokens: ``[B, N, D] -> [B, N, N]``."""
    x = F.normalize(x, dim=-1)
    return x @ x.transpose(1, 2)


class HandMimic(nn.Module):
    """Shallow mimicking as in the authors' code: a projection per layer and sum-MSE / B,
    written independently of :class:`Mimic` (bench's hook-based peer)."""

    def __init__(
        self,
        layers: int,
        d_s: int,
        d_t: int,
        align: str = "linear",
        loss: str = "mse",
        weight: float = 3e-5,
    ) -> None:
        super().__init__()
        self.proj = nn.ModuleList(make_align(align, d_s, d_t) for _ in range(layers))
        self.loss, self.weight = loss, weight

    def forward(self, student: list[Tensor], teacher: list[Tensor]) -> Any:
        total: Any = 0.0
        for proj, s, t in zip(self.proj, student, teacher, strict=True):
            pred = proj(s.float())
            if self.loss == "mse":
                total = total + F.mse_loss(pred, t.float(), reduction="sum") / s.shape[0]
            else:
                total = total + F.mse_loss(pred, t.float())
        return self.weight * total
