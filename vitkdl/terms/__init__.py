"""The loss kinds: one package per kind, and this registry, the only list of them.

Every stage asks here: the spec stage looks a term's keyword up (an unknown one gets a
did-you-mean from :data:`KINDS`), the checks run each kind's own checks, the planner asks each
kind for its plan entry, ``explain`` for its words, the program for its module and how to feed
it, ``bench`` for its hand-written reference. Adding a kind is one new folder,
``terms/KEYWORD/``: ``__init__.py`` declares it (a :class:`~vitkdl.terms.base.Kind` subclass
with its spec, checks, plan and words, torch-free; see ``mimic/``) and ``module.py`` holds its
torch modules as top-level classes, imported only when one is built; plus its line below and
its tests.
"""

from __future__ import annotations

from collections.abc import Iterable

from vitkdl.terms import dist, dkd, generate, kd, labels, mimic, nkd, srrl, token, wsld
from vitkdl.terms.base import Context, Kind, KindOptions, StepInputs, TapPoint, TermPlan, Words

__all__ = [
    "KINDS",
    "Context",
    "Kind",
    "KindOptions",
    "StepInputs",
    "TapPoint",
    "TermPlan",
    "Words",
    "kind",
    "needs_teacher",
    "register",
]

KINDS: dict[str, Kind] = {}


def register(k: Kind) -> Kind:
    """Add a kind to the registry (its keyword must be new); returns it."""
    if k.keyword in KINDS:
        raise ValueError(f"a kind with keyword {k.keyword!r} is registered already")
    KINDS[k.keyword] = k
    return k


for _module in (mimic, generate, kd, nkd, token, labels, dkd, dist, wsld, srrl):
    register(_module.KIND)


def kind(keyword: str) -> Kind:
    """The kind written with ``keyword``."""
    return KINDS[keyword]


def needs_teacher(kinds: Iterable[str]) -> bool:
    """Whether terms of these kinds (keywords) read the teacher: the one rule for whether a
    recipe's teacher is built, run and evaluated."""
    return any(KINDS[k].needs_teacher for k in kinds)
