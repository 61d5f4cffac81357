"""Deprecated alias: ``minqwen.lora_demo`` moved to :mod:`minqwen.recipes.lora_demo`. Removed in the next release."""

import warnings

from .recipes.lora_demo import *  # noqa: F401,F403

warnings.warn("minqwen.lora_demo is deprecated: import minqwen.recipes.lora_demo", DeprecationWarning, stacklevel=2)
