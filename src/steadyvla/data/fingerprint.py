"""A cheap fingerprint of a dataset's contents, stored in every checkpoint and compared on resume.

A dataset regenerated or changed in place must not resume with the old statistics and sample
positions; an identical copy at another path (node-local staging) must. So the fingerprint holds
no absolute path and no mtime (copies get new mtimes), only:

- the frame and episode counts and a sha256 of all actions (already in memory for statistics);
- per file, relative to the dataset root: the sha256 of the small index/meta files (LeRobot
  `meta/`, RLDS `*.json`), and the size of the bulk data files (parquet, video, TFRecord shards),
  which are too large to hash at every start.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from steadyvla.data.frames import FrameSource

FINGERPRINT_VERSION = 1
HASH_CHUNK = 1 << 20
# LeRobot v3: everything under meta/ is index (counts, episode ranges, tasks); data/ and videos/ are bulk.
LEROBOT_INDEX_DIR = "meta"
LEROBOT_DATA_DIRS = ("data", "videos")
# RLDS: the version folder's JSON files are index; the TFRecord shards are bulk.
RLDS_INDEX_GLOB = "*.json"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files_of(source: FrameSource) -> tuple[Path, list[Path], list[Path]] | None:
    """(root, index files, bulk data files) of the readers steadyvla knows; None for others."""
    root = getattr(source, "root", None)
    if root is not None and (Path(root) / LEROBOT_INDEX_DIR).is_dir():
        root = Path(root)
        index = [p for p in (root / LEROBOT_INDEX_DIR).rglob("*") if p.is_file()]
        bulk = [p for d in LEROBOT_DATA_DIRS for p in (root / d).rglob("*") if p.is_file()]
        return root, index, bulk
    version_dir = getattr(source, "version_dir", None)
    if version_dir is not None:
        version_dir = Path(version_dir)
        return version_dir, sorted(version_dir.glob(RLDS_INDEX_GLOB)), list(getattr(source, "shards", []))
    return None


def dataset_fingerprint(source: FrameSource) -> dict[str, Any]:
    """The fingerprint of `source` (JSON-serialisable; equal for identical copies at any path)."""
    actions = np.ascontiguousarray(np.asarray(source.actions(), dtype=np.float32))
    fingerprint: dict[str, Any] = {
        "version": FINGERPRINT_VERSION,
        "frames": len(source),
        "episodes": int(source.num_episodes),
        "actions_sha256": hashlib.sha256(actions.tobytes()).hexdigest(),
    }
    files = _files_of(source)
    if files is not None:
        root, index, bulk = files
        listing = {p.relative_to(root).as_posix(): {"sha256": _sha256_file(p)} for p in index}
        listing.update({p.relative_to(root).as_posix(): {"size": p.stat().st_size} for p in bulk})
        fingerprint["files"] = dict(sorted(listing.items()))
    return fingerprint


def fingerprint_differences(stored: dict[str, Any], current: dict[str, Any], limit: int = 5) -> list[str]:
    """Human-readable differences between two fingerprints (empty when they match)."""
    out = [f"{key}: checkpoint {stored.get(key)!r}, now {current.get(key)!r}"
           for key in ("frames", "episodes", "actions_sha256") if stored.get(key) != current.get(key)]
    old, new = stored.get("files", {}), current.get("files", {})
    for name in sorted(set(old) | set(new)):
        if old.get(name) != new.get(name):
            was = old.get(name, "absent")
            now = new.get(name, "absent")
            out.append(f"file {name}: checkpoint {was}, now {now}")
    if len(out) > limit:
        out = out[:limit] + [f"... and {len(out) - limit} more"]
    return out
