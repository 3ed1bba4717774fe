"""Versions of steadyvla and the libraries that decide numerics, recorded in checkpoints."""

from __future__ import annotations

import functools
import importlib.metadata
import platform

import steadyvla


def library_versions() -> dict[str, str]:
    """Versions of the libraries that decide numerics (looked up once per process: each lookup
    scans sys.path, which would make every checkpoint save block longer)."""
    return dict(_library_versions())


@functools.cache
def _library_versions() -> dict[str, str]:
    out = {"steadyvla": steadyvla.__version__, "python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "timm", "safetensors"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "missing"
    return out
