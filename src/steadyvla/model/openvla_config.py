"""OpenVLA's Hugging Face `config.json` / `preprocessor_config.json` <-> `VLASpec` (DESIGN.md §8).

Reading honours every explicit `text_config` field (any LLM size), `timm_model_ids`,
`image_sizes`, `timm_override_act_layers`, `use_fused_vision_backbone` and `arch_specifier`.
Writing produces the upstream fields; `text_config` carries the four upstream keys plus every
LLM field that differs from a `LlamaConfig` default, so any shape reads back as it was written.

Two steadyvla extensions, never written for openvla-7b: `timm_model_kwargs` (per-tower timm
constructor overrides such as depth or width) for shapes that are not a registered timm model (the
tiny test towers), and `action_vocab_end` where a preset's tokenizer ends its action bins somewhere
else than OpenVLA's `text vocab - pad_to_multiple_of` (the tiny tokenizer: 705, not 704).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import transformers
from transformers import LlamaConfig

from steadyvla.config import ConfigError
from steadyvla.model.presets import DINOV2_MEAN, DINOV2_STD, SIGLIP_MEAN, SIGLIP_STD
from steadyvla.model.spec import TowerSpec, VLASpec

CONFIG_JSON = "config.json"
GENERATION_CONFIG_JSON = "generation_config.json"
PREPROCESSOR_CONFIG_JSON = "preprocessor_config.json"
PROCESSOR_CONFIG_JSON = "processor_config.json"

MODEL_TYPE = "openvla"
ARCHITECTURE = "OpenVLAForActionPrediction"
AUTO_MAP = {
    "AutoConfig": "configuration_prismatic.OpenVLAConfig",
    "AutoModelForVision2Seq": "modeling_prismatic.OpenVLAForActionPrediction",
}
PROCESSOR_AUTO_MAP = {
    "AutoImageProcessor": "processing_prismatic.PrismaticImageProcessor",
    "AutoProcessor": "processing_prismatic.PrismaticProcessor",
}
RESIZE_NAIVE = "resize-naive"
BICUBIC = "bicubic"
PIL_BICUBIC = 3  # torchvision InterpolationMode.BICUBIC as stored in tvf_resize_params
FUSED_ARCH = "no-align+fused-gelu-mlp"
SINGLE_ARCH = "no-align+gelu-mlp"
# text_config keys that describe the file, not the LLM's shape
_TEXT_CONFIG_META = ("model_type", "torch_dtype", "dtype")
TIMM_KWARGS_FIELD = "timm_model_kwargs"
ACTION_END_FIELD = "action_vocab_end"  # steadyvla-only, where a preset's action bins end (never for 7b)


class OpenVLAFormatError(ConfigError):
    """A directory, file or field does not match the OpenVLA layout; the message names it."""


def read_json(path: Path) -> dict:
    """A JSON object from `path`, or an OpenVLAFormatError naming the file."""
    if not path.is_file():
        raise OpenVLAFormatError(f"{path}: missing (expected an OpenVLA Hugging Face checkpoint directory)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise OpenVLAFormatError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise OpenVLAFormatError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _field(config: dict, name: str, kind: type | tuple[type, ...], source: Path) -> Any:
    if name not in config:
        raise OpenVLAFormatError(f"{source}: field `{name}` is missing")
    value = config[name]
    if not isinstance(value, kind):
        raise OpenVLAFormatError(f"{source}: field `{name}` = {value!r}, expected {kind}")
    return value


def _default_normalisation(timm_id: str) -> tuple[tuple, tuple]:
    return (SIGLIP_MEAN, SIGLIP_STD) if "siglip" in timm_id else (DINOV2_MEAN, DINOV2_STD)


def spec_from_openvla_config(config: dict, source: Path) -> VLASpec:
    """The build spec of the OpenVLA checkpoint in `source` from its parsed config.json (and its
    preprocessor_config.json, read here once the config is known to be OpenVLA's)."""
    config_path, pre_path = source / CONFIG_JSON, source / PREPROCESSOR_CONFIG_JSON
    if config.get("model_type") != MODEL_TYPE:
        raise OpenVLAFormatError(f"{config_path}: field `model_type` = {config.get('model_type')!r}, expected {MODEL_TYPE!r}")
    timm_ids = _field(config, "timm_model_ids", list, config_path)
    fused = _field(config, "use_fused_vision_backbone", bool, config_path)
    if len(timm_ids) != (2 if fused else 1):
        raise OpenVLAFormatError(f"{config_path}: field `timm_model_ids` has {len(timm_ids)} entries but "
                                 f"`use_fused_vision_backbone` is {fused} (expected {2 if fused else 1})")
    sizes = _field(config, "image_sizes", list, config_path)
    if len(sizes) != len(timm_ids) or len(set(sizes)) != 1:
        raise OpenVLAFormatError(f"{config_path}: field `image_sizes` = {sizes}, expected one equal size per tower "
                                 f"({len(timm_ids)})")
    arch = _field(config, "arch_specifier", str, config_path)
    if arch.endswith("fused-gelu-mlp") != fused or not arch.endswith("gelu-mlp"):
        raise OpenVLAFormatError(f"{config_path}: field `arch_specifier` = {arch!r}, expected "
                                 f"{FUSED_ARCH if fused else SINGLE_ARCH!r} with use_fused_vision_backbone={fused}")
    acts = config.get("timm_override_act_layers") or [None] * len(timm_ids)
    extra = config.get(TIMM_KWARGS_FIELD) or [{}] * len(timm_ids)
    means, stds = _preprocessing(read_json(pre_path), timm_ids, sizes[0], pre_path)
    towers = tuple(
        TowerSpec(tid, means[i], stds[i],
                  dict(extra[i], img_size=sizes[i], **({"act_layer": acts[i]} if acts[i] else {})))
        for i, tid in enumerate(timm_ids)
    )
    text = _field(config, "text_config", dict, config_path)
    if text.get("model_type", "llama") != "llama":
        raise OpenVLAFormatError(f"{config_path}: field `text_config.model_type` = {text['model_type']!r}, "
                                 "expected 'llama'")
    llm = {k: v for k, v in text.items() if k not in _TEXT_CONFIG_META}
    if "vocab_size" not in llm:
        raise OpenVLAFormatError(f"{config_path}: field `text_config.vocab_size` is missing")
    llm.setdefault("pad_token_id", config.get("pad_token_id"))
    return VLASpec(image_size=int(sizes[0]), towers=towers, llm=llm,
                   pad_to_multiple_of=int(config.get("pad_to_multiple_of", 64)),
                   n_action_bins=int(config.get("n_action_bins", 256)),
                   action_bins_end=config.get(ACTION_END_FIELD))


def _preprocessing(pre: dict, timm_ids: list[str], size: int, path: Path) -> tuple[list, list]:
    strategy = pre.get("image_resize_strategy", RESIZE_NAIVE)
    if strategy != RESIZE_NAIVE:
        raise OpenVLAFormatError(f"{path}: field `image_resize_strategy` = {strategy!r}; only {RESIZE_NAIVE!r} "
                                 "(OpenVLA's) is implemented")
    interpolations = pre.get("interpolations") or [BICUBIC] * len(timm_ids)
    if any(i != BICUBIC for i in interpolations):
        raise OpenVLAFormatError(f"{path}: field `interpolations` = {interpolations}, expected {BICUBIC!r} per tower")
    for i, input_size in enumerate(pre.get("input_sizes") or []):
        if list(input_size) != [3, size, size]:
            raise OpenVLAFormatError(f"{path}: field `input_sizes[{i}]` = {input_size}, expected [3, {size}, {size}] "
                                     "(config.json image_sizes)")
    defaults = [_default_normalisation(t) for t in timm_ids]
    means = [tuple(m) for m in pre.get("means") or [d[0] for d in defaults]]
    stds = [tuple(s) for s in pre.get("stds") or [d[1] for d in defaults]]
    if len(means) != len(timm_ids) or len(stds) != len(timm_ids):
        raise OpenVLAFormatError(f"{path}: fields `means`/`stds` need one entry per tower ({len(timm_ids)})")
    return means, stds


def _text_config(spec: VLASpec, dtype_name: str) -> dict:
    defaults = LlamaConfig().to_dict()
    text = {"model_type": "llama", "pad_token_id": spec.llm.get("pad_token_id"), "torch_dtype": dtype_name,
            "vocab_size": spec.llm["vocab_size"]}
    text.update({k: v for k, v in spec.llm.items() if k not in text and defaults.get(k, object()) != v})
    return dict(sorted(text.items()))


def openvla_config_from_spec(spec: VLASpec, norm_stats: dict, dtype_name: str = "bfloat16") -> dict:
    """config.json contents for `spec` with the fields OpenVLA writes (DESIGN.md §8)."""
    ids = [t.timm_id for t in spec.towers]
    config = {
        "arch_specifier": FUSED_ARCH if spec.fused else SINGLE_ARCH,
        "architectures": [ARCHITECTURE],
        "auto_map": AUTO_MAP,
        "hf_llm_id": "meta-llama/Llama-2-7b-hf",
        "image_resize_strategy": RESIZE_NAIVE,
        "image_sizes": [spec.image_size] * len(ids),
        "llm_backbone_id": "llama2-7b-pure",
        "llm_max_length": spec.llm.get("max_position_embeddings", 2048),
        "model_type": MODEL_TYPE,
        "n_action_bins": spec.n_action_bins,
        "norm_stats": norm_stats,
        "output_projector_states": False,
        "pad_to_multiple_of": spec.pad_to_multiple_of,
        "pad_token_id": spec.llm.get("pad_token_id"),
        "text_config": _text_config(spec, dtype_name),
        "timm_model_ids": ids,
        "timm_override_act_layers": [t.overrides.get("act_layer") for t in spec.towers],
        "torch_dtype": dtype_name,
        "transformers_version": transformers.__version__,
        "use_fused_vision_backbone": spec.fused,
        "vision_backbone_id": "dinosiglip-vit-so-224px" if spec.fused else f"{ids[0]}-{spec.image_size}px",
    }
    extra = [{k: v for k, v in t.overrides.items() if k not in ("img_size", "act_layer")} for t in spec.towers]
    if any(extra):
        config[TIMM_KWARGS_FIELD] = extra
    if spec.action_bins_end is not None:
        config[ACTION_END_FIELD] = spec.action_bins_end
    return config


def preprocessor_config_from_spec(spec: VLASpec) -> dict:
    """preprocessor_config.json: OpenVLA's PrismaticImageProcessor fields for `spec`'s towers."""
    size = [spec.image_size, spec.image_size]
    return {
        "auto_map": PROCESSOR_AUTO_MAP,
        "image_processor_type": "PrismaticImageProcessor",
        "image_resize_strategy": RESIZE_NAIVE,
        "input_sizes": [[3, *size] for _ in spec.towers],
        "interpolations": [BICUBIC for _ in spec.towers],
        "means": [list(t.mean) for t in spec.towers],
        "processor_class": "PrismaticProcessor",
        "stds": [list(t.std) for t in spec.towers],
        "tvf_crop_params": [{"output_size": size} for _ in spec.towers],
        "tvf_do_letterbox": False,
        "tvf_letterbox_fill": None,
        "tvf_normalize_params": [{"inplace": False, "mean": list(t.mean), "std": list(t.std)} for t in spec.towers],
        "tvf_resize_params": [{"antialias": True, "interpolation": PIL_BICUBIC, "max_size": None, "size": size}
                              for _ in spec.towers],
        "use_fused_vision_backbone": spec.fused,
    }


def processor_config() -> dict:
    """processor_config.json as OpenVLA ships it."""
    return {"auto_map": {"AutoProcessor": PROCESSOR_AUTO_MAP["AutoProcessor"]}, "processor_class": "PrismaticProcessor"}


def generation_config(tokenizer) -> dict:
    """generation_config.json as OpenVLA ships it (ids from the tokenizer)."""
    return {"_from_model_config": True, "bos_token_id": int(tokenizer.bos_token_id),
            "eos_token_id": int(tokenizer.eos_token_id), "pad_token_id": int(tokenizer.pad_token_id),
            "transformers_version": transformers.__version__}
