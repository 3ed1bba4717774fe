"""Where checkpoints live, how one is committed, which one a resume takes, which ones to delete.

Knows files only (no model or optimizer): the caller's ``write_fn`` fills a directory, and this
module makes that directory appear atomically, verifiably and durably.

Save protocol (a kill at any point leaves the previous ``latest`` usable)::

    checkpoints/.tmp-<name>-<pid>/   <- write_fn, then manifest.json last, then fsync all
    rename -> checkpoints/<name>/    <- fsync checkpoints/
    checkpoints/latest = <name>      <- atomic replace
    retention                        <- only now may older checkpoints go
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

from steadyvla.atomic_files import atomic_write_text, fsync_dir, fsync_tree
from steadyvla.checkpoint.layout import (
    ASIDE_DIR_PREFIX,
    CHECKPOINTS_DIR,
    LATEST_FILE,
    TMP_DIR_PREFIX,
    TRAINER_STATE_JSON,
    TRASH_DIR_PREFIX,
    is_transient_name,
    parse_step_dir,
    step_dir_name,
)
from steadyvla.checkpoint.manifest import verify_checkpoint, write_manifest
from steadyvla.checkpoint.run_lock import RunLock


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used or written; the message says which one and why."""


@dataclass
class CheckpointInfo:
    """One checkpoint dir as found on disk."""

    path: Path
    name: str
    step: int  # trainer_state.json's global_step when readable, else the dir name's
    complete: bool
    problems: list[str] = field(default_factory=list)
    is_latest: bool = False


def _read_step(ckpt_dir: Path) -> int | None:
    try:
        with open(ckpt_dir / TRAINER_STATE_JSON, encoding="utf-8") as f:
            step = json.load(f).get("global_step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


class CheckpointManager:
    """Atomic saves, verified resume and retention for one run dir's ``checkpoints/``.

    Only one process (rank 0) may save into a run dir: every save (and the cleanup of leftovers of
    killed saves) runs under the run dir's lock (``RunLock``, re-entrant for the process that
    already holds it for the whole run). Saves through one manager are serialized.
    ``keep_last_k`` keeps the k newest complete checkpoints, ``save_latest_only`` keeps one;
    with neither, every complete checkpoint is kept. A save's ``keep_steps`` are kept in any case.
    """

    def __init__(self, run_dir: Path, *, keep_last_k: int | None = None,
                 save_latest_only: bool = False, log: Callable[[str], None] = print) -> None:
        if keep_last_k is not None and (isinstance(keep_last_k, bool) or keep_last_k < 1):
            raise ValueError(f"keep_last_k must be >= 1 or None, got {keep_last_k!r}")
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / CHECKPOINTS_DIR
        self.keep_last_k = 1 if save_latest_only else keep_last_k
        self.log = log
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ saving

    def save(self, step: int, write_fn: Callable[[Path], None],
             dir_name: str | None = None, keep_steps: Collection[int] = ()) -> Path:
        """Write a checkpoint atomically and make it ``latest``; return its final path.

        ``write_fn(tmp_dir)`` writes the checkpoint's files into a fresh temporary directory. If it
        raises, the temporary directory is removed, the exception propagates, and the previous
        checkpoints and ``latest`` are untouched. Retention runs only after the new checkpoint is
        complete and ``latest`` names it; complete checkpoints of ``keep_steps`` (e.g. the best by
        eval score) are kept on top of the ``keep_last_k`` newest.
        """
        name = dir_name if dir_name is not None else step_dir_name(step)
        tmp = self.begin(name)
        try:
            write_fn(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return self.commit(tmp, step, name, keep_steps)

    def begin(self, name: str) -> Path:
        """Clean up after killed saves and return a fresh temporary dir for checkpoint ``name``
        (first half of ``save``, for writers that fill it from several processes)."""
        if not name or "/" in name or os.sep in name or name.startswith(".") or name == LATEST_FILE:
            raise ValueError(f"invalid checkpoint dir name {name!r}")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with self._lock, RunLock.acquire(self.run_dir):
            self._prepare_root()
            tmp = self.root / f"{TMP_DIR_PREFIX}{name}-{os.getpid()}"
            _remove(tmp)
            tmp.mkdir()
        return tmp

    def commit(self, tmp: Path, step: int, name: str, keep_steps: Collection[int] = ()) -> Path:
        """Second half of ``save``: manifest over everything in ``tmp``, fsync, rename to ``name``,
        ``latest``, retention. On failure ``tmp`` is removed and ``latest`` is untouched."""
        with self._lock, RunLock.acquire(self.run_dir):
            try:
                recorded = _read_step(tmp)
                if recorded is not None and recorded != step:
                    raise CheckpointError(f"save({step}) but {TRAINER_STATE_JSON} records "
                                          f"global_step {recorded}")
                write_manifest(tmp)
                fsync_tree(tmp)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            final = self._commit(tmp, name)
            atomic_write_text(self.root / LATEST_FILE, name + "\n")
            self._apply_retention(name, set(keep_steps))
        return final

    def _prepare_root(self) -> None:
        if not self.root.is_dir():
            self.root.mkdir(parents=True, exist_ok=True)
            fsync_dir(self.run_dir)
        self._clean_transients()

    def _clean_transients(self) -> None:
        """Remove what killed saves left behind; put back a dir a killed replace moved aside."""
        for entry in sorted(self.root.iterdir()):
            if not is_transient_name(entry.name):
                continue
            if entry.name.startswith(ASIDE_DIR_PREFIX):
                original = self.root / entry.name[len(ASIDE_DIR_PREFIX):].rsplit("-", 1)[0]
                if original.name and not original.exists():
                    os.rename(entry, original)
                    self.log(f"restored {CHECKPOINTS_DIR}/{original.name} (an interrupted save "
                             "had moved it aside)")
                    continue
            self.log(f"removing leftover of an interrupted save: {CHECKPOINTS_DIR}/{entry.name}")
            _remove(entry)
        fsync_dir(self.root)

    def _commit(self, tmp: Path, name: str) -> Path:
        final = self.root / name
        aside = None
        if final.exists() or final.is_symlink():
            # rename() cannot replace a non-empty dir: move the old one aside, delete it after.
            aside = self.root / f"{ASIDE_DIR_PREFIX}{name}-{os.getpid()}"
            _remove(aside)
            os.rename(final, aside)
            self.log(f"replacing existing {CHECKPOINTS_DIR}/{name}")
        os.rename(tmp, final)
        fsync_dir(self.root)
        if aside is not None:
            _remove(aside)
            fsync_dir(self.root)
        return final

    def _apply_retention(self, latest_name: str, keep_steps: set[int]) -> None:
        infos = self.list_checkpoints(deep=False)
        latest = next((i for i in infos if i.name == latest_name), None)
        if latest is None:
            return
        # Checkpoints past the new one belong to an abandoned future (a resume from an older
        # one); they are replaced when the run reaches them, never deleted here.
        older = [i for i in infos if i.step <= latest.step and i.name != latest_name]
        complete = sorted((i for i in older if i.complete), key=lambda i: i.step, reverse=True)
        keep = {i.name for i in complete} if self.keep_last_k is None else {
            i.name for i in complete[: self.keep_last_k - 1]}
        keep |= {i.name for i in complete if i.step in keep_steps}
        doomed = [i for i in older if i.name not in keep]
        for info in doomed:
            why = "retention" if info.complete else f"incomplete: {'; '.join(info.problems)}"
            self.log(f"deleting {CHECKPOINTS_DIR}/{info.name} ({why})")
            trash = self.root / f"{TRASH_DIR_PREFIX}{info.name}-{os.getpid()}"
            _remove(trash)
            os.rename(info.path, trash)  # a half-deleted dir must never look like a checkpoint
            _remove(trash)
        if doomed:
            fsync_dir(self.root)

    # ----------------------------------------------------------------- reading

    def read_latest(self) -> str | None:
        """The dir name stored in ``checkpoints/latest``, or None if absent or unreadable."""
        try:
            name = (self.root / LATEST_FILE).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            return None
        return name or None

    def list_checkpoints(self, *, deep: bool = True) -> list[CheckpointInfo]:
        """Every checkpoint dir (complete or not), sorted by step.

        ``deep=False`` verifies presence and sizes only (no hashing). Dirs whose step can be read
        neither from ``trainer_state.json`` nor from the name are not checkpoints and are ignored.
        """
        if not self.root.is_dir():
            return []
        latest = self.read_latest()
        infos = []
        for path in self.root.iterdir():
            if path.name.startswith(".") or not path.is_dir() or path.is_symlink():
                continue
            step = _read_step(path)
            if step is None:
                step = parse_step_dir(path.name)
            if step is None:
                continue
            problems = verify_checkpoint(path, deep=deep)
            infos.append(CheckpointInfo(path=path, name=path.name, step=step,
                                        complete=not problems, problems=problems,
                                        is_latest=path.name == latest))
        return sorted(infos, key=lambda i: (i.step, i.name))

    def _candidates(self) -> list[CheckpointInfo]:
        """Checkpoints in the order ``resume: auto`` tries them (unverified)."""
        infos = self.list_checkpoints(deep=False)
        if not infos:
            return []
        latest_name = self.read_latest()
        start = next((i for i in infos if i.name == latest_name), None)
        if start is None:
            if latest_name is not None:
                self.log(f"{CHECKPOINTS_DIR}/{LATEST_FILE} names {latest_name!r}, which does "
                         "not exist; trying checkpoints from the highest step down")
            return infos[::-1]
        rest = [i for i in infos if i.step <= start.step and i.name != start.name]
        return [start] + rest[::-1]

    def resolve_latest_explained(self) -> tuple[Path | None, list[str]]:
        """``resolve_latest`` plus one message per checkpoint it skipped (which one and why)."""
        skipped: list[str] = []
        for info in self._candidates():
            problems = verify_checkpoint(info.path, deep=True)
            if not problems:
                if skipped:
                    self.log(f"using {CHECKPOINTS_DIR}/{info.name} (step {info.step}) instead")
                return info.path, skipped
            msg = f"skipping {CHECKPOINTS_DIR}/{info.name}: {'; '.join(problems)}"
            self.log(msg)
            skipped.append(msg)
        return None, skipped

    def resolve_latest(self) -> Path | None:
        """The checkpoint ``resume: auto`` should load, fully verified; None if there is none.

        Starts at the one ``latest`` names (or the highest step if ``latest`` is missing or
        dangling) and walks back to older ones, logging which checkpoint was skipped and why.
        """
        return self.resolve_latest_explained()[0]

    def set_latest(self, name: str) -> None:
        """Point ``latest`` at the complete checkpoint ``name`` (an explicit rewind), under the run lock."""
        if verify_checkpoint(self.root / name, deep=False):
            raise CheckpointError(f"cannot make {CHECKPOINTS_DIR}/{name} latest: it is not complete")
        with self._lock, RunLock.acquire(self.run_dir):
            atomic_write_text(self.root / LATEST_FILE, name + "\n")

    def resolve_explicit(self, path: Path) -> Path:
        """Resolve a user-named checkpoint dir or run dir; raise ``CheckpointError`` if unusable.

        A run dir (or its ``checkpoints/``) resolves to its latest complete checkpoint. A
        checkpoint dir must verify: a named checkpoint is never silently swapped for another.
        """
        path = Path(path)
        if not path.exists():
            raise CheckpointError(f"checkpoint path {path} does not exist")
        if not path.is_dir():
            raise CheckpointError(f"checkpoint path {path} is a file; expected a checkpoint "
                                  f"dir or a run dir")
        run_dir = None
        if (path / CHECKPOINTS_DIR).is_dir():
            run_dir = path
        elif path.name == CHECKPOINTS_DIR:
            run_dir = path.parent
        if run_dir is not None:
            manager = CheckpointManager(run_dir, log=self.log)
            found, skipped = manager.resolve_latest_explained()
            if found is None:
                detail = "".join(f"\n  {m}" for m in skipped)
                raise CheckpointError(f"run dir {run_dir} has no complete checkpoint{detail}")
            return found
        problems = verify_checkpoint(path, deep=True)
        if problems:
            detail = "".join(f"\n  {p}" for p in problems)
            if _read_step(path) is None and parse_step_dir(path.name) is None:
                raise CheckpointError(f"{path} is neither a run dir (no {CHECKPOINTS_DIR}/) nor "
                                      f"a complete checkpoint:{detail}")
            raise CheckpointError(f"checkpoint {path} is incomplete or corrupt:{detail}\n"
                                  "name an older checkpoint, or the run dir to take its newest "
                                  "complete one")
        return path
