"""Fixtures shared by the test modules (helpers they import live in tests/helpers.py)."""

from __future__ import annotations

import pytest
from helpers import labeled_dataset


@pytest.fixture
def dataset(tmp_path):
    """Three labeled JPEG shards, their manifest, and tiny class/template lists."""
    return labeled_dataset(tmp_path)
