"""Test photos: the builders live in ``tools.photos`` (the local demo uses them too).

Kept as ``tests.photos`` so the tests import them as before (``from tests import
photos``); every public name of ``tools.photos`` (its ``__all__``) is re-exported.
"""

from __future__ import annotations

from tools.photos import *  # noqa: F403  (re-export: tools.photos.__all__)
from tools.photos import __all__  # noqa: F401
