"""``vitkdl bench``'s options and configuration names, torch-free: the CLI builds its parser
from them (every command builds the parser, so this must not import torch) and
:mod:`vitkdl.bench` checks them."""

from __future__ import annotations

__all__ = [
    "BACKENDS",
    "CONFIGURATIONS",
    "DEFAULT_STEPS",
    "DEFAULT_WARMUP",
    "FLOOR_MODES",
    "LABELS",
    "MASKED_KEEP",
    "TEACHER_CONFIGURATIONS",
    "configurations_problem",
    "options_problem",
]

#: torch.compile backends of the compiled figures: ``inductor`` (what training uses), the
#: others for tests and debugging.
BACKENDS = ("inductor", "aot_eager", "eager")
#: How the floor runs: ``auto`` (compiled on CUDA, eager on CPU), one mode, or ``best`` (both).
FLOOR_MODES = ("auto", "eager", "compiled", "best")
DEFAULT_STEPS = 10
DEFAULT_WARMUP = 3

#: The configurations in the order they are built, reported and shown, with the letter the
#: documentation gives each.
#: The teacher's options (issue 20), each the compiled step with one option on, against
#: ``teacher_plain`` (the whole teacher, fp32 weights, every token, run in the step); one that
#: runs exactly as another measured configuration is reported as that one, not built twice.
TEACHER_CONFIGURATIONS = (
    "teacher_plain",
    "early_exit",
    "teacher_bf16",
    "teacher_fp8",
    "cached_logits",
    "masked",
)
CONFIGURATIONS = ("compiled", "eager", "hooks", "timm", "floor", *TEACHER_CONFIGURATIONS)
LABELS = {
    "compiled": "(a) vitkdl compiled",
    "eager": "(b) vitkdl eager",
    "hooks": "(c) hooks + loss module",
    "timm": "(e) timm's own task",
    "floor": "(d) floor: student + teacher inf.",
    "teacher_plain": "(f) plain teacher (whole, fp32)",
    "early_exit": "(g) teacher only as deep as read",
    "teacher_bf16": "(h) teacher in bf16",
    "teacher_fp8": "(i) teacher in fp8",
    "cached_logits": "(j) cached logits (no teacher)",
    "masked": "(k) masked teacher (keep)",
}
#: The share of patch tokens the ``masked`` configuration keeps when the recipe writes none.
MASKED_KEEP = 0.5


def configurations_problem(names: list[str]) -> str | None:
    """What is wrong with ``--configs`` (the configurations to measure), or None. ``compiled``
    and ``floor`` are measured whatever it says (the ratios are against them), and
    ``teacher_plain`` with any teacher option."""
    unknown = [n for n in names if n not in CONFIGURATIONS]
    if unknown:
        return f"unknown configuration {unknown[0]!r}; one of {', '.join(CONFIGURATIONS)}"
    return None


def options_problem(
    steps: int, warmup: int, backend: str, floor: str, threads: int | None
) -> str | None:
    """What is wrong with a set of bench options, in the CLI's words, or None."""
    if steps < 1 or warmup < 1:
        return "--steps and --warmup must be at least 1"
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; one of {', '.join(BACKENDS)}"
    if floor not in FLOOR_MODES:
        return f"unknown floor mode {floor!r}; one of {', '.join(FLOOR_MODES)}"
    if threads is not None and threads < 1:
        return "--threads must be at least 1"
    return None
