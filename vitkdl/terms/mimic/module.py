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
    ``loss="manifold"`` (Hao et al., NeurIPS 2022): with :math:`\hat X` the tokens
    L2-normalised over channels and :math:`\mathrm{msd}(A, B) = \operatorname{mean}(A - B)^2`,
    :math:`\alpha \frac{1}{L}\sum_l \big(w_a\,\mathrm{msd}(\hat S\hat S^\top, \hat T\hat
    T^\top) + w_e\,\mathrm{msd}` of the ``[N, B, B]`` maps across images per token position
    :math:`+ w_r\,\mathrm{msd}` of the ``[K, K]`` maps of K tokens drawn at random from the
    batch's ``B * N`` (the same on both sides):math:`\big)` (no adapter);
    ``loss="kl"``: attention maps ``[B, H, N, N]`` (rows are distributions),
    :math:`\alpha \sum_l \operatorname{mean}_{b,h,i} \mathrm{KL}(A^t_{bhi} \| A^s_{bhi})`,
    heads averaged first with ``heads="mean"``.

    Args:
        student_dims: student width per paired layer (an int means a single layer).
        teacher_dims: teacher width per paired layer (an int is broadcast).
        align: ``"linear"`` (default), ``"identity"`` (widths must match), ``"mlp"`` or
            ``"auto"`` (identity where widths match, else linear). Unused by ``relation``
            and ``kl``.
        loss: ``"mse"``, ``"mse_mean"``, ``"relation"``, ``"kl"`` or ``"manifold"``.
        heads: ``"pair"`` or ``"mean"`` (``kl`` only).
        weight: the multiplier :math:`\alpha` (3e-5 in the paper, for ``"mse"``).
        intra, inter, random: ``manifold``'s map weights :math:`w_a, w_e, w_r`.
        samples: ``manifold``'s K, the tokens its random map draws.
    """

    def __init__(
        self,
        student_dims: Sequence[int] | int,
        teacher_dims: Sequence[int] | int,
        align: str = "linear",
        loss: str = "mse",
        weight: float = 3e-5,
        heads: str = "pair",
        intra: float = 4.0,
        inter: float = 0.1,
        random: float = 0.2,
        samples: int = 192,
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
        if loss not in ("mse", "mse_mean", "relation", "kl", "manifold"):
            raise ValueError(
                f"Mimic: unknown loss {loss!r}; expected 'mse', 'mse_mean', 'relation', 'kl' "
                "or 'manifold'"
            )
        if samples < 1:
            raise ValueError(f"Mimic: samples must be >= 1, got {samples}")
        if heads not in ("pair", "mean"):
            raise ValueError(f"Mimic: heads must be 'pair' or 'mean', got {heads!r}")
        self.student_dims: list[int] = s_dims
        self.teacher_dims: list[int] = t_dims
        self.loss_kind: str = loss
        self.heads: str = heads
        self.weight: float = float(weight)
        self.manifold: tuple[float, float, float] = (float(intra), float(inter), float(random))
        self.samples: int = int(samples)
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
        if self.loss_kind == "manifold":  # the authors average their layers
            total = total / len(self.align)
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
        if self.loss_kind == "manifold":
            with torch.autocast(s.device.type, enabled=False):
                return manifold(s.float(), t.float(), *self.manifold, self.samples)
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


def manifold(
    s: Tensor, t: Tensor, intra: float, inter: float, random: float, samples: int
) -> Tensor:
    """Manifold distillation on one paired layer ``[B, N, Ds]``, ``[B, N, Dt]``: the weighted
    mean squared differences of the intra-image, inter-image and random-token relation maps
    of the L2-normalised tokens."""
    s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
    loss = intra * _msd(s, t)  # [B, N, N]: every pair of tokens in an image
    loss = loss + inter * _msd(s.transpose(0, 1), t.transpose(0, 1))  # [N, B, B]
    b, n = s.shape[:2]
    # K tokens of the whole batch, the same on both sides, from torch's generator (on the
    # step's device: one graph, and the state a checkpoint restores).
    pick = torch.randperm(b * n, device=s.device)[: min(samples, b * n)]
    rs, rt = s.reshape(b * n, -1)[pick], t.reshape(b * n, -1)[pick]
    return loss + random * _msd(rs.unsqueeze(0), rt.unsqueeze(0))  # [1, K, K]


def _msd(s: Tensor, t: Tensor) -> Tensor:
    """The mean squared difference of the batched relation maps ``x @ x^T``."""
    return (s @ s.transpose(-1, -2) - t @ t.transpose(-1, -2)).pow(2).mean()


class HandManifold(nn.Module):
    """Manifold distillation as the authors write it (``layer_mf_loss``: ``bmm`` per map,
    ``randperm(B * N)[:K]``, ``(M_t - M_s)^2`` averaged; layers averaged), independent of
    :class:`Mimic`: its reference in the tests and ``vitkdl bench``."""

    def __init__(
        self, intra: float, inter: float, random: float, samples: int, weight: float = 1.0
    ) -> None:
        super().__init__()
        self.w = (intra, inter, random)
        self.k, self.weight = samples, weight

    def forward(self, student: list[Tensor], teacher: list[Tensor]) -> Any:
        total: Any = 0.0
        for fs, ft in zip(student, teacher, strict=True):
            fs, ft = F.normalize(fs.float(), dim=-1), F.normalize(ft.float(), dim=-1)
            diff = ft.bmm(ft.transpose(-1, -2)) - fs.bmm(fs.transpose(-1, -2))
            intra = (diff * diff).mean()
            ps, pt = fs.permute(1, 0, 2), ft.permute(1, 0, 2)
            diff = pt.bmm(pt.transpose(-1, -2)) - ps.bmm(ps.transpose(-1, -2))
            inter = (diff * diff).mean()
            bsz, patches, _ = fs.shape
            sampler = torch.randperm(bsz * patches, device=fs.device)[: self.k]
            rs = fs.reshape(bsz * patches, -1)[sampler]
            rt = ft.reshape(bsz * patches, -1)[sampler]
            diff = rt.mm(rt.T) - rs.mm(rs.T)
            rand = (diff * diff).mean()
            total = total + self.w[0] * intra + self.w[1] * inter + self.w[2] * rand
        return self.weight * total / len(student)


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
