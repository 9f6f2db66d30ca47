"""Tests for the trainer's data layer (vitkdl.train.data); fast, no network."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.train.plans import data_plan
from vitkdl.planner import DataPlan
from vitkdl.train.data import (
    UNREADABLE,
    DataError,
    ImageFolderDataset,
    _digits_split,
    build_datasets,
    build_loaders,
    build_mixup,
    build_transforms,
    patch_timm_posterize,
    posterize,
    set_epoch,
)

# ------------------------------------------------------------------------------------ helpers


def _write_png(path: Path, seed: int, size: int = 12, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)


def _make_imagefolder(
    root: Path,
    train_classes: tuple[str, ...] = ("cat", "dog"),
    val_classes: tuple[str, ...] | None = None,
    per_class: int = 3,
) -> Path:
    val_classes = train_classes if val_classes is None else val_classes
    seed = 0
    for split, classes in (("train", train_classes), ("val", val_classes)):
        for cls in classes:
            for i in range(per_class):
                seed += 1
                _write_png(root / split / cls / f"img{i}.png", seed)
    return root


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return _make_imagefolder(tmp_path / "data")


def _folder_cfg(root: Path, **kw: object) -> DataPlan:
    base: dict[str, object] = {
        "source": "imagefolder",
        "root": str(root),
        "image_size": 16,
        "batch_size": 2,
    }
    base.update(kw)
    return data_plan(**base)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------- digits


def test_digits_split_sizes_and_classes() -> None:
    train, val, num_classes = build_datasets(data_plan(source="digits", image_size=8))
    assert (len(train), len(val), num_classes) == (1437, 360, 10)
    # stratified: every class is present in val with roughly 36 images
    labels = torch.tensor([val[i][1] for i in range(len(val))])
    counts = torch.bincount(labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37


def test_digits_deterministic_across_calls() -> None:
    cfg = data_plan(source="digits", image_size=8, in_chans=1)
    (t1, v1, _), (t2, v2, _) = build_datasets(cfg), build_datasets(cfg)
    seeded = build_datasets(data_plan(source="digits", image_size=8, in_chans=1, seed=123))
    for i in (0, 17, 359):
        assert torch.equal(v1[i][0], v2[i][0]) and v1[i][1] == v2[i][1]
        # the split is fixed at random_state=0 regardless of cfg.seed
        assert torch.equal(v1[i][0], seeded[1][i][0]) and v1[i][1] == seeded[1][i][1]
    assert torch.equal(t1[5][0], t2[5][0])


@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("image_size", [8, 16])
def test_digits_shapes_dtypes(in_chans: int, image_size: int) -> None:
    cfg = data_plan(source="digits", image_size=image_size, in_chans=in_chans)
    train, val, _ = build_datasets(cfg)
    for ds in (train, val):
        x, y = ds[3]
        assert x.shape == (in_chans, image_size, image_size)
        assert x.dtype == torch.float32
        assert isinstance(y, int) and 0 <= y < 10
    x, _ = val[0]
    # default digits normalisation is (x - 0.5) / 0.5 -> values in [-1, 1]
    assert x.min() >= -1.0 - 1e-6 and x.max() <= 1.0 + 1e-6
    if in_chans == 3:
        assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])


def test_digits_custom_norm_is_used() -> None:
    cfg = data_plan(source="digits", image_size=8, in_chans=1, mean=(0.0,), std=(1.0,))
    _, val, _ = build_datasets(cfg)
    x, _ = val[0]
    assert x.min() >= 0.0 and x.max() <= 1.0


@pytest.mark.parametrize("augment", ["basic", "deit"])
def test_digits_augment_shapes(augment: str) -> None:
    cfg = data_plan(source="digits", image_size=16, in_chans=3, augment=augment, batch_size=8)
    train_loader, _, _ = build_loaders(cfg)
    x, y = next(iter(train_loader))
    assert x.shape == (8, 3, 16, 16) and y.shape == (8,) and y.dtype == torch.int64


# ---------------------------------------------------------------------------------- synthetic


def test_synthetic_sizes_and_determinism() -> None:
    cfg = data_plan(
        source="synthetic", image_size=16, in_chans=3, size=40, classes=5, batch_size=16, seed=7
    )
    train, val, num_classes = build_datasets(cfg)
    assert (len(train), len(val), num_classes) == (40, 16, 5)  # val: max(40 // 4, 16)
    train2, _, _ = build_datasets(cfg)
    for i in (0, 39):
        x, y = train[i]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and 0 <= y < 5
        assert torch.equal(x, train2[i][0]) and y == train2[i][1]
    assert not torch.equal(train[0][0], val[0][0])
    other, _, _ = build_datasets(data_plan(source="synthetic", image_size=16, size=40, seed=8))
    assert not torch.equal(train[0][0], other[0][0])
    big = build_datasets(data_plan(source="synthetic", size=400, batch_size=8, image_size=8))
    assert len(big[1]) == 100


# -------------------------------------------------------------------------------- imagefolder


@pytest.mark.parametrize("augment", ["none", "basic", "deit"])
def test_imagefolder_trains_through_loaders(folder: Path, augment: str) -> None:
    cfg = _folder_cfg(folder, augment=augment)
    train_loader, val_loader, num_classes = build_loaders(cfg)
    assert num_classes == 2
    assert train_loader.dataset.classes == ["cat", "dog"]
    batches = list(train_loader)
    assert len(batches) == 3
    for x, y in batches:
        assert x.shape == (2, 3, 16, 16) and x.dtype == torch.float32
        assert y.dtype == torch.int64 and set(y.tolist()) <= {0, 1}
    val_batches = list(val_loader)
    assert sum(len(y) for _, y in val_batches) == 6
    assert torch.cat([y for _, y in val_batches]).tolist() == [0, 0, 0, 1, 1, 1]


def test_imagefolder_grayscale_and_case_insensitive_ext(tmp_path: Path) -> None:
    root = _make_imagefolder(tmp_path / "d")
    _write_png(root / "train" / "cat" / "UPPER.PNG", 99)
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    cfg = _folder_cfg(root, in_chans=1, augment="deit")
    train, val, _ = build_datasets(cfg)
    assert len(train) == 7 and len(val) == 6
    x, _ = train[0]
    assert x.shape == (1, 16, 16)


def test_corrupt_image_is_skipped_warned_and_counted(folder: Path) -> None:
    bad = folder / "train" / "cat" / "x.jpg"
    bad.write_bytes(b"\x00garbage, not a jpeg\xff" * 10)
    train, _, _ = build_datasets(_folder_cfg(folder))
    assert isinstance(train, ImageFolderDataset)
    assert len(train) == 7
    idx = [p for p, _ in train.samples].index(str(bad))
    with pytest.warns(RuntimeWarning, match=r"x\.jpg"):
        x, _ = train[idx]
    assert x.shape == (3, 16, 16)
    assert train.skipped == {str(bad)}
    # the substitute is the next sample; the warning is emitted only once per file
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert train[idx][1] == train[(idx + 1) % len(train)][1]

    # a full epoch through a loader does not crash, warns once and counts the file
    loader, _, _ = build_loaders(_folder_cfg(folder))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            assert sum(len(y) for _, y in loader) == 6  # 7 files, batch 2, drop_last
    assert sum("x.jpg" in str(w.message) for w in caught) == 1
    assert loader.dataset.skipped == {str(bad)}


def _log_warnings_to(path: str) -> Callable[[int], None]:
    """A DataLoader worker_init_fn: the worker's warnings go to ``path``, one line each (the
    test's own warning capture does not reach a worker process)."""

    def init(worker_id: int) -> None:
        def show(message, category, filename, lineno, file=None, line=None):  # type: ignore[no-untyped-def]
            with open(path, "a") as f:
                f.write(f"{worker_id}: {message}\n")

        warnings.showwarning = show

    return init


def test_an_unreadable_image_is_warned_about_once_per_run_across_loader_workers(
    folder: Path, tmp_path: Path
) -> None:
    """Two DataLoader workers, the broken file read by one of them in the first epoch and by
    the other in the second: one warning in all (each worker used to warn once)."""
    from torch.utils.data import DataLoader

    bad = folder / "train" / "cat" / "x.jpg"
    bad.write_bytes(b"\x00garbage, not a jpeg\xff" * 10)
    train, _, _ = build_datasets(_folder_cfg(folder))
    idx = [p for p, _ in train.samples].index(str(bad))
    others = [i for i in range(len(train)) if i != idx]
    order = [idx, *others]  # batch k goes to worker k % 2: the broken file to worker 0 ...
    log = tmp_path / "warnings.txt"
    loader = DataLoader(
        train,
        batch_size=1,
        sampler=order,  # type: ignore[arg-type]
        num_workers=2,
        persistent_workers=True,
        worker_init_fn=_log_warnings_to(str(log)),
    )
    for _epoch in range(2):
        assert sum(len(y) for _, y in loader) == len(train)
        order[:] = [others[0], idx, *others[1:]]  # ... then to worker 1
    lines = log.read_text().splitlines()
    assert len(lines) == 1 and "x.jpg" in lines[0], lines


def test_an_unreadable_validation_image_is_never_replaced_by_another(folder: Path) -> None:
    bad = folder / "val" / "cat" / "img0.png"
    bad.write_bytes(b"\x89PNG truncated")
    (folder / "train" / "cat" / "img0.png").write_bytes(b"\x89PNG truncated")
    train, val, _ = build_datasets(_folder_cfg(folder))
    with pytest.warns(RuntimeWarning, match=r"img0\.png"):
        labels = [val[i][1] for i in range(len(val))]
        images = [val[i][0] for i in range(len(val))]
    # The unreadable one stands as UNREADABLE (same shape, so batches keep theirs); every
    # readable image appears once, under its own label.
    assert labels == [UNREADABLE, 0, 0, 1, 1, 1]
    assert all(x.shape == (3, 16, 16) for x in images)
    assert sum(torch.equal(images[1], x) for x in images) == 1
    # Training still takes the next readable image instead (only the stream matters there).
    with pytest.warns(RuntimeWarning, match=r"img0\.png"):
        assert [train[i][1] for i in range(len(train))] == [0, 0, 0, 1, 1, 1]


def test_all_corrupt_raises(tmp_path: Path) -> None:
    root = tmp_path / "d"
    for split in ("train", "val"):
        (root / split / "a").mkdir(parents=True)
        (root / split / "a" / "x.png").write_bytes(b"junk")
    train, _, _ = build_datasets(_folder_cfg(root))
    with pytest.warns(RuntimeWarning), pytest.raises(DataError, match="could be decoded"):
        train[0]


def test_missing_root(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DataError) as err:
        build_datasets(_folder_cfg(missing))
    assert str(missing) in str(err.value) and "--set data.root=" in str(err.value)
    with pytest.raises(DataError, match=r"--set data\.root="):
        build_datasets(data_plan(source="imagefolder"))


def test_missing_val_split(tmp_path: Path) -> None:
    root = tmp_path / "d"
    _write_png(root / "train" / "a" / "0.png", 1)
    with pytest.raises(DataError) as err:
        build_datasets(_folder_cfg(root))
    msg = str(err.value)
    assert str(root / "val") in msg and "--set data.root=" in msg


def test_empty_split(tmp_path: Path) -> None:
    root = tmp_path / "d"
    _write_png(root / "train" / "a" / "0.png", 1)
    (root / "val" / "a").mkdir(parents=True)
    with pytest.raises(DataError) as err:
        build_datasets(_folder_cfg(root))
    msg = str(err.value)
    assert str(root / "val") in msg and "no images" in msg and "--set data.root=" in msg
    # a train split without class folders is reported too
    root2 = tmp_path / "e"
    (root2 / "train").mkdir(parents=True)
    (root2 / "val").mkdir()
    with pytest.raises(DataError, match=r"--set data\.root="):
        build_datasets(_folder_cfg(root2))


def test_class_mismatch_reported(tmp_path: Path) -> None:
    root = _make_imagefolder(tmp_path / "d", ("cat", "dog"), ("cat", "emu"), per_class=1)
    with pytest.raises(DataError) as err:
        build_datasets(_folder_cfg(root))
    msg = str(err.value)
    assert "emu" in msg and "dog" in msg and "subset" in msg


def test_val_subset_of_train_uses_train_mapping(tmp_path: Path) -> None:
    root = _make_imagefolder(tmp_path / "d", ("ant", "bee", "cat"), ("cat",), per_class=1)
    _, val, num_classes = build_datasets(_folder_cfg(root))
    assert num_classes == 3
    assert [val[i][1] for i in range(len(val))] == [2]


# ------------------------------------------------------------------------------ loaders/mixup


def test_mixup_soft_targets() -> None:
    cfg = data_plan(
        source="synthetic",
        image_size=8,
        size=16,
        classes=4,
        batch_size=8,
        mixup=0.8,
        cutmix=1.0,
        smoothing=0.1,
    )
    loader, _, num_classes = build_loaders(cfg)
    mixup = build_mixup(cfg, num_classes)
    assert mixup is not None
    x, y = next(iter(loader))
    mx, soft = mixup(x, y)
    assert mx.shape == x.shape
    assert soft.shape == (8, 4) and soft.dtype.is_floating_point
    assert torch.allclose(soft.sum(dim=1), torch.ones(8))
    assert build_mixup(data_plan(source="synthetic", smoothing=0.1), 4) is None
    with pytest.raises(DataError, match="even batch size"):
        build_mixup(data_plan(source="synthetic", batch_size=7, mixup=0.8), 4)


def test_drop_last_gives_only_full_batches() -> None:
    cfg = data_plan(source="synthetic", image_size=8, size=50, batch_size=16, classes=3)
    train_loader, val_loader, _ = build_loaders(cfg)
    sizes = [len(y) for _, y in train_loader]
    assert sizes == [16, 16, 16]
    assert [len(y) for _, y in val_loader] == [16]  # val: max(50 // 4, 16) = 16
    keep, _, _ = build_loaders(cfg, drop_last=False)
    assert [len(y) for _, y in keep] == [16, 16, 16, 2]
    with pytest.raises(DataError, match="batch_size"):
        build_loaders(data_plan(source="synthetic", image_size=8, size=8, batch_size=16))


def test_shuffle_reproducible_and_set_epoch() -> None:
    cfg = data_plan(source="synthetic", image_size=4, size=32, batch_size=8, seed=3)

    def order(loader: torch.utils.data.DataLoader) -> list[int]:
        return list(iter(loader.sampler))  # type: ignore[arg-type]

    a, _, _ = build_loaders(cfg)
    b, _, _ = build_loaders(cfg)
    assert order(a) == order(b)
    set_epoch(a, 1, seed=cfg.seed)
    first = order(a)
    set_epoch(a, 1, seed=cfg.seed)
    assert order(a) == first
    set_epoch(a, 2, seed=cfg.seed)
    assert order(a) != first


def test_distributed_samplers_partition() -> None:
    cfg = data_plan(source="synthetic", image_size=4, size=42, batch_size=4, seed=1)
    seen: list[int] = []
    val_seen: list[int] = []
    for rank in range(2):
        train, val, _ = build_loaders(cfg, distributed=True, rank=rank, world_size=2)
        assert isinstance(train.sampler, torch.utils.data.DistributedSampler)
        assert train.sampler.shuffle
        set_epoch(train, 0, seed=cfg.seed, rank=rank)
        pairs = list(iter(train.sampler))  # (epoch, index): the epoch travels with a sample
        assert {e for e, _ in pairs} == {0}
        idx = [i for _, i in pairs]
        assert len(idx) == 21
        seen += idx
        assert all(len(y) == 4 for _, y in train)
        val_seen += list(val.dataset.indices)  # exact shards of the 10 val images, no padding
    assert sorted(seen) == list(range(42))
    assert sorted(val_seen) == list(range(10))


def test_loaders_never_draw_from_the_global_rng() -> None:
    """Iterating a loader (evaluation included) leaves the training's random streams alone."""
    cfg = data_plan(source="synthetic", image_size=4, size=16, batch_size=4, seed=1)
    for distributed in (False, True):
        train, val, _ = build_loaders(
            cfg, distributed=distributed, rank=0, world_size=2 if distributed else 1
        )
        before = torch.get_rng_state()
        list(val)
        set_epoch(train, 0, seed=cfg.seed)
        list(train)
        assert torch.equal(torch.get_rng_state(), before)


def test_workers_are_seeded_deterministically() -> None:
    cfg = data_plan(
        source="digits", image_size=8, in_chans=1, augment="deit", batch_size=64, workers=2, seed=5
    )
    batches = []
    for _ in range(2):
        loader, _, _ = build_loaders(cfg)
        assert loader.persistent_workers
        batches.append(next(iter(loader)))
    assert torch.equal(batches[0][0], batches[1][0])
    assert torch.equal(batches[0][1], batches[1][1])


def test_a_decoded_image_has_one_or_three_channels(folder: Path) -> None:
    """What the recipe's checks leave to the loader (the spec validates every other field)."""
    with pytest.raises(DataError, match=r"data\.in_chans=2 .*imagefolder supports 1"):
        build_datasets(_folder_cfg(folder, in_chans=2, mean=(0.5, 0.5), std=(0.5, 0.5)))
    train, _, _ = build_datasets(
        data_plan("synthetic", image_size=4, in_chans=2, mean=(0.5, 0.5), std=(0.5, 0.5))
    )
    assert train[0][0].shape == (2, 4, 4)  # generated images take any channel count


@pytest.mark.slow
def test_embedded_digits_are_the_fixed_split_without_scikit_learn() -> None:
    """The digits ship as a 47 KB array: the same 1437 / 360 stratified split as ever (checked
    against scikit-learn's own split when it is installed), and loading them imports neither
    scikit-learn nor SciPy."""
    import subprocess
    import sys

    code = (
        "import sys; from vitkdl.train.data import _digits_split; x = _digits_split(); "
        "assert not {'sklearn', 'scipy'} & set(sys.modules), sorted(sys.modules); "
        "print(x[0].shape[0], x[1].shape[0])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == ["1437", "360"]
    x_tr, x_va, y_tr, y_va = _digits_split()
    assert np.bincount(y_va).tolist() == [36, 36, 35, 37, 36, 37, 36, 36, 35, 36]
    assert x_tr.dtype == np.float32 and x_tr.min() == 0.0 and x_tr.max() == 1.0
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    want = train_test_split(
        digits.images.astype("float32") / 16.0,
        digits.target,
        test_size=0.2,
        stratify=digits.target,
        random_state=0,
    )
    for got, ref in zip((x_tr, x_va, y_tr, y_va), want, strict=True):
        assert np.array_equal(got, ref)


def test_the_device_side_input_path_gives_the_same_batches(tmp_path: Path) -> None:
    """On a GPU, decoded images travel as uint8 and are normalised on the device (timm's
    PrefetchLoader); run here on the CPU, it must give the batches of the float path."""
    root = tmp_path / "data"
    for split in ("train", "val"):
        for c in range(2):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(4):
                pixels = np.random.default_rng(10 * c + i).integers(0, 255, (20, 20, 3))
                Image.fromarray(pixels.astype("uint8")).save(folder / f"{i}.png")
    common = {
        "source": "imagefolder",
        "root": str(root),
        "image_size": 16,
        "batch_size": 4,
        "augment": "none",
    }
    plain = build_loaders(data_plan(**common))
    device_side = build_loaders(data_plan(**common), prefetch_device="cpu")
    inner = next(iter(device_side[0].loader))[0]
    assert inner.dtype == torch.uint8  # what crosses the bus
    for a, b in ((plain[0], device_side[0]), (plain[1], device_side[1])):
        set_epoch(a, 0, seed=0)
        set_epoch(b, 0, seed=0)
        for (xa, ya), (xb, yb) in zip(a, b, strict=True):
            assert xb.dtype == torch.float32 and torch.equal(ya, yb)
            torch.testing.assert_close(xa, xb, atol=1e-5, rtol=1e-5)
    assert len(device_side[0]) == len(plain[0])


# ---------------------------------------------------------------------------- deit posterize


def _old_pillow_posterize(img: Image.Image, bits: int) -> Image.Image:
    """Pillow < 13's posterize, written out: keep the top ``bits`` bits of every level (0 bits:
    every level to 0), for any ``bits`` in 0..8."""
    mask = ~(2 ** (8 - bits) - 1)
    return img.point([i & mask for i in range(256)] * len(img.getbands()))


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_posterize_shim_is_pillows_with_0_bits_black(mode: str) -> None:
    from PIL import ImageOps

    rng = np.random.default_rng(0)
    shape = (9, 7, 3) if mode == "RGB" else (9, 7)
    img = Image.fromarray(rng.integers(1, 256, shape, dtype=np.uint8), mode)
    black = posterize(img, 0)
    assert black.mode == mode and black.size == img.size
    assert not np.asarray(black).any()  # 0 bits: a black image, as DeiT trained with
    for bits in range(9):  # the meaning every Pillow the project allows gave these bits
        assert np.array_equal(np.asarray(posterize(img, bits)), _old_pillow_posterize(img, bits))
    for bits in range(1, 9):  # and the installed Pillow's own op wherever it has one
        assert np.array_equal(np.asarray(posterize(img, bits)), ImageOps.posterize(img, bits))


def test_posterize_patch_is_idempotent_and_replaces_only_posterize() -> None:
    from timm.data import auto_augment

    before = dict(auto_augment.NAME_TO_OP)
    patch_timm_posterize()
    once = dict(auto_augment.NAME_TO_OP)
    patch_timm_posterize()
    assert once == auto_augment.NAME_TO_OP
    changed = {k for k in once if once[k] is not before[k]}
    assert changed <= {"Posterize", "PosterizeIncreasing", "PosterizeOriginal"}
    assert once["PosterizeIncreasing"] is posterize


def test_the_deit_transform_survives_thousands_of_images(tmp_path: Path, monkeypatch) -> None:
    """DeiT's RandAugment draws posterize with 0 bits now and then (level 10 of
    ``PosterizeIncreasing``); Pillow 13 raises there. Thousands of tiny images through the
    real ``deit`` train transform, with a fixed seed: it must meet 0 bits and survive it."""
    import random

    from timm.data import auto_augment

    zero_bits = []

    def counting(img: Image.Image, bits_to_keep: int, **kw: object) -> Image.Image:
        if bits_to_keep <= 0:
            zero_bits.append(bits_to_keep)
        return posterize(img, bits_to_keep, **kw)

    cfg = data_plan(source="imagefolder", root=str(tmp_path), image_size=16, augment="deit")
    train_tf, _ = build_transforms(cfg)  # patches timm's op table first
    ops = [
        op
        for t in getattr(train_tf, "transforms", [])
        for op in getattr(t, "ops", [])
        if isinstance(op, auto_augment.AugmentOp) and op.name.startswith("Posterize")
    ]
    assert ops and all(op.aug_fn is posterize for op in ops)
    import pickle  # spawned workers receive the transform pickled

    copied = pickle.loads(pickle.dumps(train_tf))
    assert any(op.aug_fn is posterize for t in copied.transforms for op in getattr(t, "ops", []))
    for op in ops:
        monkeypatch.setattr(op, "aug_fn", counting)
    random.seed(0)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)) for _ in range(8)]
    for i in range(4000):
        x = train_tf(images[i % len(images)])
        assert x.shape == (3, 16, 16) and torch.isfinite(x).all()
    assert zero_bits  # the case that crashed was met


def _folder_with_broken_val(root, val_files: int) -> None:  # type: ignore[no-untyped-def]
    """An imagefolder root whose train images read and whose ``val_files`` val files do not."""
    from PIL import Image

    for c in range(2):
        train = root / "train" / f"c{c}"
        train.mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8), (60 * c, 0, 0)).save(train / f"{i}.png")
        val = root / "val" / f"c{c}"
        val.mkdir(parents=True)
        for i in range(val_files):
            (val / f"{i}.jpg").write_bytes(b"not an image")


def test_a_validation_split_of_unreadable_images_is_refused_before_training(tmp_path) -> None:
    import random

    from vitkdl.train.data import check_val_readable

    _folder_with_broken_val(tmp_path, val_files=3)
    cfg = data_plan(source="imagefolder", root=str(tmp_path), image_size=8, batch_size=2)
    _, val, _ = build_loaders(cfg)
    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # one per unreadable file
        with pytest.raises(DataError, match=r"data \(val\) cannot be used: none of its 6"):
            check_val_readable(val, "(val)")
    # the probe leaves the training's random streams where they were
    assert torch.equal(torch.get_rng_state(), before[0])
    assert random.getstate() == before[1]
    assert (np.random.get_state()[1] == before[2]).all()


def test_a_validation_loader_that_raises_or_yields_nothing_is_a_clean_error() -> None:
    from torch.utils.data import DataLoader, Dataset, TensorDataset

    from vitkdl.train.data import check_val_readable

    class Failing(Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, index: int):  # type: ignore[no-untyped-def]
            raise OSError("Permission denied: 'val/0.jpg'")

    with pytest.raises(DataError, match=r"cannot be read: .*Permission denied"):
        check_val_readable(DataLoader(Failing(), batch_size=2), "(/data/val)")
    empty = DataLoader(TensorDataset(torch.zeros(0, 1), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(DataError, match="yields no image"):
        check_val_readable(empty, "(/data/val)")
    check_val_readable(empty, "(/data/val)", allow_empty=True)  # a rank's empty shard


# ------------------------------------------------------------------------ a replayable stream


def _stream(cfg: DataPlan, epochs: int = 2, noise: bool = True) -> list[tuple[torch.Tensor, ...]]:
    """Every training batch of ``epochs`` epochs after mixup, as the loop makes them; the
    global streams are stirred between batches (as a student's drop path would)."""
    import random

    from vitkdl.train.data import step_key

    train, _, classes = build_loaders(cfg)
    mixup = build_mixup(cfg, classes)
    out = []
    for epoch in range(epochs):
        set_epoch(train, epoch, seed=cfg.seed)
        for batch, (x, y) in enumerate(train):
            if noise:
                torch.rand(7)
                np.random.rand(3)
                random.random()
            key = step_key(cfg.seed, epoch, batch)
            mixed, soft = mixup(x, y, key) if mixup is not None else (x, y)
            out.append((x, y, mixed, soft))
    return out


@pytest.mark.parametrize("workers", [0, 1])
def test_the_training_stream_replays_bit_for_bit_whatever_the_global_streams(
    workers: int,
) -> None:
    """Crop, random erasing, mixup/cutmix pairing and lambda are a function of (data seed,
    epoch, sample / step) only: two loaders built twice, under different global RNG states and
    with the global streams stirred between batches, give identical batches for 2 epochs."""
    cfg = data_plan(
        source="digits",
        image_size=8,
        batch_size=64,
        augment="deit",
        mixup=0.8,
        cutmix=1.0,
        seed=5,
        workers=workers,
    )
    torch.manual_seed(1)
    a = _stream(cfg)
    torch.manual_seed(2)
    np.random.seed(3)
    b = _stream(cfg, noise=False)
    assert len(a) == 2 * (1437 // 64)
    for left, right in zip(a, b, strict=True):
        for u, v in zip(left, right, strict=True):
            assert torch.equal(u, v)
    # The epochs differ (order and augmentation), and augmentation is on.
    assert not torch.equal(a[0][0], a[len(a) // 2][0])
    plain = _stream(cfg.model_copy(update={"augment": "none", "mixup": 0.0, "cutmix": 0.0}))
    assert not torch.equal(torch.sort(a[0][0].flatten())[0], torch.sort(plain[0][0].flatten())[0])


def test_the_stream_leaves_the_global_streams_where_they_were() -> None:
    """Reading the training stream never moves the student's random streams, torch's and
    Python's (workers=0, augmentation in the main process)."""
    import random

    cfg = data_plan(source="digits", image_size=8, batch_size=64, augment="deit", mixup=0.8)
    train, _, classes = build_loaders(cfg)
    mixup = build_mixup(cfg, classes)
    set_epoch(train, 0, seed=cfg.seed)
    torch.manual_seed(11)
    random.seed(11)
    np.random.seed(11)
    x, y = next(iter(train))
    assert mixup is not None
    mixup(x, y, 123)
    # The next draws are the first of seed 11's streams: nothing was drawn from them.
    assert torch.equal(torch.rand(4), torch.rand(4, generator=torch.Generator().manual_seed(11)))
    assert random.random() == random.Random(11).random()


def test_the_stream_depends_on_the_data_seed_not_the_students(tmp_path: Path) -> None:
    """data.seed decides the stream; train.seed only when data.seed is not written."""
    from vitkdl import pipeline

    def spec_plan(body: str):  # type: ignore[no-untyped-def]
        path = tmp_path / "r.vkd"
        path.write_text(
            "recipe r\nstudent vit_tiny_patch16_224 { img_size = 8 patch_size = 2 in_chans = 1 "
            "depth = 1 embed_dim = 16 num_heads = 2 num_classes = 10 }\n" + body + "\n"
        )
        return pipeline.plan(pipeline.load(path))

    a = spec_plan("train { seed = 1 }\ndata digits { seed = 7 }")
    b = spec_plan("train { seed = 2 }\ndata digits { seed = 7 }")
    c = spec_plan("train { seed = 3 }")
    assert (a.data.seed, b.data.seed, a.seed, b.seed) == (7, 7, 1, 2)
    assert c.data.seed == 3


def test_device_erasing_replays_per_batch() -> None:
    """Random erasing done on the device side (after the loader) is keyed per batch: the
    same boxes and noise on every pass, and the global streams untouched."""
    from vitkdl.train.data import DeviceErasing

    cfg = data_plan(source="digits", image_size=8, batch_size=64, seed=3)
    train, _, _ = build_loaders(cfg)
    wrapped = DeviceErasing(train, cfg.seed, 0, torch.device("cpu"))
    set_epoch(train, 0, seed=cfg.seed)
    first = [x.clone() for x, _ in wrapped]
    torch.manual_seed(99)
    state = torch.get_rng_state()
    set_epoch(train, 0, seed=cfg.seed)
    second = [x for x, _ in wrapped]
    assert torch.equal(state, torch.get_rng_state())
    assert all(torch.equal(u, v) for u, v in zip(first, second, strict=True))
    set_epoch(train, 0, seed=cfg.seed)
    plain = [x for x, _ in train]
    assert any(not torch.equal(u, v) for u, v in zip(first, plain, strict=True))


def test_randaugment_replays_whatever_the_workers(tmp_path: Path) -> None:
    """DeiT's imagefolder transform (random resized crop, flip, RandAugment, colour and random
    erasing: Python's, numpy's and torch's streams) gives the same batches in the main process
    and in two workers, under different global states."""
    root = _make_imagefolder(tmp_path / "data", per_class=6)
    cfg = _folder_cfg(root, augment="deit", batch_size=4, seed=2)
    torch.manual_seed(0)
    here = _stream(cfg)
    torch.manual_seed(1)
    np.random.seed(1)
    there = _stream(cfg.model_copy(update={"workers": 2}), noise=False)
    assert len(here) == len(there) == 2 * 3
    for left, right in zip(here, there, strict=True):
        assert all(torch.equal(u, v) for u, v in zip(left, right, strict=True))
    assert not torch.equal(here[0][0], here[3][0])
