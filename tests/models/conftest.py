"""Fixtures shared by the model-loading tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty model cache of this test's own (``VPS_CACHE_DIR``), with progress output quiet."""
    root = tmp_path / "cache"
    monkeypatch.setenv("VPS_CACHE_DIR", str(root))
    monkeypatch.setenv("VPS_QUIET", "1")
    return root
