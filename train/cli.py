"""``deepserve train FAMILY``: build the run config from defaults, a preset or a YAML file, plus overrides."""

from __future__ import annotations

import argparse
from pathlib import Path

FAMILIES = ("classifier", "charlm", "seq2seq")
PRESET_DIR = Path(__file__).parent / "presets"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a classifier, char-level LM or seq2seq Transformer",
        description="Train a model and write a checkpoint (state_dict + args + config + data + metrics). "
        "Config = family defaults, then --preset or --config (YAML), then --set overrides, then the flags below.",
    )
    parser.add_argument("family", choices=FAMILIES, help="model family")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", help="a bundled preset: " + ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))))
    source.add_argument("--config", type=Path, help="YAML file with train/data/model sections")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, e.g. --set train.lr=1e-3 (repeatable)")
    parser.add_argument("--out", type=Path, help="checkpoint path (default: checkpoints/<family>.pt)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="train.device")
    parser.add_argument("--epochs", type=int, help="train.epochs")
    parser.add_argument("--max-time", type=float, metavar="SECONDS", help="train.max_time_s")
    parser.add_argument("--max-steps", type=int, help="train.max_steps")
    parser.add_argument("--seed", type=int, help="train.seed")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint at --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    parser.set_defaults(func=run)


def resolve_config(args: argparse.Namespace):
    from deepserve.errors import CLIError
    from deepserve.train.config import ConfigError, apply_overrides, build_config, load_yaml
    from deepserve.train.task import family_classes

    config_cls, _ = family_classes(args.family)
    raw: dict = {}
    if args.preset:
        path = PRESET_DIR / f"{args.preset}.yaml"
        if not path.is_file():
            known = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
            raise CLIError(f"--preset {args.preset!r} does not exist; known presets: {known}")
        raw = load_yaml(path)
    elif args.config:
        try:
            raw = load_yaml(args.config)
        except ConfigError as e:
            raise CLIError(f"--config: {e}") from None
    flags = {"device": args.device, "epochs": args.epochs, "max_time_s": args.max_time,
             "max_steps": args.max_steps, "seed": args.seed}
    overrides = list(args.overrides) + [f"train.{k}={v}" for k, v in flags.items() if v is not None]
    if args.no_progress:
        overrides.append("train.progress=false")
    try:
        return build_config(config_cls, apply_overrides(raw, overrides))
    except ConfigError as e:
        where = f"--preset {args.preset}" if args.preset else f"--config {args.config}" if args.config else "config"
        raise CLIError(f"{where}: {e}") from None


def run(args: argparse.Namespace) -> int:
    import dataclasses

    import yaml

    from deepserve.errors import CLIError
    from deepserve.train.checkpoint import CheckpointError
    from deepserve.train.config import ConfigError
    from deepserve.train.loop import run_training

    config = resolve_config(args)
    if args.print_config:
        print(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False), end="")
        return 0
    out = args.out or Path("checkpoints") / f"{args.family}.pt"
    if args.resume and not out.exists():
        raise CLIError(f"--resume: no checkpoint at {out} (set --out)")
    try:
        result = run_training(args.family, config, out_path=out, resume=args.resume)
    except (ConfigError, CheckpointError) as e:
        raise CLIError(str(e)) from None
    except (FileNotFoundError, PermissionError) as e:
        raise CLIError(f"{e.filename or ''}: {e.strerror or e}") from None
    print(f"checkpoint: {result.checkpoint} ({result.steps} steps, {result.elapsed_s:.1f} s)")
    return 0
