"""Saves copy adapter + optimizer state through reserved flat buffers (checkpoint/flat_staging.py):
the same bytes as copying each tensor, the same buffers every save, and a fallback when the state
no longer has the shapes the buffers were reserved for."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model

from steadyvla.checkpoint.flat_staging import ALIGN_BYTES, FlatStaging
from steadyvla.checkpoint.state import optimizer_state
from steadyvla.config import build_config
from steadyvla.data.sampler import DataPosition
from steadyvla.train.checkpointing import TrainState, adapter_views, snapshot_staging, take_snapshot
from steadyvla.train.optim import build_optimizer, build_scheduler


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_copy_gives_each_tensor_bitwise_in_aligned_reused_buffers():
    gen = torch.Generator().manual_seed(0)
    live = {"a": {"x": torch.randn(3, 5, generator=gen), "y": torch.randn(7, generator=gen).bfloat16()},
            "b": {"step": torch.tensor(4.0), "x": torch.randn(2, 2, 2, generator=gen)}}

    def clone(sections):
        return {name: {k: v.clone() for k, v in part.items()} for name, part in sections.items()}

    def equal(a, b):
        return a.keys() == b.keys() and all(_equal(a[name], b[name]) for name in a)

    staging = FlatStaging(live)
    first = staging.copy(live)
    assert equal(first, clone(live))
    views = [v for part in first.values() for v in part.values()]
    assert not {v.data_ptr() for v in views} & {t.data_ptr() for part in live.values() for t in part.values()}
    starts = {g.dtype: g.host_flat.data_ptr() for g in staging.groups}
    assert len(starts) == 2  # one buffer per dtype, shared by the sections
    assert all((v.data_ptr() - starts[v.dtype]) % ALIGN_BYTES == 0 for v in views)
    kept = clone(first)
    for part in live.values():
        for t in part.values():
            t.add_(1)
    assert equal(first, kept)  # the copy does not follow the live tensors
    second = staging.copy(live)
    assert equal(second, clone(live))
    assert [v.data_ptr() for part in second.values() for v in part.values()] == [v.data_ptr() for v in views]
    assert staging.matches(live)
    assert staging.matches(clone(live))  # other tensors of the same shapes
    assert not staging.matches({**live, "a": {**live["a"], "x": torch.zeros(3, 6)}})
    assert not staging.matches({"a": live["a"]})


def _tiny_state(seed: int = 0) -> tuple[TrainState, object]:
    torch.manual_seed(seed)
    body = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(4)])
    model = get_peft_model(body, LoraConfig(r=4, target_modules=["0", "1", "2", "3"]))
    cfg = build_config({"model_preset": "tiny", "run_root_dir": "unused", "progress_bar": False})
    optimizer = build_optimizer(model, cfg)
    model(torch.randn(8, 16)).square().mean().backward()
    optimizer.step()
    return TrainState(model, optimizer, build_scheduler(optimizer, cfg), DataPosition(), global_step=1), cfg


def test_snapshot_through_staging_equals_per_tensor_snapshot():
    state, cfg = _tiny_state()
    view = adapter_views(state.model)
    staging = snapshot_staging(state, view)
    staged = take_snapshot(state, cfg, adapter_view=view, staging=staging)
    plain = take_snapshot(state, cfg, adapter_view=view)
    assert staged is not None and plain is not None
    assert _equal(staged.adapter, plain.adapter) and staged.adapter
    optim = {k: v for k, v in staged.tensors.items() if k.startswith("optim.")}
    assert staged.adapter.keys() == plain.adapter.keys() == view.keys()
    assert len(optim) == 3 * len(staged.adapter)  # step, exp_avg, exp_avg_sq per LoRA matrix
    assert _equal(staged.tensors, plain.tensors)
    assert staged.meta["optimizer"] == plain.meta["optimizer"]
    staged_ptrs = {k: v.data_ptr() for k, v in staged.adapter.items()}
    again = take_snapshot(state, cfg, adapter_view=view, staging=staging)
    assert {k: v.data_ptr() for k, v in again.adapter.items()} == staged_ptrs  # reserved once


def test_optimizer_state_packs_like_state_dict():
    """The snapshot reads the optimizer directly instead of building `state_dict()`; the keys,
    tensors and JSON part are what state_dict() packs."""
    state, _cfg = _tiny_state(1)
    tensors, meta = optimizer_state(state.optimizer)
    packed = state.optimizer.state_dict()
    expected = {f"optim.{pid}.{name}": v for pid, s in packed["state"].items() for name, v in s.items()}
    assert tensors.keys() == expected.keys() and all(tensors[k] is expected[k] for k in tensors)
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in packed["param_groups"]]
    assert meta == {"param_groups": groups, "scalars": {}}


def test_state_that_changed_shape_is_copied_tensor_by_tensor():
    state, cfg = _tiny_state(2)
    view = adapter_views(state.model)
    staging = snapshot_staging(state, view)
    first_param = state.optimizer.param_groups[0]["params"][0]
    state.optimizer.state[first_param]["extra"] = torch.ones(3)  # the state grew after the reservation
    snap = take_snapshot(state, cfg, adapter_view=view, staging=staging)
    assert torch.equal(snap.tensors["optim.0.extra"], torch.ones(3))
    assert _equal(snap.adapter, take_snapshot(state, cfg, adapter_view=view).adapter)


def test_snapshot_overhead_bench_counts_the_presets_lora_layers():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from snapshot_overhead import lora_layer_count, stand_in_state, timed_snapshots

    layers = lora_layer_count("tiny", 4)
    state, cfg = stand_in_state(layers, torch.device("cpu"))
    assert sum(1 for p in state.model.parameters() if p.requires_grad) == 2 * layers
    view = adapter_views(state.model)
    staging = snapshot_staging(state, view)
    assert len(timed_snapshots(state, cfg, 2, adapter_view=view, staging=staging)) == 2
    from peft.tuners.lora import LoraLayer

    from test_fast_paths import _tiny

    built = _tiny()[2]  # the tiny VLA with LoRA on real tensors: the meta count is its count
    assert layers == sum(1 for m in built.modules() if isinstance(m, LoraLayer)) > 0
