"""`steadyvla ckpt export`: a full-training checkpoint as one consolidated OpenVLA directory.

Offline and single-process: no process group, no GPU. The checkpoint's sha256 manifest is
verified first (DCP's metadata is only read from a verified checkpoint); the model half of its
`model_optim/` DCP directory is checked key by key and shape by shape against the model its
config describes, then read output shard by output shard (host memory holds one shard, not the
model) and written through the same OpenVLA writer as `steadyvla merge`: config.json with
`norm_stats` (the run's dataset_statistics.json), preprocessor and tokenizer files, sharded
safetensors. The optimizer half is never read. The output appears atomically and must not exist.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from steadyvla.checkpoint.dcp_read import DCPReadError, TensorEntry, dcp_dir, load_model_tensors, model_entries
from steadyvla.checkpoint.layout import TRAINER_STATE_JSON
from steadyvla.checkpoint.manager import CheckpointManager
from steadyvla.config import ConfigError
from steadyvla.model.build import load_tokenizer, model_spec, openvla_source
from steadyvla.model.merge import _carried_files, _largest_shard_bytes, checkpoint_config, merged_norm_stats
from steadyvla.model.openvla_load import build_empty
from steadyvla.model.openvla_save import DEFAULT_MAX_SHARD_BYTES, write_openvla_dir
from steadyvla.model.spec import VLASpec

EXPORT_DTYPES = ("float32", "bfloat16")  # `--dtype`; None keeps what the checkpoint stores
_REPORT_KEYS = 5


def check_entries(entries: dict[str, TensorEntry], spec: VLASpec, where: Path) -> None:
    """The checkpoint's model tensors must be exactly the VLA's state dict (names and shapes)."""
    expected = {name: tuple(t.shape) for name, t in build_empty(spec).state_dict().items()}
    missing = [k for k in expected if k not in entries]
    unexpected = [k for k in entries if k not in expected]
    mismatched = [f"{k}: expected {list(expected[k])}, found {list(entries[k].shape)}"
                  for k in expected if k in entries and entries[k].shape != expected[k]]
    problems = [f"{what} ({len(items)}): {'; '.join(items[:_REPORT_KEYS])}"
                for what, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                    ("shape mismatches", mismatched)) if items]
    if problems:
        raise ConfigError(f"--checkpoint: {where}: the model tensors do not match the model its config describes: "
                          + " | ".join(problems))


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in EXPORT_DTYPES:
        raise ConfigError(f"--dtype: {name!r} is not one of {', '.join(EXPORT_DTYPES)} (leave it out to keep the "
                          "checkpoint's own dtype)")
    return getattr(torch, name)


def _with_dtype(config: dict, dtype: torch.dtype) -> dict:
    """A base config.json whose `torch_dtype` fields name the dtype actually written."""
    name = str(dtype).removeprefix("torch.")
    config["torch_dtype"] = name
    if isinstance(config.get("text_config"), dict) and "torch_dtype" in config["text_config"]:
        config["text_config"] = dict(config["text_config"], torch_dtype=name)
    return config


def export_checkpoint(checkpoint: Path | str, out: Path | str, dtype: str | None = None,
                      log: Callable[[str], None] = print, max_shard_bytes: int | None = None) -> Path:
    """Write the model of a full-training checkpoint (or a run dir's newest complete one) to `out`
    as an OpenVLA Hugging Face directory; `dtype` None keeps the stored (float32 master) weights.

    A run trained from `vla_path` keeps that directory's config.json (with the run's statistics
    added to `norm_stats`), its other files and its shard size; a run of a random-init preset is
    written from the preset's spec with its tokenizer.
    """
    out = Path(out)
    cast = _dtype(dtype)
    if out.exists():
        raise ConfigError(f"--out: {out} already exists; name a new directory (export never overwrites)")
    try:  # verifies the sha256 manifest before anything in the checkpoint is read
        ckpt = CheckpointManager(Path(checkpoint), log=log).resolve_explicit(Path(checkpoint))
        path = dcp_dir(ckpt)
        entries = model_entries(path)
    except Exception as err:  # CheckpointError, DCPReadError or an unreadable dir: one line for the user
        raise ConfigError(f"--checkpoint: {err}") from err
    if not (ckpt / TRAINER_STATE_JSON).is_file():
        raise ConfigError(f"--checkpoint: {ckpt} has no {TRAINER_STATE_JSON}")
    cfg = checkpoint_config(ckpt)
    run_dir = ckpt.parent.parent
    tokenizer = load_tokenizer(cfg)
    config, carried = None, []
    if cfg.vla_path:
        src = openvla_source(cfg)
        spec, stats, carried = src.spec, merged_norm_stats(src.norm_stats, run_dir), _carried_files(src.path)
        config = _with_dtype(dict(src.config, norm_stats=stats), cast or next(iter(entries.values())).dtype)
        max_shard_bytes = max_shard_bytes or _largest_shard_bytes(src)
    else:
        spec, stats = model_spec(cfg, tokenizer), merged_norm_stats({}, run_dir)
    check_entries(entries, spec, path)
    order = list(build_empty(spec).state_dict())  # the module's own order, as merge and save_vla write
    described = {name: torch.empty(entries[name].shape, dtype=entries[name].dtype, device="meta") for name in order}

    def load_shard(names: list[str]) -> dict[str, torch.Tensor]:
        try:
            return load_model_tensors(path, {name: entries[name] for name in names})
        except DCPReadError as err:
            raise ConfigError(f"--checkpoint: {err}") from err

    log(f"exporting {ckpt} ({len(order)} tensors) to {out}")
    write_openvla_dir(out, spec, described, tokenizer, stats, dtype=cast, copy_from=carried, config=config,
                      max_shard_bytes=max_shard_bytes or DEFAULT_MAX_SHARD_BYTES, load_shard=load_shard)
    log(f"wrote {out}")
    return out
