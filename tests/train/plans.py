"""A :class:`~vitkdl.planner.DataPlan` for loader tests, without a recipe."""

from __future__ import annotations

from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from vitkdl.planner import DataPlan
from vitkdl.sources import input_norm, split_sizes


def data_plan(
    source: str,
    *,
    size: int = 256,
    classes: int = 10,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    **fields: Any,
) -> DataPlan:
    """The data block of a plan on ``source``, with the fields a test names.

    ``size`` is ``synthetic``'s train split (sized as the planner does); ``classes`` the
    head's. ``mean``/``std`` default to those the planner gives a student without statistics
    of its own on ``source`` (timm's ImageNet defaults; 0.5 / 0.5 on ``digits``); the rest
    default to a small 3-channel 224-pixel pipeline at batch 32, no workers, no augmentation.
    """
    base: dict[str, Any] = {
        "root": None,
        "image_size": 224,
        "in_chans": 3,
        "batch_size": 32,
        "workers": 0,
        "augment": "none",
        "mixup": 0.0,
        "cutmix": 0.0,
        "smoothing": 0.0,
        "interpolation": "bicubic",
        "crop_pct": 0.875,
        "seed": 0,
    }
    base.update(fields)
    if mean is None or std is None:
        default = input_norm(source, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, base["in_chans"])
        mean, std = mean or default[0], std or default[1]
    train_images, val_images = split_sizes(source, size, base["batch_size"])
    return DataPlan(
        source=source,
        global_batch=base["batch_size"],
        num_classes=classes,
        train_images=train_images,
        val_images=val_images,
        mean=mean,
        std=std,
        **base,
    )
