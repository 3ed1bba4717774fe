"""Build the tokenizer, the VLA and its LoRA wrapper from a RunConfig."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoTokenizer

from steadyvla.config import ConfigError, RunConfig
from steadyvla.model.action_tokenizer import ActionTokenizer
from steadyvla.model.presets import get_preset, tiny_tokenizer_dir
from steadyvla.model.vla import VLA

# The LM head stays frozen, as in OpenVLA's "all-linear" LoRA (PEFT only skips it for HF models).
LORA_EXCLUDED_MODULES = ["language_model.lm_head"]


def load_tokenizer(cfg: RunConfig):
    """Tokenizer from `tokenizer_path`, or the one shipped for the tiny preset (`vla_path` weights
    loading is not available yet and is refused rather than silently ignored)."""
    if cfg.vla_path:
        raise ConfigError(
            f"config field `vla_path`: {cfg.vla_path!r}: loading OpenVLA weights is not available yet (it comes with "
            "the OpenVLA checkpoint I/O work); set `vla_path: null` to train the preset from random init"
        )
    if cfg.tokenizer_path:
        path = Path(cfg.tokenizer_path)
        if not path.is_dir():
            raise ConfigError(f"config field `tokenizer_path`: {cfg.tokenizer_path!r} is not a directory")
        tok = AutoTokenizer.from_pretrained(str(path))
    elif cfg.model_preset == "tiny":
        tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir()))
    else:
        raise ConfigError(
            f"config field `tokenizer_path`: required for model_preset {cfg.model_preset!r} (a local directory with "
            "the Llama-2 tokenizer files, e.g. tokenizer.model); only `tiny` ships its own tokenizer"
        )
    if tok.pad_token_id is None:
        tok.add_special_tokens({"pad_token": "<PAD>"})
    return tok


def action_tokenizer_for(tokenizer) -> ActionTokenizer:
    """Action bins on the last 256 ids before <PAD> (tokenizer.vocab_size: 32000 for Llama-2)."""
    return ActionTokenizer(vocab_end=int(tokenizer.vocab_size))


def build_vla(cfg: RunConfig, tokenizer, device: torch.device | str = "cpu") -> VLA:
    """The VLA with deterministic random init from `cfg.seed`, built directly on `device` (a 7B
    model initialised on the CPU takes minutes and 30 GB of host RAM)."""
    torch.manual_seed(cfg.seed)
    with torch.device(device):
        model = VLA(get_preset(cfg.model_preset).spec(len(tokenizer), int(tokenizer.pad_token_id)))
    return model.to(dtype=getattr(torch, cfg.dtype))


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
