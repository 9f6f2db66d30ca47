"""What every CLI test needs: a plain terminal in the project root."""

from __future__ import annotations

import pytest

from tests.conftest import ROOT


@pytest.fixture(autouse=True)
def plain_terminal(monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.chdir(ROOT)
