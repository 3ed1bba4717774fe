"""`steadyvla merge`: fold a LoRA checkpoint into its base and write a deployable OpenVLA dir.

The base is loaded once, in its stored dtype, on the CPU (one model copy); PEFT merges the
adapter in place; the merged tensors are written shard by shard under the base's key names and
dtypes. `norm_stats` = the base's, updated with the run's `dataset_statistics.json` (OpenVLA
replaces the base statistics with the fine-tuning run's at inference). The base directory's
other files (tokenizer, processor, generation config, remote code, README, ...) are carried over.
The output appears atomically (temporary sibling, rename).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from peft import PeftModel

from steadyvla.checkpoint.layout import DATASET_STATISTICS, TRAINER_STATE_JSON
from steadyvla.checkpoint.manager import CheckpointManager
from steadyvla.config import ConfigError, RunConfig, build_config
from steadyvla.data.stats import load_dataset_statistics
from steadyvla.model.base_init import base_init_device
from steadyvla.model.build import build_vla, load_tokenizer, model_spec, openvla_source
from steadyvla.model.openvla_config import CONFIG_JSON
from steadyvla.model.openvla_keys import WEIGHTS_INDEX
from steadyvla.model.openvla_load import OpenVLADir, load_weights
from steadyvla.model.openvla_save import write_openvla_dir

_WEIGHT_SUFFIX = ".safetensors"


def checkpoint_config(ckpt: Path) -> RunConfig:
    """The RunConfig a checkpoint was trained with (stored in its trainer_state.json)."""
    stored = json.loads((ckpt / TRAINER_STATE_JSON).read_text()).get("config")
    if not isinstance(stored, dict):
        raise ConfigError(f"{ckpt / TRAINER_STATE_JSON}: no `config` recorded; cannot tell which base model it adapts")
    values = {k: v for k, v in stored.items() if k != "ignored_keys"}
    return build_config(values)


def _carried_files(base: Path) -> list[Path]:
    """Every file of the base directory except its weights and config.json (rewritten)."""
    return [p for p in sorted(base.iterdir())
            if p.is_file() and p.name not in (CONFIG_JSON, WEIGHTS_INDEX) and not p.name.endswith(_WEIGHT_SUFFIX)]


def _largest_shard_bytes(src: OpenVLADir) -> int | None:
    """Shard like the base: no output shard larger than its largest (None for a single file)."""
    return max((src.path / f).stat().st_size for f in src.shard_files) if len(src.shard_files) > 1 else None


def merged_norm_stats(base_stats: dict, run_dir: Path) -> dict:
    """The base's norm_stats with the run's dataset_statistics.json entries added (same names win)."""
    path = run_dir / DATASET_STATISTICS
    return {**base_stats, **(load_dataset_statistics(path) if path.exists() else {})}


def merge_checkpoint(checkpoint: Path | str, out: Path | str, log: Callable[[str], None] = print,
                     max_shard_bytes: int | None = None) -> Path:
    """Merge the LoRA checkpoint (or a run dir's newest complete one) into its base; write `out`.

    A run fine-tuned from `vla_path` keeps that directory's config, key names, dtypes and files;
    a run of a random-init preset is rebuilt from its seed and written from its spec (float32).
    """
    out = Path(out)
    try:
        ckpt = CheckpointManager(Path(checkpoint), log=log).resolve_explicit(Path(checkpoint))
    except Exception as err:  # CheckpointError or an unreadable dir: one line for the user
        raise ConfigError(f"--checkpoint: {err}") from err
    if out.exists():
        raise ConfigError(f"--out: {out} already exists; name a new directory (merge never overwrites)")
    cfg = checkpoint_config(ckpt)
    run_dir = ckpt.parent.parent
    tokenizer = load_tokenizer(cfg)
    if cfg.vla_path:
        src = openvla_source(cfg)
        log(f"merging {ckpt} into {src.path}")
        base = load_weights(src, "cpu", dtype=None)  # stored dtypes, so the output keeps them
        spec, stats, config, carried = src.spec, merged_norm_stats(src.norm_stats, run_dir), dict(src.config), \
            _carried_files(src.path)
        config["norm_stats"] = stats
        max_shard_bytes = max_shard_bytes or _largest_shard_bytes(src)
    else:
        log(f"merging {ckpt} into the seeded `{cfg.model_preset}` preset it was trained from")
        state = json.loads((ckpt / TRAINER_STATE_JSON).read_text())
        base = build_vla(cfg, tokenizer, "cpu", init_device=base_init_device(state, ckpt))
        spec, stats, config, carried = model_spec(cfg, tokenizer), merged_norm_stats({}, run_dir), None, []
    with torch.no_grad():
        merged = PeftModel.from_pretrained(base, str(ckpt)).merge_and_unload()
    kwargs = {"max_shard_bytes": max_shard_bytes} if max_shard_bytes else {}
    write_openvla_dir(out, spec, merged.state_dict(), tokenizer, stats, dtype=None, copy_from=carried,
                      config=config, **kwargs)
    log(f"wrote merged model to {out}")
    return out
