"""Deprecated path: see :mod:`minqwen.loading.gguf`."""

from ._moved import forward_to
from .loading import gguf

__getattr__ = forward_to(__name__, gguf)
