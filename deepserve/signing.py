"""Artifact signing: ``manifest.sig`` beside ``manifest.json``, and the checks serve makes before loading.

The manifest already holds the sha256 of every other file of the artifact, so signing the manifest signs the
whole artifact. The signature is made and checked with sigstore's ``model-signing`` library (private-key
mode, no network): ``manifest.sig`` is a Sigstore bundle (JSON) whose DSSE envelope carries an in-toto statement
with the sha256 of ``manifest.json``, signed with an elliptic-curve key (P-256, P-384 or P-521, PEM files);
``verificationMaterial.publicKey.hint`` is the sha256 of the signer's PEM public key, which picks the trusted
key to check it with.

``ArtifactTrust.check`` is what serve runs on every version folder before reading its manifest: the folder must
lie inside the repository (unless symlinks out are allowed), and when trusted keys are configured the
manifest must carry a good signature by one of them. This module imports neither torch nor (until a key is
used) the signing library, so serve can import it cheaply.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepserve.manifest import MANIFEST_FILE, SIGNATURE_FILE, ManifestError

TRUSTED_KEYS_ENV = "DEEPSERVE_TRUSTED_KEYS"
"""Environment variable: the public key file, or folder of ``*.pub`` files, serve trusts (as ``--trusted-keys``)."""
KEY_PASSWORD_ENV = "DEEPSERVE_SIGN_KEY_PASSWORD"
"""Environment variable: the password of an encrypted private key given to ``--sign-key`` / ``--key``."""
CURVES = ("secp256r1", "secp384r1", "secp521r1")
"""The curves model-signing signs with (NIST P-256, P-384, P-521)."""
_CHANGED = "Signature mismatch"
"""How model-signing's ``verify`` starts the ValueError for a file whose hash differs from the signed one."""
_INSTALL = "artifact signing needs the model-signing package: pip install 'deepserve[sign]'"


class KeyFileError(ValueError):
    """A key file is missing, unreadable or not a key of the right kind; the message names the file."""


class SignatureError(ManifestError):
    """An artifact is unsigned, signed by an untrusted key, or changed after it was signed."""


class SymlinkError(ManifestError):
    """A model or version folder is a symlink pointing out of the repository."""


@dataclass(frozen=True)
class TrustedKey:
    """A public key serve accepts signatures from."""

    path: Path
    """The PEM file it was read from (model-signing reads it again to verify)."""
    fingerprint: str
    """sha256 hex of the key's PEM SubjectPublicKeyInfo: model-signing's key hint in ``manifest.sig``."""

    @property
    def name(self) -> str:
        return self.path.name


def _read_pem(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise KeyFileError(f"{path}: is a folder, not a key file") from None
    except OSError as e:
        raise KeyFileError(f"{path}: cannot read it ({e.strerror or e})") from None


def _check_curve(path: Path, key: Any, kind: str) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    if not isinstance(key, (ec.EllipticCurvePublicKey, ec.EllipticCurvePrivateKey)) or key.curve.name not in CURVES:
        raise KeyFileError(f"{path}: a {type(key).__name__} {kind}; signing needs an elliptic-curve P-256, P-384 or "
                           "P-521 key (make one with `deepserve sign --generate-key KEY.pem`)")


def fingerprint(public_key: Any) -> str:
    """sha256 hex of a public key's PEM SubjectPublicKeyInfo, as model-signing writes its key hint."""
    from cryptography.hazmat.primitives import serialization

    pem = public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(pem).hexdigest()


def load_public_key(path: Path) -> TrustedKey:
    """Read one PEM public key; ``KeyFileError`` names the file when it is not one the signer could have used."""
    path = Path(path)
    _require(path)
    from cryptography.hazmat.primitives import serialization

    pem = _read_pem(path)
    if b"PRIVATE KEY-----" in pem:
        raise KeyFileError(f"{path}: is a private key; trust its public key (the .pub file) instead")
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError):
        raise KeyFileError(f"{path}: not a PEM public key") from None
    _check_curve(path, key, "public key")
    return TrustedKey(path=path, fingerprint=fingerprint(key))


def load_trusted_keys(path: Path | str) -> tuple[TrustedKey, ...]:
    """The public key in file ``path``, or every ``*.pub`` file in folder ``path``."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".pub" and p.is_file())
        if not files:
            raise KeyFileError(f"{path}: folder holds no public keys (*.pub files)")
        return tuple(load_public_key(p) for p in files)
    return (load_public_key(path),)


def trusted_keys_option(value: str | None) -> tuple[TrustedKey, ...]:
    """The keys ``--trusted-keys`` (else ``$DEEPSERVE_TRUSTED_KEYS``) names, or () when neither is set; a
    ``CLIError`` names the flag or variable and the file at fault."""
    from deepserve.errors import CLIError

    where = "--trusted-keys" if value else TRUSTED_KEYS_ENV
    value = value or os.environ.get(TRUSTED_KEYS_ENV)
    if not value:
        return ()
    try:
        return load_trusted_keys(value)
    except KeyFileError as e:
        raise CLIError(f"{where} {e}") from None


def check_private_key(path: Path | str) -> Path:
    """Fail early, naming the file, unless ``path`` is a usable signing key (``KEY_PASSWORD_ENV`` if encrypted)."""
    path = Path(path)
    _require(path)
    from cryptography.hazmat.primitives import serialization

    pem = _read_pem(path)
    try:
        key = serialization.load_pem_private_key(pem, _password())
    except TypeError as e:  # encrypted without a password, or a password for a plain key
        raise KeyFileError(f"{path}: {e} (the password comes from {KEY_PASSWORD_ENV})") from None
    except ValueError:
        hint = " (that is a public key; sign with the private one)" if b"PUBLIC KEY-----" in pem else ""
        raise KeyFileError(f"{path}: not a PEM private key, or a wrong password{hint}") from None
    _check_curve(path, key, "private key")
    return path


def _password() -> bytes | None:
    password = os.environ.get(KEY_PASSWORD_ENV)
    return password.encode() if password else None


def generate_key(private_path: Path | str) -> tuple[Path, Path]:
    """Write a new P-256 private key to ``private_path`` (mode 0600) and its public key beside it as ``.pub``.
    Refuses to overwrite either file."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private_path = Path(private_path)
    public_path = private_path.with_suffix(".pub")
    if private_path == public_path:
        raise KeyFileError(f"{private_path}: name the private key file something other than *.pub (e.g. KEY.pem)")
    for p in (private_path, public_path):
        if p.exists():
            raise KeyFileError(f"{p}: already exists; not overwriting a key")
    key = ec.generate_private_key(ec.SECP256R1())
    password = _password()
    encryption = (serialization.BestAvailableEncryption(password) if password
                  else serialization.NoEncryption())
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(private_pem)
        public_path.write_bytes(public_pem)
    except OSError as e:
        raise KeyFileError(f"{e.filename or private_path}: cannot write it ({e.strerror or e})") from None
    return private_path, public_path


def sign_manifest(directory: Path | str, private_key: Path | str) -> Path:
    """Sign ``directory/manifest.json`` with ``private_key``, writing ``directory/manifest.sig``."""
    signing = _import("signing")
    directory = Path(directory)
    signature = directory / SIGNATURE_FILE
    # model-signing hands the password to cryptography, which takes bytes
    config = signing.Config().use_elliptic_key_signer(private_key=Path(private_key), password=_password())
    partial = directory / f".{SIGNATURE_FILE}.tmp"  # a server loading meanwhile never sees half a signature
    try:
        config.sign(directory / MANIFEST_FILE, partial)
        os.replace(partial, signature)
    finally:
        partial.unlink(missing_ok=True)
    return signature


def _import(name: str) -> Any:
    import importlib

    try:
        return importlib.import_module(f"model_signing.{name}")
    except ModuleNotFoundError as e:
        raise RuntimeError(f"{_INSTALL} ({e})") from None


def _require(path: Path) -> None:
    """Before a key is used: without the signing libraries, say so naming the key, not in a traceback later."""
    import importlib.util

    if any(importlib.util.find_spec(m) is None for m in ("cryptography", "model_signing", "OpenSSL")):
        raise KeyFileError(f"{path}: cannot be used: {_INSTALL}")


def _signer_hint(signature: Path) -> str:
    """The key hint of ``manifest.sig`` ("" for bundles written before model-signing recorded one)."""
    try:
        bundle = json.loads(signature.read_text(encoding="utf-8"))
        hint = (bundle["verificationMaterial"].get("publicKey") or {}).get("hint") or ""
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise SignatureError(f"{SIGNATURE_FILE} is not a signature bundle (corrupt, or not written by "
                             "`deepserve sign`)") from None
    if not isinstance(hint, str):
        raise SignatureError(f"{SIGNATURE_FILE} is not a signature bundle (its key hint is not a string)")
    return hint


def verify_manifest(directory: Path | str, keys: Sequence[TrustedKey]) -> TrustedKey:
    """Check that ``manifest.sig`` is a good signature of ``manifest.json`` by one of ``keys``, and that the
    signed manifest names the model folder it sits in. Returns the key; raises ``SignatureError`` saying what
    is wrong in the operator's terms."""
    directory = Path(directory)
    signature = directory / SIGNATURE_FILE
    if not signature.is_file():
        raise SignatureError(f"not signed (no {SIGNATURE_FILE}); this server serves only artifacts signed by a "
                             "trusted key")
    hint = _signer_hint(signature)
    candidates = [k for k in keys if k.fingerprint == hint] if hint else list(keys)
    if not candidates:
        raise SignatureError(f"signed by a key that is not trusted here (key {hint[:16]})")
    verifying = _import("verifying")
    from cryptography.exceptions import InvalidSignature

    for key in candidates:
        try:
            verifying.Config().use_elliptic_key_verifier(public_key=key.path).verify(directory / MANIFEST_FILE,
                                                                                     signature)
        except InvalidSignature:
            problem = f"{SIGNATURE_FILE} does not verify with trusted key {key.name}: the signature was altered"
        except (ValueError, KeyError, TypeError) as e:
            if not str(e).startswith(_CHANGED):
                raise SignatureError(f"{SIGNATURE_FILE} could not be checked: {e}") from None
            problem = (f"{MANIFEST_FILE} was changed after it was signed (by trusted key {key.name}): labels, "
                       "preprocessing or file hashes differ from the signed ones")
        else:
            _check_signed_name(directory)
            return key
    raise SignatureError(problem)


def _check_signed_name(directory: Path) -> None:
    """A signed manifest may not be moved under another model's name: the name is part of what was signed."""
    try:
        name = json.loads((directory / MANIFEST_FILE).read_text()).get("name")
    except (OSError, ValueError, AttributeError):
        return  # load_manifest reports an unreadable manifest next, with its own reason
    folder = Path(os.path.abspath(directory)).parent.name  # the name it is served under: symlinks not followed
    if name != folder:
        raise SignatureError(f"{MANIFEST_FILE} is signed for model {name!r} but sits in folder {folder!r}")


@dataclass(frozen=True)
class ArtifactTrust:
    """What serve requires of a version folder before it reads the manifest."""

    keys: tuple[TrustedKey, ...] = ()
    """Trusted public keys; when any are given, every artifact must be signed by one of them."""
    allow_symlinks_out: bool = False
    """Serve model or version folders that are symlinks to somewhere outside the repository."""

    def check(self, directory: Path, repository: Path) -> None:
        """Raise ``SymlinkError`` / ``SignatureError`` unless ``directory`` (``<repository>/<model>/<version>``)
        may be loaded."""
        if not self.allow_symlinks_out:
            check_inside(Path(directory), Path(repository))
        if self.keys:
            verify_manifest(directory, self.keys)


def check_inside(directory: Path, repository: Path) -> None:
    """``directory`` and its model folder must resolve to places inside ``repository``."""
    root = repository.resolve()
    for folder, what in ((directory.parent, "model folder"), (directory, "version folder")):
        if not folder.resolve().is_relative_to(root):
            raise SymlinkError(f"the {what} {folder.name!r} is a symlink out of the repository; refused "
                               "(serve --allow-symlinks-out serves it)")
