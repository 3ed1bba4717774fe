"""Build the tokenizer, the VLA and its LoRA wrapper from a RunConfig."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from steadyvla.config import ConfigError, RunConfig
from steadyvla.model.action_tokenizer import ActionTokenizer
from steadyvla.model.bundle import tokenizer_from_dir
from steadyvla.model.openvla_config import OpenVLAFormatError
from steadyvla.model.openvla_load import OpenVLADir, check_weights, load_weights, read_openvla_dir
from steadyvla.model.presets import get_preset, tiny_tokenizer_dir
from steadyvla.model.spec import VLASpec
from steadyvla.model.vla import VLA

# The LM head stays frozen, as in OpenVLA's "all-linear" LoRA (PEFT only skips it for HF models).
LORA_EXCLUDED_MODULES = ["language_model.lm_head"]


def openvla_source(cfg: RunConfig) -> OpenVLADir:
    """The checked OpenVLA directory of `vla_path`: config, index and every shard header agree
    with the model config.json describes (cheap: the model is built on the meta device). Errors
    name the field, the file and what was expected."""
    try:
        src = read_openvla_dir(cfg.vla_path)
        check_weights(src)
    except OpenVLAFormatError as err:
        raise OpenVLAFormatError(f"config field `vla_path`: {err}") from err
    if cfg.tokenizer_path:
        raise ConfigError(f"config field `tokenizer_path`: {cfg.tokenizer_path!r} conflicts with `vla_path` "
                          f"{cfg.vla_path!r}, whose own tokenizer is used; set `tokenizer_path: null`")
    return src


def load_tokenizer(cfg: RunConfig):
    """Tokenizer from `vla_path`, `tokenizer_path`, or the one shipped for the tiny preset."""
    if cfg.vla_path:
        return tokenizer_from_dir(cfg.vla_path)
    if cfg.tokenizer_path:
        path = Path(cfg.tokenizer_path)
        if not path.is_dir():
            raise ConfigError(f"config field `tokenizer_path`: {cfg.tokenizer_path!r} is not a directory")
        return tokenizer_from_dir(path)
    if cfg.model_preset == "tiny":
        return tokenizer_from_dir(tiny_tokenizer_dir())
    raise ConfigError(
        f"config field `tokenizer_path`: required for model_preset {cfg.model_preset!r} (a local directory with "
        "the Llama-2 tokenizer files, e.g. tokenizer.model); only `tiny` ships its own tokenizer"
    )


def model_spec(cfg: RunConfig, tokenizer) -> VLASpec:
    """What the model is built from: `vla_path`'s config.json, else the preset sized to the tokenizer."""
    if cfg.vla_path:
        return read_openvla_dir(cfg.vla_path).spec
    return get_preset(cfg.model_preset).spec(len(tokenizer), int(tokenizer.pad_token_id), int(tokenizer.vocab_size))


def action_tokenizer_for(tokenizer, spec: VLASpec | None = None) -> ActionTokenizer:
    """Action bins on the last 256 ids before <PAD> (tokenizer.vocab_size: 32000 for Llama-2).

    With `spec` the end is `spec.action_vocab_end`: OpenVLA's own `text vocab - pad_to_multiple_of`
    (what its `predict_action` decodes with; 32000 for Llama-2), or a preset's tokenizer's own end,
    which a merged export records in config.json so that inference decodes as training encoded.
    """
    if spec is not None:
        return ActionTokenizer(vocab_end=spec.action_vocab_end, n_bins=spec.n_action_bins)
    return ActionTokenizer(vocab_end=int(tokenizer.vocab_size))


def build_vla(cfg: RunConfig, tokenizer, device: torch.device | str = "cpu",
              init_device: torch.device | str | None = None) -> VLA:
    """The VLA of `vla_path` (weights streamed onto `device` in `cfg.dtype`), or the preset with
    deterministic random init from `cfg.seed`, built directly on `device` (a 7B model initialised
    on the CPU takes minutes and 30 GB of host RAM). The init's numbers depend on the device type
    (CPU and CUDA generators differ): `init_device` draws them where a run's base was drawn
    (`model.base_init`), then the model moves to `device`."""
    dtype = getattr(torch, cfg.dtype)
    if cfg.vla_path:
        return load_weights(openvla_source(cfg), device, dtype)
    torch.manual_seed(cfg.seed)
    with torch.device(init_device if init_device is not None else device):
        model = VLA(model_spec(cfg, tokenizer))
    return model.to(device=device, dtype=dtype)


def _target_modules(spec: str) -> str | list[str]:
    return spec if spec == "all-linear" else [name.strip() for name in spec.split(",") if name.strip()]


def lora_config(cfg: RunConfig) -> LoraConfig:
    """PEFT LoRA on every linear layer except the LM head, Gaussian init (as OpenVLA)."""
    return LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.effective_lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=_target_modules(cfg.lora_target_modules),
        exclude_modules=LORA_EXCLUDED_MODULES,
        init_lora_weights="gaussian",
    )


def wrap_lora(model: VLA, cfg: RunConfig) -> PeftModel:
    """Freeze the base model and attach LoRA adapters (init draws from the seeded torch RNG)."""
    torch.manual_seed(cfg.seed + 1)
    return get_peft_model(model, lora_config(cfg))
