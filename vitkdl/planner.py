"""Stage 4: checked spec -> :class:`Plan`, the resolved description of a run, as data.

The plan holds keys and numbers only: absolute tap points, tensor shapes on both sides of every
term, adapters with parameter and FLOP counts, each term's weight and per-element coefficient
and its kind's options, the data pipeline, optimizer, schedule, precision, compile mode and the
cost per image. ``vitkdl explain`` turns it into words (asking each term's kind for its
formula); :mod:`vitkdl.program` builds from it. Nothing here allocates a tensor.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from vitkdl.checks import Context, default_classes
from vitkdl.errors import Diagnostic, warning
from vitkdl.models import ModelFacts
from vitkdl.optim import NO_DECAY_NAMES
from vitkdl.plain import Plain as _Plain
from vitkdl.sources import input_norm, source, split_sizes
from vitkdl.spec import DataSpec, ModelSpec, RecipeSpec, checkpoint_interval
from vitkdl.terms import KINDS, needs_teacher
from vitkdl.terms.base import AdapterPlan, TapPoint, TermPlan

__all__ = [
    "AdapterPlan",
    "CostPlan",
    "DataPlan",
    "ModelPlan",
    "OptimizerPlan",
    "Plan",
    "SchedulePlan",
    "TapPoint",
    "TermPlan",
    "coefficient_warnings",
    "data_plan",
    "make_plan",
]


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
    # The resolution this model sees (h, w): a ViT's img_size, else its pretrained config's
    # input size or the img_size written for it. The loader produces the student's; a teacher
    # at another one has its input resized in the step with its own interpolation.
    input_size: tuple[int, int]
    vit: bool = True  # ViT blocks on one patch grid (taps); else logit terms only
    distilled: bool = False  # DeiT's distillation token and head
    # `pretrained = true`: the timm tag loaded through the Hugging Face hub cache.
    pretrained: bool = False
    pretrained_tag: str | None = None
    hf_hub_id: str | None = None
    hf_hub_filename: str | None = None
    pretrained_classes: int | None = None
    # How a frozen teacher's weights are held (`precision`): auto, fp32, bf16 or fp8.
    precision: Literal["auto", "fp32", "bf16", "fp8"] = "auto"
    # MaskedKD (`keep`): the share of its patch tokens a frozen teacher sees, as written.
    keep: float | None = None


class DataPlan(_Plain):
    """The data pipeline, resolved: all that :func:`vitkdl.train.data.build_loaders` reads.

    A new data field is a field of :class:`~vitkdl.spec.DataSpec`, one here (resolved in
    :func:`data_plan`) and its use in the loader.
    """

    source: str
    root: str | None
    image_size: int  # the square side the loader produces (the student's resolution)
    in_chans: int  # the student's
    batch_size: int  # per device
    global_batch: int
    workers: int  # per device; the loader uses at most the running machine's CPU count
    augment: str
    mixup: float
    cutmix: float
    smoothing: float
    num_classes: int  # the student's head (``synthetic``: the classes it draws)
    train_images: int | None  # None: known once the data is read (``synthetic``: its size)
    val_images: int | None
    # The student's input as its pretrained config wants it (vitkdl.sources.input_norm):
    # per-channel statistics matched to in_chans, resize interpolation and eval crop.
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    crop_pct: float
    # The data stream's (data.seed, else train.seed): the order, each sample's augmentation,
    # each batch's mixup/cutmix and ``synthetic`` content; never the student's.
    seed: int
    # hfds / wds (see vitkdl.sources): hub name, splits, validation shards, columns
    name: str | None = None
    split: str = "train"
    val_split: str | None = None
    val_root: str | None = None
    image_key: str | None = None
    label_key: str | None = None


class OptimizerPlan(_Plain):
    name: str
    lr: float
    weight_decay: float
    kwargs: dict[str, Any]
    no_weight_decay: tuple[str, ...]  # parameter-name endings kept out of weight decay
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


#: The logits a teacher cache keeps per sample when ``topk`` is not written (TinyViT's).
CACHE_TOPK = 100


class CachePlan(_Plain):
    """A teacher-output cache (``teacher { cache = PATH  topk = K }``), resolved: where it
    lies, what it keeps per sample and how big it is (:mod:`vitkdl.train.cache`)."""

    path: str
    topk: int | None  # None: every class, fp32 (exact); else the top k (fp16 values + indices)
    classes: int
    bytes_per_sample: int
    samples_per_epoch: int | None  # None: known once the data is read
    epochs: int

    @property
    def exact(self) -> bool:
        """Whether the cache keeps every logit, as computed (``topk = all``)."""
        return self.topk is None

    @property
    def total_bytes(self) -> int | None:
        """The cache's size over the run's epochs (None: the data's size is not known yet)."""
        if self.samples_per_epoch is None:
            return None
        return self.bytes_per_sample * self.samples_per_epoch * self.epochs


def cache_bytes_per_sample(topk: int | None, classes: int) -> int:
    """What one sample costs in a cache: every logit in fp32, or the top k as fp16 values with
    int16 indices (int32 beyond 32767 classes)."""
    if topk is None:
        return 4 * classes
    return topk * (2 + (2 if classes <= 32767 else 4))


def cache_plan(spec: RecipeSpec, data: DataPlan, classes: int) -> CachePlan | None:
    """The cache of the recipe's teacher, or None when it has none."""
    t = spec.teacher
    if t is None or t.cache is None:
        return None
    k = CACHE_TOPK if t.topk is None else t.topk
    topk = None if k == "all" or int(k) >= classes else int(k)
    samples = None
    if data.train_images is not None:  # drop_last: whole global batches per epoch
        samples = data.train_images // data.global_batch * data.global_batch
    return CachePlan(
        path=t.cache,
        topk=topk,
        classes=classes,
        bytes_per_sample=cache_bytes_per_sample(topk, classes),
        samples_per_epoch=samples,
        epochs=spec.train.epochs,
    )


class Plan(_Plain):
    """Everything the compiler will build and run, resolved."""

    recipe: str
    file: str
    hash: str
    extends: list[str]
    overrides: list[str]
    student: ModelPlan
    teacher: ModelPlan | None
    teacher_used: bool  # some term reads the teacher: it is built, run and evaluated
    # The teacher's blocks the step runs (0 when no term reads the teacher): all of them, or,
    # when no term reads its logits or any point after block k, k + 1 (the step stops there:
    # no later block, final norm or head). See :func:`teacher_depth`.
    teacher_depth: int = 0
    # MaskedKD (`teacher { keep = 0.5 }`): the patch tokens the teacher sees, k = round(keep *
    # N), those the student's last block's class token attends to most; None: all of them
    # (no `keep`, keep = 1, or no term reads the teacher). See :func:`teacher_keep`.
    teacher_keep: int | None = None
    terms: list[TermPlan]
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
    checkpoint_every: int | float  # in checkpoint_unit
    log_every: int
    world_size: int
    cost: CostPlan
    checkpoint_unit: Literal["epochs", "steps", "minutes"] = "epochs"
    # The teacher's logits read from a cache instead of computed in the step (None: none).
    cache: CachePlan | None = None


PRECISION = {
    "auto": "auto (bf16 autocast on CUDA with bf16 support, fp32 otherwise)",
    "bf16": "bf16 autocast",
    "fp16": "fp16 autocast with loss scaling",
    "fp32": "fp32",
}
COMPILE = {
    "auto": "auto (torch.compile on CUDA, eager on CPU)",
    "off": "eager",
    "default": "torch.compile",
    "max-autotune": "torch.compile mode=max-autotune",
}


def _model_plan(
    spec: ModelSpec,
    facts: ModelFacts,
    num_classes: int | None,
    source: str,
    image_size: int | None = None,
) -> ModelPlan:
    """One model's plan; ``image_size``: the data's, which a student without ViT blocks takes
    as its resolution (a ViT's is its img_size)."""
    mean, std = input_norm(source, facts.mean, facts.std, facts.in_chans)
    kwargs = spec.timm_kwargs(num_classes)
    if not facts.takes_img_size:  # a CNN: img_size is only the resolution it is fed
        kwargs.pop("img_size", None)
    # A teacher `from` a recipe is that recipe's exported student, whatever it started from.
    pretrained = spec.pretrained and spec.from_recipe is None
    input_size = facts.img_size
    if not facts.vit and image_size is not None and spec.img_size is None:
        input_size = (image_size, image_size)
    resolved: dict[str, Any] = {
        "timm_kwargs": kwargs,
        "width": facts.embed_dim,
        "heads": facts.num_heads,
        "prefix_tokens": facts.num_prefix_tokens,
        "tokens": facts.num_patches,
        "img_size": input_size[0],
        "input_size": input_size,
        "patch_size": facts.patch_size[0],
        "forward_flops": facts.flops,
        "trainable": spec.role == "student",
        "mean": mean,
        "std": std,
        "pretrained": pretrained,
        "pretrained_tag": facts.pretrained_tag if pretrained else None,
        "hf_hub_id": facts.hf_hub_id if pretrained else None,
        "hf_hub_filename": facts.hf_hub_filename if pretrained else None,
    }
    # Every other field is the facts' field of that name (the model as built), else the
    # spec's (as written: role, weights, the recipe a teacher comes from).
    fields = {}
    for name in ModelPlan.model_fields.keys() - resolved.keys():
        fields[name] = getattr(facts if name in ModelFacts.model_fields else spec, name)
    return ModelPlan(**fields, **resolved)


def data_plan(spec: RecipeSpec, student: ModelPlan, world_size: int = 1) -> DataPlan:
    """The data pipeline of ``spec`` feeding ``student`` on ``world_size`` devices: the
    written fields, and what they leave open resolved (resolution, channels, classes, split
    sizes, workers, the student's normalisation, the seed)."""
    data = spec.data
    train_images, val_images = split_sizes(data.source, data.size, data.batch_size)
    workers = data.workers
    if workers is None:  # files to decode: a worker per core, up to 8
        workers = min(8, os.cpu_count() or 1) if source(data.source).decodes else 0
    resolved: dict[str, Any] = {
        "image_size": data.image_size or student.img_size,
        "in_chans": student.in_chans,
        "global_batch": data.batch_size * world_size,
        "workers": workers,
        "num_classes": student.num_classes,
        "train_images": train_images,
        "val_images": val_images,
        "mean": student.mean,
        "std": student.std,
        "interpolation": student.interpolation,
        "crop_pct": student.crop_pct,
        "seed": spec.train.seed if data.seed is None else data.seed,
    }
    # Every other field of the plan is the spec's field of that name, as written.
    written = {
        name: getattr(data, name)
        for name in DataPlan.model_fields
        if name in DataSpec.model_fields and name not in resolved
    }
    return DataPlan(**written, **resolved)


def make_plan(spec: RecipeSpec, ctx: Context, world_size: int = 1) -> Plan:
    """Resolve a checked spec into a :class:`Plan` (call after the checks found no error)."""
    assert spec.student is not None and ctx.student is not None
    data = spec.data
    student = _model_plan(
        spec.student, ctx.student, default_classes(spec, spec.student), data.source, data.image_size
    )
    teacher = None
    if spec.teacher is not None and ctx.teacher is not None:
        teacher = _model_plan(
            spec.teacher, ctx.teacher, default_classes(spec, spec.teacher), data.source
        )
    terms = term_plans(spec, ctx)
    adapters = sum(t.adapter_params for t in terms)
    opt = spec.train.optimizer
    sched = spec.train.schedule
    teacher_used = teacher is not None and needs_teacher(t.kind for t in terms)
    depth = teacher_depth(teacher, terms) if teacher_used else 0
    keep = teacher_keep(teacher) if teacher_used else None
    teacher_fwd = teacher_flops(teacher, depth, keep) if teacher is not None and teacher_used else 0
    data_resolved = data_plan(spec, student, world_size)
    cache = (
        cache_plan(spec, data_resolved, teacher.num_classes) if teacher_used and teacher else None
    )
    if cache is not None:  # the step reads the teacher's logits from the cache
        teacher_fwd = 0
    adapter_flops = sum(t.adapter_flops for t in terms)
    cost = CostPlan(
        teacher_forward=teacher_fwd,
        student_forward_backward=3 * student.forward_flops,
        adapters_forward_backward=adapter_flops,
        total=teacher_fwd + 3 * student.forward_flops + adapter_flops,
    )
    return Plan(
        recipe=spec.name,
        file=spec.file,
        hash=spec.hash(),
        extends=list(spec.extends),
        overrides=list(spec.overrides),
        student=student,
        teacher=teacher,
        teacher_used=teacher_used,
        teacher_depth=depth,
        teacher_keep=keep,
        terms=terms,
        data=data_resolved,
        optimizer=OptimizerPlan(
            name=opt.name,
            lr=opt.lr,
            weight_decay=opt.weight_decay,
            kwargs=opt.kwargs,
            no_weight_decay=NO_DECAY_NAMES,
            trainable_params=student.params + adapters,
        ),
        schedule=SchedulePlan(
            name=sched.name,
            epochs=spec.train.epochs,
            warmup_epochs=sched.warmup_epochs,
            min_lr=sched.min_lr,
            warmup_lr=sched.warmup_lr,
            per="iteration",
            decay_epochs=sched.decay_epochs,
            decay_rate=sched.decay_rate,
        ),
        epochs=spec.train.epochs,
        clip_grad=spec.train.clip_grad,
        ema=spec.train.ema,
        precision=spec.train.precision,
        compile=spec.train.compile,
        shard=spec.train.shard,
        seed=spec.train.seed,
        eval_every=spec.train.eval_every,
        checkpoint_every=checkpoint_interval(spec.train.checkpoint_every)[0],
        checkpoint_unit=checkpoint_interval(spec.train.checkpoint_every)[1],
        log_every=spec.train.log_every,
        world_size=world_size,
        cost=cost,
        cache=cache,
    )


def without_cache(plan: Plan) -> Plan:
    """``plan`` with its teacher run in the step rather than read from a cache (what the
    cache pass, the probe and bench build), its cost counting the teacher's forward again."""
    if plan.cache is None or plan.teacher is None:
        return plan
    flops = teacher_flops(plan.teacher, plan.teacher_depth)
    cost = plan.cost.model_copy(
        update={
            "teacher_forward": flops,
            "total": plan.cost.total - plan.cost.teacher_forward + flops,
        }
    )
    return plan.model_copy(update={"cache": None, "cost": cost})


def teacher_depth(teacher: ModelPlan | None, terms: list[TermPlan]) -> int:
    """How many of the teacher's blocks the step runs: its whole depth when a term reads its
    logits, its final norm or pooled feature (or it has no ViT blocks), else up to and
    including the deepest block some term taps."""
    if teacher is None:
        return 0
    points = [p for t in terms for p in t.teacher]
    if (
        not teacher.vit
        or not points
        or any(KINDS[t.kind].reads_teacher_logits for t in terms)
        or any(p.block is None for p in points)
    ):
        return teacher.depth
    return max(p.block for p in points if p.block is not None) + 1


def teacher_keep(teacher: ModelPlan | None) -> int | None:
    """MaskedKD: how many patch tokens the teacher sees, ``round(keep * N)`` (at least one),
    or None when it sees all of them (no ``keep``, or one that rounds to every token)."""
    if teacher is None or teacher.keep is None or not teacher.vit:
        return None
    kept = max(1, round(teacher.keep * teacher.tokens))
    return kept if kept < teacher.tokens else None


def teacher_flops(teacher: ModelPlan, depth: int, kept: int | None = None) -> int:
    """Forward FLOPs per image of the teacher run through its first ``depth`` blocks (its whole
    forward at full depth), on ``kept`` of its patch tokens when masked (all by default). The
    counted forward is the patch embedding, ``teacher.depth`` equal blocks and the head(s)
    (norms and additions count no FLOPs), so one block's share is what is left after the
    patch embedding and head; exact for timm's plain ViT blocks. A block on T tokens costs a
    part linear in T (projections, MLP) plus the attention scores' 4 T^2 D; the patch
    embedding runs on every patch (the tokens are chosen after it)."""
    full = teacher.forward_flops
    if (depth >= teacher.depth or teacher.depth == 0) and kept is None:
        return full
    stem = 2 * teacher.tokens * teacher.in_chans * teacher.patch_size**2 * teacher.width
    head = (2 if teacher.distilled else 1) * 2 * teacher.width * teacher.num_classes
    block = (full - stem - head) / teacher.depth
    if block <= 0:  # a stem other than one patch projection (a hybrid): scale the whole
        return round(full * min(depth, teacher.depth) / teacher.depth)
    if kept is not None:
        seen, masked = teacher.tokens + teacher.prefix_tokens, kept + teacher.prefix_tokens
        scores = 4 * teacher.width * seen**2
        per_token = max(0.0, block - scores) / seen
        block = per_token * masked + 4 * teacher.width * masked**2
    if depth < teacher.depth:  # stops early: no later block, final norm or head
        return round(stem + depth * block)
    return round(stem + teacher.depth * block + head)


def term_plans(spec: RecipeSpec, ctx: Context) -> list[TermPlan]:
    """Each term resolved by its own kind; a term at weight 0 is left out (nothing to build)."""
    return [KINDS[t.kind].plan(t, ctx) for t in spec.terms if t.weight > 0]


#: The per-element coefficients (a term's weight on its mean-reduced loss) a recipe may use
#: without a warning. The shipped recipes span 0.02 (quickstart's generate) to 12 (DeiT-B's
#: mimic) and the logit terms sit at 0.5-1, so a coefficient above 1e3 outweighs every other
#: term by two orders of magnitude or more (``mimic { loss = relation }`` at weight 1: ~4e4,
#: the gradient swamps the label loss), and one below 1e-4 trains nothing (the paper's 3e-5
#: for a sum-reduced ``mse`` left on ``loss = mse_mean``: 6e-5). Both are almost always a
#: weight written for the other reduction; neither is an error (a researcher may mean it).
COEFFICIENT_RANGE = (1e-4, 1e3)


def coefficient_warnings(spec: RecipeSpec, terms: list[TermPlan]) -> list[Diagnostic]:
    """A warning, at the term's weight, for each term whose per-element coefficient lies
    outside :data:`COEFFICIENT_RANGE` (``validate`` and ``explain`` print them)."""
    low, high = COEFFICIENT_RANGE
    out: list[Diagnostic] = []
    for entry in terms:
        c = entry.coefficient
        if low <= c <= high:
            continue
        term = spec.term(entry.name)
        span = term.at("weight") if term is not None else None
        out.append(
            warning(
                f"{entry.kind} '{entry.name}': per-element coefficient {_number(c)} "
                f"(weight {_number(entry.weight)} x {entry.elements:,.0f} elements) is "
                f"{'very large' if c > high else 'very small'}",
                span,
                expected=f"a coefficient between {low:g} and {high:g} "
                "(the shipped recipes use 0.02 to 12)",
                hint=f"the coefficient is the term's weight on its mean-reduced loss; "
                f"weight = {_number(1 / entry.elements)} gives coefficient 1",
            )
        )
    return out


def _number(x: float) -> str:
    """Three significant digits as a recipe writes numbers: ``38400``, ``2.6e-5``."""
    from vitkdl.language import format_number

    return format_number(float(f"{x:.3g}"))
