"""The base node types every stage and every loss kind shares: :class:`Node` (frozen, strict,
spans attached), taps (:class:`TapSpec`, :class:`SliceSpec`) and the term bases
(:class:`TermSpec`, :class:`PairedTermSpec`). Torch-free, registry-free: :mod:`vitkdl.spec`
(which loads recipes and asks the registry of kinds) and the kinds under :mod:`vitkdl.terms`
both import this module, so neither imports the other's way up.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from vitkdl.errors import Span

__all__ = ["TAP_SUBPOINTS", "Node", "PairedTermSpec", "SliceSpec", "TapSpec", "TermSpec"]


class Node(BaseModel):
    """Base of every spec node: frozen, strict, unknown fields forbidden, spans attached.

    ``span`` covers the node's text; ``spans`` maps each field written in the source to the
    span of its ``name = value`` (fields left at their defaults have none).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    span: Span | None = Field(default=None, exclude=True, repr=False)
    spans: dict[str, Span] = Field(default_factory=dict, exclude=True, repr=False)

    def at(self, name: str | None = None) -> Span | None:
        """The span of field ``name`` when it was written, else of the node."""
        if name is not None and name in self.spans:
            return self.spans[name]
        return self.span


class SliceSpec(Node):
    """``start:stop:step`` in a tap index (Python slice semantics over the blocks)."""

    start: int | None = None
    stop: int | None = None
    step: int | None = None


class TapSpec(Node):
    """``student.blocks[0, 1]``, ``teacher.blocks[0:2].attn``, ``teacher.norm`` or
    ``teacher.pre_logits`` (the pooled feature the classifier head reads).

    ``sub`` names a point inside the blocks: ``attn`` (the residual stream after the attention
    half, MHA-out), ``mlp`` (after the FFN half: the block output, FFN-out, which plain
    ``blocks[i]`` also names) or ``attn_map`` (the attention probabilities)."""

    side: Literal["student", "teacher"]
    point: Literal["blocks", "norm", "fc_norm", "pre_logits"]
    index: tuple[int | SliceSpec, ...] | None = None
    sub: Literal["attn", "mlp", "attn_map"] | None = None

    def text(self) -> str:
        if self.index is None:
            return f"{self.side}.{self.point}"
        items = []
        for i in self.index:
            if isinstance(i, SliceSpec):
                parts = ["" if v is None else str(v) for v in (i.start, i.stop, i.step)]
                items.append(":".join(parts[:2] if i.step is None else parts))
            else:
                items.append(str(i))
        sub = f".{self.sub}" if self.sub else ""
        return f"{self.side}.{self.point}[{', '.join(items)}]{sub}"


TAP_SUBPOINTS = ("attn", "mlp", "attn_map")


class TermSpec(Node):
    """Base of every distill term: its kind (the keyword it is written with), its name and its
    weight. Each kind subclasses it in its own module under :mod:`vitkdl.terms`."""

    kind: str
    name: str
    weight: float = 1.0


class PairedTermSpec(TermSpec):
    """A term written with taps, ``KEYWORD student.TAPS -> teacher.TAPS``."""

    student: tuple[TapSpec, ...]
    teacher: tuple[TapSpec, ...]
