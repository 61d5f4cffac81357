"""Deprecated path: see :mod:`minqwen.loading` (``from_pretrained``), :mod:`minqwen.loading.weights`
and :mod:`minqwen.loading.files` (``atomic_directory``)."""

from . import loading
from ._moved import forward_to
from .loading import files, weights

__getattr__ = forward_to(__name__, weights, loading, files)
