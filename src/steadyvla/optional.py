"""Imports of optional dependencies (extras) with an install hint instead of a bare ImportError."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, *, extra: str, purpose: str) -> ModuleType:
    """Import `module`, or raise ImportError saying which steadyvla extra provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{purpose} needs `{module.split('.')[0]}`: pip install 'steadyvla[{extra}]'") from exc
