"""Serving ONNX artifacts needs no torch; TorchScript artifacts still load it, and serve the same answers.

Both run the real `deepserve serve` in a subprocess on a real socket, on a repository shaped like the default
one (a classifier, a char-LM and a seq2seq model, each exported as TorchScript and ONNX), with the default
`--device auto`. In the ONNX server every import of torch fails, as in an environment without torch, and is
reported on stderr: any code path that needs torch makes a model not ready or a request fail.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.artifacts import make_charlm_artifact, make_classifier_artifact, make_seq2seq_artifact
from tests.servers import free_port
from tests.test_serve_socket import as_logits, body, images

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("tiny-cnn", "tiny-charlm", "tiny-seq2seq")
BLOCKED = "BLOCKED import of"

# A meta path finder in front that refuses torch and says so: an environment without torch.
BLOCK_TORCH = textwrap.dedent(f"""
    import sys

    class NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "torch":
                print("{BLOCKED}", name, flush=True, file=sys.stderr)
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None

    sys.meta_path.insert(0, NoTorch())
""")
NO_TORCH = BLOCK_TORCH + "from deepserve.cli import main\nsys.exit(main(sys.argv[1:]))\n"
"""`deepserve serve` without torch."""


class Served:
    """`deepserve serve` in a subprocess; ``started`` is set when uvicorn listens, which it does after the
    lifespan (every model loaded and warmed up). Stderr is read by a thread, so `-X importtime`'s lines never fill the pipe."""

    def __init__(self, command: list[str]) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.lines: list[str] = []
        self.started = threading.Event()
        self.complete = False
        """uvicorn said "Uvicorn running on"."""
        self.proc = subprocess.Popen([*command, "--port", str(self.port)], cwd=ROOT, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            if "Uvicorn running on" in line:
                self.complete = True
                self.started.set()
        self.started.set()  # exited: let the waiter see it

    def log(self) -> str:
        return "\n".join([line for line in self.lines if not line.startswith("import time:")][-40:])

    def wait_started(self) -> None:
        assert self.started.wait(120), f"server did not start in 120 s:\n{self.log()}"
        assert self.complete, f"server exited while starting:\n{self.log()}"

    def imported(self) -> set[str]:
        """Every module the process imported so far (`-X importtime` lines)."""
        return {line.rsplit("|", 1)[-1].strip() for line in self.lines if line.startswith("import time:")}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.reader.join(10)


@pytest.fixture(scope="module")
def servers(tmp_path_factory) -> Iterator[dict[str, Served]]:
    root = tmp_path_factory.mktemp("lean-repo")
    make_classifier_artifact(root, "tiny-cnn", quantize=False)
    make_charlm_artifact(root, "tiny-charlm")
    make_seq2seq_artifact(root, "tiny-seq2seq")
    serve = ["serve", "--repository", str(root), "--max-queue-delay-ms", "10"]
    started = {  # both start at once: their start-ups overlap
        "onnx": Served([sys.executable, "-X", "importtime", "-c", NO_TORCH, *serve]),
        "torchscript": Served([sys.executable, "-X", "importtime", "-m", "deepserve.cli", *serve,
                               "--backend", "torchscript"]),
    }
    try:
        for server in started.values():
            server.wait_started()
        yield started
    finally:
        for server in started.values():
            server.stop()


def answers(base: str) -> dict[str, object]:
    """Every model's answer to a fixed request: classifier logits, greedy char-LM and beam-search seq2seq text."""
    with httpx.Client(base_url=base, timeout=60) as c:
        out: dict[str, object] = {"tiny-cnn": as_logits(c.post("/v2/models/tiny-cnn/infer", json=body(images(3, 7))))}
        for model, parameters in (("tiny-charlm", {"max_new_tokens": 8, "temperature": 0.0}),
                                  ("tiny-seq2seq", {"max_new_tokens": 6, "num_beams": 2})):
            r = c.post(f"/v2/models/{model}/generate", json={"text_input": "12", "parameters": parameters})
            assert r.status_code == 200, r.text
            out[model] = r.json()["text_output"]
    return out


def platforms(base: str) -> dict[str, str]:
    return {m: httpx.get(f"{base}/v2/models/{m}", timeout=10).json()["platform"] for m in MODELS}


def test_onnx_serving_never_imports_torch(servers):
    onnx = servers["onnx"]
    index = httpx.get(f"{onnx.base}/v2/models", timeout=10).json()["models"]
    assert {m["name"]: m["ready"] for m in index} == dict.fromkeys(MODELS, True), index
    assert set(platforms(onnx.base).values()) == {"onnxruntime_onnx"}
    answers(onnx.base)
    assert not [line for line in onnx.lines if line.startswith(BLOCKED)], "something tried to import torch"
    imported = onnx.imported()
    assert "deepserve.serve.app" in imported and "onnxruntime" in imported
    assert not {m for m in imported if m.split(".")[0] == "torch"}


def test_torchscript_serving_loads_torch_and_answers_like_onnx(servers):
    torchscript = servers["torchscript"]
    assert set(platforms(torchscript.base).values()) == {"pytorch_libtorch"}
    assert "torch" in torchscript.imported()
    expected, got = answers(servers["onnx"].base), answers(torchscript.base)
    np.testing.assert_allclose(got.pop("tiny-cnn"), expected.pop("tiny-cnn"), rtol=1e-4, atol=1e-5)
    assert got == expected  # greedy and beam-search text: the same tokens


def test_torchscript_without_torch_says_what_to_install(tmp_path):
    """The backend's reason (a model's not-ready reason) names the extra to install."""
    directory = make_classifier_artifact(tmp_path, "tiny-cnn", quantize=False)
    script = BLOCK_TORCH + textwrap.dedent(f"""
        from deepserve.manifest import load_manifest
        from deepserve.serve.backends import BackendUnavailable
        from deepserve.serve.runtime import open_runtime

        graph = load_manifest({str(directory)!r}).graphs["model"]
        try:
            open_runtime(graph, {str(directory)!r}, backend="torchscript", device="cpu")
        except BackendUnavailable as e:
            print(e)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "pip install 'deepserve[serve-torchscript]'" in done.stdout, done.stdout + done.stderr
