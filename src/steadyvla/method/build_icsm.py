"""`steadyvla icsm build`: run the frozen teacher over the probe set once and write the artifacts."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import torch

from steadyvla.config import ConfigError, RunConfig
from steadyvla.data.transforms import ImageTransform
from steadyvla.method.artifacts import ICSM_FORMAT, IcsmArtifacts, read_artifacts, write_artifacts
from steadyvla.method.icsm import IcsmOptions, decoder_layers, layer_groups, layer_subspaces, pooled_instruction_states
from steadyvla.method.probe import ProbeSet, encode_probe_batch, probe_from_jsonl, probe_from_source
from steadyvla.model.build import build_vla, load_tokenizer
from steadyvla.model.prompt import PromptBuilder, probe_template
from steadyvla.versions import library_versions


def artifact_dir(cfg: RunConfig) -> Path:
    """`icms_artifact_dir`; when unset `<artifact_dir>/icms_<name>` (the users' layout) or
    `<run_root_dir>/icsm/<name>`, name = <model>-<dataset>-r<rank>-seed<seed>."""
    if cfg.icms_artifact_dir:
        return Path(cfg.icms_artifact_dir)
    model = Path(cfg.vla_path).name if cfg.vla_path else cfg.model_preset
    name = f"{model}-{cfg.dataset_name}-r{cfg.icsm_rank}-seed{cfg.seed}"
    if cfg.artifact_dir:
        return Path(cfg.artifact_dir) / f"icms_{name}"
    return Path(cfg.run_root_dir) / "icsm" / name


def load_probe(cfg: RunConfig, training_source) -> ProbeSet:
    """The probe set the config asks for (JSONL, a named dataset, or the training dataset)."""
    if cfg.probe_jsonl:
        image_root = Path(cfg.probe_image_root) if cfg.probe_image_root else None
        return probe_from_jsonl(Path(cfg.probe_jsonl), cfg.probe_size, image_root)
    source = training_source
    root = Path(cfg.probe_root_dir or cfg.data_root_dir)
    name = cfg.probe_dataset_name or cfg.dataset_name
    if (root, name) != (Path(cfg.data_root_dir), cfg.dataset_name):
        from steadyvla.data.registry import open_frame_source

        if not (root / name).exists():
            raise ConfigError(f"config fields `probe_root_dir`/`probe_dataset_name`: {root / name} does not exist")
        source = open_frame_source(root, name)
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
    builder = PromptBuilder(tokenizer, probe_template(cfg.prompt_template))
    options = IcsmOptions.from_config(cfg)
    transform = ImageTransform(teacher.spec, image_aug=False, seed=cfg.seed)

    def batch_of(indices: list[int]):
        return encode_probe_batch(probe, indices, builder, transform, teacher.num_patches, int(tokenizer.pad_token_id))

    log(f"ICSM: teacher forward over {len(probe)} probe samples ({probe.origin}); layers {groups}")
    pooled: dict[int, list[torch.Tensor]] = {r: [] for r in reps}
    empty = 0
    for start in range(0, len(probe), cfg.icsm_batch_size):
        indices = list(range(start, min(len(probe), start + cfg.icsm_batch_size)))
        states, valid = pooled_instruction_states(teacher, batch_of(indices), reps, device)
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
        try:
            tensors[r] = layer_subspaces(teacher, x, sens_batch, r, options, device, teacher.num_patches)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        u_f, u_p = tensors[r]["U_f"], tensors[r]["U_p"]
        log(f"ICSM layer {r}: D={x.shape[1]}, r={len(tensors[r]['sensitivity'])}, U_f {tuple(u_f.shape)}, "
            f"U_p {tuple(u_p.shape)} ({options.split})")
    meta = {
        "format": ICSM_FORMAT, "version": 1, "layers": [i for g in groups for i in g], "groups": groups,
        "r": cfg.icsm_rank, "epsilon": cfg.icsm_epsilon, "epsilon_absolute": cfg.icsm_epsilon_absolute,
        "split": cfg.icsm_split, "fragile_fraction": cfg.icsm_fragile_fraction,
        "plastic_fraction": cfg.icsm_plastic_fraction, "fragile_dim": cfg.icsm_fragile_dim,
        "plastic_dim": cfg.icsm_plastic_dim,
        "sensitivity_samples": cfg.icsm_sensitivity_samples, "seed": cfg.seed, "probe_prompt_template": builder.template,
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
