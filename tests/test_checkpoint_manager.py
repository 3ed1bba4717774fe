"""File-level checkpoint machinery: atomic saves, manifest verification, resume choice,
retention, leftovers of killed saves, the async writer, and real SIGKILLs of a saving process."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from steadyvla.checkpoint.async_writer import AsyncCheckpointWriter
from steadyvla.checkpoint.layout import (
    ADAPTER_WEIGHTS,
    CHECKPOINTS_DIR,
    LATEST_FILE,
    MANIFEST_FILE,
    TRAINER_STATE_JSON,
    parse_step_dir,
    step_dir_name,
)
from steadyvla.checkpoint.manager import CheckpointError, CheckpointManager
from steadyvla.checkpoint.manifest import read_manifest, verify_checkpoint

SRC_DIR = Path(__file__).resolve().parents[1] / "src"
SHARD = "shards/rank-0.bin"


def payload(step: int, size: int = 64 * 1024) -> bytes:
    """Deterministic per-step file content, so a test can tell which step a file belongs to."""
    block = hashlib.sha256(f"step {step}".encode()).digest()
    return (block * (size // len(block) + 1))[:size]


def write_step(ckpt_dir: Path, step: int, size: int = 64 * 1024, chunk: int = 1 << 20) -> None:
    """A fake checkpoint: weights, a nested shard and trainer_state.json."""
    data = payload(step, size)
    with open(ckpt_dir / ADAPTER_WEIGHTS, "wb") as f:
        for i in range(0, len(data), chunk):
            f.write(data[i : i + chunk])
            f.flush()
    (ckpt_dir / "shards").mkdir()
    (ckpt_dir / SHARD).write_bytes(payload(step + 1_000_000, 1000))
    (ckpt_dir / TRAINER_STATE_JSON).write_text(json.dumps({"global_step": step, "size": size}))


def check_content(ckpt_dir: Path) -> int:
    """Assert a checkpoint holds exactly what write_step wrote for its step; return the step."""
    state = json.loads((ckpt_dir / TRAINER_STATE_JSON).read_text())
    step = state["global_step"]
    assert parse_step_dir(ckpt_dir.name) == step
    assert (ckpt_dir / ADAPTER_WEIGHTS).read_bytes() == payload(step, state["size"])
    assert (ckpt_dir / SHARD).read_bytes() == payload(step + 1_000_000, 1000)
    return step


class Log(list):
    def __call__(self, msg: str) -> None:
        self.append(msg)

    def text(self) -> str:
        return "\n".join(self)


def make(tmp_path: Path, steps=(), **kwargs) -> tuple[CheckpointManager, Log]:
    log = Log()
    manager = CheckpointManager(tmp_path / "run", log=log, **kwargs)
    for step in steps:
        manager.save(step, lambda d, s=step: write_step(d, s))
    return manager, log


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def visible(manager: CheckpointManager) -> list[str]:
    return sorted(p.name for p in manager.root.iterdir())


# ------------------------------------------------------------------------------------- layout

def test_layout_names():
    assert step_dir_name(250) == "step-000250"
    assert step_dir_name(250, 0, 2.34561) == "step-000250-epoch-00-loss=2.3456"
    assert step_dir_name(1_234_567) == "step-1234567"
    assert parse_step_dir("step-000250") == 250
    assert parse_step_dir("step-000250-epoch-00-loss=2.3456") == 250
    for bad in ("latest", ".tmp-step-000250-12", "steps-1", "step-x"):
        assert parse_step_dir(bad) is None
    with pytest.raises(ValueError):
        step_dir_name(-1)


# --------------------------------------------------------------------------------------- save

def test_save_is_atomic_and_sets_latest(tmp_path):
    manager, _ = make(tmp_path, steps=[10, 20])
    assert visible(manager) == [LATEST_FILE, "step-000010", "step-000020"]
    assert (manager.root / LATEST_FILE).read_text().strip() == "step-000020"
    files = read_manifest(manager.root / "step-000020")["files"]
    assert sorted(files) == [ADAPTER_WEIGHTS, SHARD, TRAINER_STATE_JSON]
    assert files[ADAPTER_WEIGHTS]["size"] == len(payload(20))
    infos = manager.list_checkpoints()
    summary = [(i.step, i.complete, i.is_latest) for i in infos]
    assert summary == [(10, True, False), (20, True, True)]
    assert manager.resolve_latest() == manager.root / "step-000020"


def test_failed_write_leaves_everything_untouched(tmp_path):
    manager, _ = make(tmp_path, steps=[10])
    before = tree(manager.root)

    def broken(d: Path) -> None:
        write_step(d, 20)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        manager.save(20, broken)
    assert tree(manager.root) == before
    assert visible(manager) == [LATEST_FILE, "step-000010"]


def test_step_must_match_trainer_state(tmp_path):
    manager, _ = make(tmp_path)
    with pytest.raises(CheckpointError, match="global_step 7"):
        manager.save(8, lambda d: write_step(d, 7))
    assert not manager.root.joinpath("step-000008").exists()


def test_full_run_dir_name_and_resave_same_step(tmp_path):
    manager, log = make(tmp_path)
    name = step_dir_name(30, 1, 0.5)
    manager.save(30, lambda d: write_step(d, 30), dir_name=name)
    (manager.root / name / "stray.txt").write_text("from an earlier attempt")
    manager.save(30, lambda d: write_step(d, 30), dir_name=name)
    assert verify_checkpoint(manager.root / name) == []
    assert visible(manager) == [LATEST_FILE, name]
    assert "replacing existing" in log.text()


# ----------------------------------------------------------------------------------- manifest

def _truncate(d: Path) -> None:
    with open(d / ADAPTER_WEIGHTS, "r+b") as f:
        f.truncate(100)


def _flip(d: Path) -> None:
    with open(d / SHARD, "r+b") as f:
        f.seek(500)
        byte = f.read(1)
        f.seek(500)
        f.write(bytes([byte[0] ^ 0x01]))


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (_truncate, f"{ADAPTER_WEIGHTS}: size 100 != manifest 65536 (truncated)"),
        (_flip, f"{SHARD}: sha256"),
        (lambda d: (d / TRAINER_STATE_JSON).unlink(), f"{TRAINER_STATE_JSON}: missing"),
        (lambda d: (d / MANIFEST_FILE).unlink(), f"{MANIFEST_FILE}: missing"),
        (lambda d: (d / MANIFEST_FILE).write_text("{not json"), f"{MANIFEST_FILE}: unreadable"),
        (lambda d: (d / "shards" / "x.bin").write_bytes(b"x"), "shards/x.bin: not in manifest"),
    ],
    ids=["truncated", "bitflip", "deleted", "no-manifest", "bad-manifest", "extra-file"],
)
def test_verify_names_file_and_reason(tmp_path, damage, expected):
    manager, _ = make(tmp_path, steps=[10])
    ckpt = manager.root / "step-000010"
    assert verify_checkpoint(ckpt) == []
    damage(ckpt)
    problems = verify_checkpoint(ckpt)
    assert len(problems) == 1 and problems[0].startswith(expected), problems
    if damage is _flip:
        assert problems[0].endswith("(corrupt)")
        assert verify_checkpoint(ckpt, deep=False) == []  # sizes still match: only hashing sees it


# ------------------------------------------------------------------------------------- resume

def test_resolve_latest_falls_back_and_says_why(tmp_path):
    manager, log = make(tmp_path, steps=[10, 20, 30])
    _truncate(manager.root / "step-000030")
    assert manager.resolve_latest() == manager.root / "step-000020"
    assert (f"skipping {CHECKPOINTS_DIR}/step-000030: {ADAPTER_WEIGHTS}: size 100 != "
            "manifest 65536 (truncated)") in log
    _flip(manager.root / "step-000020")
    assert manager.resolve_latest() == manager.root / "step-000010"
    assert any(m.startswith(f"skipping {CHECKPOINTS_DIR}/step-000020: {SHARD}: sha256")
               for m in log)
    (manager.root / "step-000010" / MANIFEST_FILE).unlink()
    assert manager.resolve_latest() is None


def test_resolve_latest_without_or_with_dangling_latest(tmp_path):
    manager, log = make(tmp_path)
    assert manager.resolve_latest() is None
    make(tmp_path, steps=[10, 20])
    (manager.root / LATEST_FILE).write_text("step-000099\n")
    assert manager.resolve_latest() == manager.root / "step-000020"
    assert "'step-000099', which does not exist" in log.text()
    (manager.root / LATEST_FILE).unlink()
    assert manager.resolve_latest() == manager.root / "step-000020"


def test_resolve_latest_never_goes_past_latest(tmp_path):
    manager, _ = make(tmp_path, steps=[10, 20, 30])
    (manager.root / LATEST_FILE).write_text("step-000020\n")  # e.g. resumed from 20 on purpose
    assert manager.resolve_latest() == manager.root / "step-000020"


def test_resolve_explicit(tmp_path):
    manager, _ = make(tmp_path, steps=[10, 20])
    good, bad = manager.root / "step-000010", manager.root / "step-000020"
    assert manager.resolve_explicit(good) == good
    assert manager.resolve_explicit(manager.run_dir) == bad
    assert manager.resolve_explicit(manager.root) == bad
    _truncate(bad)
    with pytest.raises(CheckpointError, match=r"step-000020 is incomplete or corrupt:\n  "
                       rf"{ADAPTER_WEIGHTS}: size 100 != manifest 65536 \(truncated\)"):
        manager.resolve_explicit(bad)
    assert manager.resolve_explicit(manager.run_dir) == good  # a run dir falls back
    _flip(good)
    with pytest.raises(CheckpointError, match="has no complete checkpoint(.|\n)*step-000010"):
        manager.resolve_explicit(manager.run_dir)
    with pytest.raises(CheckpointError, match="does not exist"):
        manager.resolve_explicit(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither a run dir"):
        manager.resolve_explicit(tmp_path / "empty")


# ---------------------------------------------------------------------------------- retention

def test_keep_last_k(tmp_path):
    manager, log = make(tmp_path, steps=[10, 20, 30, 40, 50], keep_last_k=2)
    assert visible(manager) == [LATEST_FILE, "step-000040", "step-000050"]
    assert "deleting checkpoints/step-000030 (retention)" in log


def test_save_latest_only_deletes_only_after_new_one_is_complete(tmp_path):
    manager, _ = make(tmp_path, steps=[10], save_latest_only=True)
    seen = []

    def write(d: Path) -> None:
        seen.append(verify_checkpoint(manager.root / "step-000010"))
        write_step(d, 20)

    manager.save(20, write)
    assert seen == [[]]  # the previous checkpoint was intact while the new one was written
    assert visible(manager) == [LATEST_FILE, "step-000020"]
    with pytest.raises(RuntimeError):
        manager.save(30, lambda d: (_ for _ in ()).throw(RuntimeError("boom")))
    assert visible(manager) == [LATEST_FILE, "step-000020"]


def test_retention_keeps_latest_and_spares_newer_ones(tmp_path):
    manager, _ = make(tmp_path, steps=[10, 20, 30], keep_last_k=1)
    manager2, _ = make(tmp_path, steps=[10, 20, 30])
    (manager.root / LATEST_FILE).write_text("step-000010\n")  # resumed from 10 on purpose
    manager.save(15, lambda d: write_step(d, 15))
    # 10 goes (older), 20 and 30 stay (an abandoned future, replaced when the run gets there)
    assert visible(manager) == [LATEST_FILE, "step-000015", "step-000020", "step-000030"]
    assert manager2.resolve_latest() == manager.root / "step-000015"


# ------------------------------------------------------------------- leftovers of killed saves

def test_killed_mid_write_leftovers_are_never_chosen_and_get_cleaned(tmp_path):
    manager, log = make(tmp_path, steps=[10, 20], keep_last_k=5)
    root = manager.root
    tmp = root / ".tmp-step-000030-99999"  # killed inside write_fn
    tmp.mkdir()
    write_step(tmp, 30)
    (root / "step-000030").mkdir()  # a final dir without manifest (e.g. copied by hand)
    write_step(root / "step-000030", 30)
    (root / "step-000005").mkdir()  # an old incomplete one
    (root / "step-000005" / ADAPTER_WEIGHTS).write_bytes(b"partial")
    (root / ".latest.tmp-99999-abcd").write_text("step-0000")  # killed atomic write of latest

    assert manager.resolve_latest() == root / "step-000020"
    (root / LATEST_FILE).unlink()
    assert manager.resolve_latest() == root / "step-000020"
    assert f"skipping {CHECKPOINTS_DIR}/step-000030: {MANIFEST_FILE}: missing" in log.text()

    manager.save(30, lambda d: write_step(d, 30))
    assert visible(manager) == [LATEST_FILE, "step-000010", "step-000020", "step-000030"]
    assert manager.resolve_latest() == root / "step-000030"
    assert "removing leftover of an interrupted save: checkpoints/.tmp-step-000030-99999" in log
    assert any(m.startswith("deleting checkpoints/step-000005 (incomplete") for m in log)


def test_dir_moved_aside_by_a_killed_replace_is_restored(tmp_path):
    manager, log = make(tmp_path, steps=[10, 20])
    os.rename(manager.root / "step-000020", manager.root / ".old-step-000020-4242")
    manager.save(30, lambda d: write_step(d, 30))
    assert visible(manager) == [LATEST_FILE, "step-000010", "step-000020", "step-000030"]
    assert verify_checkpoint(manager.root / "step-000020") == []
    assert "restored checkpoints/step-000020" in log.text()


# ------------------------------------------------------------------------------- async writer

def test_async_writer_one_at_a_time():
    writer: AsyncCheckpointWriter[int] = AsyncCheckpointWriter()
    lock, running, peak, done = threading.Lock(), [0], [0], []

    def save(i: int) -> int:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.03)
        with lock:
            running[0] -= 1
        done.append(i)
        return i

    for i in range(4):
        writer.submit(lambda i=i: save(i))
        assert writer.busy
    assert writer.wait() == 3
    assert not writer.busy and writer.wait() is None
    assert peak[0] == 1 and done == [0, 1, 2, 3]


def test_async_writer_propagates_errors():
    writer = AsyncCheckpointWriter()

    def fail() -> None:
        raise OSError("no space left on device")

    writer.submit(fail, label="step-000020")
    with pytest.raises(OSError, match="no space") as info:
        writer.wait()
    assert any("step-000020" in note for note in info.value.__notes__)
    assert any(frame.name == "fail" for frame in info.traceback)

    ran = []
    writer.submit(fail)
    with pytest.raises(OSError):
        writer.submit(lambda: ran.append(1))  # the earlier failure surfaces; nothing new starts
    assert ran == [] and not writer.busy


# -------------------------------------------------------------------------------- real kills

def _child_main(run_dir: str) -> None:
    """Save checkpoints in a loop, resuming from the last complete one, until killed."""
    manager = CheckpointManager(Path(run_dir), keep_last_k=2, log=lambda _msg: None)
    latest = manager.resolve_latest()
    step = check_content(latest) if latest is not None else 0
    print("ready", flush=True)
    while True:
        step += 1
        manager.save(step, lambda d, s=step: write_step(d, s, size=1 << 20, chunk=64 << 10))


def test_sigkill_at_random_moments_always_leaves_a_complete_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC_DIR), str(Path(__file__).parent)])}
    code = "import sys, test_checkpoint_manager as t; t._child_main(sys.argv[1])"
    rng = random.Random(0)
    last_step = 0
    for delay in (0.01, 0.05, 0.1, 0.2, 0.35):
        proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        time.sleep(delay + rng.uniform(0, 0.02))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read()

        found = CheckpointManager(run_dir, log=lambda _msg: None).resolve_latest()
        if found is None:
            assert last_step == 0
            continue
        assert verify_checkpoint(found) == []
        step = check_content(found)
        assert step >= last_step  # a kill never loses a checkpoint that was already latest
        last_step = step
    assert last_step >= 5, "the child hardly saved anything; kills did not hit real saves"

    manager, _ = make(tmp_path, keep_last_k=2)
    manager.save(last_step + 1, lambda d: write_step(d, last_step + 1))
    assert not [n for n in visible(manager) if n.startswith(".")]
    assert manager.resolve_latest() == manager.root / step_dir_name(last_step + 1)
