"""`load_vla`: an OpenVLA directory as one object carrying everything inference needs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

from steadyvla.data.transforms import ImageTransform
from steadyvla.model.action_tokenizer import ActionTokenizer
from steadyvla.model.openvla_config import OpenVLAFormatError
from steadyvla.model.openvla_load import load_weights, read_openvla_dir
from steadyvla.model.spec import VLASpec
from steadyvla.model.vla import VLA

PAD_TOKEN = "<PAD>"


def tokenizer_from_dir(path: Path | str):
    """The tokenizer in `path` (tokenizer.json or tokenizer.model), with OpenVLA's `<PAD>` added
    when the files define no pad token."""
    path = Path(path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # it peeks at config.json and warns that "openvla" is no tokenizer type
    try:
        # OpenVLA's config.json names remote code (auto_map); the tokenizer never needs it
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise OpenVLAFormatError(f"{path}: no loadable tokenizer (expected tokenizer.json or tokenizer.model): "
                                 f"{err}") from err
    finally:
        hf_logging.set_verbosity(verbosity)
    if tok.pad_token_id is None:
        tok.add_special_tokens({"pad_token": PAD_TOKEN})
    return tok


@dataclass
class VLABundle:
    """A loaded VLA with its tokenizer, preprocessing, action decoding and `norm_stats`.

    `norm_stats` maps dataset name -> {"action": {q01, q99, mask, ...}, ...} (config.json's field).
    """

    model: VLA
    tokenizer: object
    spec: VLASpec
    norm_stats: dict
    source: Path | None = None
    config: dict = field(default_factory=dict)

    @property
    def image_transform(self) -> ImageTransform:
        """OpenVLA's evaluation preprocessing for this checkpoint (no augmentation)."""
        return ImageTransform(self.spec, image_aug=False, seed=0)

    @property
    def action_tokenizer(self) -> ActionTokenizer:
        """Bin decoding over `spec.action_vocab_end` (OpenVLA's text vocab minus the padding multiple,
        or where a preset's tokenizer ends its bins)."""
        return ActionTokenizer(vocab_end=self.spec.action_vocab_end, n_bins=self.spec.n_action_bins)

    @property
    def device(self) -> torch.device:
        return self.model.projector.fc1.weight.device


def load_vla(path: Path | str, device: torch.device | str = "cpu", dtype: torch.dtype | str | None = None) -> VLABundle:
    """Load an OpenVLA Hugging Face directory (config.json, sharded safetensors, tokenizer,
    preprocessor_config.json) onto `device`. `dtype` None keeps the stored dtype (bf16)."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    src = read_openvla_dir(path)
    tokenizer = tokenizer_from_dir(src.path)
    vocab = int(src.spec.llm["vocab_size"])
    if len(tokenizer) > vocab:
        raise OpenVLAFormatError(f"{src.path}: tokenizer has {len(tokenizer)} tokens but config.json "
                                 f"`text_config.vocab_size` is {vocab}")
    model = load_weights(src, device, dtype).eval()
    return VLABundle(model, tokenizer, src.spec, src.norm_stats, src.path, src.config)


def save_vla(bundle: VLABundle, out: Path | str, dtype: torch.dtype | None = torch.bfloat16, **kwargs) -> Path:
    """Write `bundle` as a complete OpenVLA directory (see `write_openvla_dir` for `kwargs`)."""
    from steadyvla.model.openvla_save import write_openvla_dir

    return write_openvla_dir(out, bundle.spec, bundle.model.state_dict(), bundle.tokenizer, bundle.norm_stats,
                             dtype=dtype, **kwargs)
