"""Artifact signing and folder containment: `deepserve export --sign-key`, `deepserve sign`, `export --verify
--trusted-keys`, and `deepserve serve --trusted-keys` on a real socket refusing unsigned, edited, foreign-key and
moved artifacts and folders symlinked out of the repository, while the good artifact serves."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from deepserve.cli import main
from deepserve.export import export_checkpoint
from deepserve.signing import (SIGNATURE_FILE, ArtifactTrust, SignatureError, generate_key, load_trusted_keys,
                               sign_manifest, verify_manifest)
from tests.artifacts import make_classifier_checkpoint
from tests.servers import free_port, wait_ready

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    """A trusted key pair (public key alone in ``trusted/``) and an untrusted one."""
    root = tmp_path_factory.mktemp("keys")
    (root / "trusted").mkdir()
    private, public = generate_key(root / "release.pem")
    other, _ = generate_key(root / "other.pem")
    shutil.copy(public, root / "trusted" / public.name)
    return {"private": private, "public": public, "trusted_dir": root / "trusted", "other": other}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_classifier_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt")


@pytest.fixture(scope="module")
def signed(tmp_path_factory, keys, checkpoint) -> Path:
    """``signed/1`` exported with --sign-key (ONNX only: enough to serve, quicker to export)."""
    repo = tmp_path_factory.mktemp("signed-repo")
    return export_checkpoint(checkpoint, repository=repo, name="signed", formats=("onnx",), quantize=False,
                             sign_key=keys["private"], log=lambda _: None)


def copy_as(source: Path, repository: Path, name: str, key: Path | None, edit=None) -> Path:
    """Copy an artifact under another model name (as its manifest says), sign it with ``key`` (None: leave it
    unsigned), then apply ``edit`` to the manifest without re-signing."""
    target = repository / name / "1"
    shutil.copytree(source, target)
    (target / SIGNATURE_FILE).unlink()
    path = target / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "name": name}))
    if key is not None:
        sign_manifest(target, key)
    if edit is not None:
        manifest = json.loads(path.read_text())
        edit(manifest)
        path.write_text(json.dumps(manifest))
    return target


def reverse_labels(m: dict) -> None:
    m["labels"] = m["labels"][::-1]


def shift_mean(m: dict) -> None:
    m["preprocessing"]["mean"] = [0.9]


@pytest.fixture(scope="module")
def repository(tmp_path_factory, signed, keys) -> Path:
    repo = tmp_path_factory.mktemp("trust-repo")
    shutil.copytree(signed, repo / "signed" / "1")
    copy_as(signed, repo, "labels-edited", keys["private"], reverse_labels)
    copy_as(signed, repo, "mean-edited", keys["private"], shift_mean)
    copy_as(signed, repo, "unsigned", None)
    copy_as(signed, repo, "other-key", keys["other"])
    shutil.copytree(signed, repo / "moved" / "1")  # signed for "signed", sitting under another name
    corrupt = copy_as(signed, repo, "corrupt-sig", keys["private"])
    (corrupt / SIGNATURE_FILE).write_text("{not json")
    outside = tmp_path_factory.mktemp("outside")
    copy_as(signed, outside, "linked-out", keys["private"])  # well signed, but not in the repository
    (repo / "linked-out").symlink_to(outside / "linked-out", target_is_directory=True)
    copy_as(signed, outside, "version-out", keys["private"])
    (repo / "version-out").mkdir()
    (repo / "version-out" / "1").symlink_to(outside / "version-out" / "1", target_is_directory=True)
    return repo


@pytest.fixture(scope="module")
def server(repository, keys, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("trust-log") / "stderr.txt"
    cmd = [sys.executable, "-m", "deepserve.cli", "serve", "--repository", str(repository), "--port", str(port),
           "--device", "cpu", "--trusted-keys", str(keys["trusted_dir"])]
    env = {k: v for k, v in os.environ.items() if k != "DEEPSERVE_TRUSTED_KEYS"}
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, base, log)
        yield base
    finally:
        proc.kill()
        proc.wait()


EXPECTED_REASONS = {
    "labels-edited": "manifest.json was changed after it was signed",
    "mean-edited": "manifest.json was changed after it was signed",
    "unsigned": "not signed (no manifest.sig)",
    "other-key": "signed by a key that is not trusted here",
    "moved": "signed for model 'signed' but sits in folder 'moved'",
    "corrupt-sig": "manifest.sig is not a signature bundle",
    "linked-out": "model folder 'linked-out' is a symlink out of the repository",
    "version-out": "version folder '1' is a symlink out of the repository",
}


def test_serve_with_trusted_keys_serves_only_well_signed_artifacts(server, repository):
    index = {m["name"]: m for m in httpx.get(f"{server}/v2/models").json()["models"]}
    assert index["signed"]["ready"] and index["signed"]["reason"] is None
    x = np.zeros((1, 1, 8, 8), np.float32)
    body = {"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": x.ravel().tolist()}]}
    assert httpx.post(f"{server}/v2/models/signed/infer", json=body).status_code == 200
    for name, reason in EXPECTED_REASONS.items():
        assert not index[name]["ready"], name
        assert reason in index[name]["reason"], (name, index[name]["reason"])
        assert str(repository) not in index[name]["reason"]  # the operator's terms, no paths
        refused = httpx.post(f"{server}/v2/models/{name}/infer", json=body)
        assert refused.status_code == 503 and reason in refused.json()["error"], (name, refused.text)


async def test_symlinks_out_are_served_when_allowed(tmp_path, signed, keys):
    from deepserve.serve.repository import ModelRepository

    outside = copy_as(signed, tmp_path / "elsewhere", "linked", keys["private"]).parent
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "linked").symlink_to(outside, target_is_directory=True)
    trust = ArtifactTrust(load_trusted_keys(keys["public"]), allow_symlinks_out=True)
    repo = ModelRepository(tmp_path / "repo", device="cpu", use_env=False, trust=trust)
    await repo.start()
    try:
        assert repo.is_ready("linked"), repo.index()
    finally:
        await repo.stop()


def test_verify_manifest_names_the_trusted_key_and_refuses_edits(signed, keys, tmp_path):
    trusted = load_trusted_keys(keys["trusted_dir"])
    assert verify_manifest(signed, trusted).name == keys["public"].name
    edited = copy_as(signed, tmp_path, "signed", keys["private"], reverse_labels)
    with pytest.raises(SignatureError, match="changed after it was signed"):
        verify_manifest(edited, trusted)


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_export_verify_checks_the_signature(capsys, signed, keys, tmp_path):
    code, out = run_cli(capsys, "export", "--verify", signed, "--trusted-keys", keys["public"])
    assert code == 0 and "signed by trusted key release.pub" in out, out
    code, out = run_cli(capsys, "export", "--verify", signed)
    assert code == 0 and "signed, not checked (no trusted keys given)" in out, out
    edited = copy_as(signed, tmp_path, "signed", keys["private"], shift_mean)
    code, out = run_cli(capsys, "export", "--verify", edited, "--trusted-keys", keys["trusted_dir"])
    assert code == 2 and "manifest.json was changed after it was signed" in out, out


def test_sign_an_existing_artifact_then_it_verifies(capsys, signed, keys, tmp_path):
    target = copy_as(signed, tmp_path, "signed", None)  # unsigned copy
    code, out = run_cli(capsys, "export", "--verify", target, "--trusted-keys", keys["public"])
    assert code == 2 and "not signed" in out, out
    code, out = run_cli(capsys, "sign", target, "--key", keys["private"])
    assert code == 0 and (target / SIGNATURE_FILE).is_file(), out
    assert verify_manifest(target, load_trusted_keys(keys["public"])).name == "release.pub"


def test_sign_refuses_an_artifact_whose_files_do_not_match(capsys, signed, keys, tmp_path):
    target = copy_as(signed, tmp_path, "signed", None)
    with open(target / "model.onnx", "ab") as f:
        f.write(b"\0")
    code, out = run_cli(capsys, "sign", target, "--key", keys["private"])
    assert code == 2 and "not signed" in out and "sha256 mismatch" in out, out
    assert not (target / SIGNATURE_FILE).exists()


def test_cli_errors_name_the_flag_and_file(capsys, keys, checkpoint, signed, tmp_path, monkeypatch):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    ed = tmp_path / "ed25519.pub"
    ed.write_bytes(ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    (tmp_path / "empty").mkdir()
    missing = tmp_path / "missing.pem"
    moved = tmp_path / "moved" / "1"
    shutil.copytree(signed, moved)
    cases = [
        (("sign", signed), "--key is required"),
        (("sign", "--key", keys["private"]), "name at least one ARTIFACT"),
        (("sign", signed, "--key", missing), f"--key {missing}: no such file"),
        (("sign", signed, "--key", keys["public"]), "that is a public key; sign with the private one"),
        (("sign", tmp_path / "nowhere", "--key", keys["private"]), "not an artifact directory"),
        (("sign", moved, "--key", keys["private"]), "names model 'signed' but the model folder is 'moved'"),
        (("sign", "--generate-key", keys["private"]), "already exists; not overwriting a key"),
        (("export", checkpoint, "--name", "x", "--repository", tmp_path / "r", "--sign-key", missing),
         f"--sign-key {missing}: no such file"),
        (("export", "--verify", signed, "--trusted-keys", keys["private"]), "is a private key"),
        (("export", "--verify", signed, "--trusted-keys", ed), "signing needs an elliptic-curve"),
        (("export", "--verify", signed, "--sign-key", keys["private"]), "sign an existing artifact with"),
        (("serve", "--repository", signed.parent.parent, "--trusted-keys", tmp_path / "empty"),
         "holds no public keys"),
    ]
    for argv, message in cases:
        code, out = run_cli(capsys, *argv)
        assert code == 2 and message in out and "Traceback" not in out, (argv, out)
    assert not (tmp_path / "r").exists()  # a bad --sign-key is refused before anything is written
    monkeypatch.setenv("DEEPSERVE_SIGN_KEY_PASSWORD", "secret")
    encrypted, _ = generate_key(tmp_path / "encrypted.pem")
    assert b"ENCRYPTED PRIVATE KEY" in encrypted.read_bytes()
    monkeypatch.delenv("DEEPSERVE_SIGN_KEY_PASSWORD")
    code, out = run_cli(capsys, "sign", signed, "--key", encrypted)
    assert code == 2 and "the password comes from DEEPSERVE_SIGN_KEY_PASSWORD" in out, out
    monkeypatch.setenv("DEEPSERVE_TRUSTED_KEYS", str(missing))
    code, out = run_cli(capsys, "serve", "--repository", signed.parent.parent)
    assert code == 2 and f"DEEPSERVE_TRUSTED_KEYS {missing}: no such file" in out, out
