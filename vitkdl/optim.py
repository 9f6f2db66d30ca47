"""Which parameters decay: the one rule, torch-free (the trainer and the bench group parameters
with it; ``explain`` shows it).

No weight decay on 1-d parameters (norms, biases, layer scales), on what the model's own
``no_weight_decay()`` names (timm: position embeddings, class and distillation tokens), and on
parameters whose name ends in one of :data:`NO_DECAY_NAMES` (the same tokens on models that do
not list them, and the generators' mask tokens).
"""

from __future__ import annotations

from collections.abc import Container

NO_DECAY_NAMES: tuple[str, ...] = (
    "pos_embed",
    "cls_token",
    "dist_token",
    "reg_token",
    "mask_token",
)

NO_DECAY_WORDS = (
    "norms, biases and other 1-d parameters, position embeddings, class / "
    "distillation / register tokens, mask tokens"
)


def decays(name: str, ndim: int, skip: Container[str] = ()) -> bool:
    """Whether the parameter ``name`` (of ``ndim`` dimensions) takes weight decay; ``skip``
    is what its model's ``no_weight_decay()`` returns."""
    return not (ndim <= 1 or name in skip or name.endswith(NO_DECAY_NAMES))
