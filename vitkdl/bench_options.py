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
CONFIGURATIONS = ("compiled", "eager", "hooks", "timm", "floor")
LABELS = {
    "compiled": "(a) vitkdl compiled",
    "eager": "(b) vitkdl eager",
    "hooks": "(c) hooks + loss module",
    "timm": "(e) timm's own task",
    "floor": "(d) floor: student + teacher inf.",
}


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
