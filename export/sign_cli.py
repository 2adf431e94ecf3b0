"""``deepserve sign``: make a signing key pair, or sign existing artifacts (``manifest.sig``).

Imports only argparse at module level (the ``deepserve`` command loads every subcommand's parser).
"""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sign",
        help="sign artifacts' manifests (or make a key pair) so that serve --trusted-keys accepts them",
        description="Sign DIR/NAME/VERSION artifacts with --key (an elliptic-curve PEM private key), writing "
        "manifest.sig beside manifest.json after checking every file's sha256; or make a new P-256 key pair "
        "with --generate-key KEY.pem (writes KEY.pem and KEY.pub). An encrypted key's password comes from "
        "$DEEPSERVE_SIGN_KEY_PASSWORD; with it set, --generate-key encrypts the new key.",
    )
    p.add_argument("artifacts", nargs="*", metavar="ARTIFACT", help="artifact directory REPOSITORY/NAME/VERSION")
    p.add_argument("--key", metavar="KEY", help="PEM private key to sign with")
    p.add_argument("--generate-key", metavar="KEY.pem",
                   help="write a new private key here (mode 0600) and its public key beside it as .pub")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from deepserve.cli import CLIError
    from deepserve.signing import KeyFileError

    if args.generate_key:
        if args.artifacts or args.key:
            raise CLIError("--generate-key makes a key pair and signs nothing; sign with --key in a second step")
        try:
            return _generate(args.generate_key)
        except KeyFileError as e:
            raise CLIError(f"--generate-key {e}") from None
    if not args.key:
        raise CLIError("--key is required to sign (or --generate-key KEY.pem to make one)")
    if not args.artifacts:
        raise CLIError("name at least one ARTIFACT directory (REPOSITORY/NAME/VERSION) to sign")
    return _sign(args.artifacts, args.key)


def _generate(path: str) -> int:
    from deepserve.signing import generate_key, load_public_key

    private, public = generate_key(path)
    print(f"wrote {private} (private: keep it secret, sign with --key) and {public} (public: give it to "
          f"serve --trusted-keys); key {load_public_key(public).fingerprint[:16]}")
    return 0


def _sign(artifacts: list[str], key: str) -> int:
    from pathlib import Path

    from deepserve.cli import CLIError
    from deepserve.manifest import ManifestError, load_manifest
    from deepserve.signing import KeyFileError, check_private_key, sign_manifest

    try:
        check_private_key(key)
    except KeyFileError as e:
        raise CLIError(f"--key {e}") from None
    for artifact in map(Path, artifacts):
        if not artifact.is_dir():
            raise CLIError(f"{artifact}: not an artifact directory (REPOSITORY/NAME/VERSION)")
        try:  # sign only what still matches its manifest
            manifest = load_manifest(artifact, verify=True)
        except ManifestError as e:
            raise CLIError(f"{artifact}: not signed: {e}") from None
        if manifest.name != artifact.resolve().parent.name:  # serve with trusted keys would refuse it
            raise CLIError(f"{artifact}: not signed: manifest.json names model {manifest.name!r} but the model "
                           f"folder is {artifact.resolve().parent.name!r}; fix the name first")
        print(f"signed {artifact}: {sign_manifest(artifact, key)}")
    return 0
