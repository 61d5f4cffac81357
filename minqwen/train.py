"""Deprecated alias: ``minqwen.train`` became :mod:`minqwen.training` (the reusable pieces) and
:mod:`minqwen.recipes.train_tiny` (the tiny-model recipe and its CLI). Removed in the next release."""

import warnings

from .recipes.train_tiny import *  # noqa: F401,F403
from .training import *  # noqa: F401,F403

warnings.warn(
    "minqwen.train is deprecated: import from minqwen.training or minqwen.recipes.train_tiny",
    DeprecationWarning,
    stacklevel=2,
)
