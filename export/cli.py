"""``deepserve export``: checkpoint -> artifact, or ``--verify`` an existing artifact.

Imports only argparse at module level (the ``deepserve`` command loads every subcommand's parser).
"""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a checkpoint to a versioned artifact (TorchScript, ONNX, int8 ONNX) with parity checks",
        description="Write REPOSITORY/NAME/VERSION/ atomically from a training checkpoint, or re-check an "
        "artifact with --verify DIR/NAME/VERSION.",
    )
    p.add_argument("checkpoint", nargs="?", metavar="CHECKPOINT", help="checkpoint file written by deepserve train")
    p.add_argument("--name", help="model name (the directory under the repository)")
    p.add_argument("--version", type=int, default=None, metavar="N", help="version to write (default: next free)")
    p.add_argument("--repository", metavar="DIR", help="model repository directory")
    p.add_argument("--format", default="torchscript,onnx", metavar="LIST",
                   help="comma-separated formats: torchscript, onnx (default: both)")
    p.add_argument("--no-quantize", action="store_true", help="skip the int8 dynamically quantized ONNX variant")
    p.add_argument("--fp16", action="store_true", help="also write an fp16 ONNX variant (for GPU serving)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing version")
    p.add_argument("--verify", metavar="DIR", help="re-check sha256 of every file and parity of an artifact")
    p.add_argument("--sign-key", metavar="KEY", help="sign the artifact's manifest with this PEM private key "
                   "(deepserve sign --generate-key KEY.pem makes one)")
    p.add_argument("--trusted-keys", metavar="FILE|DIR", default=None,
                   help="with --verify: require a good signature by this public key, or by one of the *.pub files "
                   "in this folder (default: $DEEPSERVE_TRUSTED_KEYS)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from deepserve.cli import CLIError
    from deepserve.export import ExportError

    try:
        if args.verify:
            if args.checkpoint:
                raise CLIError("--verify takes an artifact directory and no CHECKPOINT")
            if args.sign_key:
                raise CLIError("--sign-key signs a new export; sign an existing artifact with `deepserve sign`")
            return _verify(args.verify, args.trusted_keys)
        if args.trusted_keys:
            raise CLIError("--trusted-keys goes with --verify (or with `deepserve serve`)")
        return _export(args)
    except ExportError as e:
        raise CLIError(str(e)) from None


def _export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from deepserve.cli import CLIError
    from deepserve.export import export_checkpoint

    if not args.checkpoint:
        raise CLIError("CHECKPOINT is required (or --verify DIR/NAME/VERSION)")
    if not args.name:
        raise CLIError("--name is required")
    if not args.repository:
        raise CLIError("--repository is required")
    if args.version is not None and args.version < 1:
        raise CLIError(f"--version must be a positive integer, got {args.version}")
    export_checkpoint(
        Path(args.checkpoint),
        repository=Path(args.repository),
        name=args.name,
        version=args.version,
        formats=[f for f in args.format.split(",")],
        quantize=not args.no_quantize,
        fp16=args.fp16,
        overwrite=args.overwrite,
        sign_key=Path(args.sign_key) if args.sign_key else None,
    )
    return 0


def _verify(directory: str, trusted_keys: str | None) -> int:
    from pathlib import Path

    from deepserve.export import verify_artifact
    from deepserve.signing import trusted_keys_option

    report = verify_artifact(Path(directory), trusted_keys_option(trusted_keys))
    print(f"ok: {report['directory']} ({report['name']} v{report['version']}): {report['files_checked']} files "
          f"match their sha256; {len(report['checks'])} parity checks pass (max abs diff "
          f"{report['max_abs_diff']:.2e} <= {report['tolerance']:g}); {report['signature']}")
    return 0
