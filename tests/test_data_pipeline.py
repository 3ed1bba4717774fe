"""The training input pipeline as finetune wires it: worker-count independence, seeded
augmentation, and exact continuation of the batch stream from a saved DataPosition."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from steadyvla.config import build_config
from steadyvla.data.dataset import PaddedCollator, VLADataset
from steadyvla.data.registry import open_frame_source
from steadyvla.data.sampler import DataPosition, ResumableBatchSampler, decode_sample_key, encode_sample_key
from steadyvla.data.stats import compute_action_statistics
from steadyvla.data.transforms import ImageTransform
from steadyvla.model.build import action_tokenizer_for, load_tokenizer
from steadyvla.model.presets import get_preset
from steadyvla.model.prompt import PromptBuilder

SEED, BATCH = 3, 7  # 72 frames / 7 -> 10 full batches and a short one of 2 per epoch


@pytest.fixture(scope="module")
def parts(synthetic_root: Path) -> dict:
    """Source, tokenizer and action statistics of the synthetic dataset (72 frames, 6 episodes)."""
    cfg = build_config({"data_root_dir": str(synthetic_root), "dataset_name": "synth", "seed": SEED,
                        "image_aug": True, "run_root_dir": "unused", "progress_bar": False})
    source = open_frame_source(Path(cfg.data_root_dir), cfg.dataset_name)
    tokenizer = load_tokenizer(cfg)
    stats = compute_action_statistics(source.actions(), num_trajectories=source.num_episodes)["action"]
    return {"source": source, "tokenizer": tokenizer, "stats": stats}


def make_dataset(parts: dict, image_aug: bool = True, preset: str = "tiny") -> VLADataset:
    tok = parts["tokenizer"]
    return VLADataset(parts["source"], PromptBuilder(tok), action_tokenizer_for(tok), parts["stats"],
                      ImageTransform(get_preset(preset), image_aug, SEED))


def make_loader(dataset: VLADataset, workers: int,
                start: DataPosition | None = None) -> tuple[DataLoader, ResumableBatchSampler]:
    """DataLoader exactly as `finetune` builds it (CPU: no pinned memory)."""
    sampler = ResumableBatchSampler(len(dataset), BATCH, seed=SEED, start=start)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                        collate_fn=PaddedCollator(int(dataset.prompt_builder.tokenizer.pad_token_id)),
                        persistent_workers=workers > 0, generator=torch.Generator().manual_seed(SEED))
    return loader, sampler


def take(loader: DataLoader, n: int) -> list[dict[str, torch.Tensor]]:
    it = iter(loader)
    batches = list(itertools.islice(it, n))
    del it  # shuts the workers down
    return batches


def assert_same_batches(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for step, (a, b) in enumerate(zip(got, want)):
        assert a.keys() == b.keys(), step
        for key in a:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), (step, key)


def _start_mid_epoch() -> DataPosition:
    return DataPosition(epoch=2, position=5 * BATCH)


@pytest.mark.parametrize("image_aug", [True, False])
def test_two_workers_yield_the_main_process_batches(parts: dict, image_aug: bool) -> None:
    dataset = make_dataset(parts, image_aug)
    start = _start_mid_epoch()  # runs over the epoch end (the wrapped batch) into the next epoch
    main = take(make_loader(dataset, 0, start)[0], 8)
    workers = take(make_loader(dataset, 2, start)[0], 8)
    assert_same_batches(workers, main)
    epochs = {decode_sample_key(k)[0] for b in main for k in b["sample_key"].tolist()}
    assert epochs == {2, 3} and {len(b["sample_key"]) for b in main} == {BATCH}  # every batch is full


def test_two_workers_yield_the_main_process_batches_at_224px(parts: dict) -> None:
    dataset = make_dataset(parts, image_aug=True, preset="openvla-7b")
    threads = torch.get_num_threads()
    torch.set_num_threads(4)  # what a multi-core training host's main process runs with
    try:
        main = take(make_loader(dataset, 0)[0], 1)
    finally:
        torch.set_num_threads(threads)
    assert_same_batches(take(make_loader(dataset, 2)[0], 1), main)


def test_augmentation_is_a_function_of_seed_epoch_and_index(parts: dict) -> None:
    image = parts["source"].frame(10).image
    aug = ImageTransform(get_preset("tiny"), image_aug=True, seed=SEED)
    ref = aug(image, 1, 10)
    assert torch.equal(ref, aug(image, 1, 10))
    assert torch.equal(ref, ImageTransform(get_preset("tiny"), image_aug=True, seed=SEED)(image, 1, 10))
    for other in (aug(image, 2, 10), aug(image, 1, 11),
                  ImageTransform(get_preset("tiny"), image_aug=True, seed=SEED + 1)(image, 1, 10)):
        assert not torch.equal(ref, other)
    plain = ImageTransform(get_preset("tiny"), image_aug=False, seed=SEED)
    assert torch.equal(plain(image, 1, 10), plain(image, 2, 10))
    assert not torch.equal(ref, plain(image, 1, 10))

    # Through the Dataset: any access order, same (epoch, index) -> same pixels; next epoch differs.
    dataset = make_dataset(parts)
    keys = [encode_sample_key(e, i) for e in (0, 1) for i in (3, 40, 71)]
    first = {k: dataset[k]["pixel_values"] for k in keys}
    for k in reversed(keys):
        assert torch.equal(dataset[k]["pixel_values"], first[k])
    for i in (3, 40, 71):
        a, b = first[encode_sample_key(0, i)], first[encode_sample_key(1, i)]
        assert not torch.equal(a, b)
        assert torch.equal(b, aug(parts["source"].frame(i).image, 1, i))


def test_restart_from_saved_position_continues_the_batch_stream(parts: dict) -> None:
    dataset = make_dataset(parts)
    total = 16  # one epoch is 11 batches: the run crosses into epoch 1
    full = take(make_loader(dataset, 2)[0], total)
    sampler = ResumableBatchSampler(len(dataset), BATCH, seed=SEED)
    positions = [DataPosition()]
    for _ in range(total):
        positions.append(sampler.advance(positions[-1]))
    for cut in (4, 13):  # mid epoch 0; mid epoch 1 after the wrapped batch
        saved = DataPosition.from_dict(json.loads(json.dumps(positions[cut].to_dict())))
        assert saved.position > 0
        resumed = take(make_loader(dataset, 2, saved)[0], total - cut)
        assert_same_batches(resumed, full[cut:])
    seen = [decode_sample_key(k)[1] for b in full[:11] for k in b["sample_key"].tolist()]
    n = len(dataset)  # the last batch of the epoch wraps around to the start of the same epoch's order
    assert sorted(seen[:n]) == list(range(n)) and len(seen) == 11 * BATCH
    assert np.array_equal(np.array(seen), np.concatenate([sampler.permutation(0), sampler.permutation(0)[:11 * BATCH - n]]))
