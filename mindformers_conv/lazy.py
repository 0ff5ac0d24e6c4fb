"""`torch`, imported on first use: a conversion that only moves bytes never needs it.

Importing torch costs about a second and 200 MB, more than a rename-only conversion of a 1B model takes.
Modules write `from .lazy import torch` and use it as usual; the first attribute access imports it.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class _LazyModule:
    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        module: ModuleType = importlib.import_module(self._name)
        return getattr(module, attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"


torch = _LazyModule("torch")
