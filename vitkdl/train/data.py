"""Data layer of the ViTKD trainer: datasets, loaders and mixup/cutmix.

Five sources are supported (``DataPlan.source``); ``hfds`` (Hugging Face datasets) and
``wds`` (webdataset shards) live in :mod:`vitkdl.train.readers`, the other three here:

``"digits"``
    the 1797 8x8 handwritten digits that scikit-learn bundles, embedded in the package
    (``vitkdl/data/digits.npz``; no download, no scikit-learn), held fully in memory. The
    train/val split is a fixed 80/20 stratified split (1437 train / 360 val images),
    independent of ``DataPlan.seed``.
``"synthetic"``
    Deterministic random images (a per-class low-frequency pattern plus Gaussian noise, so
    the task is learnable) for smoke tests and benchmarks.
``"imagefolder"``
    ImageNet layout ``root/train/<class>/<image>`` and ``root/val/<class>/<image>``,
    decoded with PIL and transformed with timm's ``create_transform`` (DeiT recipe:
    RandAugment ``rand-m9-mstd0.5-inc1`` + random erasing 0.25).

Everything here reads the resolved plan's data block, :class:`vitkdl.planner.DataPlan`
(normalisation, interpolation, crop and seed included: the planner resolves them once).
Errors a user can fix are raised as :class:`DataError` whose message
names the offending path or value and the ``--set data.<key>=...`` override that fixes it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import Mixup, create_transform
from timm.data.random_erasing import RandomErasing
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, Subset

from vitkdl.planner import DataPlan
from vitkdl.sources import DEIT_AUTO_AUGMENT, DEIT_RE_PROB, DIGITS_MEAN, DIGITS_STD, source
from vitkdl.train.samples import (
    UNREADABLE,
    WarnedOnce,
    mix_seed,
    seeded_streams,
    unreadable_stand_in,
)

__all__ = [
    "DEIT_AUTO_AUGMENT",
    "DEIT_RE_MODE",
    "DEIT_RE_PROB",
    "DIGITS_MEAN",
    "DIGITS_STD",
    "IMAGE_EXTENSIONS",
    "DataError",
    "DigitsDataset",
    "EpochSampler",
    "ImageFolderDataset",
    "Replayed",
    "StreamMixup",
    "SyntheticDataset",
    "build_datasets",
    "build_loaders",
    "build_mixup",
    "build_transforms",
    "loader_workers",
    "mix_seed",
    "patch_timm_posterize",
    "posterize",
    "sample_key",
    "set_epoch",
    "step_key",
    "unwrap",
]

DEIT_RE_MODE: str = "pixel"

#: Image file extensions recognised by ``imagefolder`` (compared case-insensitively).
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

DIGITS_TRAIN_SIZE: int = source("digits").train_images or 0
DIGITS_VAL_SIZE: int = source("digits").val_images or 0
DIGITS_CLASSES: int = source("digits").classes or 0


class DataError(Exception):
    """A data problem the user can fix; the message names the path/value and the fix."""


def _check(cfg: DataPlan) -> None:
    """What the recipe's checks leave to the loader: the channels a decoded image can have."""
    if source(cfg.source).decodes and cfg.in_chans not in (1, 3):
        raise DataError(
            f"data.in_chans={cfg.in_chans!r} is invalid: {cfg.source} supports 1 (grayscale) "
            "or 3 (RGB); set in_chans on the student"
        )


def loader_workers(cfg: DataPlan) -> int:
    """The loader worker processes per device on this machine: the plan's, at most one per
    CPU (a recipe written for a bigger machine still runs here)."""
    return min(cfg.workers, os.cpu_count() or 1)


# ---------------------------------------------------------------------------------------------
# digits


@lru_cache(maxsize=1)
def _digits_split() -> tuple[Any, Any, Any, Any]:
    """The embedded digits, split as always (``vitkdl/data/README.md``): every run evaluates
    on the same 360 images. Images in [0, 1]."""
    from importlib import resources

    import numpy as np

    with resources.files("vitkdl").joinpath("data/digits.npz").open("rb") as f:
        data = np.load(f)
        arrays = (
            data["train_images"].astype("float32") / 16.0,
            data["val_images"].astype("float32") / 16.0,
            data["train_labels"].astype("int64"),
            data["val_labels"].astype("int64"),
        )
    for arr in arrays:
        arr.setflags(write=False)
    return arrays


class DigitsDataset(Dataset):
    """In-memory 8x8 digits as normalised float tensors ``[in_chans, image_size, image_size]``.

    Images are stored at 8x8 (values in [0, 1]) and, per item, optionally translated by up to
    one pixel (``augment`` in ``basic``/``deit``: zero-pad by 1 then random 8x8 crop; ``deit``
    additionally applies timm ``RandomErasing`` with p=0.25), resized with bilinear
    interpolation when ``image_size != 8``, repeated to ``in_chans`` channels and normalised
    with ``(x - mean) / std``.  Randomness uses torch's and Python's global RNGs, which the
    training loader seeds per sample (:class:`Replayed`).
    """

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        *,
        image_size: int,
        in_chans: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        augment: str = "none",
    ) -> None:
        self.images = images  # [N, 1, 8, 8] float32 in [0, 1]
        self.targets = targets  # [N] int64
        self.image_size = image_size
        self.in_chans = in_chans
        self.augment = augment
        self.classes = [str(i) for i in range(DIGITS_CLASSES)]
        self._mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self._erase = (
            RandomErasing(probability=DEIT_RE_PROB, mode=DEIT_RE_MODE, device="cpu")
            if augment == "deit"
            else None
        )

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = self.images[index]  # [1, 8, 8]
        if self.augment != "none":
            dy, dx = torch.randint(0, 3, (2,)).tolist()
            x = F.pad(x, (1, 1, 1, 1))[:, dy : dy + 8, dx : dx + 8]
        if self.image_size != x.shape[-1]:
            x = F.interpolate(
                x.unsqueeze(0),
                size=(self.image_size, self.image_size),
                mode="bilinear",
                align_corners=False,
            ).squeeze(0)
        x = x.expand(self.in_chans, -1, -1)
        x = (x - self._mean) / self._std
        if self._erase is not None:
            x = self._erase(x)
        return x.contiguous(), int(self.targets[index])


def _build_digits(cfg: DataPlan) -> tuple[DigitsDataset, DigitsDataset, int]:
    x_tr, x_va, y_tr, y_va = _digits_split()

    def make(x: Any, y: Any, augment: str) -> DigitsDataset:
        return DigitsDataset(
            torch.tensor(x).unsqueeze(1),
            torch.tensor(y),
            image_size=cfg.image_size,
            in_chans=cfg.in_chans,
            mean=cfg.mean,
            std=cfg.std,
            augment=augment,
        )

    return make(x_tr, y_tr, cfg.augment), make(x_va, y_va, "none"), DIGITS_CLASSES


# ---------------------------------------------------------------------------------------------
# synthetic

_SPLIT_IDS = {"train": 0, "val": 1}


class SyntheticDataset(Dataset):
    """Deterministic random images ``[in_chans, image_size, image_size]`` and labels.

    Item ``i`` of a split is generated from a ``torch.Generator`` seeded with
    ``(seed, split, i)``, so it is identical across calls, processes and workers.  Each image is
    its class's pattern (4x4 Gaussian noise seeded by ``(seed, label)``, nearest-upsampled)
    plus unit Gaussian noise, so train and val share the classes' patterns and a model can
    learn the task.  Values are roughly zero-mean, i.e. already "normalised"; no augmentation.
    """

    def __init__(
        self,
        length: int,
        *,
        image_size: int,
        in_chans: int,
        classes: int,
        seed: int,
        split: str = "train",
    ) -> None:
        self.length = length
        self.image_size = image_size
        self.in_chans = in_chans
        self.num_classes = classes
        self.seed = seed
        self.split = split
        self.classes = [str(i) for i in range(classes)]

    def __len__(self) -> int:
        return self.length

    def _pattern(self, label: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(mix_seed(self.seed, 2, label))
        small = torch.randn(1, self.in_chans, 4, 4, generator=g)
        return F.interpolate(small, size=(self.image_size, self.image_size), mode="nearest")[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        g = torch.Generator().manual_seed(mix_seed(self.seed, _SPLIT_IDS[self.split], index))
        label = int(torch.randint(0, self.num_classes, (1,), generator=g))
        size = (self.in_chans, self.image_size, self.image_size)
        noise = torch.randn(size, generator=g)
        return self._pattern(label) + noise, label


def _build_synthetic(cfg: DataPlan) -> tuple[SyntheticDataset, SyntheticDataset, int]:
    # The planner sizes both splits (vitkdl.sources.split_sizes); the classes are the head's.
    assert cfg.train_images is not None and cfg.val_images is not None
    common = {
        "image_size": cfg.image_size,
        "in_chans": cfg.in_chans,
        "classes": cfg.num_classes,
        "seed": cfg.seed,
    }
    train = SyntheticDataset(cfg.train_images, split="train", **common)
    val = SyntheticDataset(cfg.val_images, split="val", **common)
    return train, val, cfg.num_classes


# ---------------------------------------------------------------------------------------------
# imagefolder


def build_transforms(
    cfg: DataPlan, *, uint8: bool = False
) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    """timm ``(train, eval)`` transforms for ``imagefolder`` according to ``cfg.augment``.

    ``deit``: random resized crop, flip, RandAugment ``rand-m9-mstd0.5-inc1`` and random
    erasing (p=0.25, per-pixel noise, as in DeiT).  ``basic``: the same without RandAugment
    and random erasing (so colour jitter 0.4 is on).  ``none``: the eval transform (resize to
    ``image_size / crop_pct``, centre crop) for training too.  ``uint8``: images are left
    unnormalised (and not erased), for the device to finish (see :func:`build_loaders`).
    """
    if cfg.augment == "deit":
        patch_timm_posterize()
    common: dict[str, Any] = {
        "input_size": (cfg.in_chans, cfg.image_size, cfg.image_size),
        "interpolation": cfg.interpolation,
        "mean": cfg.mean,
        "std": cfg.std,
        "crop_pct": cfg.crop_pct,
        # uint8 out, normalisation and random erasing on the device (see prefetch_device)
        "use_prefetcher": uint8,
    }
    eval_tf = create_transform(is_training=False, **common)
    if cfg.augment == "deit":
        train_tf = create_transform(
            is_training=True,
            auto_augment=DEIT_AUTO_AUGMENT,
            re_prob=DEIT_RE_PROB,
            re_mode=DEIT_RE_MODE,
            **common,
        )
    elif cfg.augment == "basic":
        train_tf = create_transform(is_training=True, auto_augment=None, re_prob=0.0, **common)
    else:
        train_tf = eval_tf
    return train_tf, eval_tf


def posterize(img: Any, bits_to_keep: int, **_: Any) -> Any:
    """timm's ``posterize`` op, with 0 bits kept giving a black image on every Pillow.

    DeiT's RandAugment (``rand-m9-mstd0.5-inc1``) draws ``PosterizeIncreasing`` levels up to
    10, which timm maps to ``bits_to_keep = 0``. Pillow before 13 posterized with the mask
    ``~(2 ** (8 - bits) - 1)``, so 0 bits gave an all-zero (black) image, which is what DeiT
    trained with; Pillow 13 raises ``ValueError`` for bits outside 1..8 instead, and the
    exception killed the DataLoader worker. 1..7 bits are Pillow's own posterize, 8 or more
    the image unchanged (as timm does).
    """
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:  # Pillow < 13's lookup table for 0 bits: every level to 0
        return img.point([0] * 256 * len(img.getbands()))
    return ImageOps.posterize(img, bits_to_keep)


def patch_timm_posterize() -> None:
    """Make timm's auto-augment ops use :func:`posterize` (idempotent).

    timm's ``AugmentOp`` looks its function up in ``NAME_TO_OP`` when it is built, so the
    entries that point at timm's own ``posterize`` are replaced before the transform is
    created; anything else (already patched, or another op) is left alone.
    """
    from timm.data import auto_augment

    for name, op in list(auto_augment.NAME_TO_OP.items()):
        if op is auto_augment.posterize:
            auto_augment.NAME_TO_OP[name] = posterize


def _prefetch(cfg: DataPlan, prefetch_device: str | None) -> bool:
    """Whether batches travel as uint8 to ``prefetch_device`` (sources that decode)."""
    return prefetch_device is not None and source(cfg.source).decodes


def _device_side(
    cfg: DataPlan, prefetch_device: str, train: DataLoader, val: DataLoader, rank: int = 0
) -> tuple[Any, Any]:
    """Both loaders wrapped in timm's ``PrefetchLoader``: the copy of the next batch overlaps
    the step on a side stream; normalisation (and DeiT's random erasing, for training) runs
    on the device."""
    from timm.data.loader import PrefetchLoader

    device = torch.device(prefetch_device)

    def wrap(loader: DataLoader, re_prob: float) -> Any:
        return PrefetchLoader(
            loader,
            mean=cfg.mean,
            std=cfg.std,
            channels=cfg.in_chans,
            device=device,
            re_prob=re_prob,
            re_mode=DEIT_RE_MODE,
        )

    train_side = wrap(train, 0.0)
    if cfg.augment == "deit":  # erased under the batch's key, not the global streams
        train_side = DeviceErasing(train_side, cfg.seed, rank, device)
    return train_side, wrap(val, 0.0)


class DeviceErasing:
    """DeiT's random erasing on the device, on the batches of a (prefetching) loader, under
    each batch's :func:`step_key`: the erased boxes and their noise replay on every pass, and
    the global streams (Python's, torch's CPU and the device's) are left as they were."""

    def __init__(self, inner: Any, seed: int, rank: int, device: torch.device) -> None:
        self.inner, self.seed, self.rank, self.device = inner, seed, rank, device
        self.erase = RandomErasing(probability=DEIT_RE_PROB, mode=DEIT_RE_MODE, device=str(device))

    @property
    def loader(self) -> DataLoader:
        """The torch ``DataLoader`` inside (see :func:`unwrap`)."""
        return unwrap(self.inner)

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Any:
        sampler = self.loader.sampler
        epoch = getattr(sampler, "epoch", 0)
        devices = [self.device] if self.device.type == "cuda" else []
        for batch, (images, labels) in enumerate(self.inner):
            key = step_key(self.seed, epoch, batch, self.rank)
            with seeded_streams(key), torch.random.fork_rng(devices=devices):
                if devices:
                    torch.cuda.manual_seed(key)
                images = self.erase(images)
            yield images, labels


def unwrap(loader: Any) -> DataLoader:
    """The torch ``DataLoader`` inside a prefetching loader (or the loader itself)."""
    return getattr(loader, "loader", loader)


def _root_error(path: str, problem: str) -> DataError:
    return DataError(
        f"data root {path} {problem}; pass --set data.root=/path/to/imagenet "
        "(expected layout: <root>/train/<class>/<image> and <root>/val/<class>/<image>)"
    )


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _class_dirs(split_dir: str) -> list[str]:
    return sorted(
        e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith(".")
    )


def _scan_class(class_dir: str) -> list[str]:
    files: list[str] = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files.extend(
            os.path.join(dirpath, f)
            for f in sorted(filenames)
            if _is_image(f) and not f.startswith(".")
        )
    return files


class ImageFolderDataset(Dataset):
    """``split_dir/<class>/<image>`` with a given class->index map, robust to corrupt files.

    An image that fails to open/decode does not crash the run: the dataset emits a
    ``RuntimeWarning`` naming the file (once per file and run, whichever DataLoader worker
    reads it: :class:`WarnedOnce`), records it in :attr:`skipped` and
    returns the next readable sample (index ``i + 1``, wrapping around) instead; with
    ``replace=False`` (evaluation) it returns :func:`unreadable_stand_in`, so no image is
    counted twice.  Only when no file of the split can be decoded is :class:`DataError`
    raised.  Errors raised by the
    transform are not caught.  With ``workers > 0`` each worker process holds its own copy of
    :attr:`skipped` (the warnings still reach stderr); read it with ``workers=0`` for an exact
    count.
    """

    def __init__(
        self,
        split_dir: str,
        class_to_idx: dict[str, int],
        *,
        transform: Callable[[Any], Any] | None = None,
        in_chans: int = 3,
        replace: bool = True,
    ) -> None:
        self.root = split_dir
        self.replace = replace
        self.class_to_idx = dict(class_to_idx)
        self.classes = sorted(self.class_to_idx, key=self.class_to_idx.__getitem__)
        self.transform = transform
        self.mode = "L" if in_chans == 1 else "RGB"
        self.samples: list[tuple[str, int]] = []
        for name in _class_dirs(split_dir):
            if name in self.class_to_idx:
                idx = self.class_to_idx[name]
                files = _scan_class(os.path.join(split_dir, name))
                self.samples.extend((path, idx) for path in files)
        self.targets = [t for _, t in self.samples]
        #: Paths of files that failed to decode and were skipped (in this process).
        self.skipped: set[str] = set()
        self.warned = WarnedOnce(len(self.samples))

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, path: str) -> Any:
        from PIL import Image

        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert(self.mode)  # convert() forces the full decode

    def __getitem__(self, index: int) -> tuple[Any, int]:
        n = len(self.samples)
        for attempt in range(n):
            at = (index + attempt) % n
            path, target = self.samples[at]
            if path in self.skipped:
                if not self.replace:
                    return unreadable_stand_in(self.transform, self.mode)
                continue
            try:
                img = self._load(path)
            except Exception as exc:  # corrupt/truncated/unreadable file: skip, never crash
                self.skipped.add(path)
                if self.warned.first(at):
                    warnings.warn(
                        f"skipping unreadable image {path}: {type(exc).__name__}: {exc}",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                if not self.replace:
                    return unreadable_stand_in(self.transform, self.mode)
                continue
            if self.transform is not None:
                img = self.transform(img)
            return img, target
        raise DataError(
            f"none of the {n} images under {self.root} could be decoded; "
            "fix the files or pass --set data.root=/path/to/imagenet"
        )


def _build_imagefolder(
    cfg: DataPlan, uint8: bool
) -> tuple[ImageFolderDataset, ImageFolderDataset, int]:
    if not cfg.root:
        raise DataError(
            "data.source=imagefolder needs a data root; pass --set data.root=/path/to/imagenet"
        )
    root = os.path.abspath(os.path.expanduser(cfg.root))
    if not os.path.isdir(root):
        raise _root_error(root, "does not exist" if not os.path.exists(root) else "is not a dir")
    split_dirs = {s: os.path.join(root, s) for s in ("train", "val")}
    for split, path in split_dirs.items():
        if not os.path.isdir(path):
            raise _root_error(root, f"has no {split} split: {path} does not exist")

    classes = _class_dirs(split_dirs["train"])
    if not classes:
        raise _root_error(root, f"has no class folders in {split_dirs['train']}")
    val_classes = _class_dirs(split_dirs["val"])
    extra = sorted(set(val_classes) - set(classes))
    if extra:
        missing = sorted(set(classes) - set(val_classes))
        raise DataError(
            f"class mismatch in data root {root}: {split_dirs['val']} has classes not in "
            f"{split_dirs['train']}: {_short(extra)}"
            + (f" (train classes missing from val: {_short(missing)})" if missing else "")
            + "; val classes must be a subset of train classes; fix the folders or pass "
            "--set data.root=/path/to/imagenet"
        )
    class_to_idx = {c: i for i, c in enumerate(classes)}
    train_tf, eval_tf = build_transforms(cfg, uint8=uint8)
    train = ImageFolderDataset(
        split_dirs["train"], class_to_idx, transform=train_tf, in_chans=cfg.in_chans
    )
    val = ImageFolderDataset(
        split_dirs["val"], class_to_idx, transform=eval_tf, in_chans=cfg.in_chans, replace=False
    )
    for split, ds in (("train", train), ("val", val)):
        if len(ds) == 0:
            raise _root_error(
                root,
                f"has no images in its {split} split {split_dirs[split]} "
                f"(extensions: {', '.join(IMAGE_EXTENSIONS)})",
            )
    empty = sorted(set(classes) - set(train.classes[t] for t in set(train.targets)))
    if empty:
        warnings.warn(
            f"{split_dirs['train']}: class folders without images: {_short(empty)}",
            RuntimeWarning,
            stacklevel=3,
        )
    return train, val, len(classes)


def _short(names: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in total)" if len(names) > limit else "")


# ---------------------------------------------------------------------------------------------
# public builders


def build_datasets(
    cfg: DataPlan, *, rank: int = 0, world_size: int = 1, uint8: bool = False
) -> tuple[Dataset, Dataset, int]:
    """Build ``(train, val, num_classes)`` for ``cfg.source``.

    Every dataset yields ``(image, label)`` with ``image`` a float32 tensor
    ``[in_chans, image_size, image_size]`` and ``label`` an ``int`` in ``[0, num_classes)``.
    The val split is never augmented.  Raises :class:`DataError` for a missing/empty root or
    split, or val classes that are not a subset of train classes (``imagefolder``).
    ``rank`` / ``world_size``: how a streamed source (``wds``) splits itself. ``uint8``:
    decoded images come unnormalised, as uint8 (see :func:`build_transforms`).
    """
    _check(cfg)
    if cfg.source == "digits":
        return _build_digits(cfg)
    if cfg.source == "synthetic":
        return _build_synthetic(cfg)
    if source(cfg.source).package is not None:
        return _build_reader(cfg, rank, world_size, uint8)
    return _build_imagefolder(cfg, uint8)


def _build_reader(
    cfg: DataPlan, rank: int, world_size: int, uint8: bool
) -> tuple[Dataset, Dataset, int]:
    """Hugging Face datasets and webdataset shards (:mod:`vitkdl.train.readers`)."""
    from vitkdl.train import readers

    transforms = build_transforms(cfg, uint8=uint8)
    try:
        if source(cfg.source).streamed:
            return readers.build_wds(cfg, transforms, rank, world_size)
        return readers.build_hfds(cfg, transforms)
    except readers.DataError as exc:
        raise DataError(str(exc)) from None


def build_loaders(
    cfg: DataPlan,
    *,
    distributed: bool = False,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = True,
    prefetch_device: str | None = None,
) -> tuple[DataLoader, DataLoader, int]:
    """Build ``(train_loader, val_loader, num_classes)`` of a plan's data block.

    Train: shuffled by an :class:`EpochSampler` (``DistributedSampler(shuffle=True,
    seed=cfg.seed)``, one replica
    when not ``distributed``) and
    ``drop_last`` so every step sees exactly ``cfg.batch_size`` samples.  Val: in order,
    incomplete last batch kept; with ``distributed`` each rank takes every ``world_size``-th
    image (nothing padded, so counts summed over ranks are exact).  Call :func:`set_epoch` at
    the start of every epoch for a per-epoch order that is reproducible and resumable.
    Every training sample is augmented under its own :func:`sample_key` of ``(cfg.seed,
    epoch, index)`` (:class:`Replayed`, fed by :class:`EpochSampler`), in a worker or in
    the main process alike: the stream replays bit for bit and never draws from (or
    disturbs) the student's random streams. The workers are :func:`loader_workers`.

    ``prefetch_device``: for sources that decode files, a device (``"cuda:0"``) to which the
    workers' uint8 batches are copied on a side stream and normalised (and randomly erased)
    there, by timm's ``PrefetchLoader``: a quarter of the bytes of float32 over the bus, and
    no float work in the workers. None: float batches normalised by the workers (the CPU
    path).

    Raises :class:`DataError` when ``drop_last`` would leave the train loader without a
    single batch.
    """
    if distributed and not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside [0, world_size={world_size})")
    if not distributed:
        rank, world_size = 0, 1
    cfg = cfg.model_copy(update={"workers": loader_workers(cfg)})
    uint8 = _prefetch(cfg, prefetch_device)
    train_ds, val_ds, num_classes = build_datasets(
        cfg, rank=rank, world_size=world_size, uint8=uint8
    )
    common = _loader_args(cfg, uint8)
    if isinstance(train_ds, IterableDataset):
        # A streamed source splits itself across ranks and workers and yields whole batches
        # only (no sampler).
        train = DataLoader(train_ds, drop_last=True, **common)
        val = DataLoader(val_ds, drop_last=False, **common)
    else:
        train, val = _map_loaders(
            cfg, train_ds, val_ds, common, distributed, rank, world_size, drop_last
        )
    if prefetch_device is not None and uint8:
        train, val = _device_side(cfg, prefetch_device, train, val, rank)
    return train, val, num_classes


def _loader_args(cfg: DataPlan, uint8: bool) -> dict[str, Any]:
    """The ``DataLoader`` arguments both splits share."""
    common: dict[str, Any] = {
        "batch_size": cfg.batch_size,
        "num_workers": cfg.workers,
        "pin_memory": torch.cuda.is_available(),
        "persistent_workers": cfg.workers > 0,
    }
    if uint8:
        from timm.data.loader import fast_collate

        common["collate_fn"] = fast_collate  # uint8 images stacked as they are
    return common


def sample_key(seed: int, epoch: int, index: int) -> int:
    """The seed of every random choice made for sample ``index`` of the training split in
    ``epoch`` (its crop, flip, RandAugment, random erasing): a function of the data seed, the
    epoch and the index alone."""
    return mix_seed(seed, 0x5A, epoch, index)


def step_key(seed: int, epoch: int, batch: int, rank: int = 0) -> int:
    """The seed of a training batch's mixup/cutmix choice and lambda (and of its random
    erasing where the device does it): a function of the data seed, the epoch, the batch's
    position in the epoch and the rank alone."""
    return mix_seed(seed, 0xB7, epoch, batch, rank)


class EpochSampler(DistributedSampler):
    """``DistributedSampler`` that yields ``(epoch, index)``: the sample and the epoch it is
    drawn in travel to the dataset (:class:`Replayed`) together, so a loader worker, which
    keeps its own copy of the dataset across epochs (persistent workers), still knows the
    epoch of every sample it reads."""

    def __iter__(self) -> Any:
        epoch = self.epoch
        return ((epoch, index) for index in super().__iter__())


class Replayed(Dataset):
    """A training dataset whose every sample is augmented under :func:`sample_key`: item
    ``(epoch, index)`` is ``dataset[index]`` with the global random streams seeded from
    ``(seed, epoch, index)`` (and restored after), so two passes over an epoch give the same
    images bit for bit, whatever the workers, the world size or the student drew before. A
    plain ``index`` reads the item without seeding. Other attributes are the dataset's."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, tuple):
            epoch, index = key
            # In a worker nothing else draws from its streams: no state to give back.
            restore = torch.utils.data.get_worker_info() is None
            with seeded_streams(sample_key(self.seed, epoch, index), restore):
                return self.dataset[index]
        return self.dataset[key]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "dataset":  # unpickling: no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)


def _map_loaders(
    cfg: DataPlan,
    train_ds: Dataset,
    val_ds: Dataset,
    common: dict[str, Any],
    distributed: bool,
    rank: int,
    world_size: int,
    drop_last: bool,
) -> tuple[DataLoader, DataLoader]:
    """The loaders of a map-style dataset: a sampler for training, in order for validation."""
    # The train order is DistributedSampler's even on one process: the permutation of epoch e
    # is randperm(n, seed + e) whatever the world size, so N processes at batch B / N see the
    # same global batches as one process at batch B (and a resumed run replays the order).
    train_ds = Replayed(train_ds, cfg.seed)
    train_sampler = EpochSampler(
        train_ds,
        num_replicas=world_size if distributed else 1,
        rank=rank if distributed else 0,
        shuffle=True,
        seed=cfg.seed,
        drop_last=drop_last,
    )
    if distributed:
        # Exact evaluation: every rank takes every world_size-th image, nothing padded (the
        # counts are summed over ranks).
        val_ds = Subset(val_ds, range(rank, len(val_ds), world_size))
    per_replica = train_sampler.num_samples
    if drop_last and per_replica < cfg.batch_size:
        raise DataError(
            f"train split has {per_replica} images per device, fewer than "
            f"data.batch_size={cfg.batch_size}, so drop_last leaves no batch; pass "
            f"--set data.batch_size=<n <= {per_replica}> or use more data"
        )
    train_gen = torch.Generator().manual_seed(cfg.seed + rank)
    val_gen = torch.Generator().manual_seed(cfg.seed + rank)
    train_loader = DataLoader(
        train_ds,
        sampler=train_sampler,
        shuffle=False,
        drop_last=drop_last,
        generator=train_gen,
        **common,
    )
    # Each loader draws its workers' base seed from its own generator, never from the global
    # RNG, so evaluating never shifts the training's random streams (exact resume).
    val_loader = DataLoader(
        val_ds,
        shuffle=False,
        drop_last=False,
        generator=val_gen,
        **common,
    )
    return train_loader, val_loader


def set_epoch(loader: DataLoader, epoch: int, *, seed: int, rank: int = 0) -> None:
    """Make ``loader``'s order and its workers' random streams a function of
    ``(seed, rank, epoch)``; call once per epoch, before ``iter(loader)``.

    Calls ``DistributedSampler.set_epoch`` when the loader has one, and reseeds the loader's
    generator, from which every ``iter(loader)`` draws its workers' base seed: so a run
    resumed in epoch ``e`` gives its workers the augmentation streams the uninterrupted run
    gave them, and each rank's workers draw their own.
    """
    inner = unwrap(loader)
    sampler = inner.sampler
    if isinstance(sampler, DistributedSampler):  # an EpochSampler: the samples' epoch too
        sampler.set_epoch(epoch)
    dataset_epoch = getattr(inner.dataset, "set_epoch", None)
    if callable(dataset_epoch):  # a streamed source shuffles per epoch itself
        dataset_epoch(epoch)
    if inner.generator is not None:
        inner.generator.manual_seed(mix_seed(seed, rank, epoch))


def build_mixup(cfg: DataPlan, num_classes: int) -> StreamMixup | None:
    """timm ``Mixup`` for ``cfg.mixup``/``cfg.cutmix`` alphas, or ``None`` when both are 0.

    Configured as in DeiT: ``switch_prob=0.5``, ``mode="batch"``, ``prob=1.0``,
    ``label_smoothing=cfg.smoothing``.  Call it as ``images, soft_targets = mixup(images,
    labels, step_key(...))`` on each train batch (before teacher and student see it);
    ``soft_targets`` is a float ``[B, num_classes]`` tensor (:class:`StreamMixup`).  timm
    requires an even batch size, so an odd ``cfg.batch_size`` raises :class:`DataError`
    (train loaders use ``drop_last``, so every batch has ``cfg.batch_size`` samples).
    """
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    if cfg.batch_size % 2:
        raise DataError(
            f"mixup/cutmix needs an even batch size but data.batch_size={cfg.batch_size}; "
            f"pass --set data.batch_size={cfg.batch_size + 1} (or disable with "
            "--set data.mixup=0 --set data.cutmix=0)"
        )
    if num_classes < 1:
        raise DataError(f"mixup needs num_classes >= 1, got {num_classes}")
    return StreamMixup(
        Mixup(
            mixup_alpha=cfg.mixup,
            cutmix_alpha=cfg.cutmix,
            prob=1.0,
            switch_prob=0.5,
            mode="batch",
            label_smoothing=cfg.smoothing,
            num_classes=num_classes,
        )
    )


class StreamMixup:
    """timm's ``Mixup`` whose choices for a batch (mixup or cutmix, lambda, the box) are drawn
    under a key: ``mixup(images, targets, key)`` with ``key`` :func:`step_key` of the batch
    replays the same mixing on every pass over the stream, and leaves the global random
    streams (which timm draws from) as they were. Without a key it draws from them as timm
    does."""

    def __init__(self, mixup: Mixup) -> None:
        self.mixup = mixup

    def __call__(
        self, images: torch.Tensor, targets: torch.Tensor, key: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if key is None:
            return self.mixup(images, targets)
        with seeded_streams(key):
            return self.mixup(images, targets)


def check_val_readable(loader: Any, where: str, *, allow_empty: bool = False) -> None:
    """Read the validation loader until one readable sample arrives, before training starts,
    so a validation split that cannot be read stops the run before any step rather than after
    an epoch. Raises :class:`DataError` naming ``where`` (the split or root) and the cause.

    ``allow_empty``: a rank's shard of a small split may hold no image under torch.distributed
    (the counts are summed over ranks), so an empty loader is then no error.

    The global RNG streams (torch, ``random``, numpy) are restored afterwards: the validation
    loader draws from its own generator and its transforms are deterministic, but training's
    exact resume must not depend on that staying so.
    """
    import random

    import numpy as np

    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            seen = 0
            for _, labels in loader:
                seen += int(labels.numel())
                if bool(labels.ne(UNREADABLE).any()):
                    return
        except DataError as exc:
            raise DataError(f"the validation data {where} cannot be read: {exc}") from None
        except Exception as exc:
            # A worker's exception carries its traceback in the message: keep the last line.
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            cause = lines[-1] if lines else type(exc).__name__
            raise DataError(f"the validation data {where} cannot be read: {cause}") from None
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
    if seen == 0 and allow_empty:
        return
    problem = f"none of its {seen} images could be read" if seen else "it yields no image"
    raise DataError(
        f"the validation data {where} cannot be used: {problem}; fix the files or pass "
        "--set data.root=... (nothing was trained)"
    )
