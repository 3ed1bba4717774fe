"""The method as a TrainHook on the one training loop: HSW gradient surgery steered by the Thermostat.

Before optimizer step t the Thermostat may measure drift on the next probe batch (student forward
under no_grad, eval mode, training dtype) and update (beta, gamma); the HSW hooks then use them
for every micro-batch of step t. All of it — coefficients, drift baseline and history, warmup
progress, probe position — is in the checkpoint's method slot, so resumed runs are bit-exact.
"""

from __future__ import annotations

from typing import Any

import torch

from steadyvla.config import ConfigError, RunConfig
from steadyvla.data.transforms import ImageTransform
from steadyvla.method.artifacts import IcsmArtifacts
from steadyvla.method.hsw import HSWHooks
from steadyvla.method.icsm import covariance_drift, decoder_layers, layer_groups, pooled_instruction_states
from steadyvla.method.probe import ProbeSet, encode_probe_batch
from steadyvla.method.thermostat import Thermostat, ThermostatSettings, broadcast_from_rank0
from steadyvla.model.build import model_spec
from steadyvla.model.prompt import DEFAULT_PROMPT_TEMPLATE, PromptBuilder, probe_template
from steadyvla.hooks import TrainHook


def _is_rank0() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or \
        torch.distributed.get_rank() == 0


class MethodHook(TrainHook):
    """ICSM + HSW + Thermostat, plugged into the shared loop."""

    name = "method"

    def __init__(self, cfg: RunConfig, model: torch.nn.Module, tokenizer, artifacts: IcsmArtifacts, probe: ProbeSet,
                 device: torch.device, *, sharded: bool = False):
        """`sharded`: the model is FSDP-sharded (full training), so every rank takes part in the probe
        forward (its all-gathers need every rank); rank 0's drift is still the one all ranks use."""
        groups = layer_groups(cfg.hsw_layer_ids, len(decoder_layers(model)))
        if groups != artifacts.groups:
            raise ConfigError(f"config field `hsw_layer_ids`: layer groups {groups} differ from the ICSM artifacts' "
                              f"{artifacts.groups}; rebuild them or use another `icms_artifact_dir`")
        self.model = model
        self.sharded = sharded
        self.device = device
        self.probe = probe
        self.probe_digest = probe.digest()  # the probe set never changes; state_dict runs every step
        self.probe_batch_size = cfg.probe_batch_size
        self.representatives = [g[-1] for g in groups]
        self.teacher_cov = {r: artifacts.tensors[r]["C_T"].to(device) for r in self.representatives}
        self.prompt_builder = PromptBuilder(tokenizer, probe_template(cfg.prompt_template))
        # artifacts from before `prompt_template` meant the probe prompt were built with the training prompt
        built_with = artifacts.meta.get("probe_prompt_template", DEFAULT_PROMPT_TEMPLATE)
        if built_with != self.prompt_builder.template:
            raise ConfigError(f"config field `prompt_template`: {self.prompt_builder.template!r}, but the ICSM "
                              f"artifacts were built with probe prompt {built_with!r}; rebuild them or set it back")
        self.transform = ImageTransform(model_spec(cfg, tokenizer), image_aug=False, seed=cfg.seed)
        self.pad_token_id = int(tokenizer.pad_token_id)
        layers = decoder_layers(model)
        hooked = [i for g in groups for i in g]
        subspaces = {str(i): (artifacts.tensors[artifacts.representative(i)]["U_f"],
                              artifacts.tensors[artifacts.representative(i)]["U_p"]) for i in hooked}
        self.hsw = HSWHooks({str(i): layers[i] for i in hooked}, subspaces, eps=cfg.hsw_eps)
        self.hsw.attach()
        self.thermostat = Thermostat(ThermostatSettings.from_config(cfg), beta0=cfg.hsw_beta, gamma0=cfg.hsw_gamma)
        self.probe_position = 0
        self.last_drift: float | None = None

    def _vla(self) -> torch.nn.Module:
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    @torch.no_grad()
    def measure_drift(self) -> float:
        """d = ||C_S - C_T||_F on the next probe batch, averaged over representative layers."""
        indices = self.probe.indices_at(self.probe_position, self.probe_batch_size)
        self.probe_position = (self.probe_position + self.probe_batch_size) % len(self.probe)
        batch = encode_probe_batch(self.probe, indices, self.prompt_builder, self.transform,
                                   self._vla().num_patches, self.pad_token_id)
        was_training = self.model.training
        self.model.eval()  # no dropout: the probe must not draw from the training RNG
        try:
            pooled, valid = pooled_instruction_states(self.model, batch, self.representatives, self.device)
        finally:
            self.model.train(was_training)
        return covariance_drift({r: pooled[r][valid] for r in self.representatives}, self.teacher_cov)

    def on_step_start(self, step: int) -> None:
        if self.thermostat.should_measure(step):
            # Only rank 0 runs the probe forward; its drift drives every rank, so all ranks hold the
            # same Thermostat state. The others only advance the probe position in step with it.
            if _is_rank0() or self.sharded:
                drift = self.measure_drift()
            else:
                drift = float("nan")
                self.probe_position = (self.probe_position + self.probe_batch_size) % len(self.probe)
            (self.last_drift,) = broadcast_from_rank0([drift])
            self.thermostat.observe(step, self.last_drift)
        self.hsw.beta, self.hsw.gamma = self.thermostat.beta, self.thermostat.gamma

    def on_step_end(self, step: int) -> dict[str, float]:
        g_norm, gprime_norm = self.hsw.pop_norms()
        metrics = {"hsw_beta": self.hsw.beta, "hsw_gamma": self.hsw.gamma, "hsw_g_norm": g_norm,
                   "hsw_gprime_norm": gprime_norm}
        if self.last_drift is not None:
            metrics["drift_d"] = self.last_drift
        return metrics

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {}, {"thermostat": self.thermostat.state_dict(), "probe_position": self.probe_position,
                    "last_drift": self.last_drift, "probe_sha256": self.probe_digest}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        if not meta:
            raise ConfigError("config field `method_enabled`: true, but the checkpoint has no method state "
                              "(it was written by a baseline run)")
        if meta.get("probe_sha256") != self.probe_digest:
            raise ConfigError("the probe set differs from the one this checkpoint's run used "
                              f"(sha256 {meta.get('probe_sha256')} vs {self.probe_digest})")
        self.thermostat.load_state_dict(meta["thermostat"])
        self.probe_position = int(meta["probe_position"])
        self.last_drift = meta["last_drift"]
        self.hsw.beta, self.hsw.gamma = self.thermostat.beta, self.thermostat.gamma
