"""The method on the shared loop: instruction mask, ICSM artifacts, HSW identity, Thermostat, resume."""

import shutil
import signal
from pathlib import Path

import torch
from safetensors.torch import load_file

from helpers import assert_bitwise_equal, checkpoint_tensors, config_args, metrics_lines, run_cli, tree_digest
from steadyvla.checkpoint.layout import CHECKPOINTS_DIR
from steadyvla.cli import main
from steadyvla.config import build_config
from steadyvla.data.registry import open_frame_source
from steadyvla.data.transforms import ImageTransform
from steadyvla.faults import FAULT_ENV
from steadyvla.method.artifacts import ICSM_META, layer_file, read_artifacts
from steadyvla.method.build_icsm import build_icsm
from steadyvla.method.probe import ProbeSample, ProbeSet, encode_probe_batch
from steadyvla.model.build import build_vla, load_tokenizer
from steadyvla.model.presets import get_preset
from steadyvla.model.prompt import PromptBuilder
from steadyvla.train.finetune import finetune
from steadyvla.train.run_dir import run_dir_for

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
METHOD = dict(method_enabled=True, probe_size=16, probe_batch_size=4, icsm_rank=8, icsm_sensitivity_samples=8,
              thermostat_warmup_steps=2, thermostat_update_interval=2)


def test_instruction_mask_covers_exactly_the_instruction_tokens_after_the_patches():
    cfg = build_config({})
    tok = load_tokenizer(cfg)
    vla = build_vla(cfg, tok)
    image = torch.zeros(8, 8, 3, dtype=torch.uint8).numpy()
    probe = ProbeSet([ProbeSample(image, "Open the drawer"), ProbeSample(image, "stack the red blocks")], "test")
    builder = PromptBuilder(tok)
    batch = encode_probe_batch(probe, [0, 1], builder, ImageTransform(get_preset("tiny"), False, 0),
                               vla.num_patches, int(tok.pad_token_id))
    for row, text in enumerate(["open the drawer", "stack the red blocks"]):
        positions = batch.instruction_mask[row].nonzero().flatten() - vla.num_patches
        ids = batch.input_ids[row, positions]
        assert tok.decode(ids).strip() == text
        assert positions.min() > 0  # never the <BOS> (followed by the patches)


def test_icsm_artifacts_have_the_right_shapes_and_are_byte_identical(make_config, synthetic_root, tmp_path):
    cfg = make_config(**METHOD, icms_artifact_dir=str(tmp_path / "a"))
    source = open_frame_source(synthetic_root, "synth")
    first = build_icsm(cfg, source, log=lambda m: None)
    second = build_icsm(make_config(**METHOD, icms_artifact_dir=str(tmp_path / "b")), source, log=lambda m: None)
    art = read_artifacts(first)
    assert art.groups == [[0, 1], [2, 3]]  # tiny has 4 LLM layers: last 4 in two groups
    hidden = 96
    for rep in (1, 3):
        t = art.tensors[rep]
        assert t["C_T"].shape == (hidden, hidden) and t["mu"].shape == (hidden,)
        assert t["U_f"].shape == (hidden, 2) and t["U_p"].shape == (hidden, 2)
        both = torch.cat([t["U_f"], t["U_p"]], dim=1)
        assert torch.allclose(both.T @ both, torch.eye(4), atol=1e-5)  # orthonormal, disjoint
        assert (first / layer_file(rep)).read_bytes() == (second / layer_file(rep)).read_bytes()
    meta_a = (first / ICSM_META).read_text()
    assert meta_a == (second / ICSM_META).read_text()
    assert art.meta["probe"]["size"] == 16 and len(art.meta["probe"]["sha256"]) == 64


def test_method_with_beta_gamma_fixed_at_one_is_bitwise_the_baseline(make_config, tmp_path):
    base_cfg = make_config(max_steps=4, save_steps=4, lora_dropout=0.1)
    finetune(base_cfg, log=lambda m: None)
    fixed = dict(METHOD, thermostat_min_beta=1.0, thermostat_max_beta=1.0, thermostat_min_gamma=1.0,
                 thermostat_max_gamma=1.0, icms_artifact_dir=str(tmp_path / "icsm"))
    method_cfg = make_config(max_steps=4, save_steps=4, lora_dropout=0.1, **fixed)
    finetune(method_cfg, log=lambda m: None)
    base_ckpt = run_dir_for(base_cfg) / CHECKPOINTS_DIR / "step-000004"
    method_ckpt = run_dir_for(method_cfg) / CHECKPOINTS_DIR / "step-000004"
    assert_bitwise_equal(load_file(str(base_ckpt / "adapter_model.safetensors")),
                         load_file(str(method_ckpt / "adapter_model.safetensors")))
    base_rows, method_rows = metrics_lines(run_dir_for(base_cfg)), metrics_lines(run_dir_for(method_cfg))
    assert [r["train_loss"] for r in base_rows] == [r["train_loss"] for r in method_rows]
    assert all(r["hsw_beta"] == 1.0 and r["hsw_gamma"] == 1.0 for r in method_rows)
    assert all(r["hsw_g_norm"] == r["hsw_gprime_norm"] > 0 for r in method_rows)


def test_thermostat_changes_beta_gamma_when_the_model_drifts(make_config, tmp_path):
    cfg = make_config(max_steps=8, save_steps=8, learning_rate=0.05, thermostat_k_beta=50.0,
                      thermostat_k_gamma=100.0, thermostat_base_scale=0.0,
                      **{**METHOD, "icms_artifact_dir": str(tmp_path / "icsm")})
    finetune(cfg, log=lambda m: None)
    rows = metrics_lines(run_dir_for(cfg))
    assert rows[0]["hsw_beta"] == 1.0 and rows[0]["hsw_gamma"] == 1.0  # warmup keeps the start values
    later = rows[-1]
    assert later["hsw_beta"] < 1.0 and later["hsw_gamma"] < later["hsw_beta"]
    assert all(r["hsw_gprime_norm"] <= r["hsw_g_norm"] * (1 + 1e-6) for r in rows)
    assert all("drift_d" in r for r in rows)


def test_killed_method_run_resumes_bit_exact_including_beta_gamma(synthetic_root, tmp_path):
    values = dict(data_root_dir=str(synthetic_root), dataset_name="synth", run_root_dir=str(tmp_path / "runs"),
                  run_id="m", batch_size=2, max_steps=8, save_steps=2, lora_rank=4, learning_rate=0.05,
                  progress_bar=False, seed=5, thermostat_k_beta=50.0, thermostat_k_gamma=100.0,
                  thermostat_base_scale=0.0, icms_artifact_dir=str(tmp_path / "icsm"), **METHOD)
    config = str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
    reference = {**values, "run_root_dir": str(tmp_path / "ref")}
    assert run_cli(["finetune", "--config", config, *config_args(reference)]).returncode == 0
    killed = run_cli(["finetune", "--config", config, *config_args(values)], extra_env={FAULT_ENV: "mid_save@6"})
    assert killed.returncode == -signal.SIGKILL
    done = run_cli(["finetune", "--config", config, *config_args(values)])
    assert done.returncode == 0, done.stdout + done.stderr
    ref_dir, run_dir = run_dir_for(build_config(reference)), run_dir_for(build_config(values))
    assert metrics_lines(run_dir) == metrics_lines(ref_dir)  # loss, lr, drift, beta/gamma trajectory
    assert_bitwise_equal(checkpoint_tensors(run_dir / CHECKPOINTS_DIR / "step-000008"),
                         checkpoint_tensors(ref_dir / CHECKPOINTS_DIR / "step-000008"))
    betas = [r["hsw_beta"] for r in metrics_lines(run_dir)]
    assert len(set(betas)) > 1


def test_resume_checks_the_icsm_artifacts_by_content_not_path(synthetic_root, tmp_path, capsys):
    values = dict(data_root_dir=str(synthetic_root), dataset_name="synth", run_root_dir=str(tmp_path / "runs"),
                  run_id="m", batch_size=2, max_steps=2, save_steps=2, lora_rank=4, progress_bar=False, seed=5,
                  icms_artifact_dir=str(tmp_path / "icsm"), **METHOD)

    def start(v: dict) -> int:
        return main(["finetune", "--config", CONFIG, *config_args(v)])

    assert start(values) == 0
    # an identical copy elsewhere (new mtimes) resumes
    shutil.copytree(tmp_path / "icsm", tmp_path / "staged", copy_function=shutil.copy)
    staged = {**values, "icms_artifact_dir": str(tmp_path / "staged"), "max_steps": 4}
    assert start(staged) == 0
    # rebuilt in place with another epsilon: same config, different subspaces -> refused
    build_icsm(build_config({**staged, "icsm_epsilon": 0.1}), open_frame_source(synthetic_root, "synth"),
               log=lambda m: None)
    run_dir = run_dir_for(build_config(values))
    before = tree_digest(run_dir)
    capsys.readouterr()
    assert start({**staged, "max_steps": 6}) == 2
    err = capsys.readouterr().err
    for text in ("ICSM artifacts in", "staged", "`icms_artifact_dir`", "content sha256 checkpoint",
                 "icsm_epsilon: checkpoint 0.5, now 0.1", "rebuild them with the checkpoint's settings"):
        assert text in err, (text, err)
    assert tree_digest(run_dir) == before
