"""End-to-end LoRA fine-tuning in-process on the synthetic dataset."""

import json

import torch
from peft import PeftModel

from helpers import metrics_lines
from steadyvla.checkpoint.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CHECKPOINTS_DIR, DATASET_STATISTICS
from steadyvla.model.build import build_vla, load_tokenizer
from steadyvla.train.finetune import finetune
from steadyvla.train.run_dir import run_dir_for


def test_finetune_loss_falls_and_adapter_reloads_with_peft(make_config, tmp_path):
    cfg = make_config(max_steps=12, save_steps=6, batch_size=8)
    result = finetune(cfg, log=lambda m: None)
    assert result.final_step == 12
    run_dir = run_dir_for(cfg)
    ckpts = sorted(p.name for p in (run_dir / CHECKPOINTS_DIR).iterdir() if p.is_dir())
    assert ckpts == ["step-000006", "step-000012"]
    assert (run_dir / CHECKPOINTS_DIR / "latest").read_text().strip() == "step-000012"
    rows = metrics_lines(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 13))
    losses = [r["train_loss"] for r in rows]
    assert sum(losses[:3]) / 3 > sum(losses[-3:]) / 3 + 0.2
    stats = json.loads((run_dir / DATASET_STATISTICS).read_text())
    assert stats["synth"]["action"]["mask"] == [True, True, True, False]

    final = run_dir / CHECKPOINTS_DIR / "step-000012"
    assert (final / ADAPTER_CONFIG).exists() and (final / ADAPTER_WEIGHTS).exists()
    tok = load_tokenizer(cfg)
    reloaded = PeftModel.from_pretrained(build_vla(cfg, tok), str(final)).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 400, (2, 10), generator=g)
    ids[:, 0] = tok.bos_token_id
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.randn(2, 6, 56, 56, generator=g))
    with torch.no_grad():
        out_reloaded = reloaded(**batch).logits
        out_trained = result.model.eval()(**batch).logits
        out_base = build_vla(cfg, tok).eval()(**batch).logits
    assert torch.equal(out_reloaded, out_trained)  # the saved adapter is the trained one, exactly
    assert not torch.equal(out_reloaded, out_base)  # and it changes the model


def test_save_latest_checkpoint_only_keeps_one(make_config):
    cfg = make_config(max_steps=6, save_steps=2, save_latest_checkpoint_only=True)
    finetune(cfg, log=lambda m: None)
    ckpts = [p.name for p in (run_dir_for(cfg) / CHECKPOINTS_DIR).iterdir() if p.is_dir()]
    assert ckpts == ["step-000006"]


def test_data_wait_s_is_the_time_the_host_waited_for_batches(make_config, monkeypatch):
    import time

    from steadyvla.data.dataset import VLADataset
    from steadyvla.train.metrics import DATA_WAIT_S, STEP_TIME_S

    slow_s = 0.05  # per sample: a batch of 2 keeps the host waiting >= 0.1 s (num_workers 0: in the main process)
    original = VLADataset.__getitem__

    def slow_getitem(self, index):
        time.sleep(slow_s)
        return original(self, index)

    monkeypatch.setattr(VLADataset, "__getitem__", slow_getitem)
    cfg = make_config(max_steps=3, save_steps=3, batch_size=2, grad_accumulation_steps=2, num_workers=0)
    finetune(cfg, log=lambda m: None)
    rows = [json.loads(line) for line in (run_dir_for(cfg) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:  # two micro-batches of 2 samples per step
        assert 4 * slow_s <= row[DATA_WAIT_S] < row[STEP_TIME_S], row
