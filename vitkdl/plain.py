"""The base of every plan record: frozen pydantic data with no extra fields. Torch-free.

Its own module so that the planner and the loss kinds' plan data (:mod:`vitkdl.terms.base`)
share one definition without importing each other.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["Plain"]


class Plain(BaseModel):
    """Frozen plan data: fields cannot be reassigned and unknown fields are rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")
