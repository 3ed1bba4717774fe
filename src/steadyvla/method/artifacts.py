"""ICSM artifacts on disk: one safetensors per representative layer + meta.json, written atomically.

    <icms_artifact_dir>/layer_030.safetensors   U_f [D, r_f], U_p [D, r_p], mu [D], C_T [D, D],
                                                singular_values [r], sensitivity [r]
    <icms_artifact_dir>/meta.json               layers, groups, r, epsilon, probe hash, model digest, versions
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from steadyvla.atomic_files import fsync_tree, replace_dir

ICSM_META = "meta.json"
# meta.json keys that describe the build environment, not the artifacts: left out of the content hash
# so rebuilding identical subspaces under another library version does not look like a change.
ENVIRONMENT_META_KEYS = ("versions",)
# config field -> meta.json key of the setting the artifacts were built with
BUILD_SETTINGS = {"icsm_rank": "r", "icsm_epsilon": "epsilon", "icsm_fragile_fraction": "fragile_fraction",
                  "icsm_plastic_fraction": "plastic_fraction", "icsm_sensitivity_samples": "sensitivity_samples",
                  "icsm_epsilon_absolute": "epsilon_absolute", "icsm_split": "split",
                  "icsm_fragile_dim": "fragile_dim", "icsm_plastic_dim": "plastic_dim",
                  "prompt_template": "probe_prompt_template", "seed": "seed"}
ICSM_FORMAT = "steadyvla-icsm"
TENSOR_KEYS = ("U_f", "U_p", "mu", "C_T", "singular_values", "sensitivity")


def layer_file(layer: int) -> str:
    return f"layer_{layer:03d}.safetensors"


@dataclass
class IcsmArtifacts:
    """Subspaces per representative layer and the grouping of hooked layers."""

    groups: list[list[int]]
    tensors: dict[int, dict[str, torch.Tensor]]  # representative layer -> TENSOR_KEYS
    meta: dict

    def content_sha256(self) -> str:
        """sha256 of what training uses: every tensor (name, dtype, shape, bytes) of every layer
        and meta.json without its ENVIRONMENT_META_KEYS. Equal for identical copies at any path."""
        digest = hashlib.sha256()
        meta = {k: v for k, v in self.meta.items() if k not in ENVIRONMENT_META_KEYS}
        digest.update(json.dumps(meta, sort_keys=True).encode())
        for layer in sorted(self.tensors):
            for key in sorted(self.tensors[layer]):
                tensor = self.tensors[layer][key].contiguous()
                digest.update(f"{layer}/{key}/{tensor.dtype}/{tuple(tensor.shape)}".encode())
                digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def build_settings(self) -> dict:
        """The config values the artifacts were built with, by config field name (absent ones left out)."""
        return {field: self.meta[key] for field, key in BUILD_SETTINGS.items() if key in self.meta}

    def representative(self, layer: int) -> int:
        """The layer whose subspace `layer` uses."""
        for group in self.groups:
            if layer in group:
                return group[-1]
        raise KeyError(f"layer {layer} is not in the ICSM groups {self.groups}")


def write_artifacts(out_dir: Path, artifacts: IcsmArtifacts) -> Path:
    """Write into a temporary sibling, fsync, then rename: a half-written dir never looks complete."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for layer, tensors in sorted(artifacts.tensors.items()):
        save_file({k: tensors[k].contiguous() for k in TENSOR_KEYS}, str(tmp / layer_file(layer)),
                  metadata={"format": "pt"})
    (tmp / ICSM_META).write_text(json.dumps(artifacts.meta, indent=1, sort_keys=True) + "\n")
    fsync_tree(tmp)
    replace_dir(tmp, out_dir)
    return out_dir


def read_artifacts(out_dir: Path) -> IcsmArtifacts:
    """Load artifacts; a missing or incomplete dir is an error naming what is missing."""
    out_dir = Path(out_dir)
    meta_path = out_dir / ICSM_META
    if not meta_path.is_file():
        raise FileNotFoundError(f"config field `icms_artifact_dir`: {out_dir} has no {ICSM_META}; "
                                "build it with `steadyvla icsm build --config ...`")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != ICSM_FORMAT:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r} is not {ICSM_FORMAT!r}")
    tensors = {}
    for group in meta["groups"]:
        path = out_dir / layer_file(group[-1])
        if not path.is_file():
            raise FileNotFoundError(f"{out_dir}: {path.name} is missing (meta.json lists group {group})")
        tensors[group[-1]] = load_file(str(path))
    return IcsmArtifacts(groups=meta["groups"], tensors=tensors, meta=meta)
