"""`steadyvla <verb>`: finetune, train, predict, merge, eval, plot, data, ckpt (ls|verify|import-legacy|export), doctor, memory, launch.

Every user error ends with one `error:` line naming the field, the value and what would be valid,
and exit status 2; nothing on disk is touched before the config and resume target are checked. Any
other failure also ends as one `error:` line (exit status 1); its traceback goes to the run dir's
errors.log, or to the terminal with `--debug`.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from steadyvla.checkpoint.manager import CheckpointError
from steadyvla.checkpoint.run_lock import RunDirBusy
from steadyvla.exit_guard import exit_after_error
from steadyvla.launch import DEFAULT_CONFIGS
from steadyvla.config import ConfigError, load_config, parse_overrides
from steadyvla.config_compat import translate_icsm_options

EXIT_FAILURE = 1
EXIT_USAGE = 2
DEBUG_FLAG = "--debug"
VERBS_WITH_OVERRIDES = ("finetune", "train", "doctor", "icsm", "memory")


def _config_from(args: argparse.Namespace, extra: list[str]):
    return load_config(args.config, parse_overrides(extra))


def cmd_finetune(args: argparse.Namespace, extra: list[str]) -> int:
    from steadyvla.train.finetune import finetune

    finetune(_config_from(args, extra))
    return 0


def cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    from steadyvla.train.full_train import train

    train(_config_from(args, extra))
    return 0


def cmd_icsm(args: argparse.Namespace, extra: list[str]) -> int:
    from steadyvla.method.build_icsm import build_icsm
    from steadyvla.train.finetune import open_training_data, say

    # the users' offline_icms.py option names (--r, --epsilon, --batch_size, ...) work here too
    cfg = load_config(args.config, translate_icsm_options(parse_overrides(extra)))
    build_icsm(cfg, open_training_data(cfg, say), say)
    return 0


def cmd_doctor(args: argparse.Namespace, extra: list[str]) -> int:
    from steadyvla.doctor import run_doctor

    return run_doctor(_config_from(args, extra))


def cmd_memory(args: argparse.Namespace, extra: list[str]) -> int:
    from steadyvla.memory_report import print_preflight

    return print_preflight(_config_from(args, extra))


def cmd_data(args: argparse.Namespace, extra: list[str]) -> int:
    if args.data_verb == "demo":
        from steadyvla.data.demo_metaworld import DEMO_TASKS, generate_demo_dataset

        tasks = args.tasks.split(",") if args.tasks else None
        unknown = [t for t in tasks or [] if t not in DEMO_TASKS]
        if unknown:
            raise ConfigError(f"--tasks: {unknown} not among {', '.join(DEMO_TASKS)}")
        out = generate_demo_dataset(Path(args.out), tasks=tasks, episodes_per_task=args.episodes_per_task,
                                    image_size=args.image_size, seed=args.seed)
        print(f"wrote LeRobot v3.0 dataset {out}")
        return 0
    from steadyvla.data.registry import describe_dataset, open_frame_source

    path = Path(args.path)
    source = open_frame_source(path.parent, path.name)
    if args.data_verb == "inspect":
        print(describe_dataset(source))
        return 0
    from steadyvla.data.stats import compute_action_statistics, write_dataset_statistics

    out = Path(args.out) if args.out else Path("dataset_statistics.json")
    stats = {source.name: compute_action_statistics(source.actions(), num_trajectories=source.num_episodes)}
    write_dataset_statistics(out, stats)
    print(f"wrote {out} ({stats[source.name]['num_transitions']} transitions)")
    return 0


def cmd_ckpt(args: argparse.Namespace, extra: list[str]) -> int:
    from steadyvla.checkpoint.report import ckpt_ls, ckpt_verify

    if args.ckpt_verb == "import-legacy":
        from steadyvla.train.import_legacy import import_legacy

        import_legacy(_config_from(args, extra), Path(args.adapter), Path(args.trainer_state))
        return 0

    if args.ckpt_verb == "export":
        from steadyvla.model.export import export_checkpoint

        export_checkpoint(Path(args.checkpoint), Path(args.out), dtype=args.dtype)
        return 0

    run_dir = Path(args.run_dir)
    return ckpt_ls(run_dir) if args.ckpt_verb == "ls" else ckpt_verify(run_dir)


def cmd_predict(args: argparse.Namespace, extra: list[str]) -> int:
    import json

    from steadyvla.model.bundle import load_vla
    from steadyvla.predict import load_image, predict_action

    image = load_image(args.image)  # before the model: a bad image fails fast
    bundle = load_vla(args.vla_path, device=args.device)
    print(json.dumps([float(v) for v in predict_action(bundle, image, args.instruction, args.unnorm_key)]))
    return 0


def cmd_merge(args: argparse.Namespace, extra: list[str]) -> int:
    from steadyvla.model.merge import merge_checkpoint

    merge_checkpoint(Path(args.checkpoint), Path(args.out))
    return 0


def cmd_eval(args: argparse.Namespace, extra: list[str]) -> int:
    from steadyvla.eval.command import EvalRequest, parse_tasks, run_eval

    run_eval(EvalRequest(
        tasks=parse_tasks(args.tasks), episodes=args.episodes, seed=args.seed,
        checkpoint=Path(args.checkpoint) if args.checkpoint else None,
        vla_path=Path(args.vla_path) if args.vla_path else None, unnorm_key=args.unnorm_key,
        max_steps=args.max_steps, videos=args.videos, out=Path(args.out) if args.out else None,
        image_size=args.image_size, num_envs=args.num_envs, device=args.device, progress=not args.no_progress))
    return 0


def cmd_plot(args: argparse.Namespace, extra: list[str]) -> int:
    from steadyvla.report.plot import plot_runs

    plot_runs([Path(p) for p in args.run_dirs], Path(args.out) if args.out else None)
    return 0


def _add_eval_parser(verbs) -> None:
    ev = verbs.add_parser("eval", help="closed-loop MetaWorld v3 rollouts of a checkpoint or OpenVLA dir")
    ev.add_argument("--checkpoint", default=None, help="checkpoint dir, or a run dir (its newest complete one)")
    ev.add_argument("--vla_path", default=None, help="base OpenVLA dir of the run; alone: evaluate this dir")
    ev.add_argument("--tasks", required=True, help="comma-separated MetaWorld v3 tasks, e.g. reach-v3,push-v3")
    ev.add_argument("--episodes", type=int, required=True, help="episodes per task")
    ev.add_argument("--seed", type=int, default=0, help="seeds every episode's object/goal placement")
    ev.add_argument("--max-steps", type=int, default=150, help="episode horizon (env steps, at most 500)")
    ev.add_argument("--videos", type=int, default=0, help="write mp4s of the first K episodes of each task")
    ev.add_argument("--out", default=None, help="results JSON (default <run_dir>/eval/step-XXXXXX.json)")
    ev.add_argument("--image-size", type=int, default=None, help="camera pixels (default: the run's demo_image_size)")
    ev.add_argument("--num-envs", type=int, default=8, help="environments stepped together (one model batch)")
    ev.add_argument("--unnorm_key", default=None, help="dataset in the statistics (default: the run's dataset)")
    ev.add_argument("--device", default="cpu", help="torch device (default cpu)")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="steadyvla", description=__doc__.splitlines()[0],
                                     epilog=f"{DEBUG_FLAG} (anywhere): print the full traceback of a failure")
    verbs = parser.add_subparsers(dest="verb", required=True)
    for name, helptext in (("finetune", "LoRA fine-tuning (baseline or method); resumes automatically"),
                           ("train", "full-parameter training (use_lora: false; FSDP2 or DDP under torchrun); "
                            "resumes automatically"),
                           ("doctor", "pre-resume checklist: what would resume, is it complete, does the config match"),
                           ("memory", "memory preflight: estimated peak GPU and host memory against what is there")):
        p = verbs.add_parser(name, help=helptext, description=f"{helptext}. Any config key can be overridden with "
                             "`--key value` (values read as YAML: true, false, null, numbers).")
        p.add_argument("--config", required=True, help="YAML config with flat keys (see configs/)")
    launch = verbs.add_parser("launch", help="run finetune supervised, as scripts/run_*.sh do: explains a death "
                              "(SIGKILL / OOM), restart_on_failure restarts it")
    launch.add_argument("kind", choices=list(DEFAULT_CONFIGS))
    launch.add_argument("args", nargs=argparse.REMAINDER,
                        help="[NPROC|auto] [TARGET_STEPS] [SAVE_STEPS] [EVAL_EVERY] [PATIENCE] [--key value ...]")
    predict = verbs.add_parser("predict", help="predict one action with an OpenVLA-layout model (prints a JSON list)")
    predict.add_argument("--vla_path", required=True, help="OpenVLA Hugging Face directory (base or merged)")
    predict.add_argument("--image", required=True, help="RGB image file (PNG/JPEG)")
    predict.add_argument("--instruction", required=True, help="task instruction, e.g. 'pick up the cup'")
    predict.add_argument("--unnorm_key", default=None, help="dataset in norm_stats (optional if there is one)")
    predict.add_argument("--device", default="cpu", help="torch device (default cpu)")
    merge = verbs.add_parser("merge", help="merge a LoRA checkpoint into its base; write an OpenVLA-layout directory")
    merge.add_argument("--checkpoint", required=True, help="checkpoint dir, or a run dir (its newest complete one)")
    merge.add_argument("--out", required=True, help="new directory for the merged model (must not exist)")
    _add_eval_parser(verbs)
    plot = verbs.add_parser("plot", help="PNG charts of a run (loss, accuracy, L1, lr, method, eval success); "
                            "several runs are overlaid")
    plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="<run_root_dir>/<run_id>")
    plot.add_argument("--out", default=None, help="output folder (default <run_dir>/plots; several runs: "
                      "<first run_dir>/plots/overlay)")
    icsm = verbs.add_parser("icsm", help="the method's offline step: ICSM subspaces from the frozen teacher")
    icsm_verbs = icsm.add_subparsers(dest="icsm_verb", required=True)
    icsm_build = icsm_verbs.add_parser("build", help="write U_f, U_p, mu, C_T per layer to icms_artifact_dir; "
                                       "config keys can be overridden with `--key value`, also with the names "
                                       "of offline_icms.py: --r --epsilon (absolute) --fragile_dim --plastic_dim "
                                       "--max_samples --sensitivity_samples --layer_ids --batch_size (teacher batch)")
    icsm_build.add_argument("--config", required=True, help="YAML config with flat keys (see configs/)")
    data = verbs.add_parser("data", help="datasets: generate the demo, inspect, write statistics")
    data_verbs = data.add_subparsers(dest="data_verb", required=True)
    demo = data_verbs.add_parser("demo", help="roll out MetaWorld scripted experts into a LeRobot v3.0 dataset")
    demo.add_argument("--out", required=True, help="dataset directory to create")
    demo.add_argument("--tasks", default=None, help="comma-separated MetaWorld v3 task names (default: all demo tasks)")
    demo.add_argument("--episodes-per-task", type=int, default=4)
    demo.add_argument("--image-size", type=int, default=224)
    demo.add_argument("--seed", type=int, default=0)
    inspect = data_verbs.add_parser("inspect", help="episodes, frames, features, instructions, action statistics")
    inspect.add_argument("path", help="dataset directory (LeRobot v3 root or RLDS builder dir)")
    stats = data_verbs.add_parser("stats", help="write dataset_statistics.json (q01/q99 etc.) for a dataset")
    stats.add_argument("path", help="dataset directory")
    stats.add_argument("--out", default=None, help="output file (default ./dataset_statistics.json)")
    ckpt = verbs.add_parser("ckpt", help="list, verify, export or import checkpoints")
    ckpt_verbs = ckpt.add_subparsers(dest="ckpt_verb", required=True)
    for name in ("ls", "verify"):
        p = ckpt_verbs.add_parser(name, help=f"{name} the checkpoints of RUN_DIR")
        p.add_argument("run_dir", help="<run_root_dir>/<run_id>")
    export = ckpt_verbs.add_parser("export", help="write a full-training checkpoint as one consolidated OpenVLA "
                                   "directory (offline, one process; config.json, tokenizer, sharded safetensors)")
    export.add_argument("--checkpoint", required=True, help="full-training checkpoint dir, or a run dir (its newest "
                        "complete one)")
    export.add_argument("--out", required=True, help="new directory for the model (must not exist)")
    export.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: as stored, the float32 master "
                        "weights)")
    legacy = ckpt_verbs.add_parser("import-legacy", help="turn an old PEFT adapter dir + trainer_state.pt into a "
                                   "checkpoint of the config's run (config keys can be overridden with `--key value`)")
    legacy.add_argument("--adapter", required=True, help="old adapter dir (adapter_config.json + weights)")
    legacy.add_argument("--trainer-state", required=True, help="old trainer_state.pt (read with weights_only=True)")
    legacy.add_argument("--config", required=True, help="YAML config of the run to continue")
    return parser


COMMANDS = {"finetune": cmd_finetune, "train": cmd_train, "predict": cmd_predict, "merge": cmd_merge, "eval": cmd_eval, "plot": cmd_plot, "doctor": cmd_doctor, "icsm": cmd_icsm, "data": cmd_data, "ckpt": cmd_ckpt,
            "memory": cmd_memory}


def main(argv: list[str] | None = None) -> int:
    """Console entry point."""
    argv = sys.argv[1:] if argv is None else argv
    debug = DEBUG_FLAG in argv  # accepted anywhere, so it never reaches the config overrides
    argv = [a for a in argv if a != DEBUG_FLAG]
    if argv[:1] == ["launch"] and not set(argv[1:2]) & {"-h", "--help"}:
        from steadyvla.launch import main as launch_main  # its own argument and environment rules

        return launch_main(argv[1:])
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.verb not in VERBS_WITH_OVERRIDES and getattr(args, "ckpt_verb", None) != "import-legacy":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return COMMANDS[args.verb](args, extra)
    except (ConfigError, CheckpointError, RunDirBusy, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as err:  # noqa: BLE001 - the last line of defence: one line, not a traceback
        if debug:
            traceback.print_exc()
        where = getattr(err, "traceback_file", None)
        hint = f"full traceback in {where}" if where else f"rerun with {DEBUG_FLAG} for the full traceback"
        print(f"error: {type(err).__name__}: {err} ({hint})", file=sys.stderr)
        exit_after_error(EXIT_FAILURE)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
