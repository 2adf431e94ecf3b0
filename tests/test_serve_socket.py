"""Real-socket tests: `deepserve serve` in a subprocess on a free loopback port (started once per module,
waited on through /v2/health/ready with bounded retries), driven by httpx and the official tritonclient."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.artifacts import make_charlm_artifact, make_classifier_artifact, make_seq2seq_artifact
from tests.live_server import running_server
from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("socket-repo")
    good = make_classifier_artifact(root, "tiny-cnn", quantize=False)
    make_charlm_artifact(root, "tiny-charlm")  # generators too, so the no-training-imports checks cover them
    make_seq2seq_artifact(root, "tiny-seq2seq")
    shutil.copytree(good, root / "tampered" / "1")
    with open(root / "tampered/1/model.pt", "ab") as f:
        f.write(b"\0")
    return root


@pytest.fixture(scope="module")
def server(repository, tmp_path_factory):
    with running_server(repository, tmp_path_factory.mktemp("server-log"), "--max-queue-delay-ms", "10",
                        "--log-level", "info", python_args=("-X", "importtime")) as s:
        yield s


def images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 1, 8, 8)).astype(np.float32)


def body(x: np.ndarray) -> dict:
    return {"inputs": [{"name": "images", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}


def as_logits(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    out = response.json()["outputs"][0]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


def test_startup_prints_examples_and_serves_despite_a_tampered_artifact(server):
    from deepserve.serve.cli import server_implementations

    stdout = server["stdout"].read_text()
    assert "curl -T digit.png" in stdout and "predictions/tiny-cnn" in stdout
    chosen = server_implementations()  # auto: uvloop and httptools where uvicorn[standard] is installed
    assert f"{chosen['loop']} loop, {chosen['http']} parser" in stdout
    index = {m["name"]: m for m in httpx.get(f"{server['base']}/v2/models").json()["models"]}
    assert index["tiny-cnn"]["ready"] and not index["tampered"]["ready"]
    assert "sha256 mismatch" in index["tampered"]["reason"]
    assert "tampered" in server["stderr"].read_text()  # the reason is logged too


def test_64_concurrent_requests_batched_equal_unbatched(server):
    x = images(64, seed=3)
    url = f"{server['base']}/v2/models/tiny-cnn/infer"
    with httpx.Client() as c:
        singles = [as_logits(c.post(url, json=body(x[i : i + 1]))) for i in range(len(x))]

    async def concurrent() -> list[np.ndarray]:
        async with httpx.AsyncClient(timeout=30) as c:
            return [as_logits(r) for r in await asyncio.gather(*(c.post(url, json=body(x[i : i + 1]))
                                                                  for i in range(len(x))))]

    for single, batched in zip(singles, asyncio.run(concurrent())):
        np.testing.assert_allclose(batched, single, rtol=1e-5, atol=1e-6)
    metrics = httpx.get(f"{server['base']}/metrics").text
    assert 'deepserve_requests_total{endpoint="infer",model="tiny-cnn",status="200"} 128.0' in metrics


def test_tritonclient_round_trip(server):
    import tritonclient.http as triton

    client = triton.InferenceServerClient(url=f"127.0.0.1:{server['port']}")
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tiny-cnn") and not client.is_model_ready("tampered")
    meta = client.get_model_metadata("tiny-cnn")
    assert meta["inputs"][0] == {"name": "images", "datatype": "FP32", "shape": [-1, 1, 8, 8]}
    x = images(5, seed=4)
    expected = as_logits(httpx.post(f"{server['base']}/v2/models/tiny-cnn/infer", json=body(x)))
    for binary in (False, True):
        inp = triton.InferInput("images", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        out = triton.InferRequestedOutput("logits", binary_data=binary)
        result = client.infer("tiny-cnn", [inp], outputs=[out], model_version="1")
        np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-5, atol=1e-6)
    result = client.infer("tiny-cnn", [inp])  # no outputs named: all come back binary
    np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(triton.InferenceServerException, match="unknown model"):
        client.infer("nope", [inp])
    client.close()


def test_serving_never_imports_training_code(repository):
    script = textwrap.dedent(f"""
        import asyncio, sys
        import httpx, numpy as np
        from deepserve.serve.app import create_app

        async def main():
            app = create_app({str(repository)!r}, device="cpu")
            await app.state.repository.start()
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                x = np.zeros((1, 1, 8, 8), np.float32)
                r = await c.post("/v2/models/tiny-cnn/infer", json={{"inputs": [{{"name": "images",
                    "datatype": "FP32", "shape": [1, 1, 8, 8], "data": x.ravel().tolist()}}]}})
                assert r.status_code == 200, r.text
                for model in ("tiny-charlm", "tiny-seq2seq"):
                    r = await c.post(f"/v2/models/{{model}}/generate",
                                     json={{"text_input": "12", "parameters": {{"max_new_tokens": 3, "num_beams": 2}}}})
                    assert r.status_code == 200, r.text
            await app.state.repository.stop()

        asyncio.run(main())
        loaded = sorted(m for m in sys.modules if m.startswith("deepserve.train"))
        assert not loaded, loaded
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


@pytest.mark.parametrize("loop, http", [("asyncio", "h11"), ("uvloop", "httptools")])
def test_both_server_stacks_serve_json_binary_chunked_gzip_and_images(repository, loop, http):
    """The pure-Python stack (uvicorn without extras) and uvicorn[standard]'s, configured as `deepserve serve`
    configures them."""
    import gzip
    import io
    import threading
    from types import SimpleNamespace

    import uvicorn
    from PIL import Image

    from deepserve.serve.app import create_app
    from deepserve.serve.cli import uvicorn_config

    args = SimpleNamespace(host="127.0.0.1", port=free_port(), log_level="warning", graceful_timeout_s=5.0)
    server = uvicorn.Server(uvicorn_config(create_app(repository, device="cpu"), args, {"loop": loop, "http": http}))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(600):  # bounded: startup loads the models
            if server.started or not thread.is_alive():
                break
            time.sleep(0.05)
        assert server.started, "server did not start"
        base = f"http://127.0.0.1:{args.port}"
        x = images(3, seed=6)
        url = f"{base}/v2/models/tiny-cnn/infer"
        with httpx.Client(timeout=30) as c:
            expected = as_logits(c.post(url, json=body(x)))
            head = json.dumps({"inputs": [{"name": "images", "datatype": "FP32", "shape": list(x.shape),
                                           "parameters": {"binary_data_size": x.nbytes}}],
                               "parameters": {"binary_data_output": True}}).encode()
            r = c.post(url, content=head + x.tobytes(), headers={"Inference-Header-Content-Length": str(len(head)),
                                                                 "Content-Type": "application/octet-stream"})
            n = int(r.headers["Inference-Header-Content-Length"])
            np.testing.assert_allclose(np.frombuffer(r.content[n:], np.float32).reshape(3, 10), expected, rtol=1e-5)
            raw = json.dumps(body(x)).encode()
            chunked = c.post(url, content=iter([raw[:100], raw[100:]]), headers={"Content-Type": "application/json"})
            assert "content-length" not in chunked.request.headers  # sent as Transfer-Encoding: chunked
            np.testing.assert_allclose(as_logits(chunked), expected, rtol=1e-5)
            zipped = c.post(url, content=gzip.compress(raw), headers={"Content-Encoding": "gzip",
                                                                      "Content-Type": "application/json"})
            np.testing.assert_allclose(as_logits(zipped), expected, rtol=1e-5)
            buf = io.BytesIO()
            Image.new("L", (8, 8), 200).save(buf, "PNG")
            top = c.post(f"{base}/predictions/tiny-cnn?top_k=3", content=buf.getvalue()).json()
            assert [set(p) for p in top] == [{"label", "probability"}] * 3
            assert c.get(f"{base}/v2/models/nope").status_code == 404
    finally:
        server.should_exit = True
        thread.join(30)


def test_sigterm_finishes_in_flight_requests_then_exits(server):
    """Runs last in this module: it stops the shared server."""
    url = f"{server['base']}/v2/models/tiny-cnn/infer"
    x = images(16, seed=5)

    async def load_then_terminate() -> list:
        async with httpx.AsyncClient(timeout=30) as c:
            tasks = [asyncio.ensure_future(c.post(url, json=body(x[i : i + 1]))) for i in range(len(x))]
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            server["proc"].send_signal(signal.SIGTERM)
            return await asyncio.gather(*tasks, return_exceptions=True)

    outcomes = asyncio.run(load_then_terminate())
    answered = 0
    for i, outcome in enumerate(outcomes):
        if isinstance(outcome, httpx.ConnectError):
            continue  # sent after the listener closed: never accepted, which is allowed
        assert not isinstance(outcome, BaseException), repr(outcome)
        assert outcome.status_code == 200, outcome.text  # accepted work is finished, not dropped
        answered += 1
    assert answered >= 1
    server["proc"].wait(timeout=60)
    assert server["proc"].returncode in (0, -signal.SIGTERM)
    stderr = server["stderr"].read_text()
    assert "Waiting for application shutdown" in stderr and "Application shutdown complete" in stderr
    # `deepserve serve` (the real command, start to exit) never imported any deepserve.train module.
    imported = [line.rsplit("|", 1)[-1].strip() for line in stderr.splitlines() if line.startswith("import time:")]
    assert "deepserve.serve.app" in imported
    assert not [m for m in imported if m.startswith("deepserve.train")], "serve imported training code"
