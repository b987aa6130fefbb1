"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The team's shared data folder (layout of shared/data): $CHATFORGE_DATA_DIR if set, else
    ../shared/data next to the repository. Tests that need it are skipped when it is absent."""
    env = os.environ.get("CHATFORGE_DATA_DIR")
    # absolute: README command 2 passes a relative path (../shared/data), and tests that link data files
    # into a temporary folder need targets that resolve from there
    path = Path(env).expanduser().resolve() if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"shared data folder {path} not found; set CHATFORGE_DATA_DIR to a folder laid out like "
                    f"shared/data to run this test")
    return path
