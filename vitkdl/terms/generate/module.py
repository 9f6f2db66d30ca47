"""The torch modules of ``generate`` (imported when a module is built: the kind's declarations
in :mod:`vitkdl.terms.generate` never import torch)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkdl.terms._torch import adapter_input, as_list, check_tokens, make_align
from vitkdl.terms.generate.counts import MLP_RATIO, masked


class Generate(nn.Module):
    r"""ViTKD deep feature generation.

    The student's patch tokens are aligned to the teacher width
    (:math:`A = f(S) \in \mathbb{R}^{B\times N\times D_t}`), then for each sample exactly
    :math:`k = N - \lfloor N (1-\lambda) \rfloor` tokens, chosen uniformly at random, are
    replaced by a learned mask token :math:`m` (``[1, 1, Dt]``, zero-initialised). A
    generator :math:`G` predicts the teacher's tokens :math:`T` and only masked tokens
    count:

    .. math::
        \mathcal{L} = \beta \, \frac{1}{B\lambda} \sum_{b,n} M_{b,n} \sum_c
        \big(G(\tilde A)_{b,n,c} - T_{b,n,c}\big)^2,
        \qquad \tilde A = M\,m + (1-M)\,A

    ``generator``: ``"conv"`` (the paper's: Conv3x3 - ReLU - Conv3x3 on the row-major
    :math:`\sqrt N \times \sqrt N` grid, or ``grid``), ``"attention"`` (a timm ViT block
    at width :math:`D_t` with ``heads`` heads over all tokens) or ``"linear"`` (per token).
    A fresh mask is drawn on every call unless one is passed in.

    Args:
        student_dim: student width :math:`D_s`.
        teacher_dim: teacher width :math:`D_t`.
        mask: masking ratio :math:`\lambda` in ``(0, 1]``.
        generator: ``"conv"``, ``"attention"`` or ``"linear"``.
        weight: the multiplier :math:`\beta` (3e-6 in the paper).
        align: ``"linear"`` (default), ``"identity"``, ``"mlp"`` or ``"auto"``.
        heads: heads of the ``attention`` generator (default: :math:`D_t / 64`, at least 1).
        grid: the token grid ``(h, w)`` for ``conv`` (default: square).
    """

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        mask: float = 0.5,
        generator: str = "conv",
        weight: float = 3e-6,
        align: str = "linear",
        heads: int | None = None,
        grid: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 < float(mask) <= 1.0:
            raise ValueError(f"Generate: mask ratio must be in (0, 1], got {mask}")
        if generator not in ("conv", "attention", "linear"):
            raise ValueError(
                f"Generate: unknown generator {generator!r}; expected "
                "'conv', 'attention' or 'linear'"
            )
        self.student_dim: int = int(student_dim)
        self.teacher_dim: int = int(teacher_dim)
        self.mask_ratio: float = float(mask)
        self.weight: float = float(weight)
        self.generator_name: str = generator
        self.grid: tuple[int, int] | None = tuple(grid) if grid else None  # type: ignore
        self.align = make_align(align, self.student_dim, self.teacher_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.teacher_dim))
        d = self.teacher_dim
        self.generator: nn.Module
        if generator == "conv":
            self.generator = nn.Sequential(
                nn.Conv2d(d, d, kernel_size=3, padding=1),
                nn.ReLU(inplace=False),
                nn.Conv2d(d, d, kernel_size=3, padding=1),
            )
        elif generator == "attention":
            from timm.models.vision_transformer import Block

            self.generator = Block(
                d, num_heads=heads or max(1, d // 64), mlp_ratio=MLP_RATIO, qkv_bias=True
            )
        else:
            self.generator = nn.Linear(d, d)

    def num_masked(self, n_tokens: int) -> int:
        """Number of tokens masked per sample: ``N - int(N * (1 - mask_ratio))``."""
        return masked(n_tokens, self.mask_ratio)

    def make_mask(
        self, batch: int, n_tokens: int, device: torch.device | str | None = None
    ) -> Tensor:
        """A fresh bool mask ``[B, N]`` (True = masked) with exactly ``num_masked(N)`` True
        entries per row, uniformly at random (``rand(B, N).argsort(1)``: no data-dependent
        shapes, compile-friendly)."""
        k = self.num_masked(n_tokens)
        perm = torch.rand(batch, n_tokens, device=device).argsort(dim=1)
        return perm < k

    @staticmethod
    def grid_side(n_tokens: int) -> int:
        """Side of the square token grid; raises ``ValueError`` if ``n_tokens`` is not a
        square."""
        side = math.isqrt(n_tokens)
        if side * side != n_tokens:
            raise ValueError(
                f"Generate: token count {n_tokens} is not a perfect square; the conv "
                "generator needs a sqrt(N) x sqrt(N) patch grid (pass patch tokens only)"
            )
        return side

    def forward(
        self,
        student: Sequence[Tensor] | Tensor,
        teacher: Sequence[Tensor] | Tensor,
        mask: Tensor | None = None,
    ) -> Tensor:
        """The generation loss for one ``[B, N, Ds]`` student and one ``[B, N, Dt]``
        teacher tensor (bare or in a list of one); ``mask`` (bool ``[B, N]``, True =
        masked) pins the mask."""
        s_list, t_list = as_list(student), as_list(teacher)
        if len(s_list) != 1 or len(t_list) != 1:
            raise ValueError(
                f"Generate: expects exactly one tap per side, got "
                f"{len(s_list)} student and {len(t_list)} teacher"
            )
        s, t = s_list[0], t_list[0]
        check_tokens("Generate", s, t)
        b, n = s.shape[0], s.shape[1]
        if mask is None:
            mask = self.make_mask(b, n, device=s.device)
        elif tuple(mask.shape) != (b, n):
            raise ValueError(f"Generate: mask must be [B, N] = {(b, n)}, got {tuple(mask.shape)}")
        m = mask.to(torch.bool).unsqueeze(-1)  # [B, N, 1]
        # Adapter and generator run in the step's precision (bf16 convolutions under
        # autocast); the error and its reduction in fp32.
        x = self.align(adapter_input(s, self))
        x = torch.where(m, self.mask_token.to(x.dtype), x)  # [B, N, Dt]
        y = self._generate(x).float()
        sq = (y - t.detach().float()).pow(2) * m
        return sq.sum() / (b * self.mask_ratio) * self.weight

    def _generate(self, x: Tensor) -> Tensor:
        if self.generator_name != "conv":
            return self.generator(x)
        b, n, d = x.shape
        h, w = self.grid or (self.grid_side(n), self.grid_side(n))
        grid = x.transpose(1, 2).reshape(b, d, h, w)  # row-major
        return self.generator(grid).flatten(2).transpose(1, 2)

    def extra_repr(self) -> str:
        return (
            f"mask_ratio={self.mask_ratio:g}, generator={self.generator_name}, "
            f"weight={self.weight:g}"
        )


class HandGenerate(nn.Module):
    """Deep generation as users write it: MAE-style random masking (scatter), a conv
    generator, MSE on the masked tokens, summed, / (B x ratio); written independently of
    :class:`Generate` (bench's hook-based peer)."""

    def __init__(
        self,
        d_s: int,
        d_t: int,
        ratio: float = 0.5,
        align: str = "linear",
        weight: float = 3e-6,
    ) -> None:
        super().__init__()
        self.proj = make_align(align, d_s, d_t)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d_t))
        self.generation = nn.Sequential(
            nn.Conv2d(d_t, d_t, 3, padding=1), nn.ReLU(), nn.Conv2d(d_t, d_t, 3, padding=1)
        )
        self.ratio, self.weight = ratio, weight

    def forward(
        self, student: list[Tensor], teacher: list[Tensor], mask: Tensor | None = None
    ) -> Any:
        x = self.proj(student[0].float())
        b, n, d = x.shape
        side = int(n**0.5)
        if mask is None:
            n_mask = n - int(n * (1 - self.ratio))
            ids = torch.rand(b, n, device=x.device).argsort(dim=1)
            mask = torch.zeros(b, n, device=x.device).scatter_(1, ids[:, :n_mask], 1.0)
        m = mask.float().unsqueeze(-1)
        x = x * (1 - m) + self.mask_token * m
        x = x.transpose(1, 2).reshape(b, d, side, side)
        y = self.generation(x).flatten(2).transpose(1, 2)
        loss = (F.mse_loss(y, teacher[0].float(), reduction="none") * m).sum()
        return self.weight * loss / (b * self.ratio)
