"""torchrun worker for tests/test_ckpt_export.py: a tiny VLA sharded with FSDP2 over the gloo ranks takes
one AdamW step, then every rank writes its shards of {"model", "optim"} with DCP into OUT/model_optim,
and rank 0 writes the gathered full model as OUT/expected.safetensors (what the export must equal).

    torchrun --standalone --nproc_per_node 2 tests/fsdp_dcp_worker.py OUT SEED
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from timm.models.vision_transformer import Block
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict
from torch.distributed.fsdp import fully_shard
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from steadyvla.checkpoint.dcp_io import save_model_optim
from steadyvla.config import build_config
from steadyvla.model.build import build_vla, load_tokenizer


def main(out: Path, seed: int) -> None:
    dist.init_process_group("gloo")
    cfg = build_config(dict(use_lora=False, seed=seed))
    model = build_vla(cfg, load_tokenizer(cfg)).train()
    for module in [m for m in model.modules() if isinstance(m, (LlamaDecoderLayer, Block))]:
        fully_shard(module)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(dist.get_rank())
    ids = torch.randint(3, 300, (2, 10), generator=g)
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids.clone(),
                 pixel_values=torch.randn(2, 6, 56, 56, generator=g))
    model(**batch).loss.backward()
    optimizer.step()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    save_model_optim({"model": model_sd, "optim": optim_sd}, out)  # as the trainer writes it
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        save_file({k: v.contiguous() for k, v in full.items()}, str(out / "expected.safetensors"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
