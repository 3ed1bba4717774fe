"""What a run reads besides its config — the dataset and the method's ICSM artifacts and probe
set — recorded in every checkpoint and checked on resume, before anything is written.

Contents are compared, never paths: an identical dataset or artifact dir copied elsewhere resumes;
one regenerated or changed in place is refused with both values and what to do.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from steadyvla.config import ConfigError, RunConfig
from steadyvla.data.fingerprint import dataset_fingerprint, fingerprint_differences
from steadyvla.data.frames import FrameSource
from steadyvla.model.base_init import BASE_INIT_KEY

if TYPE_CHECKING:  # only for annotations: a baseline run never imports the method
    from steadyvla.method.artifacts import IcsmArtifacts
    from steadyvla.method.probe import ProbeSet

INPUTS_KEY = "inputs"  # trainer_state.json key holding the dict below
DATASET_KEY = "dataset"
ICSM_KEY = "icsm"
PROBE_KEY = "probe"
NEW_RUN_HINT = "or start a new run (another run_id / run_id_note)"


def collect_run_inputs(source: FrameSource, artifacts: IcsmArtifacts | None = None,
                       probe: ProbeSet | None = None, base_init_device: str | None = None) -> dict[str, Any]:
    """Fingerprint of the dataset; with the method, content hash and build settings of the ICSM
    artifacts and the probe set's hash; for a LoRA run of a random-init preset, the device type its
    base was drawn on (`model.base_init`)."""
    inputs: dict[str, Any] = {DATASET_KEY: dataset_fingerprint(source)}
    if base_init_device is not None:
        inputs[BASE_INIT_KEY] = base_init_device
    if artifacts is not None:
        inputs[ICSM_KEY] = {"sha256": artifacts.content_sha256(), "settings": artifacts.build_settings()}
    if probe is not None:
        inputs[PROBE_KEY] = {"sha256": probe.digest(), "origin": probe.origin}
    return inputs


def check_run_inputs(cfg: RunConfig, checkpoint: Path, state: dict[str, Any], inputs: dict[str, Any],
                     artifact_dir: Path | None = None) -> None:
    """Refuse (ConfigError) a resume whose dataset, ICSM artifacts or probe set differ from the
    ones checkpoint `checkpoint` (its trainer state `state`) was trained with."""
    stored = state.get(INPUTS_KEY)
    if stored is None:
        _check_legacy_data_root(cfg, checkpoint, state)
        return
    dataset = Path(cfg.data_root_dir) / cfg.dataset_name
    differences = fingerprint_differences(stored[DATASET_KEY], inputs[DATASET_KEY])
    if differences:
        raise ConfigError(
            f"dataset {dataset} (config fields `data_root_dir`/`dataset_name`) is not the dataset checkpoint "
            f"{checkpoint} was trained on: {'; '.join(differences)}. Point `data_root_dir` at the original "
            f"dataset (an identical copy anywhere is fine), {NEW_RUN_HINT}"
        )
    if ICSM_KEY in stored and ICSM_KEY in inputs and stored[ICSM_KEY] != inputs[ICSM_KEY]:
        was, now = stored[ICSM_KEY], inputs[ICSM_KEY]
        settings = [f"{k}: checkpoint {was['settings'].get(k)!r}, now {now['settings'].get(k)!r}"
                    for k in sorted(set(was["settings"]) | set(now["settings"]))
                    if was["settings"].get(k) != now["settings"].get(k)]
        raise ConfigError(
            f"ICSM artifacts in {artifact_dir} (config field `icms_artifact_dir`) are not the ones checkpoint "
            f"{checkpoint} was trained against: content sha256 checkpoint {was['sha256']}, now {now['sha256']}"
            f"{'; built with ' + '; '.join(settings) if settings else ''}. Restore the original artifacts "
            f"(or rebuild them with the checkpoint's settings), {NEW_RUN_HINT}"
        )
    if BASE_INIT_KEY in stored and BASE_INIT_KEY in inputs and stored[BASE_INIT_KEY] != inputs[BASE_INIT_KEY]:
        raise ConfigError(
            f"checkpoint {checkpoint} adapts a base drawn on {stored[BASE_INIT_KEY]!r} from `seed` {cfg.seed}; "
            f"resuming on {inputs[BASE_INIT_KEY]!r} would rebuild another base (the generators differ). "
            f"Resume on a {stored[BASE_INIT_KEY]!r} device, {NEW_RUN_HINT}")
    if PROBE_KEY in stored and PROBE_KEY in inputs and stored[PROBE_KEY]["sha256"] != inputs[PROBE_KEY]["sha256"]:
        raise ConfigError(
            f"probe set ({inputs[PROBE_KEY]['origin']}; config fields `probe_jsonl`/`probe_dataset_name`) is not "
            f"the one checkpoint {checkpoint} was trained with: sha256 checkpoint {stored[PROBE_KEY]['sha256']}, "
            f"now {inputs[PROBE_KEY]['sha256']}. Restore the original probe set, {NEW_RUN_HINT}"
        )


def _check_legacy_data_root(cfg: RunConfig, checkpoint: Path, state: dict[str, Any]) -> None:
    # Checkpoints written before fingerprints: the path is all there is to compare.
    stored_root = state.get("config", {}).get("data_root_dir")
    if stored_root is not None and stored_root != cfg.data_root_dir:
        raise ConfigError(
            f"config field `data_root_dir`: checkpoint {stored_root!r}, now {cfg.data_root_dir!r}; checkpoint "
            f"{checkpoint} predates dataset fingerprints, so the dataset cannot be verified at another path. "
            f"Use the checkpoint's data_root_dir, {NEW_RUN_HINT}"
        )
