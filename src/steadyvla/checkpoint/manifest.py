"""``manifest.json``: size and sha256 of every file of a checkpoint, written last.

A checkpoint without a manifest was never finished. One whose files do not match it was
truncated, corrupted or tampered with after it was finished. ``verify_checkpoint`` names the
file and the reason, so a resume can say exactly why it skipped a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from steadyvla.atomic_files import atomic_write_json
from steadyvla.checkpoint.layout import MANIFEST_FILE

MANIFEST_FORMAT = "steadyvla-checkpoint-manifest"
MANIFEST_VERSION = 1
HASH_CHUNK_BYTES = 4 * 1024 * 1024


def hash_file(path: str | os.PathLike[str]) -> tuple[int, str]:
    """(size in bytes, sha256 hex digest) of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _list_files(ckpt_dir: Path) -> tuple[list[str], list[str]]:
    """(regular files, other entries) under ``ckpt_dir`` as sorted relative POSIX paths.

    The top-level manifest itself is not listed. Symlinks and special files are "other": a
    checkpoint must be self-contained, so they are reported rather than followed.
    """
    files: list[str] = []
    others: list[str] = []
    for dirpath, dirnames, filenames in os.walk(ckpt_dir):
        rel_dir = Path(dirpath).relative_to(ckpt_dir)
        for name in dirnames:
            if (Path(dirpath) / name).is_symlink():
                others.append((rel_dir / name).as_posix())
        for name in filenames:
            rel = (rel_dir / name).as_posix()
            if rel == MANIFEST_FILE:
                continue
            path = Path(dirpath) / name
            (files if path.is_file() and not path.is_symlink() else others).append(rel)
    return sorted(files), sorted(others)


def write_manifest(ckpt_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Hash every file under ``ckpt_dir`` and write ``manifest.json`` atomically; return it.

    Call this after every other file of the checkpoint is written: the manifest's presence is
    what marks the checkpoint as finished.
    """
    ckpt_dir = Path(ckpt_dir)
    files, others = _list_files(ckpt_dir)
    if others:
        raise ValueError(f"checkpoint {ckpt_dir} contains links or special files: {others}")
    entries = {}
    for rel in files:
        size, sha = hash_file(ckpt_dir / rel)
        entries[rel] = {"size": size, "sha256": sha}
    manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "files": entries}
    atomic_write_json(ckpt_dir / MANIFEST_FILE, manifest)
    return manifest


def read_manifest(ckpt_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Load and structurally check ``manifest.json``; raises ``ValueError`` or ``OSError``."""
    with open(Path(ckpt_dir) / MANIFEST_FILE, encoding="utf-8") as f:
        manifest = json.load(f)
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"not a steadyvla manifest (format {manifest.get('format')!r})"
                         if isinstance(manifest, dict) else "not a JSON object")
    version = manifest.get("version")
    if not isinstance(version, int) or version > MANIFEST_VERSION:
        raise ValueError(f"format version {version!r} is not supported (this steadyvla reads "
                         f"up to {MANIFEST_VERSION})")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(
        isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)
        for e in files.values()
    ):
        raise ValueError("'files' must map paths to {size, sha256}")
    return manifest


def verify_checkpoint(ckpt_dir: str | os.PathLike[str], *, deep: bool = True) -> list[str]:
    """Problems found in a checkpoint dir; an empty list means it is complete and intact.

    Each problem is ``"<relative path>: <reason>"``: a missing or unreadable manifest, a missing
    file, a size mismatch (truncated), a sha256 mismatch (corrupt), or a file the manifest does
    not list. ``deep=False`` skips hashing (presence and sizes only): cheap enough to run over
    every checkpoint, but blind to flipped bits.
    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return [f"{ckpt_dir}: not a directory"]
    if not (ckpt_dir / MANIFEST_FILE).is_file():
        return [f"{MANIFEST_FILE}: missing (the save never finished)"]
    try:
        expected = read_manifest(ckpt_dir)["files"]
    except (OSError, ValueError) as exc:
        return [f"{MANIFEST_FILE}: unreadable ({exc})"]

    problems: list[str] = []
    present, others = _list_files(ckpt_dir)
    present_set = set(present)
    for rel, entry in sorted(expected.items()):
        if rel not in present_set:
            problems.append(f"{rel}: missing")
            continue
        path = ckpt_dir / rel
        size = path.stat().st_size
        if size != entry["size"]:
            why = "truncated" if size < entry["size"] else "larger than when saved"
            problems.append(f"{rel}: size {size} != manifest {entry['size']} ({why})")
            continue
        if deep:
            _, sha = hash_file(path)
            if sha != entry["sha256"]:
                want = entry["sha256"]
                problems.append(f"{rel}: sha256 {sha[:12]}… != manifest {want[:12]}… (corrupt)")
    for rel in present:
        if rel not in expected:
            problems.append(f"{rel}: not in manifest (unexpected file)")
    for rel in others:
        problems.append(f"{rel}: link or special file (unexpected)")
    return problems
