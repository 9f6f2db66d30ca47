"""Stage 5: plan -> :class:`Program`: real modules and one compiled distillation step.

``program.forward(images, targets)`` runs the teacher (no grad, eval mode) and the student once
each through timm's ``forward_intermediates`` (taps and logits from one pass, no hooks), feeds
the taps to the strategy modules and returns the total loss plus one detached value per term.
``program.step`` is the same function under ``torch.compile(fullgraph=True)`` when the plan's
compile mode asks for it; backward, the optimizer step and mixup stay outside the graph.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import re
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkdl import hub
from vitkdl.errors import VkdError, error
from vitkdl.planner import ModelPlan, Plan, TapPoint, TermPlan
from vitkdl.runs import run_dir
from vitkdl.sources import teacher_affine
from vitkdl.terms import KINDS, StepInputs
from vitkdl.terms.base import END_POINTS

# --------------------------------------------------------------------------------------------
# Devices, precision, compile mode


_DEVICE = re.compile(r"(cpu|mps|cuda)(:\d+)?")


def device_problem(device: str) -> str | None:
    """Why ``device`` (``--device``) cannot be used here, or None: the one rule for a user's
    device, checked before any run folder is made (an unknown type, a GPU this machine lacks)."""
    m = _DEVICE.fullmatch(device)
    if m is None:
        return f"unknown device '{device}'; expected one of cpu, cuda, cuda:N, mps"
    device_type, index = m.group(1), m.group(2)
    if device_type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            return f"--device {device}: no CUDA device here (use --device cpu)"
        if index is not None and int(index[1:]) >= count:
            last = f"cuda:{count - 1}"
            return f"--device {device}: this machine has {count} CUDA device(s), cuda:0 to {last}"
    if device_type == "mps" and not torch.backends.mps.is_available():
        return f"--device {device}: no MPS device here (use --device cpu)"
    return None


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` picks CUDA when available, else CPU; a device this machine cannot use is a
    ValueError (:func:`device_problem`)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(device, str):
        problem = device_problem(device)
        if problem is not None:
            raise ValueError(problem)
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. ``auto``: bf16 on CUDA with bf16, else fp32."""
    if precision == "auto":
        if device.type == "cuda" and _native_bf16():
            return torch.bfloat16
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def teacher_precision(
    device: torch.device, autocast_dtype: torch.dtype | None, written: str = "auto"
) -> torch.dtype | None:
    """The dtype the frozen teacher's weights are held in, or None for as loaded (fp32).

    ``written``: the teacher's ``precision``. ``bf16`` (and ``fp8``, whose layers other than
    the FP8 linears stay in bf16) holds them in bf16 on any device, ``fp32`` as loaded;
    ``auto`` holds them in bf16 under bf16 autocast on CUDA, where autocast would otherwise
    cast every fp32 weight to bf16 again at each step (the teacher never trains, so its fp32
    master copy buys nothing), and as loaded elsewhere (CPU autocast, fp16 with its loss
    scaling, fp32)."""
    if written in ("bf16", "fp8"):
        return torch.bfloat16
    if written == "auto" and device.type == "cuda" and autocast_dtype == torch.bfloat16:
        return torch.bfloat16
    return None


def float8_teacher(teacher: nn.Module, device: torch.device) -> None:
    """Run the teacher's linear layers in FP8 (torchao's float8 inference: dynamic scaling of
    activations and weights), or a :class:`VkdError` naming what is missing: torchao (the
    ``[fp8]`` extra) or a GPU with FP8 (compute capability 8.9 or newer)."""
    try:
        import torchao.quantization as tq
    except ImportError:
        message = "teacher { precision = fp8 } needs torchao, which is not installed"
        hint = 'pip install -e ".[fp8]" (torchao), or precision = bf16'
        raise VkdError([error(message, hint=hint)]) from None
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        message = (
            "teacher { precision = fp8 } needs a CUDA GPU with FP8 (compute capability 8.9 "
            f"or newer: Ada, Hopper and later); the device is {device}"
        )
        raise VkdError([error(message, hint="precision = bf16")])
    config = getattr(tq, "Float8DynamicActivationFloat8WeightConfig", None)
    if config is not None:
        tq.quantize_(teacher, config())
    else:  # torchao before 0.9
        tq.quantize_(teacher, tq.float8_dynamic_activation_float8_weight())


def precision_name(dtype: torch.dtype | None) -> str:
    """An autocast dtype as a recipe writes it (``bf16``, ``fp16``; ``fp32`` for None)."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32") if dtype else "fp32"


def _native_bf16() -> bool:
    """bf16 in hardware (Ampere and newer): emulated bf16 on older cards is slower than fp32."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch < 2.3 has no including_emulation
        return torch.cuda.is_bf16_supported()


def resolve_compile(mode: str, device: torch.device) -> str | None:
    """The torch.compile mode, or None for eager. ``auto``: compile on CUDA, eager on CPU
    (where inductor costs a minute per graph and gains a few percent)."""
    if mode == "auto":
        return "default" if device.type == "cuda" else None
    return None if mode == "off" else mode


# --------------------------------------------------------------------------------------------
# Models and weights


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    # Checkpoints written by the original DeiT / DeiT III training scripts also pickle the
    # command line (an argparse.Namespace): harmless, so allow it under weights_only.
    allow = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    with allow([argparse.Namespace]) if allow is not None else nullcontext():
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    # The EMA weights first when a training checkpoint has them (timm's use_ema default).
    for key in ("model_ema", "model", "state_dict", "student"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise ValueError("the file holds no state dict")
    return {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, Tensor)}


def _read_failure(exc: Exception) -> str:
    """One line saying why a weights file could not be read (torch's weights-only unpickler
    buries the reason under a paragraph about ``weights_only``)."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        reason = next(
            (line.strip() for line in text.split(marker, 1)[1].splitlines() if line.strip()), ""
        )
        return f"not a PyTorch checkpoint of plain tensors ({reason.split('. ')[0]})"
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def load_weights(model: nn.Module, path: str | Path, role: str) -> None:
    """Load a local timm- or original-format checkpoint (timm's own filter converts the
    original DeiT III layout and resizes position embeddings); a mismatch becomes a
    :class:`VkdError` that lists the keys and shapes that do not fit."""
    if hub.is_hub_name(str(path)):  # weights = "hf-hub:org/repo": the cached file
        path = hub_file(str(path), hub.DEFAULT_FILES, f"the {role}'s weights {path}")
    path = Path(path)
    where = f"{role} weights {path}"
    if not path.is_file():
        raise VkdError([error(f"{where}: no such file")])
    try:
        state = _read_state_dict(path)
    except Exception as exc:  # a corrupt or foreign file: one clear line
        raise VkdError([error(f"{where}: cannot read: {_read_failure(exc)}")]) from None
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        kwargs: dict[str, Any] = {}
        with suppress(Exception):
            if (
                any(".gamma_" in k for k in state)
                and "adapt_layer_scale" in inspect.signature(filter_fn).parameters
            ):
                kwargs["adapt_layer_scale"] = True  # original DeiT III: gamma_1 -> ls1.gamma
        with suppress(Exception):
            state = filter_fn(state, model, **kwargs)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(
                f"missing {len(missing)} keys ({', '.join(missing[:6])}"
                f"{', ...' if len(missing) > 6 else ''})"
            )
        if unexpected:
            parts.append(
                f"{len(unexpected)} unexpected keys ({', '.join(unexpected[:6])}"
                f"{', ...' if len(unexpected) > 6 else ''})"
            )
        if shapes:
            parts.append(
                f"{len(shapes)} shape mismatches ({'; '.join(shapes[:4])}"
                f"{'; ...' if len(shapes) > 4 else ''})"
            )
        raise VkdError(
            [
                error(
                    f"{where} do not fit {type(model).__name__}: " + ", ".join(parts),
                    hint="check the model name, num_classes, img_size and "
                    "patch_size against the checkpoint",
                )
            ]
        )
    model.load_state_dict(state, strict=True)


def hub_file(repo: str, files: tuple[str, ...], what: str) -> Path:
    """A hub repository's weights file from the cache (downloaded when missing and online),
    or a :class:`VkdError` naming the repository, the cache and the local-file alternative."""
    try:
        return hub.fetch(repo, files, what)
    except hub.HubError as exc:
        raise VkdError([error(exc.message, hint=exc.hint)]) from None


def pretrained_model(m: ModelPlan, device: torch.device | str = "cpu") -> nn.Module:
    """The timm model of a plan with its pretrained tag's weights (``pretrained = true``),
    read from the hub cache through timm's own loader (position embeddings resized, a head
    for other classes dropped, as ``create_model(pretrained=True)`` does)."""
    import timm

    assert m.hf_hub_id is not None
    what = f"the {m.role}'s pretrained tag {m.arch}.{m.pretrained_tag}"
    path = hub_file(m.hf_hub_id, hub.weight_files(m.hf_hub_filename), what)
    overlay = {"file": str(path)}
    try:
        model = timm.create_model(
            m.name, pretrained=True, pretrained_cfg_overlay=overlay, **m.timm_kwargs
        )
    except Exception as exc:
        raise VkdError([error(f"{what} ({path}) does not load: {_read_failure(exc)}")]) from None
    return model.to(device)


def create_model(m: ModelPlan, device: torch.device | str = "cpu") -> nn.Module:
    """The timm model of a plan, randomly initialised (weights are loaded separately)."""
    import timm

    return timm.create_model(m.name, pretrained=False, **m.timm_kwargs).to(device)


def teacher_weights_path(m: ModelPlan, runs_dir: str | Path) -> Path | None:
    """Where the teacher's weights come from: the exported student of the recipe it is taken
    ``from``, or its own file."""
    if m.from_name is not None and m.from_hash is not None:
        return run_dir(Path(runs_dir), m.from_name, m.from_hash) / "student.safetensors"
    if m.weights is not None:
        return Path(m.weights)
    return None


# --------------------------------------------------------------------------------------------
# Taps: one pass per model


def model_taps(terms: list[TermPlan], side: str) -> list[TapPoint]:
    """Every point of one model (``"student"`` or ``"teacher"``) that some term reads."""
    seen: dict[str, TapPoint] = {}
    for t in terms:
        for p in t.student if side == "student" else t.teacher:
            seen.setdefault(p.key, p)
    return sorted(seen.values(), key=lambda p: (p.block is None, p.block or 0, p.point))


def distilled_heads(logits: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
    """A distilled DeiT's class and distillation logits: the pair timm returns in training
    with ``distilled_training`` on (in eval mode timm returns their mean, which stands for
    both)."""
    if isinstance(logits, (tuple, list)):
        return logits[0], logits[1]
    return logits, logits


#: timm's interpolation names -> ``F.interpolate`` modes (timm's default, bicubic, otherwise).
_INTERPOLATION = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest", "box": "area"}


def teacher_resize(plan: Plan) -> tuple[tuple[int, int], str] | None:
    """The size and mode the teacher's input is resized to in the step, or None when the
    teacher sees the student's resolution. The loader produces the student's resolution; a
    teacher with another one (a 384-px ViT, a CNN at its pretrained input size, a DINOv2 at
    patch 14) gets its own, with its own interpolation."""
    t = plan.teacher
    if t is None:
        return None
    size = tuple(t.input_size)
    if size == (plan.data.image_size, plan.data.image_size):
        return None
    return (int(size[0]), int(size[1])), _INTERPOLATION.get(t.interpolation, "bicubic")


def resize_input(images: Tensor, size: tuple[int, int], mode: str) -> Tensor:
    """``images`` resized to ``size`` with ``mode`` (antialiased when shrinking, as PIL
    does)."""
    shrink = size[0] < images.shape[-2] or size[1] < images.shape[-1]
    if mode in ("bilinear", "bicubic"):
        return F.interpolate(images, size=size, mode=mode, align_corners=False, antialias=shrink)
    return F.interpolate(images, size=size, mode=mode)


def single_logits(logits: Tensor | tuple[Tensor, ...]) -> Tensor:
    """One ``[B, C]`` tensor: a distilled DeiT with ``distilled_training`` on returns its class
    and distillation heads separately in train mode; average them as timm does at inference."""
    if isinstance(logits, (tuple, list)):
        return sum(logits[1:], logits[0]) / len(logits)
    return logits


@dataclass
class CompileReport:
    """What torch.compile made of the step."""

    mode: str | None
    graphs: int
    breaks: int
    break_reasons: list[str]
    recompiles: int
    seconds: float

    def lines(self) -> list[str]:
        out = [
            f"mode: {self.mode or 'eager (not compiled)'}",
            f"graphs: {self.graphs}, graph breaks: {self.breaks}, recompiles: {self.recompiles}",
            f"trace time: {self.seconds:.2f} s",
        ]
        out += [f"break: {r}" for r in self.break_reasons]
        return out


def tap_pass(
    model: nn.Module, images: Tensor, points: list[TapPoint], prefix: int
) -> tuple[Tensor, dict[str, Tensor]]:
    """One pass of a timm ViT: its logits (a distilled DeiT's two heads averaged) and the
    requested taps, as :func:`head_pass` gives them."""
    logits, taps = head_pass(model, images, points, prefix)
    return single_logits(logits), taps


def head_pass(
    model: nn.Module,
    images: Tensor,
    points: list[TapPoint],
    prefix: int,
    cls_row: int | None = None,
) -> tuple[Tensor | tuple[Tensor, ...], dict[str, Tensor]]:
    """One pass of a timm ViT: what its head returns (a distilled DeiT in distilled training:
    the class and distillation logits) and the requested taps (patch tokens only), keyed
    by :attr:`TapPoint.key`; the final norm's patch tokens are always there as ``norm``.
    A model without ViT blocks (a CNN) runs its plain forward features and head.

    Block outputs come from timm's ``forward_intermediates``. When a point inside a block is
    tapped, the pass runs block by block: tapped blocks as their two halves (the attention
    probabilities computed explicitly where ``attn_map`` is tapped), every other block whole,
    so it keeps its fused attention. No hooks: one graph.

    ``cls_row``: a block whose class token's attention to the patch tokens (mean over heads,
    ``[B, N]``, no gradient) is returned too, as ``cls_attn`` (MaskedKD ranks the teacher's
    patches by it).
    """
    if cls_row is None and all(p.point in ("mlp", *END_POINTS) for p in points):
        blocks = sorted({p.block for p in points if p.point == "mlp" and p.block is not None})
        if blocks:
            final, feats = model.forward_intermediates(images, indices=blocks, output_fmt="NLC")
            taps = {f"blocks.{b}": f for b, f in zip(blocks, feats, strict=True)}
        else:
            final, taps = model.forward_features(images), {}
    else:
        x, taps = _block_pass(model, images, points, prefix, cls_row=cls_row)
        final = model.norm(x)
    taps["norm"] = final[:, prefix:]
    if any(p.point == "fc_norm" for p in points):  # the pooled, normalised feature: one token
        taps["fc_norm"] = model.fc_norm(model.pool(final)).unsqueeze(1)
    if any(p.point == "pre_logits" for p in points):
        # The feature the head reads (after pooling, fc_norm, head_drop), and the logits from
        # it: the head runs once, on the very tensor the tap hands over.
        taps["pre_logits"] = model.forward_head(final, pre_logits=True)
        head = model.get_classifier()
        if isinstance(head, nn.Module):  # a distilled DeiT's two heads: its own forward_head
            return head(taps["pre_logits"]), taps
    return model.forward_head(final), taps


def shallow_pass(
    model: nn.Module, images: Tensor, points: list[TapPoint], prefix: int, depth: int
) -> dict[str, Tensor]:
    """The taps of a timm ViT (as :func:`head_pass` gives them) from its first ``depth``
    blocks only: no later block, final norm or head runs. For a teacher whose logits and
    later points no term reads; the taps are the very tensors the full pass computes."""
    if all(p.point == "mlp" for p in points):
        blocks = sorted({p.block for p in points if p.block is not None})
        assert blocks and blocks[-1] < depth
        feats = model.forward_intermediates(
            images, indices=blocks, output_fmt="NLC", stop_early=True, intermediates_only=True
        )
        return {f"blocks.{b}": f for b, f in zip(blocks, feats, strict=True)}
    return _block_pass(model, images, points, prefix, depth)[1]


def _block_pass(
    model: nn.Module,
    images: Tensor,
    points: list[TapPoint],
    prefix: int,
    depth: int | None = None,
    cls_row: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """timm's ``forward_features`` before the final norm, block by block, tapping inside the
    requested blocks: the residual stream after the first ``depth`` blocks (all by default)
    and the taps (``cls_attn`` too for block ``cls_row``, see :func:`head_pass`)."""
    want: dict[int, set[str]] = {}
    for p in points:
        if p.block is not None:
            want.setdefault(p.block, set()).add(p.point)
    taps: dict[str, Tensor] = {}
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    for i, blk in enumerate(model.blocks):
        if depth is not None and i >= depth:
            break
        inside = want.get(i, set())
        if inside <= {"mlp"} and i != cls_row:
            x = blk(x)
        else:
            h = blk.norm1(x)
            if "attn_map" in inside:
                h, probs = attention_with_map(blk.attn, h)
                taps[f"blocks.{i}.attn_map"] = probs[:, :, prefix:, prefix:]
                if i == cls_row:
                    taps["cls_attn"] = probs[:, :, 0, prefix:].detach().mean(dim=1)
            elif i == cls_row:
                h, taps["cls_attn"] = attention_with_cls_row(blk.attn, h, prefix)
            else:
                h = blk.attn(h)
            x = x + blk.drop_path1(blk.ls1(h))  # MHA-out: the residual stream after attention
            if "attn" in inside:
                taps[f"blocks.{i}.attn"] = x[:, prefix:]
            x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
        if "mlp" in inside:
            taps[f"blocks.{i}"] = x[:, prefix:]
    return x, taps


def attention_with_map(attn: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """timm's ``Attention.forward`` with the attention probabilities computed explicitly and
    returned too: ``(output, probs [B, heads, N, N])``."""
    b, n, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    probs = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    out = (attn.attn_drop(probs) @ v).transpose(1, 2).reshape(b, n, attn.num_heads * attn.head_dim)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), probs


def attention_with_cls_row(attn: nn.Module, x: Tensor, prefix: int) -> tuple[Tensor, Tensor]:
    """timm's ``Attention.forward`` (fused where timm fuses it) and the class token's
    attention probabilities to the patch tokens, mean over heads: ``(output, [B, N])``. The
    class token's row is computed from the same queries and keys, without gradient (it only
    ranks patches); the output keeps its own."""
    b, n, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    with torch.no_grad():
        row = ((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)).float().softmax(dim=-1)
        scores = row[:, :, 0, prefix:].mean(dim=1)
    if getattr(attn, "fused_attn", False):
        drop = attn.attn_drop.p if attn.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
    else:
        probs = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        out = attn.attn_drop(probs) @ v
    out = attn.norm(out.transpose(1, 2).reshape(b, n, attn.num_heads * attn.head_dim))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), scores


def keep_indices(scores: Tensor, kept: int) -> Tensor:
    """The ``kept`` patches each image's ``scores`` ``[B, N]`` rank highest, ``[B, kept]``
    (a static shape: one graph whatever the batch's attention)."""
    return scores.detach().topk(kept, dim=1).indices


def masked_pass(
    model: nn.Module, images: Tensor, keep: Tensor, prefix: int
) -> Tensor | tuple[Tensor, ...]:
    """A timm ViT on some of its patch tokens (MaskedKD): the patch embedding of the whole
    image and the position embeddings, then only the patches ``keep`` ``[B, k]`` indexes, each
    with its own position embedding, behind the prefix (class, distillation, register)
    tokens; then every block, the final norm and the head. Returns what the head returns."""
    x = model._pos_embed(model.patch_embed(images))
    index = keep.unsqueeze(-1).expand(-1, -1, x.shape[-1])
    x = torch.cat([x[:, :prefix], x[:, prefix:].gather(1, index)], dim=1)
    x = model.blocks(model.norm_pre(model.patch_drop(x)))
    return model.forward_head(model.norm(x))


def term_losses(
    plan_terms: list[TermPlan], terms: nn.ModuleDict, inputs: StepInputs
) -> dict[str, Tensor]:
    """Every term on one batch's taps and logits: ``{"loss": total, term: detached value}``.
    Each term's kind says how its module is fed.

    The values are stacked and summed once, and the detached values returned are views of that
    one stack: returning each scalar term separately made DDP's graph splitting (dynamo's DDP
    optimizer) hand inductor's backward a missing gradient (measured on torch 2.14).
    """
    if not plan_terms:  # every term at weight 0: nothing to learn from
        return {"loss": inputs.s_logits.float().sum() * 0.0}
    stack = torch.stack([KINDS[t.kind].loss(terms[t.name], t, inputs).float() for t in plan_terms])
    values = stack.detach()
    out = {t.name: values[i] for i, t in enumerate(plan_terms)}
    out["loss"] = stack.sum()
    return out


class StudentSide(nn.Module):
    """The trainable half of a program: the student, the adapters and every loss.

    ``forward(images, targets, teacher_logits, teacher_taps)`` runs the student once and
    returns ``{"loss": total, term: detached value}``. Under DDP this module, and only this
    one, is wrapped: the teacher is never wrapped, synced or given gradients.
    """

    def __init__(
        self,
        plan: Plan,
        student: nn.Module,
        terms: nn.ModuleDict,
        autocast_dtype: torch.dtype | None,
    ) -> None:
        super().__init__()
        self.student = student
        self.terms = terms
        self.plan_terms = plan.terms
        self.autocast_dtype = autocast_dtype
        self.points = model_taps(plan.terms, "student")
        self.prefix = plan.student.prefix_tokens
        # A term on the distillation head (DeiT's distillation token): the two heads reach
        # the terms separately; every other logit term then reads the class head.
        self.dist_head = any(KINDS[t.kind].reads_dist_logits for t in plan.terms)
        if self.dist_head:
            student.set_distilled_training(True)
        # MaskedKD: the teacher runs after the student, on the patches the student's last
        # block's class token attends to most (set by the Program; a plain attribute, not a
        # submodule: the teacher is never part of the trainable side).
        self.masked_teacher: Callable[[Tensor, Tensor], Tensor] | None = None
        self.last_block = plan.student.depth - 1
        # The epoch the step is in, counted from 1 (what warm-up terms read): a buffer, so a
        # compiled step reads it as an input and a new epoch never recompiles; not persistent
        # (the loop sets it from the checkpoint's position).
        self.epoch: Tensor
        self.register_buffer("epoch", torch.ones((), dtype=torch.float32), persistent=False)
        # The frozen teacher's classifier head, for a kind that runs student features through
        # it: held in a tuple so it is no submodule here (DDP and FSDP never see the teacher).
        self.teacher_head: tuple[nn.Module, ...] = ()

    def logits(self, images: Tensor) -> Tensor:
        """The student's logits (evaluation of a sharded student goes through here)."""
        with _autocast(images.device.type, self.autocast_dtype):
            return single_logits(self.student(images))

    def heads(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """A distilled student's class and distillation logits, for evaluation (eval mode;
        their mean is what :meth:`logits` returns)."""
        with _autocast(images.device.type, self.autocast_dtype):
            x = self.student.forward_features(images)
            return self.student.head(x[:, 0]), self.student.head_dist(x[:, 1])

    def forward(
        self, images: Tensor, targets: Tensor, t_logits: Tensor | None, t_taps: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        # The terms run under autocast too (their adapters' matmuls and convolutions in bf16 on
        # a GPU); each computes its error and reduction in fp32.
        with _autocast(images.device.type, self.autocast_dtype):
            inputs = self.step_inputs(images, targets, t_logits, t_taps)
            return term_losses(self.plan_terms, self.terms, inputs)

    def step_inputs(
        self, images: Tensor, targets: Tensor, t_logits: Tensor | None, t_taps: dict[str, Tensor]
    ) -> StepInputs:
        """The student's pass on a batch with the teacher's outputs, as every term reads them
        (under the caller's autocast): what :meth:`forward` feeds the terms."""
        masked = self.masked_teacher if t_logits is None else None
        cls_row = self.last_block if masked is not None else None
        out, s_taps = head_pass(self.student, images, self.points, self.prefix, cls_row)
        if masked is not None:
            t_logits = masked(images, s_taps.pop("cls_attn"))
        s_dist = None
        if self.dist_head:
            s_logits, s_dist = distilled_heads(out)
        else:
            s_logits = single_logits(out)
        t_head = self.teacher_head[0] if self.teacher_head else None
        return StepInputs(
            s_logits, s_taps, t_logits, t_taps, targets, s_dist, epoch=self.epoch, t_head=t_head
        )


def fsdp_policy(dtype: torch.dtype | None) -> Any:
    """FSDP2's mixed precision for an autocast dtype: parameters gathered in ``dtype``
    (half the all-gather bytes), gradients reduced in fp32; None in fp32."""
    if dtype is None:
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


@dataclass
class _Distribution:
    """How a program is spread over processes: the DDP wrapper of its student side (kept
    outside the module tree, so state dicts and ``parameters()`` stay those of the plain
    modules) or FSDP sharding."""

    ddp: nn.Module | None = None
    sharded: bool = False


def _autocast(device_type: str, dtype: torch.dtype | None) -> Any:
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type, dtype=dtype)


@dataclass
class TeacherReference:
    """The teacher at the precision a lower one is measured against: ``held`` (``bf16``,
    ``fp8``) is how the program runs it, ``name`` (``fp32``, ``bf16``) how ``model`` runs,
    its input cast to ``dtype`` and no autocast."""

    model: nn.Module
    dtype: torch.dtype
    held: str
    name: str


class Program(nn.Module):
    """Teacher, student and distillation terms, with one forward that returns every loss.

    ``forward(images, targets) -> {"loss": total, term: detached value, ...}``; ``targets``
    are class indices ``[B]`` or mixed soft labels ``[B, C]``. The teacher is frozen: no
    gradients, eval mode, and ``.train()`` never switches it to training mode.
    """

    def __init__(
        self,
        plan: Plan,
        student: nn.Module,
        teacher: nn.Module | None,
        terms: nn.ModuleDict,
        autocast_dtype: torch.dtype | None = None,
        compile_mode: str | None = None,
    ) -> None:
        super().__init__()
        self.plan = plan
        self.core = StudentSide(plan, student, terms, autocast_dtype)
        self.teacher = teacher
        self.autocast_dtype = autocast_dtype
        self.compile_mode = compile_mode
        self._teacher_points = model_taps(plan.terms, "teacher")
        self._teacher_prefix = plan.teacher.prefix_tokens if plan.teacher else 0
        self._needs_teacher = teacher is not None and plan.teacher_used
        # Only as deep as read: the teacher stops after its deepest tapped block when nothing
        # later (logits, final norm, later blocks) is read (None: the full pass).
        self._teacher_stop: int | None = None
        if plan.teacher is not None and 0 < plan.teacher_depth < plan.teacher.depth:
            self._teacher_stop = plan.teacher_depth
        # MaskedKD: the teacher sees plan.teacher_keep patch tokens, chosen by the student's
        # attention, so it runs after the student, inside the student side's pass.
        self._teacher_keep = plan.teacher_keep if self._needs_teacher else None
        if self._teacher_keep is not None:
            self.core.masked_teacher = self.masked_teacher
        self._dist = _Distribution()
        self.teacher_dtype: torch.dtype | None = None
        # The teacher at its reference precision, kept only when asked (the fidelity probe):
        # a plain attribute, so it is not in the state dict and never trained or saved.
        self.teacher_reference: TeacherReference | None = None
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()
            if any(KINDS[t.kind].reads_teacher_head for t in plan.terms):
                self.core.teacher_head = (teacher.get_classifier(),)
        # The loader normalises for the student; a teacher with other statistics gets its own
        # input from the same tensor through a per-channel affine inside the step (no second
        # decode, no host work). None when both models normalise alike.
        affine = (
            teacher_affine(
                (plan.student.mean, plan.student.std), (plan.teacher.mean, plan.teacher.std)
            )
            if plan.teacher is not None
            else None
        )
        self.teacher_scale: Tensor | None
        self.teacher_shift: Tensor | None
        for name, values in zip(
            ("teacher_scale", "teacher_shift"), affine or (None, None), strict=True
        ):
            buffer = None if values is None else torch.tensor(values).view(1, -1, 1, 1)
            self.register_buffer(name, buffer, persistent=False)
        self.teacher_resize = teacher_resize(plan)
        self.step: Callable[..., dict[str, Tensor]] = self.forward
        if compile_mode is not None:
            self.step = torch.compile(self.forward, fullgraph=True, mode=compile_mode)
        # Evaluation runs the student in eval mode: a graph of its own, so switching between
        # training and evaluation never recompiles the training step.
        self.predict: Callable[[Tensor], Tensor] = self.predictor(student)
        self.predict_heads: Callable[[Tensor], tuple[Tensor, Tensor]] = self.student_heads
        if compile_mode is not None and self.core.dist_head:
            self.predict_heads = torch.compile(
                self.student_heads, fullgraph=True, mode=compile_mode
            )

    def hold_teacher(self, dtype: torch.dtype | None) -> None:
        """Hold the frozen teacher's weights in ``dtype`` (None: as they are); its input is
        cast to it too, so it runs in that precision with or without autocast. Call before
        the step is first compiled."""
        if self.teacher is None or dtype is None:
            return
        self.teacher.to(dtype)
        self.teacher_dtype = dtype

    def set_epoch(self, epoch: int) -> None:
        """Tell the terms which epoch the next steps belong to, counted from 1 (the loop's
        first epoch is 1): an in-place update of a buffer the step reads, so it never
        recompiles."""
        self.core.epoch.fill_(float(epoch))

    @property
    def student(self) -> nn.Module:
        return self.core.student

    @property
    def terms(self) -> nn.ModuleDict:
        return self.core.terms

    def distribute(self, device_ids: list[int] | None = None) -> None:
        """Wrap the student side (student and adapters, never the teacher) in DDP.

        Compiled, the step becomes two compiled regions: the teacher pass (one graph) and
        the DDP-wrapped student side, which dynamo's DDP optimizer splits at gradient-bucket
        boundaries so all-reduce overlaps the backward pass.
        """
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(self.core, device_ids=device_ids)
        self._dist.ddp = ddp
        if self.compile_mode is None:
            self.step = self.forward
            return
        core = torch.compile(ddp, mode=self.compile_mode)
        teacher = torch.compile(self.teacher_pass, fullgraph=True, mode=self.compile_mode)

        def step(
            images: Tensor, targets: Tensor, cached: Tensor | None = None
        ) -> dict[str, Tensor]:
            t_logits, t_taps = (cached, {}) if cached is not None else teacher(images)
            return core(images, targets, t_logits, t_taps)

        self.step = step

    def shard(self) -> None:
        """Shard the student side (student, adapters, their gradients and optimizer state)
        across the process group with FSDP2 (``fully_shard`` per transformer block, then the
        rest), for students whose replicas and optimizer state do not fit one device.

        Under bf16/fp16 autocast, parameters are gathered in that precision and gradients
        reduced in fp32 (:func:`fsdp_policy`). The frozen teacher is not sharded: it has no
        gradients or optimizer state, and gathering it again every step would cost a full
        all-gather of its weights per step; each device keeps its own copy. The step runs
        eager: per-block all-gathers are FSDP's own.
        """
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        policy = fsdp_policy(self.autocast_dtype)
        kwargs = {"mp_policy": policy} if policy is not None else {}
        for block in self.core.student.blocks:
            fully_shard(block, **kwargs)
        fully_shard(self.core, **kwargs)
        # Methods other than forward must gather the shards too.
        register_fsdp_forward_method(self.core, "logits")
        register_fsdp_forward_method(self.core, "heads")
        self._dist.sharded = True
        self.step = self.forward
        self.predict = self.core.logits
        self.predict_heads = self.core.heads

    @property
    def sharded(self) -> bool:
        """Whether the program is sharded with FSDP."""
        return self._dist.sharded

    def train(self, mode: bool = True) -> Program:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the teacher always runs as in inference
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Student and adapter parameters (what the optimizer updates)."""
        return [p for p in self.core.parameters() if p.requires_grad]

    def _autocast(self, device_type: str) -> Any:
        return _autocast(device_type, self.autocast_dtype)

    def student_logits(self, images: Tensor) -> Tensor:
        """The student's logits (for evaluation)."""
        with self._autocast(images.device.type):
            return single_logits(self.student(images))

    def predictor(self, model: nn.Module) -> Callable[[Tensor], Tensor]:
        """Evaluation logits of ``model`` (the student, or its EMA copy) as the step runs it:
        under the program's autocast and compiled when the step is. Evaluation batches are
        padded to one size (see ``train.loop.evaluate``), so this is one graph."""

        def logits(images: Tensor) -> Tensor:
            with self._autocast(images.device.type):
                return single_logits(model(images))

        if self.compile_mode is None:
            return logits
        return torch.compile(logits, fullgraph=True, mode=self.compile_mode)

    @property
    def distilled(self) -> bool:
        """Whether the student's distillation head is trained (a term reads it): evaluation
        then reports each head's accuracy besides the averaged heads'."""
        return self.core.dist_head

    def student_heads(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """A distilled student's class and distillation logits (for evaluation, eval mode;
        their mean is what :meth:`student_logits` returns)."""
        return self.core.heads(images)

    def teacher_input(self, images: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """The student's input batch as the teacher's pretrained config wants it: normalised
        with its statistics, then resized to its resolution with its interpolation, in the
        dtype the teacher is held in (or ``dtype``)."""
        if self.teacher_scale is not None and self.teacher_shift is not None:
            images = images * self.teacher_scale + self.teacher_shift
        if self.teacher_resize is not None:
            images = resize_input(images, *self.teacher_resize)
        dtype = dtype or self.teacher_dtype
        if dtype is not None:
            images = images.to(dtype)
        return images

    def teacher_logits(self, images: Tensor) -> Tensor:
        """The teacher's logits for a batch of student inputs (its accuracy at start)."""
        assert self.teacher is not None
        with torch.no_grad(), self._autocast(images.device.type):
            return single_logits(self.teacher(self.teacher_input(images)))

    def teacher_pass(self, images: Tensor) -> tuple[Tensor | None, dict[str, Tensor]]:
        """The teacher's logits and taps for a batch (no gradients), or ``(None, {})`` when
        no term needs them. A teacher whose logits no term reads stops after the plan's
        :attr:`~vitkdl.planner.Plan.teacher_depth` blocks: its logits are then None."""
        if not self._needs_teacher or self._teacher_keep is not None:
            return None, {}  # a masked teacher runs later, in the student side's pass
        assert self.teacher is not None
        with torch.no_grad(), self._autocast(images.device.type):
            if self._teacher_stop is not None:
                taps = shallow_pass(
                    self.teacher,
                    self.teacher_input(images),
                    self._teacher_points,
                    self._teacher_prefix,
                    self._teacher_stop,
                )
                return None, taps
            return tap_pass(
                self.teacher, self.teacher_input(images), self._teacher_points, self._teacher_prefix
            )

    def reference_pass(self, images: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The :attr:`teacher_reference`'s logits and the teacher's tapped points (all of
        them, at full depth) for a batch: its input in the reference's dtype, no autocast, no
        gradients."""
        ref = self.teacher_reference
        assert ref is not None
        with torch.no_grad():
            x = self.teacher_input(images, ref.dtype)
            logits, taps = tap_pass(ref.model, x, self._teacher_points, self._teacher_prefix)
        keys = {p.key for p in self._teacher_points}
        return logits, {k: v for k, v in taps.items() if k in keys}

    def masked_teacher(self, images: Tensor, scores: Tensor) -> Tensor:
        """MaskedKD: the teacher's logits on the :attr:`~vitkdl.planner.Plan.teacher_keep`
        patches that ``scores`` ``[B, N]`` (the student's class-token attention) rank
        highest, plus its prefix tokens (no gradient, through the selection or the teacher)."""
        assert self.teacher is not None and self._teacher_keep is not None
        with torch.no_grad(), self._autocast(images.device.type):
            keep = keep_indices(scores, self._teacher_keep)
            seen = self.teacher_input(images)
            return single_logits(masked_pass(self.teacher, seen, keep, self._teacher_prefix))

    def forward(
        self, images: Tensor, targets: Tensor, cached: Tensor | None = None
    ) -> dict[str, Tensor]:
        """``cached``: the teacher's logits for the batch from a teacher cache
        (:mod:`vitkdl.train.cache`); the teacher then does not run."""
        if cached is not None:
            t_logits, t_taps = cached, {}
        else:
            t_logits, t_taps = self.teacher_pass(images)
        core = self._dist.ddp if self._dist.ddp is not None else self.core
        return core(images, targets, t_logits, t_taps)

    def compile_report(self, images: Tensor, targets: Tensor) -> CompileReport:
        """Trace the step with ``torch._dynamo.explain`` (graphs and breaks, no inductor).

        ``explain`` resets dynamo before and after tracing, so a step compiled earlier
        compiles again on its next call: report before training, not in the middle of it.
        """
        import torch._dynamo

        torch._dynamo.reset()
        start = time.perf_counter()
        explanation = torch._dynamo.explain(self.forward)(images, targets)
        seconds = time.perf_counter() - start
        reasons = [str(getattr(b, "reason", b)).splitlines()[0] for b in explanation.break_reasons]
        # Recompiles: graphs traced again by a second step of the same shapes (a fresh mask,
        # drop path): should be 0. Counted with a backend that runs the traced graphs as is.
        torch._dynamo.reset()
        graphs: list[Any] = []

        def count(gm: Any, example_inputs: Any) -> Any:
            graphs.append(gm)
            return gm.forward

        step = torch.compile(self.forward, backend=count)
        step(images, targets)
        first = len(graphs)
        step(images, targets)
        torch._dynamo.reset()
        return CompileReport(
            mode=self.compile_mode,
            graphs=explanation.graph_count,
            breaks=explanation.graph_break_count,
            break_reasons=reasons,
            recompiles=len(graphs) - first,
            seconds=seconds,
        )


def build_teacher(
    m: ModelPlan, device: torch.device, *, load: bool = True, runs_dir: str | Path = "runs"
) -> nn.Module:
    """The teacher model of a plan on ``device``, its weights loaded (``load``), in fp32 as
    loaded: what :func:`build` holds (then in its precision) and the fidelity probe's
    reference."""
    pretrained = load and m.pretrained and m.from_recipe is None
    # Off the student's random stream (the teacher's initialisation draws from a fork):
    # what follows (adapters, drop path, masks) is the same with a teacher, a cached one
    # or another one.
    with torch.random.fork_rng(devices=[]):
        teacher = (pretrained_model if pretrained else create_model)(m, device)
    path = teacher_weights_path(m, runs_dir)
    if load and path is not None and not pretrained:
        if not path.is_file() and m.from_recipe is not None:
            source = m.from_recipe
            message = f"the teacher is the final student of {source}, and {path} does not exist yet"
            hint = f"vitkdl run {source} (or `vitkdl run` this recipe, which trains it first)"
            raise VkdError([error(message, hint=hint)])
        load_weights(teacher, path, "teacher")
    return teacher


def build(
    plan: Plan,
    device: str | torch.device | None = None,
    *,
    load: bool = True,
    runs_dir: str | Path = "runs",
    compile: str | None = None,
    reference: bool = False,
) -> Program:
    """Build the :class:`Program` of a plan on ``device``.

    ``reference``: when the teacher is held in a lower precision than it was loaded in (bf16,
    or FP8 linears), keep a copy at the precision one step up (fp32, or bf16 for FP8) as
    :attr:`Program.teacher_reference`, for the fidelity probe.

    ``load`` reads the weight files the plan names (the teacher's, or the exported student of
    the recipe it is taken ``from`` under ``runs_dir``); ``compile`` overrides the plan's
    compile mode (``"off"``, ``"default"``, ``"max-autotune"``, ``"auto"``).
    """
    dev = resolve_device(device)
    if dev.type == "cuda":  # TF32 for the matmuls left in fp32 (bf16 autocast does the rest)
        torch.set_float32_matmul_precision("high")
    if load and plan.student.pretrained:
        student = pretrained_model(plan.student, dev)
    else:
        student = create_model(plan.student, dev)
    if load and plan.student.weights:
        load_weights(student, plan.student.weights, "student")
    teacher = None
    if plan.teacher is not None and plan.cache is None:  # cached: its logits are read
        teacher = build_teacher(plan.teacher, dev, load=load, runs_dir=runs_dir)
    terms = nn.ModuleDict({t.name: KINDS[t.kind].module(t) for t in plan.terms}).to(dev)
    mode = resolve_compile(compile or plan.compile, dev)
    autocast_dtype = resolve_precision(plan.precision, dev)
    program = Program(
        plan,
        student,
        teacher,
        terms,
        autocast_dtype=autocast_dtype,
        compile_mode=mode,
    ).to(dev)
    written = plan.teacher.precision if plan.teacher is not None else "auto"
    held = teacher_precision(dev, autocast_dtype, written)
    if reference and program.teacher is not None and held is not None and written != "fp8":
        program.teacher_reference = TeacherReference(
            copy.deepcopy(program.teacher), torch.float32, precision_name(held), "fp32"
        )
    program.hold_teacher(held)
    if written == "fp8" and program.teacher is not None:
        if reference:
            program.teacher_reference = TeacherReference(
                copy.deepcopy(program.teacher), torch.bfloat16, "fp8", "bf16"
            )
        float8_teacher(program.teacher, dev)
    return program
