"""Data as users hold it: Hugging Face datasets and webdataset shards.

``data hfds { name = "org/dataset" }`` reads a Hugging Face dataset by hub name through the
datasets cache (``root = "DIR"``: a local directory written by ``save_to_disk``);
``data wds { root = "shards/train-{0000..0099}.tar"  val_root = "shards/val-{00..09}.tar" }``
streams webdataset shards. Both decode with PIL, transform with the same timm transforms as
``imagefolder`` (DeiT's RandAugment and random erasing, the student's resolution,
interpolation and statistics) and keep the imagefolder guarantee: a sample that does not
decode is skipped with a warning naming it.

Why not timm's own readers (``timm.data.create_dataset("hfds/...")`` / ``"wds/..."``), which
these follow (the same ``image`` / ``label`` keys, ``.cls`` targets, shard splitting by rank and
worker): timm's HF reader cannot open a ``save_to_disk`` directory and reaches for the network
without a clean offline answer, and its webdataset reader ends an epoch when a worker's shards
run out, so two ranks can take different numbers of steps (a DDP hang), and it names no
unreadable sample. Here every rank takes exactly the same number of full batches per epoch
(each worker cycles its shards to its quota), the shuffle is a function of (seed, epoch,
worker) so a resumed run replays it, and validation reads every sample exactly once across
ranks and workers.

The optional packages are imported only here; a missing one is a :class:`DataError` naming
the ``pip install`` command.
"""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import os
import random
import tarfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from torch.utils.data import Dataset, IterableDataset, get_worker_info

from vitkdl.sources import expand_braces, source
from vitkdl.train.samples import WarnedOnce, mix_seed, unreadable_stand_in

#: Image members of a webdataset sample, in the order they are looked for.
WDS_IMAGE_KEYS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
#: Samples a training worker keeps in its shuffle buffer.
SHUFFLE_BUFFER = 1000


class DataError(Exception):
    """A data problem the user can fix (re-raised by :mod:`vitkdl.train.data` as its own)."""


def _require(source_name: str) -> Any:
    """Import the optional package a source needs, or a DataError naming the command."""
    facts = source(source_name)
    assert facts.package is not None
    try:
        return __import__(facts.package)
    except ImportError:
        raise DataError(
            f"data {source_name} needs the {facts.package} package, which is not installed; "
            f'pip install -e ".[{facts.extra}]" (or pip install {facts.package})'
        ) from None


def _open_image(data: bytes | None, path: str | None, mode: str) -> Any:
    from PIL import Image

    stream: Any = io.BytesIO(data) if data else open(path or "", "rb")  # noqa: SIM115
    with stream:
        return Image.open(stream).convert(mode)  # convert() forces the full decode


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets


class HFDataset(Dataset):
    """One split of a Hugging Face dataset: ``(transform(image), label)`` per row.

    Images are read undecoded (``datasets.Image(decode=False)``: bytes or a path) and decoded
    with PIL here, so a row that does not decode is skipped with a ``RuntimeWarning`` naming
    it (the next readable row stands in, as in ``imagefolder``; with ``replace=False``, for
    evaluation, :func:`vitkdl.train.data.unreadable_stand_in` does, counted by no one).
    """

    def __init__(
        self,
        table: Any,
        where: str,
        *,
        image_key: str,
        label_key: str,
        transform: Callable[[Any], Any] | None,
        in_chans: int,
        replace: bool = True,
    ) -> None:
        import datasets

        self.replace = replace
        self.table = table.cast_column(image_key, datasets.Image(decode=False))
        self.where = where
        self.image_key, self.label_key = image_key, label_key
        self.transform = transform
        self.mode = "L" if in_chans == 1 else "RGB"
        self.skipped: set[int] = set()

        self.warned = WarnedOnce(len(self.table))  # once per row and run, across workers

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        n = len(self.table)
        for attempt in range(n):
            i = (index + attempt) % n
            if i in self.skipped:
                if not self.replace:
                    return unreadable_stand_in(self.transform, self.mode)
                continue
            row = self.table[i]
            image = row[self.image_key] or {}
            try:
                img = _open_image(image.get("bytes"), image.get("path"), self.mode)
            except Exception as exc:  # an undecodable row: skip it, never crash
                self.skipped.add(i)
                named = f" ({image['path']})" if image.get("path") else ""
                if self.warned.first(i):
                    warnings.warn(
                        f"skipping unreadable image in row {i} of {self.where}{named}: "
                        f"{type(exc).__name__}: {exc}",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                if not self.replace:
                    return unreadable_stand_in(self.transform, self.mode)
                continue
            if self.transform is not None:
                img = self.transform(img)
            return img, int(row[self.label_key])
        raise DataError(f"none of the {n} images of {self.where} could be decoded")


@contextlib.contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """Run ``datasets`` offline (its own and the hub's flags are read once at import, so
    they are set here for the call): a hub name is then read from the cache only."""
    import datasets.config
    import huggingface_hub.constants

    before = (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE)
    if offline:
        datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = before


def _hub_reachable(name: str) -> bool:
    """One request, no retries: whether the hub answers about dataset ``name``."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

    from vitkdl import hub

    try:
        get_hf_file_metadata(
            hf_hub_url(name, "README.md", repo_type="dataset"), timeout=hub.TIMEOUT
        )
    except (EntryNotFoundError, RepositoryNotFoundError):
        return True  # it answered
    except Exception:
        return False
    return True


def _load_hfds(name: str | None, root: str | None) -> Any:
    """The DatasetDict of a local ``save_to_disk`` directory or of a hub name (cache first)."""
    datasets = _require("hfds")
    from vitkdl import hub

    if root is not None:
        path = os.path.abspath(os.path.expanduser(root))
        if not os.path.isdir(path):
            raise DataError(
                f"data hfds root {path} does not exist; pass --set data.root=DIR (a directory "
                'written by datasets\' save_to_disk) or set name = "org/dataset"'
            )
        try:
            loaded = datasets.load_from_disk(path)
        except Exception as exc:
            raise DataError(
                f"data hfds root {path} is not a dataset written by save_to_disk: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            ) from None
        if not isinstance(loaded, datasets.DatasetDict):
            raise DataError(
                f"data hfds root {path} holds one split; save a DatasetDict with a train and a "
                "validation split (DatasetDict({'train': ..., 'validation': ...}).save_to_disk)"
            )
        return loaded
    assert name is not None
    offline = hub.offline() or not _hub_reachable(name)
    try:
        with _hub_offline(offline), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return datasets.load_dataset(name)
    except Exception as exc:
        why = "offline" if offline else "the download failed"
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(
            f"data hfds name {name!r} is not in the datasets cache "
            f"({datasets.config.HF_DATASETS_CACHE}) and {why}: {first}; run once online, or "
            "pass --set data.root=DIR with a local copy written by save_to_disk"
        ) from None


def _val_split(splits: Sequence[str], asked: str | None, where: str) -> str:
    if asked is not None:
        if asked not in splits:
            raise DataError(
                f"{where} has no split {asked!r} (it has {', '.join(splits)}); "
                "pass --set data.val_split=NAME"
            )
        return asked
    for name in ("validation", "val", "valid", "test"):
        if name in splits:
            return name
    raise DataError(
        f"{where} has no validation split (it has {', '.join(splits)}); pass "
        "--set data.val_split=NAME"
    )


def _check_labels(table: Any, label_key: str, where: str) -> None:
    """A DataError naming the first row of ``table`` without a class index: ``None``, or
    negative (the datasets library's ``-1`` for "no label", as in unlabelled test splits).
    Read from the Arrow column at once, before any worker would fail on the row."""
    import pyarrow as pa
    import pyarrow.compute as pc

    column = table.data.column(label_key)
    if not (pa.types.is_integer(column.type) or pa.types.is_null(column.type)):
        return  # not class indices: int() says so
    missing = pc.or_kleene(pc.is_null(column), pc.fill_null(pc.less(column, 0), False))
    first = pc.index(missing, True).as_py()
    if first is None or first < 0:
        return
    value = column[first].as_py()
    raise DataError(
        f"{where}: row {first} has no label ({label_key} = {value}); every row needs a class "
        "index from 0: label or drop such rows, or pass --set data.split=NAME for a labelled split"
    )


def build_hfds(cfg: Any, transforms: tuple[Any, Any]) -> tuple[HFDataset, HFDataset, int]:
    """``(train, val, classes)`` of ``data hfds`` (``cfg``: the plan's DataPlan)."""
    loaded = _load_hfds(cfg.name, cfg.root)
    where = cfg.root or cfg.name
    splits = list(loaded.keys())
    if cfg.split not in splits:
        raise DataError(
            f"{where} has no split {cfg.split!r} (it has {', '.join(splits)}); "
            "pass --set data.split=NAME"
        )
    val = _val_split(splits, cfg.val_split, where)
    image_key, label_key = cfg.image_key or "image", cfg.label_key or "label"
    table = loaded[cfg.split]
    for key, field in ((image_key, "image_key"), (label_key, "label_key")):
        if key not in table.column_names:
            raise DataError(
                f"{where}[{cfg.split}] has no column {key!r} (it has "
                f"{', '.join(table.column_names)}); pass --set data.{field}=COLUMN"
            )
    for split in dict.fromkeys((cfg.split, val)):
        _check_labels(loaded[split], label_key, f"{where}[{split}]")
    feature = table.features[label_key]
    classes = getattr(feature, "num_classes", None)
    if classes is None:  # plain integers: count them
        classes = int(max(table[label_key])) + 1
    common = {"image_key": image_key, "label_key": label_key, "in_chans": cfg.in_chans}
    train_tf, eval_tf = transforms
    return (
        HFDataset(table, f"{where}[{cfg.split}]", transform=train_tf, **common),
        HFDataset(loaded[val], f"{where}[{val}]", transform=eval_tf, replace=False, **common),
        int(classes),
    )


# ---------------------------------------------------------------------------------------------
# webdataset shards


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def scan_shards(urls: Sequence[str], label_key: str | None) -> list[tuple[int, int]]:
    """``(samples, largest label)`` per local shard, read from the tar headers (and the small
    label members), without decoding an image."""
    out = []
    label_ext = "json" if label_key else "cls"
    for url in urls:
        images: set[str] = set()
        largest = -1
        try:
            with tarfile.open(url) as tar:
                for member in tar:
                    if not member.isfile() or "." not in os.path.basename(member.name):
                        continue
                    key, ext = _split_key(member.name)
                    if ext in WDS_IMAGE_KEYS:
                        images.add(key)
                    elif ext == label_ext:
                        raw = tar.extractfile(member)
                        largest = max(largest, _label(raw.read() if raw else b"", label_key))
                if not _ends_with_end_of_archive(tar):
                    raise DataError(_truncated(url, len(images)))
        except EOFError:  # a compressed shard cut short
            raise DataError(_truncated(url, len(images))) from None
        except (OSError, tarfile.TarError, ValueError, KeyError) as exc:
            if "unexpected end of data" in str(exc):  # tarfile: a member's data cut short
                raise DataError(_truncated(url, len(images))) from None
            raise DataError(f"cannot read webdataset shard {url}: {exc}") from None
        out.append((len(images), largest))
    return out


def _ends_with_end_of_archive(tar: tarfile.TarFile) -> bool:
    """Whether the archive, read to its last member, goes on with a zero block there.

    tarfile (and webdataset, which reads shards through it) silently stops at a header cut
    short, so a shard truncated between two members would lose its later samples without a
    word; a complete archive has its end-of-archive zero blocks right after the last member.
    """
    assert tar.fileobj is not None
    tar.fileobj.seek(tar.offset)
    return tar.fileobj.read(tarfile.BLOCKSIZE) == bytes(tarfile.BLOCKSIZE)


def _truncated(url: str, images: int) -> str:
    return (
        f"webdataset shard {url} is truncated: it ends inside its tar data, after "
        f"{images} readable sample{'s' * (images != 1)}, without the end-of-archive "
        "blocks; re-create or re-download it, or leave it out of the shard pattern"
    )


def _split_key(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is the path up to the first dot of the file name."""
    folder, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return os.path.join(folder, stem), ext.lower()


def _label(raw: bytes, label_key: str | None) -> int:
    if label_key:
        value: Any = json.loads(raw)
        for part in label_key.split("."):
            value = value[part]
        return int(value)
    return int(raw.decode().strip())


class WdsDataset(IterableDataset):
    """webdataset shards as ``(transform(image), label)`` samples, split across ranks and
    loader workers.

    Training: the shard order is shuffled per epoch (the same on every rank), each of the
    ``world_size x workers`` workers takes every ``G``-th shard (every ``G``-th sample when
    there are fewer shards than workers), shuffles its samples in a buffer and yields exactly
    its quota, cycling its shards when they run short, so every rank takes the same number of
    full batches (the few samples beyond the last full batch of each worker are left out of
    that epoch, as ``drop_last`` does). Validation: each shard is read once by one worker,
    nothing repeated or left out. Call :meth:`set_epoch` before each epoch.
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        train: bool,
        transform: Callable[[Any], Any] | None,
        in_chans: int,
        batch_size: int,
        workers: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        label_key: str | None = None,
        image_key: str | None = None,
        counts: Sequence[int] | None = None,
    ) -> None:
        self.urls = list(urls)
        self.train = train
        self.transform = transform
        self.mode = "L" if in_chans == 1 else "RGB"
        self.batch_size = batch_size
        self.workers = max(1, workers)
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.label_key = label_key
        self.image_keys = tuple(image_key.split(";")) if image_key else WDS_IMAGE_KEYS
        self.counts = list(counts) if counts is not None else None
        self.total = sum(self.counts) if self.counts is not None else 0
        self._epoch = multiprocessing.Value("i", 0)

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration shuffles for (shared with the loader's workers)."""
        self._epoch.value = int(epoch)

    @property
    def global_workers(self) -> int:
        return self.world_size * self.workers

    def quota(self) -> int:
        """Training samples each worker yields per epoch: whole batches only."""
        per_worker = self.total // self.global_workers
        return per_worker // self.batch_size * self.batch_size

    def __len__(self) -> int:
        if self.train:
            return self.quota() * self.workers
        # validation: the samples of this rank's shards (or its share of the samples)
        g0, big = self.rank * self.workers, self.global_workers
        if self.counts is None:
            return 0
        if len(self.urls) >= big:  # the shards of this rank's workers
            return sum(c for i, c in enumerate(self.counts) if g0 <= i % big < g0 + self.workers)
        return sum(len(range(g, self.total, big)) for g in range(g0, g0 + self.workers))

    def __iter__(self) -> Iterator[tuple[Any, int]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        g, big = self.rank * self.workers + worker, self.global_workers
        epoch = int(self._epoch.value)
        order = list(self.urls)
        if self.train:
            random.Random(mix_seed(self.seed, epoch)).shuffle(order)
        if len(order) >= big:
            mine, every = order[g::big], None
        else:  # fewer shards than workers: every worker reads all, keeps every G-th sample
            mine, every = order, (g, big)
        if not self.train:
            yield from self._samples(mine, every)
            return
        rng = random.Random(mix_seed(self.seed, epoch, g))
        stream = self._cycle(mine, every, rng)
        left = self.quota()
        size = min(SHUFFLE_BUFFER, left)
        buffer: list[tuple[Any, int]] = []
        while left > len(buffer):  # more to yield than the buffer holds: read on
            sample = next(stream)
            if len(buffer) < size:
                buffer.append(sample)
                continue
            i = rng.randrange(size)
            buffer[i], sample = sample, buffer[i]
            yield sample
            left -= 1
        rng.shuffle(buffer)
        yield from buffer[:left]

    def _cycle(
        self, urls: Sequence[str], every: tuple[int, int] | None, rng: random.Random
    ) -> Iterator[tuple[Any, int]]:
        """This worker's samples, pass after pass (shards reshuffled between passes)."""
        urls = list(urls)
        while True:
            got = 0
            for sample in self._samples(urls, every):
                got += 1
                yield sample
            if got == 0:
                raise DataError(f"no readable sample in the webdataset shards {urls[:3]}")
            rng.shuffle(urls)

    def _samples(
        self, urls: Sequence[str], every: tuple[int, int] | None
    ) -> Iterator[tuple[Any, int]]:
        """Decoded, transformed samples of ``urls`` in order (every ``every[1]``-th from
        ``every[0]`` when the samples are split instead of the shards)."""
        from webdataset import tariterators

        def skip_shard(exc: Exception) -> bool:
            warnings.warn(f"skipping part of a webdataset shard: {exc}", RuntimeWarning, 2)
            return True

        index = 0
        for url in urls:
            samples = tariterators.tarfile_samples(iter([{"url": url}]), handler=skip_shard)
            for raw in samples:
                if every is not None:
                    index += 1
                    if (index - 1) % every[1] != every[0]:
                        continue
                decoded = self._decode(raw)
                if decoded is not None:
                    yield decoded

    def _decode(self, raw: dict[str, Any]) -> tuple[Any, int] | None:
        key, url = raw.get("__key__", "?"), raw.get("__url__", "?")
        data = next((raw[k] for k in self.image_keys if k in raw), None)
        try:
            if data is None:
                raise ValueError(f"no image member ({', '.join(self.image_keys)})")
            label_raw = raw.get("json" if self.label_key else "cls")
            if label_raw is None:
                raise ValueError("no label member (.cls, or .json with label_key)")
            label = _label(label_raw, self.label_key)
            img = _open_image(data, None, self.mode)
        except Exception as exc:  # an unreadable sample: skip it, never crash
            warnings.warn(
                f"skipping unreadable sample {key} in {url}: {type(exc).__name__}: {exc}",
                RuntimeWarning,
                stacklevel=2,
            )
            return None
        if self.transform is not None:
            img = self.transform(img)
        return img, label


def build_wds(
    cfg: Any, transforms: tuple[Any, Any], rank: int, world_size: int
) -> tuple[WdsDataset, WdsDataset, int]:
    """``(train, val, classes)`` of ``data wds`` (``cfg``: the plan's DataPlan)."""
    _require("wds")
    if not cfg.root:
        raise DataError(
            'data wds needs root = "shards/train-{0000..0099}.tar"; pass --set data.root=...'
        )
    if not cfg.val_root:
        raise DataError(
            'data wds needs val_root = "shards/val-{0000..0009}.tar"; pass --set data.val_root=...'
        )
    splits = {}
    for field, pattern in (("root", cfg.root), ("val_root", cfg.val_root)):
        urls = expand_braces(pattern)
        missing = [u for u in urls if _is_local(u) and not os.path.isfile(u)]
        if missing:
            raise DataError(
                f"data.{field}: {len(missing)} of {len(urls)} shards do not exist "
                f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); pass "
                f"--set data.{field}=..."
            )
        if not all(_is_local(u) for u in urls):
            raise DataError(
                f"data.{field}: vitkdl reads local shards only (counted before training, so "
                "every rank takes the same steps); copy them to a local disk"
            )
        splits[field] = (urls, scan_shards(urls, cfg.label_key))
    classes = 1 + max(m for _, m in splits["root"][1])
    if classes < 1:
        raise DataError(f"data.root: no labelled sample in {cfg.root}")
    train_tf, eval_tf = transforms
    common = {
        "in_chans": cfg.in_chans,
        "batch_size": cfg.batch_size,
        "workers": cfg.workers,
        "seed": cfg.seed,
        "rank": rank,
        "world_size": world_size,
        "label_key": cfg.label_key,
        "image_key": cfg.image_key,
    }
    train = WdsDataset(
        splits["root"][0],
        train=True,
        transform=train_tf,
        counts=[c for c, _ in splits["root"][1]],
        **common,
    )
    val = WdsDataset(
        splits["val_root"][0],
        train=False,
        transform=eval_tf,
        counts=[c for c, _ in splits["val_root"][1]],
        **common,
    )
    if train.quota() == 0:
        raise DataError(
            f"data.root has {train.total} samples, fewer than one batch of "
            f"{cfg.batch_size} per loader worker and device ({train.global_workers}); pass "
            "--set data.batch_size=... or data.workers=..."
        )
    return train, val, classes
