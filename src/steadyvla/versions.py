"""Versions of steadyvla and the libraries that decide numerics, recorded in checkpoints."""

from __future__ import annotations

import importlib.metadata
import platform

import steadyvla


def library_versions() -> dict[str, str]:
    out = {"steadyvla": steadyvla.__version__, "python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "timm", "safetensors"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "missing"
    return out
