"""`steadyvla icsm build`: run the frozen teacher over the probe set once and write the artifacts."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import torch

from steadyvla.config import ConfigError, RunConfig
from steadyvla.data.transforms import ImageTransform
from steadyvla.method.artifacts import ICSM_FORMAT, IcsmArtifacts, read_artifacts, write_artifacts
from steadyvla.method.icsm import (
    covariance, decoder_layers, direction_sensitivity, layer_groups, pooled_instruction_states, principal_directions,
    split_by_fragility,
)
from steadyvla.method.probe import ProbeSet, encode_probe_batch, probe_from_jsonl, probe_from_source
from steadyvla.model.build import build_vla, load_tokenizer
from steadyvla.model.prompt import PromptBuilder
from steadyvla.versions import library_versions

TEACHER_BATCH = 16


def artifact_dir(cfg: RunConfig) -> Path:
    """`icms_artifact_dir`, or `<run_root_dir>/icsm/<model>-<dataset>-r<rank>` when unset."""
    if cfg.icms_artifact_dir:
        return Path(cfg.icms_artifact_dir)
    model = Path(cfg.vla_path).name if cfg.vla_path else cfg.model_preset
    return Path(cfg.run_root_dir) / "icsm" / f"{model}-{cfg.dataset_name}-r{cfg.icsm_rank}-seed{cfg.seed}"


def load_probe(cfg: RunConfig, training_source) -> ProbeSet:
    """The probe set the config asks for (JSONL, a named dataset, or the training dataset)."""
    if cfg.probe_jsonl:
        return probe_from_jsonl(Path(cfg.probe_jsonl), cfg.probe_size)
    source = training_source
    if cfg.probe_dataset_name and cfg.probe_dataset_name != cfg.dataset_name:
        from steadyvla.data.registry import open_frame_source

        source = open_frame_source(Path(cfg.data_root_dir), cfg.probe_dataset_name)
    return probe_from_source(source, cfg.probe_size, cfg.seed)


def model_digest(model: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer (names sorted): identifies the teacher exactly."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def build_icsm(cfg: RunConfig, training_source, log: Callable[[str], None] = print,
               probe: ProbeSet | None = None) -> Path:
    """Compute U_f, U_p, mu, C_T per representative layer from the frozen teacher; write them.
    The probe set is the config's (`load_probe`) unless one is passed in."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(cfg)
    teacher = build_vla(cfg, tokenizer, device).eval()
    probe = probe if probe is not None else load_probe(cfg, training_source)
    groups = layer_groups(cfg.hsw_layer_ids, len(decoder_layers(teacher)))
    reps = [g[-1] for g in groups]
    builder = PromptBuilder(tokenizer, cfg.prompt_template)
    transform = ImageTransform(teacher.spec, image_aug=False, seed=cfg.seed)

    def batch_of(indices: list[int]):
        return encode_probe_batch(probe, indices, builder, transform, teacher.num_patches, int(tokenizer.pad_token_id))

    log(f"ICSM: teacher forward over {len(probe)} probe samples ({probe.origin}); layers {groups}")
    pooled: dict[int, list[torch.Tensor]] = {r: [] for r in reps}
    empty = 0
    for start in range(0, len(probe), TEACHER_BATCH):
        states, valid = pooled_instruction_states(teacher, batch_of(list(range(start, min(len(probe), start + TEACHER_BATCH)))), reps, device)
        empty += int((~valid).sum())
        for r in reps:
            pooled[r].append(states[r][valid].cpu())
    if empty:
        log(f"ICSM: {empty} probe samples have an empty instruction span and were skipped")
    sens_batch = batch_of(list(range(min(len(probe), cfg.icsm_sensitivity_samples))))
    tensors = {}
    for r in reps:
        x = torch.cat(pooled[r])
        if x.shape[0] < 2:
            raise ConfigError(f"config field `probe_size`: {x.shape[0]} usable probe samples; need at least 2")
        directions, singular = principal_directions(x, cfg.icsm_rank)
        spread = (x - x.mean(dim=0)).pow(2).sum(dim=1).mean().sqrt().item()
        sensitivity = direction_sensitivity(teacher, sens_batch, r, directions, cfg.icsm_epsilon * spread, device,
                                            teacher.num_patches)
        u_f, u_p = split_by_fragility(directions, sensitivity, cfg.icsm_fragile_fraction, cfg.icsm_plastic_fraction)
        tensors[r] = {"U_f": u_f, "U_p": u_p, "mu": x.mean(dim=0), "C_T": covariance(x),
                      "singular_values": singular, "sensitivity": sensitivity}
        log(f"ICSM layer {r}: D={x.shape[1]}, r={directions.shape[1]}, U_f {tuple(u_f.shape)}, U_p {tuple(u_p.shape)}")
    meta = {
        "format": ICSM_FORMAT, "version": 1, "layers": [i for g in groups for i in g], "groups": groups,
        "r": cfg.icsm_rank, "epsilon": cfg.icsm_epsilon, "fragile_fraction": cfg.icsm_fragile_fraction,
        "plastic_fraction": cfg.icsm_plastic_fraction, "seed": cfg.seed,
        "probe": {"origin": probe.origin, "size": len(probe), "sha256": probe.digest(), "empty_masks": empty},
        "model": {"preset": cfg.model_preset, "vla_path": cfg.vla_path, "sha256": model_digest(teacher)},
        "versions": library_versions(),
    }
    out = write_artifacts(artifact_dir(cfg), IcsmArtifacts(groups, tensors, meta))
    log(f"ICSM artifacts written to {out}")
    return out


def ensure_icsm(cfg: RunConfig, training_source, log: Callable[[str], None] = print,
                probe: ProbeSet | None = None) -> IcsmArtifacts:
    """Load the artifacts, building them once (from `probe` if given) if the directory does not exist yet."""
    out = artifact_dir(cfg)
    if not out.exists():
        log(f"{out} is missing: building ICSM artifacts once (cached for later runs)")
        build_icsm(cfg, training_source, log, probe=probe)
    return read_artifacts(out)
