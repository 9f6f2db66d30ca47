"""Facts about timm Vision Transformers, resolved on the meta device and cached on disk.

``vitkdl validate`` needs to know the shape of the teacher and student models of a recipe
(embedding width, depth, heads, patch grid, prefix tokens, parameter and FLOP counts, the
pretrained data config...) without allocating any weights and, when run again, without even
importing torch.  This module builds each model with ``pretrained=False`` inside
``torch.device("meta")``, reads the facts off the module, counts the forward FLOPs with
:class:`torch.utils.flop_counter.FlopCounterMode` on meta tensors and stores the result (or the
:class:`ModelError` explaining why the model is unusable) in a JSON cache file.

torch and timm are imported lazily, inside the functions that need them: a warm cache answers
:func:`model_facts`, :func:`model_names` and :func:`suggest_models` with the standard library
and pydantic only.

The cache file lives in ``$VITKDL_CACHE_DIR``, else ``$XDG_CACHE_HOME/vitkdl``, else
``~/.cache/vitkdl``, and its name carries the timm and torch versions (read with
:mod:`importlib.metadata`, which imports neither), so an upgrade starts a fresh cache.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import importlib.metadata
import json
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:  # pragma: no cover - typing only, never imported at run time
    import torch.nn

__all__ = [
    "ErrorReason",
    "ModelError",
    "ModelFacts",
    "cache_path",
    "clear_cache",
    "model_facts",
    "model_names",
    "suggest_models",
]

#: Bump when the layout of the cache file or of :class:`ModelFacts` changes.
CACHE_FORMAT = 5

#: Keyword arguments of ``timm.create_model`` that would load weights; they are dropped because
#: facts are always resolved with ``pretrained=False`` on the meta device.
_WEIGHT_KWARGS = ("pretrained", "checkpoint_path")

#: Defaults used by timm when a pretrained config lacks a field (``timm.data.constants``).
_DEFAULT_MEAN = (0.485, 0.456, 0.406)
_DEFAULT_STD = (0.229, 0.224, 0.225)
_DEFAULT_INTERPOLATION = "bicubic"
_DEFAULT_CROP_PCT = 0.875

ErrorReason = Literal["unknown_model", "unknown_tag", "bad_argument", "not_vit", "build_failed"]
_ERROR_REASONS = frozenset(get_args(ErrorReason))

_UNEXPECTED_KWARG = re.compile(
    r"(?:(?P<qual>[\w.<>]+)\(\) )?got an unexpected keyword argument '(?P<arg>[^']+)'"
)


class ModelFacts(BaseModel):
    """What vitkdl needs to know about one timm Vision Transformer configuration."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    """The full name as given, e.g. ``"deit3_large_patch16_224.fb_in22k_ft_in1k"``."""
    arch: str
    """The timm architecture, e.g. ``"deit3_large_patch16_224"``."""
    tag: str | None
    """The pretrained tag given in the name (``None`` when the name has none)."""
    family: str
    """The model class name, e.g. ``"VisionTransformer"``, ``"VisionTransformerDistilled"``."""
    embed_dim: int
    depth: int
    num_heads: int
    num_prefix_tokens: int
    """Class/distillation/register tokens in front of the patch tokens (0, 1, 2, ...)."""
    grid: tuple[int, int]
    """Patch grid ``(h, w)``."""
    num_patches: int
    img_size: tuple[int, int]
    patch_size: tuple[int, int]
    in_chans: int
    num_classes: int
    params: int
    """Total parameter count."""
    head_params: int
    """Parameters of the classifier head(s)."""
    flops: int
    """Forward FLOPs for one image (2 per multiply-add), counted on the meta device."""
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    crop_pct: float
    block_parts: tuple[str, ...] = ()
    """The children of the first block, e.g. ``("norm1", "attn", "ls1", ...)``."""
    sub_taps: bool = False
    """Whether the blocks are timm's ``Block`` in a ViT that vitkdl can run block by block, so
    points inside them (``.attn``, ``.attn_map``) can be tapped."""
    vit: bool = True
    """Whether the model is a Vision Transformer with ``blocks`` on one patch grid, whose
    features can be tapped. Any other timm classifier (ResNet, RegNetY, ConvNeXt, Swin, ...)
    takes part in logit terms only; its token fields (depth, heads, grid, prefix tokens) are
    0 and ``embed_dim`` is its pooled feature width."""
    not_vit: str | None = None
    """Why a classifier's features cannot be tapped, in words (None for a ViT)."""
    distilled: bool = False
    """Whether the model has DeiT's distillation token and head (``head_dist``)."""
    takes_img_size: bool = True
    """Whether ``create_model`` accepts ``img_size`` (CNNs do not: their input size is only
    the resolution vitkdl resizes their input to)."""
    pretrained_tag: str | None = None
    """The pretrained tag ``pretrained=True`` loads (the name's, else timm's default)."""
    hf_hub_id: str | None = None
    """Where that tag's weights live on the Hugging Face hub (``timm/resnet18.a1_in1k``)."""
    hf_hub_filename: str | None = None
    """The weights file in that repository when it is not timm's default name."""
    pretrained_classes: int | None = None
    """The classes the pretrained tag's head was trained on."""
    head_key: str | None = None
    """The state-dict key of the classifier's weight (``head.weight``, ``fc.weight``), whose
    rows are the classes; None when the model has no classifier (``num_classes = 0``)."""
    norm_identity: bool = False
    """Whether the final ``norm`` is ``nn.Identity`` (models with ``global_pool = avg``
    normalise after pooling, in ``fc_norm``): ``teacher.norm`` is then the last block's
    output."""
    fc_norm: bool = False
    """Whether the model normalises its pooled feature (``fc_norm`` is not ``nn.Identity``)."""


#: The points inside a block that a sub-block tap reads, and where the pass starts.
SUB_TAP_BLOCK = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
_SUB_TAP_MODEL = ("patch_embed", "_pos_embed", "patch_drop", "norm_pre", "blocks", "norm")


class ModelError(Exception):
    """Why a model name plus ``create_model`` keyword arguments cannot be used by vitkdl.

    Attributes:
        reason: ``"unknown_model"``, ``"unknown_tag"``, ``"bad_argument"``, ``"not_vit"`` or
            ``"build_failed"``.
        message: One clear sentence.
        suggestions: Did-you-mean candidates, closest first (at most 3); may be empty.
        argument: For ``bad_argument``, the offending keyword argument name.
        expected: For ``bad_argument``, the keyword names the model class accepts; may be empty.
    """

    def __init__(
        self,
        reason: ErrorReason,
        message: str,
        *,
        suggestions: list[str] | None = None,
        argument: str | None = None,
        expected: list[str] | None = None,
    ) -> None:
        super().__init__(message)
        self.reason: ErrorReason = reason
        self.message = message
        self.suggestions: list[str] = list(suggestions or [])
        self.argument = argument
        self.expected: list[str] = list(expected or [])

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"ModelError({self.reason!r}, {self.message!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_error_from_dict, (self.to_dict(),))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ModelError):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = Exception.__hash__

    def to_dict(self) -> dict[str, Any]:
        """The error as a JSON-ready dict (the form stored in the cache)."""
        return {
            "reason": self.reason,
            "message": self.message,
            "suggestions": list(self.suggestions),
            "argument": self.argument,
            "expected": list(self.expected),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelError:
        """Rebuild an error from :meth:`to_dict` output."""
        return cls(
            data["reason"],
            str(data["message"]),
            suggestions=[str(s) for s in data.get("suggestions") or []],
            argument=data.get("argument"),
            expected=[str(s) for s in data.get("expected") or []],
        )


def _error_from_dict(data: Mapping[str, Any]) -> ModelError:
    return ModelError.from_dict(data)


# --------------------------------------------------------------------------------------------
# The on-disk cache
# --------------------------------------------------------------------------------------------


@functools.cache
def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def cache_path() -> Path:
    """The JSON cache file for the installed timm and torch versions.

    The directory is ``$VITKDL_CACHE_DIR``, else ``$XDG_CACHE_HOME/vitkdl``, else
    ``~/.cache/vitkdl``; it is read from the environment on every call.
    """
    explicit = os.environ.get("VITKDL_CACHE_DIR")
    if explicit:
        directory = Path(explicit).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
        directory = base / "vitkdl"
    return directory / f"models-timm{_version('timm')}-torch{_version('torch')}.json"


class _Cache:
    """The in-memory image of one cache file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.index: dict[str, Any] | None = None
        self.entries: dict[str, dict[str, Any]] = {}
        data = _read_cache_file(path)
        if data is not None:
            self._absorb(data)

    def _absorb(self, data: Mapping[str, Any]) -> None:
        index = data.get("index")
        if self.index is None and _valid_index(index):
            self.index = dict(index)
        entries = data.get("entries")
        if isinstance(entries, dict):
            for key, value in entries.items():
                if isinstance(value, dict):
                    self.entries.setdefault(key, value)

    def save(self) -> None:
        """Merge with what other processes wrote meanwhile and replace the file atomically."""
        on_disk = _read_cache_file(self.path)
        if on_disk is not None:
            self._absorb(on_disk)
        payload = {
            "format": CACHE_FORMAT,
            "timm": _version("timm"),
            "torch": _version("torch"),
            "index": self.index,
            "entries": self.entries,
        }
        tmp: str | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(
                dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp"
            )
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(payload, fh, separators=(",", ":"))
            os.replace(tmp, self.path)
            tmp = None
        except OSError:
            pass  # an unwritable cache only costs speed
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)


def _read_cache_file(path: Path) -> dict[str, Any] | None:
    """The parsed cache file, or ``None`` when missing, unreadable, corrupt or of another format."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeError):
        return None
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
        return None
    return data


def _valid_index(index: object) -> bool:
    return (
        isinstance(index, dict)
        and isinstance(index.get("names"), list)
        and isinstance(index.get("tags"), dict)
        and isinstance(index.get("deprecated"), dict)
    )


_CACHES: dict[Path, _Cache] = {}


def _cache() -> _Cache:
    """The cache for :func:`cache_path`, loaded from disk once per process."""
    path = cache_path()
    cache = _CACHES.get(path)
    if cache is None:
        cache = _CACHES[path] = _Cache(path)
    return cache


def clear_cache(*, memory_only: bool = False) -> None:
    """Forget everything cached in this process and delete the cache file.

    Args:
        memory_only: Keep the file on disk; the next lookup reloads it.
    """
    _CACHES.clear()
    if not memory_only:
        with contextlib.suppress(OSError):
            cache_path().unlink()


# --------------------------------------------------------------------------------------------
# Names, tags and suggestions
# --------------------------------------------------------------------------------------------


def _index() -> dict[str, Any]:
    """Registered architectures, their pretrained tags and deprecated aliases (cached)."""
    cache = _cache()
    if cache.index is None:
        import timm
        from timm.models import get_deprecated_models

        tags: dict[str, list[str]] = {}
        for full in timm.list_models(include_tags=True):
            arch, _, tag = full.partition(".")
            if tag:
                tags.setdefault(arch, []).append(tag)
        cache.index = {
            "names": list(timm.list_models()),
            "tags": tags,
            "deprecated": dict(get_deprecated_models()),
        }
        cache.save()
    return cache.index


def model_names() -> list[str]:
    """All registered timm architecture names (``timm.list_models()``), cached on disk."""
    return list(_index()["names"])


def suggest_models(name: str, n: int = 3) -> list[str]:
    """Registered architectures closest to ``name`` (any pretrained tag ignored), closest first."""
    if n <= 0:
        return []
    arch = name.partition(".")[0].strip().lower()
    return difflib.get_close_matches(arch, model_names(), n=n, cutoff=0.6)


def _arch_tags(arch: str) -> list[str]:
    return list(_index()["tags"].get(arch, []))


# --------------------------------------------------------------------------------------------
# model_facts
# --------------------------------------------------------------------------------------------


def _cache_key(name: str, kwargs: Mapping[str, Any]) -> str | None:
    """``name`` plus the canonical JSON of ``kwargs``; ``None`` when they are not JSON data."""
    try:
        return name + " " + json.dumps(kwargs, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError):
        return None


def model_facts(name: str, kwargs: Mapping[str, Any] | None = None) -> ModelFacts:
    """Resolve the facts about timm model ``name`` built with ``create_model(name, **kwargs)``.

    The model is built with ``pretrained=False`` inside ``torch.device("meta")``: no weights are
    allocated or downloaded (``pretrained`` and ``checkpoint_path`` in ``kwargs`` are ignored).
    Results and errors are cached on disk; a cached answer needs neither torch nor timm.

    Args:
        name: A timm architecture, optionally with a pretrained tag
            (``"deit3_large_patch16_224.fb_in22k_ft_in1k"``).
        kwargs: ``timm.create_model`` keyword arguments exactly as they will be passed.

    Raises:
        ModelError: The name is unknown, the tag is unknown, a keyword argument is not accepted,
            the model is not a patch-token Vision Transformer, or building it failed.
    """
    effective = {k: v for k, v in (kwargs or {}).items() if k not in _WEIGHT_KWARGS}
    key = _cache_key(name, effective)
    cache = _cache()
    if key is not None:
        hit = _from_entry(cache.entries.get(key))
        if hit is not None:
            if isinstance(hit, ModelError):
                raise hit
            return hit

    result: ModelFacts | ModelError
    try:
        result = _resolve(name, effective)
    except ModelError as err:
        result = err
    if key is not None:
        cache.entries[key] = (
            {"error": result.to_dict()}
            if isinstance(result, ModelError)
            else {"facts": result.model_dump(mode="json")}
        )
        cache.save()
    if isinstance(result, ModelError):
        raise result
    return result


def _from_entry(entry: Mapping[str, Any] | None) -> ModelFacts | ModelError | None:
    """A cached answer, or ``None`` when absent or unusable (then it is recomputed)."""
    if not entry:
        return None
    try:
        if "facts" in entry:
            return ModelFacts.model_validate(entry["facts"])
        if "error" in entry and entry["error"].get("reason") in _ERROR_REASONS:
            return ModelError.from_dict(entry["error"])
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    return None


def _resolve(name: str, kwargs: dict[str, Any]) -> ModelFacts:
    """Check the name against the registry, then build the model on meta and measure it."""
    if not isinstance(name, str) or not name.strip():
        raise ModelError("unknown_model", f"unknown timm model {name!r}")
    if ":" in name:
        raise ModelError(
            "unknown_model",
            f"model {name!r} comes from a hub or a local directory; vitkdl resolves only "
            "registered timm architectures",
        )
    arch, _, tag_part = name.partition(".")
    tag = tag_part or None

    index = _index()
    deprecated: dict[str, str | None] = index["deprecated"]
    if arch in deprecated:
        current = deprecated[arch]
        if current is None:
            raise ModelError(
                "unknown_model",
                f"timm model {arch!r} has been removed",
                suggestions=suggest_models(arch),
            )
        # timm maps the alias to "arch.tag"; resolve it here so the facts name the real model
        arch, _, mapped_tag = current.partition(".")
        tag = tag or mapped_tag or None
    elif arch not in index["names"]:
        raise ModelError(
            "unknown_model", f"unknown timm model {arch!r}", suggestions=suggest_models(arch)
        )
    if tag is not None:
        tags = _arch_tags(arch)
        if tag not in tags:
            full_names = [f"{arch}.{t}" for t in tags]
            raise ModelError(
                "unknown_tag",
                f"unknown pretrained tag {tag!r} for timm model {arch!r}",
                suggestions=difflib.get_close_matches(f"{arch}.{tag}", full_names, n=3, cutoff=0),
            )
    build_name = f"{arch}.{tag}" if tag else arch
    return _build_and_measure(name, arch, tag, build_name, kwargs)


def _build_and_measure(
    name: str, arch: str, tag: str | None, build_name: str, kwargs: dict[str, Any]
) -> ModelFacts:
    takes_img_size = True
    try:
        model = _create_on_meta(build_name, kwargs)
    except TypeError as exc:
        bad = _bad_argument(exc, arch)
        if bad is not None and bad.argument == "img_size" and "img_size" in kwargs:
            # A CNN takes no img_size: there it is the resolution its input is resized to.
            takes_img_size = False
            try:
                model = _create_on_meta(
                    build_name, {k: v for k, v in kwargs.items() if k != "img_size"}
                )
            except TypeError as again:
                raise _bad_argument(again, arch) or _build_failed(again) from None
            except Exception as again:
                raise _build_failed(again) from None
        elif bad is not None:
            raise bad from None
        else:
            raise _build_failed(exc) from None
    except Exception as exc:
        raise _build_failed(exc) from None

    try:
        if not all(hasattr(model, a) for a in ("blocks", "patch_embed", "forward_intermediates")):
            reason = "no ViT blocks (`blocks` after a `patch_embed`)"
            return _measure_classifier(model, name, arch, tag, kwargs, reason, takes_img_size)
        return _measure(model, name, arch, tag, kwargs)
    except ModelError:
        raise
    except Exception as exc:
        raise _build_failed(exc) from None


def _create_on_meta(build_name: str, kwargs: Mapping[str, Any]) -> torch.nn.Module:
    import timm
    import torch

    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        return timm.create_model(build_name, pretrained=False, **kwargs)


def _build_failed(exc: BaseException) -> ModelError:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    message = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return ModelError("build_failed", message)


def _bad_argument(exc: TypeError, arch: str) -> ModelError | None:
    """A ``bad_argument`` error for "unexpected keyword argument" TypeErrors, else ``None``."""
    match = _UNEXPECTED_KWARG.search(str(exc))
    if match is None:
        return None
    argument = match.group("arg")
    qual = match.group("qual") or ""
    owner = qual.split(".")[0] if qual.endswith(".__init__") else ""
    expected = _init_parameters(_find_class(owner, exc)) if owner else []
    where = f"{owner} (timm model {arch!r})" if owner else f"timm model {arch!r}"
    return ModelError(
        "bad_argument",
        f"{argument!r} is not a keyword argument of {where}",
        suggestions=difflib.get_close_matches(argument, expected, n=3, cutoff=0.6),
        argument=argument,
        expected=expected,
    )


def _find_class(class_name: str, exc: BaseException) -> type | None:
    """The class called ``class_name`` visible from the frames the exception went through."""
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        for namespace in (frame.f_locals, frame.f_globals):
            candidate = namespace.get(class_name)
            if isinstance(candidate, type):
                return candidate
        tb = tb.tb_next
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("timm."):
            candidate = getattr(module, class_name, None)
            if isinstance(candidate, type):
                return candidate
    return None


def _init_parameters(cls: type | None) -> list[str]:
    """Keyword names accepted by ``cls.__init__`` in signature order (no ``self``/``*args``)."""
    import inspect

    if cls is None:
        return []
    try:
        signature = inspect.signature(cls.__init__)
    except (TypeError, ValueError):
        return []
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in signature.parameters.values() if p.kind in kinds and p.name != "self"]


def _pair(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return (value, value)
    items = tuple(int(v) for v in value)
    if len(items) == 1:
        return (items[0], items[0])
    if len(items) != 2:
        return None
    return (items[0], items[1])


def _count(modules: Any) -> int:
    """Distinct parameters in a module, a tuple/list of modules, or nothing."""
    import torch.nn as nn

    if isinstance(modules, nn.Module):
        modules = [modules]
    elif not isinstance(modules, (list, tuple)):
        return 0
    seen: dict[int, int] = {}
    for module in modules:
        if isinstance(module, nn.Module):
            for p in module.parameters():
                seen[id(p)] = p.numel()
    return sum(seen.values())


def _first_conv_channels(model: torch.nn.Module, first_conv: Any) -> int | None:
    """Input channels of the layer the pretrained config names as the first convolution."""
    if isinstance(first_conv, (list, tuple)):
        first_conv = first_conv[0] if first_conv else None
    if not isinstance(first_conv, str) or not first_conv:
        return None
    try:
        layer = model.get_submodule(first_conv)
    except AttributeError:
        return None
    channels = getattr(layer, "in_channels", None)
    return channels if isinstance(channels, int) else None


def _num_heads(block: torch.nn.Module) -> int:
    attn = getattr(block, "attn", None)
    heads = getattr(attn, "num_heads", None)
    if isinstance(heads, int):
        return heads
    for module in block.modules():
        heads = getattr(module, "num_heads", None)
        if isinstance(heads, int):
            return heads
    return 0


def _measure(
    model: torch.nn.Module, name: str, arch: str, tag: str | None, kwargs: Mapping[str, Any]
) -> ModelFacts:
    import torch

    cfg: dict[str, Any] = dict(getattr(model, "pretrained_cfg", None) or {})
    input_size = cfg.get("input_size") or (3, 224, 224)
    patch_embed = model.patch_embed
    proj = getattr(patch_embed, "proj", None)

    in_chans = (
        _first_conv_channels(model, cfg.get("first_conv"))
        or kwargs.get("in_chans")
        or (None if hasattr(patch_embed, "backbone") else getattr(proj, "in_channels", None))
        or input_size[0]
    )
    img_size = (
        _pair(getattr(patch_embed, "img_size", None))
        or _pair(kwargs.get("img_size"))
        or _pair(input_size[-2:])
    )
    patch_size = _pair(getattr(patch_embed, "patch_size", None))
    grid = _pair(getattr(patch_embed, "grid_size", None))
    if grid is None and img_size is not None and patch_size is not None:  # e.g. XCiT
        grid = (img_size[0] // patch_size[0], img_size[1] // patch_size[1])
    if img_size is None or patch_size is None or grid is None:
        # e.g. CrossViT (two patch embeddings) or Hiera (tokens pooled between stages)
        reason = "no single patch grid"
        return _measure_classifier(model, name, arch, tag, kwargs, reason, True)

    num_prefix_tokens = getattr(model, "num_prefix_tokens", None)
    if not isinstance(num_prefix_tokens, int):
        num_prefix_tokens = sum(
            getattr(model, attr, None) is not None for attr in ("cls_token", "dist_token")
        )
    blocks = list(model.blocks)
    embed_dim = getattr(model, "embed_dim", None) or getattr(model, "num_features", 0)

    # No autograd at all: torch's ModuleTracker (inside FlopCounterMode) trips over parameters
    # fed straight into submodules (CaiT class tokens, attention-pool latents) under no_grad.
    model.eval().requires_grad_(False)
    with torch.device("meta"), torch.no_grad():
        flops = _count_flops(model, torch.empty(1, int(in_chans), *img_size))

    first = blocks[0] if blocks else None
    attn = getattr(first, "attn", None)
    sub_taps = (
        first is not None
        and type(first).__module__ == "timm.models.vision_transformer"
        and type(first).__name__ == "Block"
        and all(hasattr(first, a) for a in SUB_TAP_BLOCK)
        and all(hasattr(model, a) for a in _SUB_TAP_MODEL)
        and all(hasattr(attn, a) for a in ("qkv", "num_heads", "head_dim", "scale"))
    )
    return ModelFacts(
        name=name,
        arch=arch,
        tag=tag,
        family=type(model).__name__,
        embed_dim=int(embed_dim),
        depth=len(blocks),
        num_heads=_num_heads(blocks[0]) if blocks else 0,
        num_prefix_tokens=num_prefix_tokens,
        grid=grid,
        num_patches=grid[0] * grid[1],
        img_size=img_size,
        patch_size=patch_size,
        in_chans=int(in_chans),
        **_shared_facts(model, cfg, flops),
        block_parts=tuple(n for n, _ in first.named_children()) if first is not None else (),
        sub_taps=bool(sub_taps),
        distilled=hasattr(model, "head_dist") and hasattr(model, "set_distilled_training"),
        # From the modules themselves, not from names: which norm is real depends on the
        # configuration (global_pool = avg moves timm's final norm behind the pooling).
        norm_identity=isinstance(getattr(model, "norm", None), torch.nn.Identity),
        fc_norm=isinstance(getattr(model, "fc_norm", None), torch.nn.Module)
        and not isinstance(model.fc_norm, torch.nn.Identity),
    )


def _shared_facts(model: torch.nn.Module, cfg: Mapping[str, Any], flops: int) -> dict[str, Any]:
    """The facts of every model, ViT or not: its head, size, cost, preprocessing (timm's
    pretrained config) and where ``pretrained=True`` would load its weights from."""
    classes = cfg.get("num_classes")
    return {
        "head_key": _head_key(model),
        "num_classes": int(getattr(model, "num_classes", 0) or 0),
        "params": _count(model),
        "head_params": _count(model.get_classifier()) if hasattr(model, "get_classifier") else 0,
        "flops": flops,
        "mean": tuple(float(v) for v in cfg.get("mean") or _DEFAULT_MEAN),
        "std": tuple(float(v) for v in cfg.get("std") or _DEFAULT_STD),
        "interpolation": str(cfg.get("interpolation") or _DEFAULT_INTERPOLATION),
        "crop_pct": float(cfg.get("crop_pct") or _DEFAULT_CROP_PCT),
        "pretrained_tag": cfg.get("tag") or None,
        "hf_hub_id": cfg.get("hf_hub_id") or None,
        "hf_hub_filename": cfg.get("hf_hub_filename") or None,
        "pretrained_classes": int(classes) if isinstance(classes, int) else None,
    }


def _head_key(model: torch.nn.Module) -> str | None:
    """The state-dict key of the classifier's weight, or None without a classifier."""
    import torch

    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(head, tuple):  # a distilled DeiT: (head, head_dist); the class head first
        head = head[0] if head else None
    if not isinstance(head, torch.nn.Module) or isinstance(head, torch.nn.Identity):
        return None
    for name, module in model.named_modules():
        if module is head:
            # A classifier wrapping its Linear (ConvNeXt's head.fc, RegNet's head.fc)
            for sub, param in module.named_parameters():
                if param.dim() == 2:
                    return f"{name}.{sub}"
    return None


def _measure_classifier(
    model: torch.nn.Module,
    name: str,
    arch: str,
    tag: str | None,
    kwargs: Mapping[str, Any],
    reason: str,
    takes_img_size: bool,
) -> ModelFacts:
    """The facts of a timm classifier without ViT blocks (ResNet, RegNetY, ConvNeXt, Swin,
    EfficientNet, ...): enough for logit terms and for its own preprocessing (input size,
    statistics, interpolation), no taps."""
    import torch

    cfg: dict[str, Any] = dict(getattr(model, "pretrained_cfg", None) or {})
    input_size = cfg.get("input_size") or (3, 224, 224)
    patch_embed = getattr(model, "patch_embed", None)
    in_chans = (
        _first_conv_channels(model, cfg.get("first_conv"))
        or kwargs.get("in_chans")
        or input_size[0]
    )
    img_size = (
        _pair(kwargs.get("img_size"))
        or _pair(getattr(patch_embed, "img_size", None))
        or _pair(input_size[-2:])
    )
    assert img_size is not None
    model.eval().requires_grad_(False)
    with torch.device("meta"), torch.no_grad():
        flops = _count_flops(model, torch.empty(1, int(in_chans), *img_size))
    width = getattr(model, "num_features", None) or getattr(model, "embed_dim", None) or 0
    return ModelFacts(
        name=name,
        arch=arch,
        tag=tag,
        family=type(model).__name__,
        embed_dim=int(width),
        depth=0,
        num_heads=0,
        num_prefix_tokens=0,
        grid=(0, 0),
        num_patches=0,
        img_size=img_size,
        patch_size=(0, 0),
        in_chans=int(in_chans),
        **_shared_facts(model, cfg, flops),
        vit=False,
        not_vit=reason,
        takes_img_size=takes_img_size,
    )


def _count_flops(model: torch.nn.Module, x: Any) -> int:
    """Forward FLOPs of one image: the ``forward_intermediates`` + ``forward_head`` path that
    distillation uses, or the plain forward when a model does not support it that way."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with FlopCounterMode(display=False) as counter:
            final, _ = model.forward_intermediates(x, indices=1)
            model.forward_head(final)
        return int(counter.get_total_flops())
    except Exception:
        with FlopCounterMode(display=False) as counter:
            model(x)
        return int(counter.get_total_flops())
