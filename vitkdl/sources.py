"""The data sources' facts, written once and torch-free.

What is known about a data source before any image is read: its class count, its split
sizes, how its pixels are normalised for a model, and what each ``augment`` choice does to it.
The checks, the planner, ``explain`` and the data layer all ask here; none of them keeps a copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

#: timm's ImageNet statistics: what a model without a pretrained config of its own reports.
IMAGENET_MEAN: tuple[float, ...] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, ...] = (0.229, 0.224, 0.225)

#: DeiT's training augmentation (Touvron et al. 2021), as used by the ViTKD paper.
DEIT_AUTO_AUGMENT = "rand-m9-mstd0.5-inc1"
DEIT_RE_PROB = 0.25


@dataclass(frozen=True)
class SourceFacts:
    """One data source as far as it is known without reading it."""

    name: str
    classes: int | None  # known before the data is read (None: counted from the folders)
    train_images: int | None
    val_images: int | None
    normalised: bool  # whether the loader normalises pixels with the model's statistics
    augment: dict[str, str]  # augment choice -> what it does, in words
    decodes: bool = False  # reads and decodes files: worth loader worker processes
    root: str | None = None  # what data.root names for this source (None: not used)
    package: str | None = None  # the optional package it needs (imported by the data layer)
    extra: str | None = None  # the pip extra that installs it: pip install -e ".[EXTRA]"
    streamed: bool = False  # read in order as a stream (no random access, no sampler)


_DEIT_WORDS = {
    "deit": "RandAugment m9-mstd0.5-inc1 + random erasing 0.25",
    "basic": "random resized crop + flip + colour jitter",
    "none": "none",
}

SOURCES: dict[str, SourceFacts] = {
    s.name: s
    for s in (
        SourceFacts(
            "imagefolder",
            None,
            None,
            None,
            True,
            _DEIT_WORDS,
            decodes=True,
            root="a folder with train/<class>/* and val/<class>/*",
        ),
        # A Hugging Face dataset: by hub name (`name`, through the datasets cache) or a local
        # directory written by save_to_disk (`root`); classes from its label feature.
        SourceFacts(
            "hfds",
            None,
            None,
            None,
            True,
            _DEIT_WORDS,
            decodes=True,
            root="a local dataset directory written by datasets' save_to_disk",
            package="datasets",
            extra="hf",
        ),
        # webdataset shards (`root`, `val_root`: brace patterns), streamed; sizes and classes
        # are counted from the shards' headers when a run starts.
        SourceFacts(
            "wds",
            None,
            None,
            None,
            True,
            _DEIT_WORDS,
            decodes=True,
            root="webdataset training shards, e.g. shards/train-{0000..0099}.tar",
            package="webdataset",
            extra="wds",
            streamed=True,
        ),
        # scikit-learn's 8x8 digits: a fixed stratified 80/20 split of 1797 images.
        SourceFacts(
            "digits",
            10,
            1437,
            360,
            True,
            {
                "deit": "random 1-pixel shift + random erasing 0.25",
                "basic": "random 1-pixel shift",
                "none": "none",
            },
        ),
        # Random images that are already zero-mean and unit-variance: nothing to normalise.
        SourceFacts(
            "synthetic", None, None, None, False, {"deit": "none", "basic": "none", "none": "none"}
        ),
    )
}


def source(name: str) -> SourceFacts:
    """The facts of a data source by name."""
    return SOURCES[name]


def known_classes(name: str, classes: int | None) -> int | None:
    """The class count of a source when it is known before the data is read (``synthetic``:
    its ``classes`` field; ``imagefolder``: None, counted from the folders)."""
    return classes if name == "synthetic" else source(name).classes


def split_sizes(name: str, size: int, batch_size: int) -> tuple[int | None, int | None]:
    """Train and validation images of a source (``synthetic`` has ``size`` train images and a
    quarter of that, at least a batch, for validation)."""
    if name == "synthetic":
        return size, max(size // 4, batch_size)
    facts = source(name)
    return facts.train_images, facts.val_images


def match_channels(
    mean: Sequence[float], std: Sequence[float], in_chans: int
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Match ``mean``/``std`` to ``in_chans`` as timm's ``resolve_data_config`` does: one
    value is broadcast; a 3-value (RGB) tuple on a 1-channel model is averaged to grey.
    Raises ``ValueError`` naming the field when the counts cannot be matched."""

    def one(values: Sequence[float], key: str) -> tuple[float, ...]:
        values = tuple(float(v) for v in values)
        if len(values) == 1:
            return values * in_chans
        if len(values) == in_chans:
            return values
        if in_chans == 1 and len(values) == 3:
            return (sum(values) / 3.0,)
        raise ValueError(f"{key} has {len(values)} values but in_chans={in_chans}")

    return one(mean, "mean"), one(std, "std")


#: The digits are grey strokes in [0, 1]; a model without statistics of its own (timm's
#: ImageNet defaults) sees them centred at 0.5 with std 0.5.
DIGITS_MEAN = 0.5
DIGITS_STD = 0.5


def input_norm(
    source_name: str, mean: Sequence[float], std: Sequence[float], in_chans: int
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The per-channel mean and std with which a model sees pixels of ``source_name``.

    Each model's own pretrained statistics (timm's ``pretrained_cfg``), matched to its
    channels; on ``digits``, ImageNet's defaults (a model with no statistics of its own)
    become 0.5 / 0.5. The loader normalises for the student; the step turns the student's
    input into the teacher's with the per-channel affine between the two (see
    :func:`teacher_affine`).
    """
    m, s = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if source_name == "digits" and (m, s) == (IMAGENET_MEAN, IMAGENET_STD):
        m, s = (DIGITS_MEAN,), (DIGITS_STD,)
    return match_channels(m, s, in_chans)


def teacher_affine(
    student: tuple[Sequence[float], Sequence[float]],
    teacher: tuple[Sequence[float], Sequence[float]],
) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``(scale, shift)`` per channel with ``x_teacher = x_student * scale + shift`` for two
    models' ``(mean, std)``, or None when the two normalise alike (nothing to do).

    A pixel ``p`` reaches the student as ``(p - m_s) / s_s``; the teacher wants
    ``(p - m_t) / s_t = x_s * s_s / s_t + (m_s - m_t) / s_t``.
    """
    (ms, ss), (mt, st) = student, teacher
    if len(ms) != len(mt):
        raise ValueError(f"the student normalises {len(ms)} channels, the teacher {len(mt)}")
    if tuple(ms) == tuple(mt) and tuple(ss) == tuple(st):
        return None
    scale = tuple(a / b for a, b in zip(ss, st, strict=True))
    shift = tuple((a - b) / c for a, b, c in zip(ms, mt, st, strict=True))
    return scale, shift


def expand_braces(pattern: str) -> list[str]:
    """Shard names of a brace pattern, as webdataset expands them:
    ``train-{0000..0002}.tar`` -> ``train-0000.tar``, ``train-0001.tar``, ``train-0002.tar``
    (zero-padded to the first bound's width); ``{a,b}`` alternatives; several groups."""
    start = pattern.find("{")
    end = pattern.find("}", start)
    if start < 0 or end < 0:
        return [pattern]
    head, body, tail = pattern[:start], pattern[start + 1 : end], pattern[end + 1 :]
    if ".." in body and "," not in body:
        lo, _, hi = body.partition("..")
        if lo.isdigit() and hi.isdigit():
            width = len(lo) if lo.startswith("0") else 0
            items = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
        else:
            items = [body]
    else:
        items = body.split(",")
    return [head + item + rest for item in items for rest in expand_braces(tail)]
