"""Stage 4: checked spec -> :class:`Plan`, the resolved, printable description of a run.

The plan is pure data (pydantic): absolute block indices, tensor shapes on both sides of every
term, adapter modules with parameter counts, each term's weight and per-element coefficient,
the total loss as a formula, the data pipeline, optimizer, schedule, precision, compile mode and
the cost per image. ``vitkdl explain`` prints it; :mod:`vitkdl.program` builds from it. Nothing
here allocates a tensor.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from vitkdl.checks import Context, default_classes
from vitkdl.models import ModelFacts
from vitkdl.sources import input_norm, split_sizes
from vitkdl.spec import (
    GenerateSpec,
    KDSpec,
    LabelsSpec,
    MimicSpec,
    ModelSpec,
    NKDSpec,
    RecipeSpec,
)


class _Plain(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelPlan(_Plain):
    """One model as it will be built."""

    role: Literal["teacher", "student"]
    name: str
    arch: str
    tag: str | None
    family: str
    timm_kwargs: dict[str, Any]
    width: int
    depth: int
    heads: int
    prefix_tokens: int
    grid: tuple[int, int]
    tokens: int
    img_size: int
    patch_size: int
    in_chans: int
    num_classes: int
    params: int
    forward_flops: int
    weights: str | None
    from_recipe: str | None
    from_name: str | None
    from_hash: str | None
    trainable: bool
    # The per-channel statistics this model's input is normalised with (its own pretrained
    # config, matched to its channels and the data source; see vitkdl.sources.input_norm).
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    crop_pct: float


class AdapterPlan(_Plain):
    """A module the term trains along with the student."""

    name: str
    module: str
    params: int


class TermPlan(_Plain):
    """One distillation term, resolved."""

    name: str
    kind: Literal["mimic", "generate", "kd", "nkd", "labels"]
    student_taps: list[str]
    teacher_taps: list[str]
    student_blocks: list[int | str]
    teacher_blocks: list[int | str]
    student_shape: list[int]
    teacher_shape: list[int]
    adapters: list[AdapterPlan]
    adapter_params: int
    adapter_flops: int
    weight: float
    coefficient: float
    reduction: str
    formula: str
    options: dict[str, Any]


class DataPlan(_Plain):
    source: str
    root: str | None
    image_size: int
    in_chans: int
    batch_size: int
    global_batch: int
    workers: int
    augment: str
    mixup: float
    cutmix: float
    smoothing: float
    num_classes: int
    train_images: int | None
    val_images: int | None


class OptimizerPlan(_Plain):
    name: str
    lr: float
    weight_decay: float
    kwargs: dict[str, Any]
    no_weight_decay: str
    trainable_params: int


class SchedulePlan(_Plain):
    name: str
    epochs: int
    warmup_epochs: float
    min_lr: float
    warmup_lr: float
    per: str
    decay_epochs: float | None
    decay_rate: float


class CostPlan(_Plain):
    """FLOPs per training image (2 per multiply-add; backward counted as 2x forward)."""

    teacher_forward: int
    student_forward_backward: int
    adapters_forward_backward: int
    total: int


class Plan(_Plain):
    """Everything the compiler will build and run, resolved."""

    recipe: str
    file: str
    hash: str
    extends: list[str]
    overrides: list[str]
    student: ModelPlan
    teacher: ModelPlan | None
    terms: list[TermPlan]
    loss: str
    data: DataPlan
    optimizer: OptimizerPlan
    schedule: SchedulePlan
    epochs: int
    clip_grad: float | None
    ema: float | None
    precision: str
    compile: str
    shard: str
    seed: int
    eval_every: int
    checkpoint_every: int
    log_every: int
    world_size: int
    cost: CostPlan


PRECISION = {"auto": "auto (bf16 autocast on CUDA with bf16 support, fp32 otherwise)",
              "bf16": "bf16 autocast", "fp16": "fp16 autocast with loss scaling", "fp32": "fp32"}
COMPILE = {"auto": "auto (torch.compile on CUDA, eager on CPU)", "off": "eager",
            "default": "torch.compile", "max-autotune": "torch.compile mode=max-autotune"}


def _model_plan(spec: ModelSpec, facts: ModelFacts, num_classes: int | None,
                source: str) -> ModelPlan:
    mean, std = input_norm(source, facts.mean, facts.std, facts.in_chans)
    return ModelPlan(
        role=spec.role, name=facts.name, arch=facts.arch, tag=facts.tag, family=facts.family,
        timm_kwargs=spec.timm_kwargs(num_classes), width=facts.embed_dim, depth=facts.depth,
        heads=facts.num_heads, prefix_tokens=facts.num_prefix_tokens, grid=facts.grid,
        tokens=facts.num_patches, img_size=facts.img_size[0], patch_size=facts.patch_size[0],
        in_chans=facts.in_chans, num_classes=facts.num_classes, params=facts.params,
        forward_flops=facts.flops, weights=spec.weights, from_recipe=spec.from_recipe,
        from_name=spec.from_name, from_hash=spec.from_hash, trainable=spec.role == "student",
        mean=mean, std=std, interpolation=facts.interpolation, crop_pct=facts.crop_pct)


def _linear(name: str, d_in: int, d_out: int) -> AdapterPlan:
    return AdapterPlan(name=name, module=f"Linear({d_in}, {d_out})", params=d_in * d_out + d_out)


def _tap_name(i: int | str) -> str:
    return "norm" if i == "norm" else f"blocks.{i}"


def _feature_term(term: MimicSpec | GenerateSpec, ctx: Context) -> TermPlan:
    s, t = ctx.student, ctx.teacher
    assert s is not None and t is not None
    sb, tb = ctx.taps[(term.name, "student")], ctx.taps[(term.name, "teacher")]
    n, ds, dt = s.num_patches, s.embed_dim, t.embed_dim
    adapters: list[AdapterPlan] = []
    if isinstance(term, MimicSpec):
        layers = len(sb)
        for i in range(layers):
            if term.align == "identity":
                continue
            adapters.append(_linear(f"align.{i}", ds, dt))
            if term.align == "mlp":
                adapters.append(_linear(f"align.{i}.fc2", dt, dt))
        elements = layers * n * dt
        if term.loss == "mse":
            coefficient = term.weight * elements
            reduction = f"sum over {layers} x {n} tokens x {dt} channels / batch"
            formula = f"{term.weight:g} * sum((align(s) - t)^2) / B"
        else:
            coefficient = term.weight * layers
            reduction = "mean over tokens and channels, summed over layers"
            formula = f"{term.weight:g} * sum_layers mean((align(s) - t)^2)"
        options: dict[str, Any] = {"align": term.align, "loss": term.loss, "layers": layers}
    else:
        if term.align != "identity":
            adapters.append(_linear("align", ds, dt))
        adapters.append(AdapterPlan(name="mask_token", module=f"Parameter(1, 1, {dt})",
                                    params=dt))
        conv = 9 * dt * dt + dt
        adapters.append(AdapterPlan(name="generator",
                                    module=f"Conv3x3({dt}, {dt}) - ReLU - Conv3x3({dt}, {dt})",
                                    params=2 * conv))
        masked = n - int(n * (1 - term.mask))
        coefficient = term.weight * masked * dt / term.mask
        reduction = (f"sum over {masked} masked of {n} tokens x {dt} channels / "
                     f"(batch x {term.mask:g})")
        formula = (f"{term.weight:g} * sum_masked((gen(mask(align(s))) - t)^2) / "
                   f"(B * {term.mask:g})")
        options = {"mask": term.mask, "masked_tokens": masked, "generator": term.generator,
                   "align": term.align, "grid": list(t.grid)}
    # FLOPs per image: linear adapters run on every tapped token, the generator's convs on the
    # whole grid; forward + backward = 3x forward.
    fwd = 0
    for a in adapters:
        if a.module.startswith("Linear"):
            fwd += 2 * (a.params - int(a.module.split(", ")[1].rstrip(")"))) * n
        elif a.name == "generator":
            fwd += 2 * 2 * 9 * dt * dt * n
    return TermPlan(
        name=term.name, kind=term.kind,
        student_taps=[tap.text() for tap in term.student],
        teacher_taps=[tap.text() for tap in term.teacher],
        student_blocks=sb, teacher_blocks=tb,
        student_shape=[n, ds], teacher_shape=[n, dt], adapters=adapters,
        adapter_params=sum(a.params for a in adapters), adapter_flops=3 * fwd,
        weight=term.weight, coefficient=coefficient, reduction=reduction, formula=formula,
        options=options)


def _logit_term(term: KDSpec | NKDSpec | LabelsSpec, ctx: Context, smoothing: float) -> TermPlan:
    classes = ctx.student.num_classes if ctx.student else 0
    if isinstance(term, KDSpec):
        t2 = term.temperature ** 2
        formula = (f"{term.weight:g} * {t2:g} * KL(softmax(t/{term.temperature:g}) || "
                   f"softmax(s/{term.temperature:g}))")
        options: dict[str, Any] = {"temperature": term.temperature}
        reduction = "sum over classes, mean over batch"
    elif isinstance(term, NKDSpec):
        formula = (f"{term.weight:g} * (-p_t[y] log p_s[y] + {term.gamma:g} * "
                   f"{term.temperature ** 2:g} * CE(q_t, q_s) over non-target classes)")
        options = {"temperature": term.temperature, "gamma": term.gamma}
        reduction = "mean over batch"
    else:
        smooth = term.smoothing if term.smoothing is not None else smoothing
        formula = f"{term.weight:g} * CE(s, y, smoothing={smooth:g})"
        options = {"smoothing": smooth}
        reduction = "mean over batch"
    teacher_side = [] if term.kind == "labels" else ["teacher.head"]
    return TermPlan(
        name=term.name, kind=term.kind, student_taps=["student.head"], teacher_taps=teacher_side,
        student_blocks=["head"], teacher_blocks=["head"] if teacher_side else [],
        student_shape=[classes], teacher_shape=[classes] if teacher_side else [],
        adapters=[], adapter_params=0, adapter_flops=0, weight=term.weight,
        coefficient=term.weight, reduction=reduction, formula=formula, options=options)


def make_plan(spec: RecipeSpec, ctx: Context, world_size: int = 1) -> Plan:
    """Resolve a checked spec into a :class:`Plan` (call after the checks found no error)."""
    assert spec.student is not None and ctx.student is not None
    data = spec.data
    student = _model_plan(spec.student, ctx.student, default_classes(spec, spec.student),
                          data.source)
    teacher = None
    if spec.teacher is not None and ctx.teacher is not None:
        teacher = _model_plan(spec.teacher, ctx.teacher, default_classes(spec, spec.teacher),
                              data.source)
    terms: list[TermPlan] = []
    for term in spec.terms:
        if isinstance(term, (MimicSpec, GenerateSpec)):
            terms.append(_feature_term(term, ctx))
        else:
            terms.append(_logit_term(term, ctx, data.smoothing))
    terms = [t for t in terms if t.weight > 0 or t.kind != "labels"]
    loss = " + ".join(f"[{t.name}] {t.formula}" for t in terms) or "0"
    image_size = data.image_size or student.img_size
    train_images, val_images = split_sizes(data.source, data.size, data.batch_size)
    workers = data.workers if data.workers is not None else (
        min(8, os.cpu_count() or 1) if data.source == "imagefolder" else 0)
    adapters = sum(t.adapter_params for t in terms)
    opt = spec.train.optimizer
    sched = spec.train.schedule
    teacher_fwd = teacher.forward_flops if teacher else 0
    adapter_flops = sum(t.adapter_flops for t in terms)
    cost = CostPlan(teacher_forward=teacher_fwd,
                    student_forward_backward=3 * student.forward_flops,
                    adapters_forward_backward=adapter_flops,
                    total=teacher_fwd + 3 * student.forward_flops + adapter_flops)
    return Plan(
        recipe=spec.name, file=spec.file, hash=spec.hash(), extends=list(spec.extends),
        overrides=list(spec.overrides), student=student, teacher=teacher, terms=terms,
        loss=loss,
        data=DataPlan(source=data.source, root=data.root, image_size=image_size,
                      in_chans=student.in_chans, batch_size=data.batch_size,
                      global_batch=data.batch_size * world_size, workers=workers,
                      augment=data.augment, mixup=data.mixup, cutmix=data.cutmix,
                      smoothing=data.smoothing, num_classes=student.num_classes,
                      train_images=train_images, val_images=val_images),
        optimizer=OptimizerPlan(name=opt.name, lr=opt.lr, weight_decay=opt.weight_decay,
                                kwargs=opt.kwargs,
                                no_weight_decay="norms, biases, position embeddings, "
                                                "class tokens, mask tokens",
                                trainable_params=student.params + adapters),
        schedule=SchedulePlan(name=sched.name, epochs=spec.train.epochs,
                              warmup_epochs=sched.warmup_epochs, min_lr=sched.min_lr,
                              warmup_lr=sched.warmup_lr, per="iteration",
                              decay_epochs=sched.decay_epochs, decay_rate=sched.decay_rate),
        epochs=spec.train.epochs, clip_grad=spec.train.clip_grad, ema=spec.train.ema,
        precision=spec.train.precision, compile=spec.train.compile, shard=spec.train.shard,
        seed=spec.train.seed, eval_every=spec.train.eval_every,
        checkpoint_every=spec.train.checkpoint_every, log_every=spec.train.log_every,
        world_size=world_size, cost=cost)
