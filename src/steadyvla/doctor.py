"""`steadyvla doctor --config X`: the users' pre-resume checklist, automated.

Will the run fit in GPU and host memory (the preflight), what would be resumed, is it complete
(manifest verified), is its step aligned with `save_steps`, does the config match it, where does the
log stand (step, lr, loss), and is there disk space for the next save. Read-only: it never writes into the run dir.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from steadyvla.checkpoint.layout import METRICS_JSONL
from steadyvla.checkpoint.run_lock import describe_holder, is_locked_elsewhere, read_holder
from steadyvla.config import ConfigError, RunConfig
from steadyvla.data.fingerprint import dataset_fingerprint
from steadyvla.memory_report import preflight_for
from steadyvla.train.finetune import DEMO_DATASET_NAME
from steadyvla.train.metrics import read_metrics
from steadyvla.train.resume import ResumePlan, config_changes, plan_resume
from steadyvla.train.run_inputs import DATASET_KEY, INPUTS_KEY, check_run_inputs
from steadyvla.train.run_dir import run_dir_for

OK, WARN, FAIL = "ok  ", "warn", "FAIL"


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _check_dataset(cfg: RunConfig, plan: ResumePlan, report: Callable[[str, str], None]) -> None:
    """Compare the dataset with the checkpoint's fingerprint (reads only)."""
    from steadyvla.data.registry import open_frame_source

    if INPUTS_KEY not in plan.state:
        report(WARN, f"dataset: checkpoint {plan.checkpoint.name} predates dataset fingerprints; it cannot be verified")
        return
    try:
        source = open_frame_source(Path(cfg.data_root_dir), cfg.dataset_name, image_key=cfg.image_key)
        check_run_inputs(cfg, plan.checkpoint, plan.state, {DATASET_KEY: dataset_fingerprint(source)})
    except ConfigError as err:
        report(FAIL, str(err))
    except (OSError, ValueError) as err:
        report(FAIL, f"dataset: {err}")
    else:
        report(OK, "dataset matches the checkpoint's fingerprint")


def run_doctor(cfg: RunConfig) -> int:
    """Print the checklist; exit status 1 if any item fails (a resume would error or be wrong)."""
    failures = 0

    def report(status: str, message: str) -> None:
        nonlocal failures
        failures += status == FAIL
        print(f"[{status}] {message}")

    run_dir = run_dir_for(cfg)
    report(OK, f"run dir: {run_dir} ({'exists' if run_dir.exists() else 'new run'})")
    if is_locked_elsewhere(run_dir):
        report(WARN, f"run dir in use by {describe_holder(read_holder(run_dir))}: a start now would be refused")
    data = Path(cfg.data_root_dir) / cfg.dataset_name
    if data.exists():
        report(OK, f"dataset: {data}")
    elif cfg.dataset_name == DEMO_DATASET_NAME:
        report(WARN, f"dataset: {data} missing; the MetaWorld demo will be generated on the first start")
    else:
        report(FAIL, f"dataset: {data} does not exist")
    memory = preflight_for(cfg)
    if memory.fits:
        report(OK, f"memory: {memory.summary()} (`steadyvla memory` shows the table)")
    else:
        report(WARN if cfg.force else FAIL, f"memory: will not fit: {'; '.join(memory.problems)}; would fit: "
                                            f"{' | '.join(memory.knobs)}")
    notes: list[str] = []
    try:
        plan = plan_resume(cfg, run_dir, notes.append)
    except ConfigError as err:
        for note in notes:
            report(WARN, note)
        report(FAIL, f"resume: {err}")
        return 1
    for note in notes:
        report(WARN if note.startswith("skipping") else OK, note)
    if plan.checkpoint is None:
        report(OK, "nothing to resume: a start would begin at step 0")
        return 1 if failures else 0
    report(OK, f"checkpoint verified (sha256 manifest): {plan.checkpoint}, step {plan.step}")
    aligned = plan.step % cfg.save_steps == 0 or plan.step == cfg.max_steps
    report(OK if aligned else WARN, f"step {plan.step} {'is' if aligned else 'is NOT'} a multiple of "
                                    f"save_steps={cfg.save_steps}")
    try:
        changes = config_changes(cfg, plan)
        report(OK, "config matches the checkpoint in every resume-critical field")
        for key, change in changes.items():
            report(WARN, f"changed since the checkpoint (allowed, recorded in starts.jsonl): `{key}`: "
                         f"{change['checkpoint']!r} -> {change['now']!r}")
    except ConfigError as err:
        report(FAIL, str(err))
    if data.exists():
        _check_dataset(cfg, plan, report)
    logged = [r for r in read_metrics(run_dir / METRICS_JSONL) if r.get("step") == plan.step]
    if logged:
        row = logged[-1]
        report(OK, f"log at step {plan.step}: lr {row.get('lr', float('nan')):.3e}, "
                   f"train_loss {row.get('train_loss', float('nan')):.4f}")
    else:
        report(WARN, f"no metrics.jsonl line for step {plan.step}")
    need = _dir_size(plan.checkpoint)
    free = shutil.disk_usage(run_dir).free
    report(OK if free > 2 * need else FAIL, f"disk: {free / 2**30:.1f} GiB free, one checkpoint is "
                                            f"{need / 2**20:.1f} MiB")
    print(f"a start now would continue at step {plan.step + 1} of {cfg.max_steps}")
    return 1 if failures else 0
