"""Weights by name: timm's pretrained tags and ``hf-hub:org/repo``, through the Hugging Face
hub cache. Torch-free (``huggingface_hub`` is imported only when a name is looked up).

``pretrained = true`` loads the timm tag of a model name (``regnety_160.deit_in1k``, or timm's
default tag) from the repository its pretrained config names (``timm/regnety_160.deit_in1k``);
``weights = "hf-hub:org/repo"`` (timm's spelling, ``@revision`` allowed) loads that repository's
weights file. Both look in the local hub cache first (``$HF_HUB_CACHE``, else
``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``) and use a cached file without any network;
only a file that is not cached is downloaded, with the hub's timeouts. Offline
(``HF_HUB_OFFLINE=1``) and not cached, or a download that fails, is one :class:`HubError` that
names the repository, the cache directory and the ``weights = "..."`` alternative: never a
traceback, never a hang.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

#: How timm spells a weights repository on the hub (``hf-hub:timm/vit_base_patch16_224``).
HF_HUB_PREFIX = "hf-hub:"

#: The weights files timm looks for in a repository, safetensors first.
DEFAULT_FILES: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")

#: Seconds to wait for the hub to answer before giving up on a download.
TIMEOUT = 10.0


class HubError(Exception):
    """Weights that cannot be had by name (not cached and offline, or a failed download)."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.message, self.hint = message, hint


def is_hub_name(weights: str | None) -> bool:
    """Whether a ``weights`` value names a hub repository rather than a local file."""
    return weights is not None and weights.startswith(HF_HUB_PREFIX)


def cache_dir() -> Path:
    """The hub cache, read from the environment on every call (as ``huggingface_hub`` does
    when it starts): ``$HF_HUB_CACHE``, ``$HUGGINGFACE_HUB_CACHE``, ``$HF_HOME/hub``,
    ``$XDG_CACHE_HOME/huggingface/hub``, ``~/.cache/huggingface/hub``."""
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(key):
            return Path(os.environ[key]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "huggingface" / "hub"


def offline() -> bool:
    """Whether the hub must not be contacted (``HF_HUB_OFFLINE`` set to a true value)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def weight_files(filename: str | None = None) -> tuple[str, ...]:
    """The files to look for: timm's defaults, or a pretrained config's own file name with
    its safetensors alternative first (as timm's loader does)."""
    if not filename:
        return DEFAULT_FILES
    if filename.endswith(".safetensors"):
        return (filename,)
    stem = filename.rsplit(".", 1)[0]
    if stem == "pytorch_model":
        return DEFAULT_FILES
    if stem.endswith("_pytorch_model"):
        return (stem.removesuffix("_pytorch_model") + "_model.safetensors", filename)
    return (stem + ".safetensors", filename)


def split_repo(repo: str) -> tuple[str, str | None]:
    """``org/repo@revision`` -> ``("org/repo", "revision")``; ``hf-hub:`` stripped."""
    repo = repo.removeprefix(HF_HUB_PREFIX)
    name, _, revision = repo.partition("@")
    return name, revision or None


def cached(repo: str, files: Sequence[str] = DEFAULT_FILES) -> Path | None:
    """The first of ``files`` that the local hub cache holds for ``repo``, or None. Never
    touches the network."""
    from huggingface_hub import try_to_load_from_cache

    repo_id, revision = split_repo(repo)
    for name in files:
        try:
            found = try_to_load_from_cache(
                repo_id, name, cache_dir=str(cache_dir()), revision=revision
            )
        except Exception:  # an invalid repo id: nothing cached under it
            return None
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def _alternative(what: str) -> str:
    return (
        f"download it once online (vitkdl run does), point HF_HUB_CACHE at a cache that holds "
        f'it, or set weights = "path/to/{what}.safetensors" to a local file'
    )


def fetch(repo: str, files: Sequence[str] = DEFAULT_FILES, what: str | None = None) -> Path:
    """A local file with ``repo``'s weights: from the cache, else downloaded into it.

    ``what`` names the weights in messages (``the teacher's pretrained tag
    regnety_160.deit_in1k``). Raises :class:`HubError` when offline and not cached, or when
    the download fails (no network, unknown repository, no weights file in it).
    """
    what = what or repo
    found = cached(repo, files)
    if found is not None:
        return found
    repo_id, revision = split_repo(repo)
    where = cache_dir()
    stem = repo_id.rsplit("/", 1)[-1]
    if offline():
        raise HubError(
            f"{what}: {repo_id} is not in the Hugging Face hub cache {where}, and "
            "HF_HUB_OFFLINE is set",
            _alternative(stem),
        )
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError

    reason = f"it has none of {', '.join(files)}"
    for name in files:
        try:
            # One request without retries first: the download itself retries a failing
            # network with back-off for most of a minute per file.
            get_hf_file_metadata(hf_hub_url(repo_id, name, revision=revision), timeout=TIMEOUT)
        except EntryNotFoundError:
            continue  # the repository has no file of that name: try the next one
        except Exception as exc:  # no network, unknown repository, gated, ...
            reason = "the hub cannot be reached or refused: " + _one_line(exc)
            break
        try:
            path = hf_hub_download(
                repo_id, name, revision=revision, cache_dir=str(where), etag_timeout=TIMEOUT
            )
            return Path(path)
        except Exception as exc:
            reason = "the download failed: " + _one_line(exc)
            break
    raise HubError(
        f"{what}: {repo_id} is not in the Hugging Face hub cache {where}, and {reason}",
        _alternative(stem),
    )


def _one_line(exc: BaseException) -> str:
    first = next((x.strip() for x in str(exc).splitlines() if x.strip()), "")
    return f"{type(exc).__name__}" + (f": {first}" if first else "")
