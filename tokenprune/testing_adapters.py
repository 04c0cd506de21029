"""The adapter test kit under its first import path; it lives in :mod:`tokenprune.testing.adapters`."""

from tokenprune.testing.adapters import *  # noqa: F403
from tokenprune.testing.adapters import __all__  # noqa: F401
