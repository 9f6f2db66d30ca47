"""What the plan and the torch module of ``generate`` both count by (torch-free; the module
imports this, never the kind's declarations, so the kind's folder has no import cycle)."""

from __future__ import annotations

MLP_RATIO = 4  # the attention generator's block, as a timm ViT block


def masked(tokens: int, mask: float) -> int:
    """Tokens masked per sample, as the authors count them: ``N - int(N * (1 - mask))``."""
    return tokens - int(tokens * (1 - mask))
