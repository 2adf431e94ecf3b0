"""CUDA variants: the same artifacts served on the GPU give the CPU's answers, and training with AMP on the GPU
writes a checkpoint that loads and exports on the CPU.

Marked ``cuda``: deselected by ``make test`` (pyproject's addopts ``-m "not cuda"``), run on a GPU machine by
``benchmarks/gpu_check.sh`` (``pytest -m cuda tests/test_cuda.py``). Without a GPU they fail rather than skip,
so a GPU run can never pass by doing nothing.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch

from deepserve.manifest import load_manifest
from deepserve.serve.app import create_app
from deepserve.serve.generation.engine import GenerationServable
from deepserve.serve.runtime import open_runtime
from tests.artifacts import make_charlm_artifact, make_classifier_artifact, make_seq2seq_artifact

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module", autouse=True)
def gpu() -> None:
    assert torch.cuda.is_available(), "the cuda tests need a CUDA GPU (run them through benchmarks/gpu_check.sh)"


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cuda-repo")
    make_classifier_artifact(root, "tiny-cnn", quantize=False)
    make_classifier_artifact(root, "tiny-resnet", arch="resnet", channels=3, size=16, quantize=False)
    make_charlm_artifact(root, quantize=False)
    make_seq2seq_artifact(root, quantize=False)
    return root


def images(n: int, channels: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, channels, size, size)).astype(np.float32)


@pytest.mark.parametrize("name, channels, size", [("tiny-cnn", 1, 8), ("tiny-resnet", 3, 16)])
def test_torchscript_on_cuda_matches_the_cpu_graphs(repo, name, channels, size):
    directory = repo / name / "1"
    graph = load_manifest(directory).graphs["model"]
    reference = open_runtime(graph, directory, backend="onnx", device="cpu")
    on_gpu = open_runtime(graph, directory, backend="torchscript", device="cuda")
    assert on_gpu.platform == "pytorch_libtorch"
    # growing, shrinking and repeated batch sizes: the pinned staging buffers are reused and resized
    for i, n in enumerate((1, 7, 32, 3, 32, 64)):
        x = images(n, channels, size, seed=i)
        want = reference.run({"images": x})["logits"]
        got = on_gpu.run({"images": x})["logits"]
        assert got.shape == want.shape == (n, 10)
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


def test_cuda_server_batches_concurrent_requests_with_the_cpu_answers(repo):
    x = images(48, 3, 16, seed=9)

    async def logits(device: str) -> list[np.ndarray]:
        app = create_app(repo, device=device)
        await app.state.repository.start()
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                index = {m["name"]: m for m in (await c.get("/v2/models")).json()["models"]}
                assert index["tiny-resnet"]["ready"], index["tiny-resnet"]

                async def one(i: int) -> np.ndarray:
                    body = {"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 3, 16, 16],
                                        "data": x[i].ravel().tolist()}]}
                    r = await c.post("/v2/models/tiny-resnet/infer", json=body)
                    assert r.status_code == 200, r.text
                    return np.asarray(r.json()["outputs"][0]["data"], np.float32)

                platform = (await c.get("/v2/models/tiny-resnet")).json()["platform"]
                assert platform == ("pytorch_libtorch" if device == "cuda" else "onnxruntime_onnx")
                return list(await asyncio.gather(*(one(i) for i in range(len(x)))))
        finally:
            await app.state.repository.stop()

    cpu, gpu = asyncio.run(logits("cpu")), asyncio.run(logits("cuda"))
    np.testing.assert_allclose(np.stack(gpu), np.stack(cpu), rtol=1e-3, atol=1e-4)


def settings(**kw) -> SimpleNamespace:
    base = dict(max_running_rows=128, max_waiting=256, max_prompt_length=64, max_new_tokens=64, max_beams_x_n=16,
                request_timeout_s=60.0, backend="torchscript", precision="fp32")
    return SimpleNamespace(**{**base, **kw})


@pytest.mark.parametrize("name, prompts", [
    ("tiny-charlm", ["hello there", "the cat", "a", "quick brown fox"]),
    ("tiny-seq2seq", ["12+7", "(3+4)*2", "99-5", "8*8"]),
])
def test_generation_on_cuda_gives_the_cpu_tokens(repo, name, prompts):
    directory = repo / name / "1"
    probes = [(t, p) for t in prompts for p in ({"temperature": 0, "max_new_tokens": 12},
                                                {"num_beams": 4, "num_return_sequences": 2, "max_new_tokens": 8},
                                                {"seed": 3, "temperature": 1.0, "max_new_tokens": 6})]

    async def run(device: str, backend: str) -> list:
        s = GenerationServable(load_manifest(directory), directory, settings(backend=backend), device)
        await s.start()
        await s.warmup()
        try:
            results = await asyncio.gather(*(s.generate(t, p) for t, p in probes))  # one continuous batch
        finally:
            await s.stop()
        return [[(o.token_ids, o.finish_reason) for o in r.outputs] for r in results]

    cpu = asyncio.run(run("cpu", "onnx"))
    gpu = asyncio.run(run("cuda", "torchscript"))
    assert gpu == cpu


def test_amp_training_on_cuda_writes_a_checkpoint_that_exports_on_cpu(tmp_path):
    from deepserve.export import export_checkpoint
    from deepserve.train.checkpoint import load_checkpoint
    from deepserve.train.loop import run_training
    from tests.test_train_classifier import TINY_MODELS, run_config, write_idx

    rng = np.random.default_rng(0)
    for prefix, n in (("train", 256), ("t10k", 64)):
        labels = rng.integers(0, 10, n)
        pictures = rng.integers(0, 40, (n, 8, 8)) + 20 * labels[:, None, None]
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", pictures)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels)
    config = run_config(tmp_path, TINY_MODELS["cnn"], epochs=2, max_steps=16, device="cuda", amp=True)
    result = run_training("classifier", config, out_path=tmp_path / "clf.pt", log=lambda _: None)
    assert np.isfinite(result.metrics["test_loss"])
    payload = load_checkpoint(result.checkpoint, expected_task="image-classification")
    assert all(t.device.type == "cpu" for t in payload["state_dict"].values())  # loads on a machine with no GPU
    directory = export_checkpoint(result.checkpoint, repository=tmp_path / "repo", name="amp-cnn", version=1,
                                  formats=("torchscript", "onnx"), quantize=False, log=lambda _: None)
    assert (directory / "manifest.json").is_file()


def test_device_resolution_finds_the_gpu_without_torch():
    """`--device auto` asks the CUDA driver, not torch: it must see the GPU torch sees."""
    from deepserve.serve.backends import cuda_device_count, resolve_device

    assert cuda_device_count() == torch.cuda.device_count()
    assert resolve_device("auto") == "cuda"
