"""Old import paths kept for one release: a module ``__getattr__`` that warns and forwards.

A shim module (``minqwen/weights.py`` ...) keeps no code of its own; it names the modules its
contents moved to, and each attribute read through it emits a ``DeprecationWarning`` naming the
new place.
"""

from __future__ import annotations

import warnings
from types import ModuleType
from typing import Any, Callable


def forward_to(old: str, *new_modules: ModuleType) -> Callable[[str], Any]:
    """The ``__getattr__`` for the shim module ``old``: the first of ``new_modules`` that has the name."""

    def __getattr__(name: str) -> Any:
        for module in new_modules:
            if hasattr(module, name):
                warnings.warn(f"{old}.{name} has moved to {module.__name__}.{name}; {old} goes away in the next release", DeprecationWarning, stacklevel=2)
                return getattr(module, name)
        raise AttributeError(f"module {old!r} has no attribute {name!r}")

    return __getattr__
