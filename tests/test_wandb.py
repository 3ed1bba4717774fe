"""`use_wandb: true`: one W&B run per run dir, continued on resume without duplicated steps."""

import json
import sys
import types
from pathlib import Path

import pytest

from helpers import metrics_lines
from steadyvla.config import ConfigError
from steadyvla.train.finetune import finetune
from steadyvla.train.run_dir import run_dir_for
from steadyvla.train.wandb_log import WANDB_STATE, WandbTracker


class FakeWandb(types.ModuleType):
    """Records init arguments and logged steps per run id; refuses a step that goes backwards, as W&B does."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.steps = [], {}

    def init(self, **kwargs):
        self.inits.append(kwargs)
        steps = self.steps.setdefault(kwargs["id"], [])
        fake = self

        class Run:
            def log(self, metrics, step):
                assert not steps or step > steps[-1], f"step {step} after {steps[-1]}"
                assert "train_loss" in metrics
                steps.append(step)

            def finish(self):
                fake.finished = True

        return Run()


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc entry


def test_resumed_run_continues_the_same_wandb_run_without_duplicate_steps(make_config, monkeypatch, no_credentials):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    first = make_config(use_wandb=True, wandb_project="proj", max_steps=2, save_steps=2)
    finetune(first, log=lambda m: None)
    run_dir = run_dir_for(first)
    state = json.loads((run_dir / WANDB_STATE).read_text())
    assert fake.steps == {state["id"]: [1, 2]} and state["last_step"] == 2
    assert fake.inits[0]["mode"] == "offline" and fake.inits[0]["resume"] == "allow"
    assert fake.inits[0]["project"] == "proj" and fake.inits[0]["dir"] == str(run_dir)
    # a kill after step 3 reached W&B but before its checkpoint: the resume redoes step 3
    (run_dir / WANDB_STATE).write_text(json.dumps({**state, "last_step": 3}))
    fake.steps[state["id"]].append(3)
    finetune(make_config(use_wandb=True, wandb_project="proj", max_steps=4, save_steps=2), log=lambda m: None)
    assert fake.inits[1]["id"] == state["id"]
    assert fake.steps == {state["id"]: [1, 2, 3, 4]}
    assert [r["step"] for r in metrics_lines(run_dir)] == [1, 2, 3, 4]


def test_missing_wandb_package_is_a_config_error(monkeypatch, tmp_path, make_config):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ConfigError, match=r"use_wandb`: true, but the `wandb` package is not installed"):
        WandbTracker(tmp_path, make_config(use_wandb=True))


def test_real_wandb_offline_keeps_the_run_id(tmp_path, make_config, monkeypatch, no_credentials):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = make_config(use_wandb=True)
    tracker = WandbTracker(tmp_path, cfg, log=lambda m: None)
    tracker.log(1, {"train_loss": 1.0})
    tracker.close()
    again = WandbTracker(tmp_path, cfg, log=lambda m: None)
    again.log(1, {"train_loss": 9.0})  # already sent: skipped
    again.log(2, {"train_loss": 0.5})
    again.close()
    assert again.run_id == tracker.run_id
    runs = sorted(p.name for p in (tmp_path / "wandb").glob("offline-run-*"))
    assert runs and all(name.endswith(tracker.run_id) for name in runs)
    assert json.loads((tmp_path / WANDB_STATE).read_text()) == {"id": tracker.run_id, "last_step": 2}


def test_offline_without_network_even_with_a_key(monkeypatch):
    import steadyvla.train.wandb_log as wandb_log

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setattr(wandb_log, "_reachable", lambda timeout=3.0: False)
    assert wandb_log.wandb_mode() == "offline"
    monkeypatch.setattr(wandb_log, "_reachable", lambda timeout=3.0: True)
    assert wandb_log.wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_log.wandb_mode() == "disabled"
