"""The run directory's own durability (issue 8, item 14)."""

import os

from steadyvla.config import build_config
from steadyvla.train.run_dir import record_start


def test_creating_the_run_dir_fsyncs_its_parent(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def observe(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", observe)
    run_dir = tmp_path / "runs" / "new"
    record_start(run_dir, build_config({}), resumed_from=None, resumed_step=0, changes={})
    assert run_dir.is_dir()
    assert str(tmp_path / "runs") in synced and str(tmp_path) in synced  # both levels it created
