"""Data as users hold it: a Hugging Face dataset directory and webdataset shards, built tiny."""

from __future__ import annotations

import io
import json
import tarfile
import warnings
from pathlib import Path

import pytest
import torch

from tests.train.plans import data_plan
from vitkdl.cli import main
from vitkdl.planner import DataPlan
from vitkdl.train.data import DataError, build_datasets, build_loaders, set_epoch


def _png(colour: tuple[int, int, int]) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (12, 12), colour).save(out, format="PNG")
    return out.getvalue()


COLOURS = ((255, 0, 0), (0, 0, 255), (0, 255, 0))


@pytest.fixture
def hf_dir(tmp_path: Path) -> Path:
    """A DatasetDict (train 9 rows, one broken; validation 6 rows) written by save_to_disk."""
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["r", "b", "g"])}
    )

    def rows(n: int, broken: int | None) -> dict:
        images = [
            {"bytes": b"broken" if i == broken else _png(COLOURS[i % 3]), "path": None}
            for i in range(n)
        ]
        return {"image": images, "label": [i % 3 for i in range(n)]}

    splits = {"train": rows(9, 4), "validation": rows(6, None)}
    path = tmp_path / "hf"
    datasets.DatasetDict(
        {k: datasets.Dataset.from_dict(v, features=feats) for k, v in splits.items()}
    ).save_to_disk(str(path))
    return path


def _shard(path: Path, keys: list[str], broken: set[str] = frozenset()) -> None:
    with tarfile.open(path, "w") as tar:
        for k in keys:
            label = int(k.rsplit("_", 1)[1]) % 3
            members = {"png": b"broken" if k in broken else _png(COLOURS[label])}
            members["cls"] = str(label).encode()
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{k}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def shards(tmp_path: Path) -> tuple[str, str]:
    """4 training shards of 6 samples (one broken), 3 validation shards of 4."""
    pytest.importorskip("webdataset")
    folder = tmp_path / "shards"
    folder.mkdir()
    for s in range(4):
        _shard(folder / f"train-{s:04d}.tar", [f"t{s}_{i}" for i in range(6)], {"t0_1"})
    for s in range(3):
        _shard(folder / f"val-{s:02d}.tar", [f"v{s}_{i}" for i in range(4)])
    return str(folder / "train-{0000..0003}.tar"), str(folder / "val-{00..02}.tar")


def _cfg(**kw) -> DataPlan:
    base = {"image_size": 8, "batch_size": 2, "augment": "none", "workers": 0}
    return data_plan(**{**base, **kw})


def test_hfds_local_directory_with_an_unreadable_row(hf_dir: Path) -> None:
    cfg = _cfg(source="hfds", root=str(hf_dir), augment="deit")
    train, val, classes = build_loaders(cfg)
    assert classes == 3 and len(train.dataset) == 9 and len(val.dataset) == 6
    with pytest.warns(RuntimeWarning, match=r"row 4 of .*hf\[train\]"):
        images = [x for x, _ in train]
    assert images[0].shape == (2, 3, 8, 8) and len(images) == 4  # drop_last
    x, y = next(iter(val))
    assert x.dtype == torch.float32 and y.tolist() == [0, 1]
    with pytest.raises(DataError, match=r"no split 'nope' .*--set data.val_split"):
        build_loaders(_cfg(source="hfds", root=str(hf_dir), val_split="nope"))


def test_hfds_validation_leaves_an_unreadable_row_out(hf_dir: Path) -> None:
    from vitkdl.train.data import UNREADABLE

    cfg = _cfg(source="hfds", root=str(hf_dir), split="validation", val_split="train")
    _, val, _ = build_datasets(cfg)  # train's row 4 is broken: here it is the validation
    with pytest.warns(RuntimeWarning, match=r"row 4 of .*hf\[train\]"):
        labels = [val[i][1] for i in range(len(val))]
    assert labels == [0, 1, 2, 0, UNREADABLE, 2, 0, 1, 2]  # row 5 is not counted twice


def test_hfds_hub_name_offline_and_not_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as info:
        build_loaders(_cfg(source="hfds", name="someone/no_such_dataset_here"))
    text = str(info.value)
    assert "'someone/no_such_dataset_here' is not in the datasets cache" in text
    assert "offline" in text and "--set data.root=DIR" in text


def test_a_missing_extra_names_the_command(
    hf_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys
) -> None:
    import builtins
    import importlib.util

    real = builtins.__import__

    def no_datasets(name, *args, **kwargs):  # type: ignore[no-untyped-def]
        if name == "datasets":
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(DataError, match=r'pip install -e "\.\[hf\]"'):
        build_loaders(_cfg(source="hfds", root=str(hf_dir)))
    monkeypatch.setattr(builtins, "__import__", real)
    find = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "webdataset" else find(n, *a)
    )
    recipe = tmp_path / "w.vkd"
    recipe.write_text(
        "student vit_tiny_patch16_224 { img_size = 8  patch_size = 4  depth = 1  embed_dim = 8"
        "  num_heads = 2  num_classes = 3 }\n"
        'data wds { root = "a-{0..1}.tar" val_root = "b.tar" }\n'
    )
    assert main(["validate", str(recipe)]) == 0  # warnings until run
    err = " ".join(capsys.readouterr().err.split())
    assert "data wds needs the webdataset package, which is not installed" in err
    assert 'pip install -e ".[wds]"' in err and "2 of the 2 shards of data.root" in err


def test_wds_shards_split_across_ranks_and_workers(shards: tuple[str, str]) -> None:
    root, val_root = shards
    steps, seen_val = [], []
    for rank in range(2):
        cfg = _cfg(source="wds", root=root, val_root=val_root, workers=2)
        train, val, classes = build_loaders(cfg, distributed=True, rank=rank, world_size=2)
        assert classes == 3
        set_epoch(train, 0, seed=0, rank=rank)
        batches = list(train)
        # 24 samples / (2 ranks x 2 workers) = 6 a worker = 3 batches of 2: 6 a rank
        assert len(train) == len(batches) == 6 and all(b[0].shape[0] == 2 for b in batches)
        steps.append(len(batches))
        seen_val += [int(y) for _, ys in val for y in ys]
        assert sum(len(ys) for _, ys in val) == len(val.dataset)
    assert steps[0] == steps[1]  # every rank takes as many steps (DDP)
    assert len(seen_val) == 12  # 3 shards x 4: each validation sample exactly once
    # the order is a function of (seed, epoch): the same again, another one next epoch
    cfg = _cfg(source="wds", root=root, val_root=val_root)
    with pytest.warns(RuntimeWarning, match="skipping unreadable sample t0_1 in .*0000.tar"):
        train, _, _ = build_loaders(cfg)
        orders = []
        for epoch in (0, 0, 1):
            set_epoch(train, epoch, seed=0)
            orders.append(torch.cat([y for _, y in train]).tolist())
    # 24 counted (the broken one too): the worker cycles its shards to fill its quota
    assert orders[0] == orders[1] and len(orders[0]) == 24
    assert orders[0] != orders[2]


def test_wds_fewer_shards_than_workers_split_the_samples(tmp_path: Path) -> None:
    pytest.importorskip("webdataset")
    _shard(tmp_path / "one.tar", [f"s_{i}" for i in range(10)])
    cfg = _cfg(source="wds", root=str(tmp_path / "one.tar"), val_root=str(tmp_path / "one.tar"))
    counts = []
    for rank in range(2):
        train, val, _ = build_loaders(cfg, distributed=True, rank=rank, world_size=2)
        counts.append((len(list(train)), sum(len(y) for _, y in val)))
    assert counts == [(2, 5), (2, 5)]  # 5 samples a rank: 2 whole batches; val 5 + 5


def _cut(path: Path, keep: int) -> int:
    """Keep the first ``keep`` samples of a :func:`_shard` and 300 bytes of the next one's
    first header (where tarfile stops without a word); the bytes kept."""
    with tarfile.open(path) as tar:
        members = list(tar)
    offset = members[2 * keep].offset + 300  # two members (png, cls) a sample
    path.write_bytes(path.read_bytes()[:offset])
    return offset


def test_a_truncated_wds_shard_is_an_error_naming_it(tmp_path: Path) -> None:
    """Cut inside a header, tarfile (and so webdataset) reads half the shard without a word;
    the shard is checked when it is counted and named before any training."""
    pytest.importorskip("webdataset")
    good, bad = tmp_path / "train-0.tar", tmp_path / "train-1.tar"
    for path in (good, bad):
        _shard(path, [f"{path.stem}_{i}" for i in range(10)])
    _cut(bad, 5)
    cfg = _cfg(source="wds", root=str(tmp_path / "train-{0..1}.tar"), val_root=str(good))
    with pytest.raises(DataError) as info:
        build_loaders(cfg)
    text = str(info.value)
    assert f"webdataset shard {bad} is truncated" in text and "after 5 readable samples" in text
    assert str(good) not in text


@pytest.mark.parametrize("where", ["in a member's data", "between members", "gzip"])
def test_every_kind_of_cut_is_named_truncated(tmp_path: Path, where: str) -> None:
    from vitkdl.train.readers import DataError, scan_shards

    path = tmp_path / ("s.tar.gz" if where == "gzip" else "s.tar")
    _shard(tmp_path / "s.tar", [f"s_{i}" for i in range(6)])
    with tarfile.open(tmp_path / "s.tar") as tar:
        third = list(tar)[6]  # the third sample's image
    raw = (tmp_path / "s.tar").read_bytes()
    if where == "in a member's data":
        raw = raw[: third.offset_data + 100]
    elif where == "between members":  # exactly at a header: no end-of-archive block
        raw = raw[: third.offset]
    else:
        import gzip

        raw = gzip.compress(raw)
        raw = raw[: len(raw) // 2]
    path.write_bytes(raw)
    with pytest.raises(DataError, match=r"is truncated: .* after \d+ readable sample") as info:
        scan_shards([str(path)], None)
    assert f"webdataset shard {path} is" in str(info.value)


def test_a_complete_shard_cut_in_its_final_padding_still_reads(tmp_path: Path) -> None:
    """After the end-of-archive block nothing is lost: such a shard is read in full."""
    from vitkdl.train.readers import scan_shards

    path = tmp_path / "s.tar"
    _shard(path, [f"s_{i}" for i in range(4)])
    with tarfile.open(path) as tar:
        end = tar.offset if list(tar) else 0
    path.write_bytes(path.read_bytes()[: end + 700])  # one zero block and a part of the next
    assert scan_shards([str(path)], None) == [(4, 2)]


@pytest.mark.slow
def test_hfds_and_wds_train_under_run(hf_dir: Path, shards: tuple[str, str], tmp_path: Path):
    model = (
        "student vit_tiny_patch16_224 { img_size = 16  patch_size = 4  depth = 1  "
        "embed_dim = 16  num_heads = 2  num_classes = 3 }\n"
    )
    hf = tmp_path / "hf.vkd"
    hf.write_text(model + f'data hfds {{ root = "{hf_dir}"  batch_size = 4  augment = deit }}\n')
    wds = tmp_path / "wds.vkd"
    wds.write_text(
        model + f'data wds {{ root = "{shards[0]}"  val_root = "{shards[1]}"  batch_size = 4  '
        "workers = 0  augment = basic }\n"
    )
    out = str(tmp_path / "runs")
    for recipe in (hf, wds):
        with warnings.catch_warnings():  # the unreadable samples (named: the tests above)
            warnings.simplefilter("ignore", RuntimeWarning)
            assert main(["run", str(recipe), "--out", out, "--max-steps", "3", "--quiet"]) == 0
        summary = json.loads((tmp_path / "runs" / recipe.stem / "summary.json").read_text())
        assert summary["steps"] == 3 and summary["top1"] is not None


@pytest.mark.slow
def test_a_run_on_a_truncated_shard_stops_before_training(tmp_path: Path, capsys) -> None:
    """End to end: ``vitkdl run`` on a shard cut short exits 2 naming it, and trains nothing
    (before, the run took 6 of its 10 steps an epoch without a warning)."""
    pytest.importorskip("webdataset")
    shard = tmp_path / "train.tar"
    _shard(shard, [f"t_{i}" for i in range(20)])
    _cut(shard, 12)
    val = tmp_path / "val.tar"
    _shard(val, [f"v_{i}" for i in range(4)])
    recipe = tmp_path / "wds.vkd"
    recipe.write_text(
        "student vit_tiny_patch16_224 { img_size = 16  patch_size = 4  depth = 1  "
        "embed_dim = 16  num_heads = 2  num_classes = 3 }\n"
        f'data wds {{ root = "{shard}"  val_root = "{val}"  batch_size = 2  workers = 0  '
        "augment = none }\n"
    )
    out = tmp_path / "runs"
    assert main(["run", str(recipe), "--out", str(out), "--quiet"]) == 1  # README: data error
    err = " ".join(capsys.readouterr().err.split())
    assert f"webdataset shard {shard} is truncated" in err and "after 12 readable" in err
    assert not (out / "wds" / "summary.json").exists()


@pytest.mark.parametrize(("feature", "missing"), [("class", None), ("int", None), ("class", -1)])
def test_hfds_a_row_without_a_label_is_named_before_training(
    tmp_path: Path, feature: str, missing: int | None
) -> None:
    """A label of None (or the datasets library's -1, "no label") used to fail in a loader
    worker mid-epoch (``int(None)``) or as an internal error (``max`` over the column)."""
    datasets = pytest.importorskip("datasets")
    names = ["r", "b", "g"]
    label = datasets.ClassLabel(names=names) if feature == "class" else datasets.Value("int64")
    feats = datasets.Features({"image": datasets.Image(), "label": label})

    def rows(n: int, unlabelled: int | None) -> dict:
        images = [{"bytes": _png(COLOURS[i % 3]), "path": None} for i in range(n)]
        return {"image": images, "label": [missing if i == unlabelled else i % 3 for i in range(n)]}

    path = tmp_path / "hf"
    splits = {"train": rows(6, None), "validation": rows(4, 2)}
    datasets.DatasetDict(
        {k: datasets.Dataset.from_dict(v, features=feats) for k, v in splits.items()}
    ).save_to_disk(str(path))
    with pytest.raises(DataError) as caught:
        build_loaders(_cfg(source="hfds", root=str(path)))
    message = str(caught.value)
    assert f"{path}[validation]: row 2 has no label (label = {missing})" in message
    assert "\n" not in message
