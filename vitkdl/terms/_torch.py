"""Torch helpers shared by the kinds' modules (imported only when a module is built)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ALIGN_CHOICES = ("linear", "identity", "mlp", "auto")


def as_list(x: Tensor | Sequence[Tensor]) -> list[Tensor]:
    """A bare tensor or a sequence of tensors, as a list."""
    if isinstance(x, Tensor):
        return [x]
    return list(x)


def make_align(align: str, d_in: int, d_out: int) -> nn.Module:
    """One student->teacher width adapter: ``linear`` (with bias), ``identity`` (widths must
    match), ``mlp`` (Linear - GELU - Linear) or ``auto`` (identity when the widths match, else
    linear, what the ViTKD authors do for shallow mimicking)."""
    if align == "auto":
        align = "identity" if d_in == d_out else "linear"
    if align == "linear":
        return nn.Linear(d_in, d_out, bias=True)
    if align == "identity":
        if d_in != d_out:
            raise ValueError(
                f"align='identity' needs equal widths, got student {d_in} and teacher {d_out}"
            )
        return nn.Identity()
    if align == "mlp":
        return nn.Sequential(nn.Linear(d_in, d_out), nn.GELU(), nn.Linear(d_out, d_out))
    raise ValueError(f"unknown align {align!r}; expected one of {', '.join(ALIGN_CHOICES)}")


def check_tokens(name: str, s: Tensor, t: Tensor) -> None:
    """Both sides are ``[B, N, D]`` token tensors that agree on ``[B, N]``."""
    if s.dim() != 3 or t.dim() != 3:
        raise ValueError(
            f"{name}: expected [B, N, D] token tensors, got student "
            f"{tuple(s.shape)} and teacher {tuple(t.shape)}"
        )
    if s.shape[:2] != t.shape[:2]:
        raise ValueError(
            f"{name}: student and teacher disagree on [B, N]: "
            f"{tuple(s.shape[:2])} vs {tuple(t.shape[:2])}"
        )


def hard_labels(target: Tensor) -> Tensor:
    """Class indices ``[B]`` from indices ``[B]`` or soft labels ``[B, C]`` (argmax)."""
    if target.dim() == 2:
        return target.argmax(dim=1)
    return target.long()


def adapter_input(x: Tensor, module: nn.Module) -> Tensor:
    """``x`` as an adapter should see it: as it is under autocast (which runs the adapter's
    matmuls in the autocast dtype), else in the adapter's own dtype (bf16 features into an
    fp32 adapter outside autocast)."""
    if torch.is_autocast_enabled(x.device.type):
        return x
    p = next(module.parameters(), None)
    return x if p is None else x.to(p.dtype)


def resample_tokens(x: Tensor, src: tuple[int, int], dst: tuple[int, int], mode: str) -> Tensor:
    """Tokens ``[B, h*w, D]`` laid out row-major on the ``src`` grid, resampled to the ``dst``
    grid: ``[B, h'*w', D]``. ``bilinear`` interpolates (``align_corners=False``); ``area``
    averages each destination cell's footprint (adaptive average pooling)."""
    b, n, d = x.shape
    if n != src[0] * src[1]:
        raise ValueError(f"resample: {n} tokens do not lie on a {src[0]}x{src[1]} grid")
    grid = x.transpose(1, 2).reshape(b, d, src[0], src[1])
    if mode == "area":
        out = F.adaptive_avg_pool2d(grid, dst)
    elif mode == "bilinear":
        out = F.interpolate(grid, size=dst, mode="bilinear", align_corners=False)
    else:
        raise ValueError(f"resample: unknown mode {mode!r}; expected 'bilinear' or 'area'")
    return out.flatten(2).transpose(1, 2)
