"""The data sources' facts and the normalisation rules, torch-free."""

from __future__ import annotations

import math

import pytest

from vitkdl.sources import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    input_norm,
    known_classes,
    match_channels,
    split_sizes,
    teacher_affine,
)


def test_each_model_keeps_its_own_statistics() -> None:
    assert input_norm("imagefolder", IMAGENET_MEAN, IMAGENET_STD, 3) == (
        IMAGENET_MEAN,
        IMAGENET_STD,
    )
    assert input_norm("imagefolder", (0.5,) * 3, (0.5,) * 3, 3) == ((0.5,) * 3, (0.5,) * 3)
    # Digits: a model with no statistics of its own (ImageNet's defaults) sees 0.5 / 0.5.
    assert input_norm("digits", IMAGENET_MEAN, IMAGENET_STD, 1) == ((0.5,), (0.5,))
    assert input_norm("digits", (0.25,) * 3, (0.5,) * 3, 1) == ((0.25,), (0.5,))


def test_channels_are_matched_like_timm() -> None:
    assert match_channels((0.1,), (0.2,), 3) == ((0.1,) * 3, (0.2,) * 3)
    mean, _ = match_channels((0.3, 0.6, 0.9), (1, 1, 1), 1)
    assert math.isclose(mean[0], 0.6)
    with pytest.raises(ValueError, match="mean has 2 values"):
        match_channels((0.1, 0.2), (1,), 3)


def test_teacher_affine_turns_the_student_input_into_the_teacher_input() -> None:
    student, teacher = (IMAGENET_MEAN, IMAGENET_STD), ((0.5,) * 3, (0.5,) * 3)
    affine = teacher_affine(student, teacher)
    assert affine is not None
    scale, shift = affine
    for pixel in (0.0, 0.3, 1.0):
        for c in range(3):
            x_s = (pixel - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
            assert math.isclose(x_s * scale[c] + shift[c], (pixel - 0.5) / 0.5, abs_tol=1e-12)
    assert teacher_affine(student, student) is None


def test_facts_known_before_reading() -> None:
    assert known_classes("digits", None) == 10
    assert known_classes("synthetic", 7) == 7 and known_classes("imagefolder", None) is None
    assert split_sizes("digits", 0, 32) == (1437, 360)
    assert split_sizes("synthetic", 64, 32) == (64, 32)
