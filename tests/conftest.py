"""Shared fixtures: an isolated model-facts cache, the repository paths, golden-file helper."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"
GOLDEN = Path(__file__).resolve().parent / "golden"

# One cache for the whole test session: model facts resolve on the meta device once.
os.environ.setdefault("VITKDL_CACHE_DIR", str(ROOT / ".pytest_cache" / "vitkdl"))


def shipped_recipes() -> list[Path]:
    """Every runnable recipe we ship, the ablations and the methods included (bases are only
    ever extended)."""
    return (
        sorted(RECIPES.glob("*.vkd"))
        + sorted(RECIPES.glob("ablations/*.vkd"))
        + sorted(RECIPES.glob("methods/*.vkd"))
        + sorted(RECIPES.glob("methods/imagenet/*.vkd"))
    )


def check_golden(path: Path, text: str) -> None:
    """Compare ``text`` with the golden file; ``UPDATE_GOLDEN=1`` rewrites it."""
    if os.environ.get("UPDATE_GOLDEN") or not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        if not os.environ.get("UPDATE_GOLDEN"):
            pytest.fail(f"golden file {path.name} was missing and has been written; rerun")
    assert text == path.read_text(), f"output differs from {path}; UPDATE_GOLDEN=1 to accept"
