"""Write a complete OpenVLA Hugging Face directory (DESIGN.md §8), atomically.

Weights go out shard by shard (each shard's tensors are cast and made contiguous only while that
shard is written), so writing needs about one shard on top of the model that is being saved.
The directory is assembled in a hidden sibling and renamed into place: readers see the old
directory or the complete new one.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors.torch import save_file

from steadyvla.atomic_files import fsync_tree, replace_dir
from steadyvla.model.openvla_config import (
    CONFIG_JSON, GENERATION_CONFIG_JSON, PREPROCESSOR_CONFIG_JSON, PROCESSOR_CONFIG_JSON, generation_config,
    openvla_config_from_spec, preprocessor_config_from_spec, processor_config,
)
from steadyvla.model.openvla_keys import (
    SAFETENSORS_METADATA, SINGLE_WEIGHTS, WEIGHTS_INDEX, shard_name, to_openvla_key,
)
from steadyvla.model.spec import VLASpec

ShardLoader = Callable[[list[str]], dict[str, torch.Tensor]]  # module names -> their tensors
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3  # openvla-7b's 15 GB of bf16 -> three shards, as upstream
TOKENIZER_MODEL = "tokenizer.model"
TOKENIZER_CONFIG_JSON = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_JSON = "special_tokens_map.json"
ADDED_TOKENS_JSON = "added_tokens.json"


def _plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    used = 0
    for key, size in sizes:
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += size
    return shards


def write_weights(tensors: dict[str, torch.Tensor], out: Path, dtype: torch.dtype | None,
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, load_shard: ShardLoader | None = None) -> int:
    """Write module tensors under their OpenVLA keys as sharded safetensors + index (or a single
    `model.safetensors` when everything fits in one shard); returns the number of shards.

    With `load_shard`, `tensors` only describes the weights (shapes and dtypes; meta tensors do)
    and `load_shard(names)` reads each shard's tensors just before it is written, so host memory
    holds one shard at a time (a full-training checkpoint is exported this way).
    """
    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    keyed = {to_openvla_key(name): t for name, t in tensors.items()}
    module_name = {to_openvla_key(name): name for name in tensors}
    itemsize = {k: (dtype.itemsize if dtype is not None and t.is_floating_point() else t.element_size())
                for k, t in keyed.items()}
    shards = _plan_shards([(k, t.numel() * itemsize[k]) for k, t in keyed.items()], max_shard_bytes)
    weight_map = {}
    for i, keys in enumerate(shards, start=1):
        name = SINGLE_WEIGHTS if len(shards) == 1 else shard_name(i, len(shards))
        source = load_shard([module_name[k] for k in keys]) if load_shard is not None else None
        part = {k: cast(source[module_name[k]] if source is not None else keyed[k]).detach().to("cpu").contiguous()
                for k in keys}
        del source
        save_file(part, str(out / name), metadata=SAFETENSORS_METADATA)
        del part
        weight_map.update({k: name for k in keys})
    if len(shards) > 1:
        total = sum(keyed[k].numel() * itemsize[k] for k in keyed)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return len(shards)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_tokenizer(tokenizer, out: Path, max_length: int) -> None:
    """Tokenizer files as OpenVLA ships them: tokenizer.json (+ tokenizer.model when the source had
    one), tokenizer_config.json, special_tokens_map.json, added_tokens.json (`<PAD>`)."""
    tokenizer.save_pretrained(str(out))
    source_model = getattr(tokenizer, "vocab_file", None)
    if source_model and Path(source_model).is_file() and Path(source_model).name == TOKENIZER_MODEL:
        shutil.copyfile(source_model, out / TOKENIZER_MODEL)
    config = json.loads((out / TOKENIZER_CONFIG_JSON).read_text())
    # a class name that Transformers 4.x (OpenVLA's own loader) resolves as well as 5.x
    config["tokenizer_class"] = "LlamaTokenizer" if (out / TOKENIZER_MODEL).exists() else "PreTrainedTokenizerFast"
    config.update(add_bos_token=True, add_eos_token=False, padding_side="right", model_max_length=max_length)
    _write_json(out / TOKENIZER_CONFIG_JSON, config)
    special = {name: getattr(tokenizer, name) for name in ("bos_token", "eos_token", "unk_token", "pad_token")
               if getattr(tokenizer, name, None) is not None}
    _write_json(out / SPECIAL_TOKENS_MAP_JSON, {k: str(v) for k, v in special.items()})
    added = {tok: i for tok, i in tokenizer.get_added_vocab().items() if i >= tokenizer.vocab_size}
    _write_json(out / ADDED_TOKENS_JSON, added)


def staging_dir(final: Path) -> Path:
    """A fresh hidden sibling of `final` to assemble a directory in."""
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir(parents=True)
    return tmp


def commit_dir(staged: Path, final: Path) -> None:
    """fsync `staged` and rename it to `final` (replacing an existing directory whole)."""
    fsync_tree(staged)
    replace_dir(staged, final)


def write_openvla_dir(
    out: Path | str,
    spec: VLASpec,
    tensors: dict[str, torch.Tensor],
    tokenizer,
    norm_stats: dict,
    dtype: torch.dtype | None = torch.bfloat16,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    copy_from: Iterable[Path] = (),
    config: dict | None = None,
    load_shard: ShardLoader | None = None,
) -> Path:
    """Write `out` in the exact OpenVLA layout, atomically.

    `tensors` is a module state dict (timm names; LayerScale is renamed on the way out); `dtype`
    casts floating tensors (None keeps them). `copy_from` files are copied first (a merge carries
    the base directory's other files over); `config`, when given, is written instead of one
    derived from `spec` (a merge keeps the base's config.json with updated `norm_stats`).
    `load_shard`: read the tensors shard by shard instead (see `write_weights`).
    """
    out = Path(out)
    staged = staging_dir(out)
    try:
        for path in copy_from:
            shutil.copy2(path, staged / path.name)
        dtype_name = str(dtype or next(iter(tensors.values())).dtype).removeprefix("torch.")
        write_weights(tensors, staged, dtype, max_shard_bytes, load_shard)
        _write_json(staged / CONFIG_JSON, config or openvla_config_from_spec(spec, norm_stats, dtype_name))
        if not (staged / TOKENIZER_CONFIG_JSON).exists():
            write_tokenizer(tokenizer, staged, int(spec.llm.get("max_position_embeddings", 2048)))
        for name, content in ((GENERATION_CONFIG_JSON, lambda: generation_config(tokenizer)),
                              (PREPROCESSOR_CONFIG_JSON, lambda: preprocessor_config_from_spec(spec)),
                              (PROCESSOR_CONFIG_JSON, processor_config)):
            if not (staged / name).exists():  # files carried over from a base dir win
                _write_json(staged / name, content())
        commit_dir(staged, out)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return out
