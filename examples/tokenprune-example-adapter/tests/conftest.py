"""Fixtures of the example adapter's tests."""

from __future__ import annotations

import pytest
from tiny_mistral3 import Tiny, build_tiny


@pytest.fixture(scope="module")
def tiny() -> Tiny:
    """A tiny random Mistral3 and its batch builder."""
    return build_tiny()
