"""Deprecated path: see :mod:`minqwen.loading.prepared`."""

from ._moved import forward_to
from .loading import prepared, weights

__getattr__ = forward_to(__name__, prepared, weights)
