"""``deepserve defaults``: make sure the small default models exist as artifacts (used by ``make serve``).

For each default, an existing artifact is kept when this deepserve can serve it; otherwise (missing, or exported
by an older deepserve whose graph layout this one refuses) an existing checkpoint is exported as a new
version; otherwise the model is trained from its preset first. Warm re-runs therefore neither retrain nor
re-export.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DefaultModel:
    name: str
    """Serving name (directory in the model repository)."""
    family: str
    """Training family: classifier | charlm | seq2seq."""
    preset: str
    """Bundled preset in deepserve/train/presets."""
    budget: str
    """What training costs on 2 CPU cores, for the message before it starts."""


DEFAULT_MODELS = (
    DefaultModel("digits-cnn", "classifier", "digits-cnn", "about 1 minute"),
    DefaultModel("charlm-lstm", "charlm", "charlm-lstm", "about 3 minutes"),
    DefaultModel("seq2seq-math", "seq2seq", "seq2seq-math", "about 5 minutes"),
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "defaults",
        help="train (if missing) and export (if missing) the small default models",
        description=__doc__,
    )
    parser.add_argument("--checkpoints", type=Path, default=Path("checkpoints"), help="checkpoint directory")
    parser.add_argument("--repository", type=Path, default=Path("model_repository"), help="model repository")
    parser.add_argument("--only", action="append", choices=[m.name for m in DEFAULT_MODELS],
                        help="limit to these defaults (repeatable)")
    parser.set_defaults(func=run)


def has_artifact(repository: Path, name: str) -> bool:
    return any((repository / name).glob("*/manifest.json"))


def outdated_reason(repository: Path, name: str) -> str | None:
    """Why the newest version of ``name`` cannot be served by this deepserve (``None`` when it can): an
    unreadable manifest, or a seq2seq graph layout from an older export."""
    from deepserve.manifest import KV_LAYOUT, ManifestError, load_manifest

    versions = sorted((int(p.parent.name), p.parent) for p in (repository / name).glob("*/manifest.json")
                      if p.parent.name.isdigit())
    if not versions:
        return "no numbered version directory holds a manifest.json"
    directory = versions[-1][1]
    try:
        manifest = load_manifest(directory, verify=False)
    except ManifestError as e:
        return str(e)
    if manifest.task == "seq2seq":
        layout = manifest.model.get("kv_layout")
        if layout != KV_LAYOUT:
            return f"its seq2seq graphs use kv_layout {layout!r}, this deepserve serves {KV_LAYOUT!r}"
    return None


def run(args: argparse.Namespace) -> int:
    from deepserve.errors import CLIError

    chosen = [m for m in DEFAULT_MODELS if not args.only or m.name in args.only]
    for model in chosen:
        checkpoint = args.checkpoints / f"{model.name}.pt"
        if has_artifact(args.repository, model.name):
            reason = outdated_reason(args.repository, model.name)
            if reason is None:
                print(f"[defaults] {model.name}: artifact present in {args.repository / model.name}, nothing to do")
                continue
            print(f"[defaults] {model.name}: the artifact in {args.repository / model.name} cannot be served "
                  f"({reason}); exporting a new version")
        if not checkpoint.exists():
            print(f"[defaults] {model.name}: training preset {model.preset!r} ({model.budget} on 2 CPU cores)")
            from deepserve.train.config import build_config, load_yaml
            from deepserve.train.loop import run_training
            from deepserve.train.task import family_classes
            from deepserve.train.cli import PRESET_DIR

            config_cls, _ = family_classes(model.family)
            config = build_config(config_cls, load_yaml(PRESET_DIR / f"{model.preset}.yaml"))
            run_training(model.family, config, out_path=checkpoint)
        try:
            from deepserve.export import export_checkpoint
        except ImportError:
            raise CLIError("the exporter is not available in this build; trained checkpoints are in "
                           f"{args.checkpoints}") from None
        print(f"[defaults] {model.name}: exporting {checkpoint} to {args.repository}")
        export_checkpoint(checkpoint, repository=args.repository, name=model.name)
    return 0
