"""``minqwen.hub`` is :mod:`minqwen.loading.hub` under its short, documented name (not deprecated).

``import minqwen.hub`` and ``minqwen.hub`` give the same module object: this file only makes the
first form find it.
"""

import sys

from .loading import hub

sys.modules[__name__] = hub
