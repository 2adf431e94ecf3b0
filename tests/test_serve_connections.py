"""Connections on a real socket: slow-header clients, the keep-alive timeout, JSON logs with request ids, and
draining on SIGTERM (new requests on open connections get 503 + Connection: close; exit status 0)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from deepserve.clients import Client
from tests.artifacts import make_classifier_artifact, tampered_copy
from tests.servers import free_port, read_all, wait_ready

ROOT = Path(__file__).resolve().parents[1]
KEEP_ALIVE_S = 2.0


@pytest.fixture(scope="module", params=["httptools", "h11"])
def server(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("conn-repo")
    good = make_classifier_artifact(root, "tiny-cnn", quantize=False)
    tampered_copy(good, root)
    port = free_port()
    log = tmp_path_factory.mktemp("conn-log") / "stderr.txt"
    cmd = [sys.executable, "-m", "deepserve.cli", "serve", "--repository", str(root), "--port", str(port),
           "--device", "cpu", "--header-timeout-s", "1", "--keep-alive-s", str(KEEP_ALIVE_S), "--log-format", "json",
           "--http", request.param]
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, base, log)
        yield {"base": base, "port": port, "proc": proc, "stderr": log}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("sent", [b"", b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n"])
def test_a_client_too_slow_with_its_headers_gets_408_and_is_closed(server, sent):
    with socket.create_connection(("127.0.0.1", server["port"]), timeout=30) as sock:
        sock.sendall(sent)  # then nothing more: headers never complete
        answer = read_all(sock)  # returns once the server closes (uvicorn alone never did)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"--header-timeout-s" in answer and b'"error"' in answer


def test_the_sdk_reuses_connections_across_the_keep_alive_timeout(server):
    with Client(server["base"], max_retries=0) as client:  # no retry may hide a stale connection
        assert client.models()
        time.sleep(KEEP_ALIVE_S + 0.5)  # the server closes the idle connection meanwhile
        assert client.models()


def test_keep_alive_default_outlasts_load_balancers():
    from deepserve.cli import build_parser
    from deepserve.serve.cli import uvicorn_config

    args = build_parser().parse_args(["serve", "--repository", "."])
    config = uvicorn_config(None, args, {"loop": "asyncio", "http": "h11"})
    assert config.timeout_keep_alive > 60  # a balancer's idle timeout is typically 60 s


def test_json_log_lines_carry_the_request_id(server):
    r = httpx.post(f"{server['base']}/v2/models/tampered/infer", json={"inputs": []},
                   headers={"x-request-id": "trace-7"})
    assert r.status_code == 503 and r.headers["x-request-id"] == "trace-7"
    records = [json.loads(line) for line in server["stderr"].read_text().splitlines() if line.startswith("{")]
    assert records and all({"time", "level", "logger", "message", "request_id"} <= set(r) for r in records)
    mine = [r for r in records if r["request_id"] == "trace-7"]
    assert mine and "sha256 mismatch" in mine[0]["message"]  # the full reason is in the log, tied to the id


@pytest.mark.parametrize("http", ["httptools", "h11"])
def test_connections_waiting_to_be_accepted_at_shutdown_are_answered_503_not_reset(tmp_path, http):
    """Clients whose connections the kernel completed, but the server had not accepted yet when it shut down,
    get 503 + Connection: close: closing a listener with a full accept queue resets them all."""
    import asyncio
    import threading

    import uvicorn

    from deepserve.serve.app import create_app
    from deepserve.serve.shutdown import DrainingServer, draining_protocol

    app = create_app(tmp_path, device="cpu")
    port = free_port()
    server = DrainingServer(uvicorn.Config(app, host="127.0.0.1", port=port, loop="asyncio", log_level="warning",
                                           http=draining_protocol(http)), app)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert wait_until_started(server)
    loop = server.servers[0].get_loop()

    async def shut_down_with_a_full_accept_queue() -> list[socket.socket]:
        # no await until the shutdown: the loop cannot accept these, they wait in the kernel's queue
        clients = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(8)]
        for c in clients:
            c.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        server.handle_exit(signal.SIGTERM, None)
        await server._answer_accept_queue()  # what uvicorn's shutdown now begins with
        return clients

    clients = asyncio.run_coroutine_threadsafe(shut_down_with_a_full_accept_queue(), loop).result(30)
    answers = [read_all(c) for c in clients]  # a reset raises ConnectionResetError here
    thread.join(30)
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 503") and b"connection: close" in answer.lower(), answer[:200]
    with pytest.raises(ConnectionRefusedError):  # and the listener is closed
        socket.create_connection(("127.0.0.1", port), timeout=5)


def test_a_connection_whose_answer_was_under_way_at_sigterm_answers_its_next_request_503(tmp_path):
    """A stream already answering when SIGTERM arrives cannot say Connection: close any more; after it ends, the
    client's next request on that connection gets 503 + Connection: close, not a closed socket."""
    from tests.artifacts import make_charlm_artifact
    from tests.live_server import running_server

    make_charlm_artifact(tmp_path / "repo")
    body = json.dumps({"text_input": "a", "parameters": {"max_new_tokens": 3000, "min_new_tokens": 3000,
                                                          "seed": 1}}).encode()
    with running_server(tmp_path / "repo", tmp_path, env={"DEEPSERVE_MAX_NEW_TOKENS": "3000"}) as live, \
            socket.create_connection(("127.0.0.1", live["port"]), timeout=30) as sock:
        sock.sendall(b"POST /v2/models/tiny-charlm/generate_stream HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        stream = sock.recv(65536)
        assert stream.startswith(b"HTTP/1.1 200") and b"connection: close" not in stream.lower()  # under way
        live["proc"].send_signal(signal.SIGTERM)
        while not stream.endswith(b"\r\n0\r\n\r\n"):  # the stream runs to its end
            chunk = sock.recv(65536)
            assert chunk, "closed before the stream ended"
            stream += chunk
        assert b"[DONE]" in stream or b'"finish_reason": "length"' in stream
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")  # was a reset or an empty read
        answer = read_all(sock)
        assert answer.startswith(b"HTTP/1.1 503") and b"connection: close" in answer.lower(), answer[:300]
        assert live["proc"].wait(timeout=60) == 0


def wait_until_started(server, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)  # test only: uvicorn's startup runs in another thread
    return server.started


def test_sigterm_answers_new_requests_503_while_in_flight_work_drains_then_exits_0(server):
    """Runs last in this module: it stops the server."""
    body = json.dumps({"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 1, 8, 8],
                                   "data": [0.5] * 64}]}).encode()
    busy = socket.create_connection(("127.0.0.1", server["port"]), timeout=30)
    busy.sendall(b"POST /v2/models/tiny-cnn/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
    assert busy.recv(1024).startswith(b"HTTP/1.1 100")  # the app is reading the body: a request in flight
    busy.sendall(body[:10])
    idle = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=30)
    idle.request("GET", "/v2/health/live")
    assert idle.getresponse().read() and idle.sock is not None  # kept alive
    server["proc"].send_signal(signal.SIGTERM)
    for _ in range(10_000):  # until the server has seen the signal; each round trip is a real request
        idle.request("GET", "/v2/health/live")  # on the connection opened before: was a reset
        response = idle.getresponse()
        payload = json.loads(response.read())
        if response.status != 200:
            break
    assert response.status == 503 and response.getheader("connection") == "close", payload
    assert "shutting down" in payload["error"] and response.getheader("retry-after")
    busy.sendall(body[10:])  # the request in flight completes and is answered
    answer = read_all(busy)  # returns once the server has closed this connection too
    busy.close()
    assert answer.startswith(b"HTTP/1.1 200") and b'"outputs"' in answer, answer[:300]
    assert server["proc"].wait(timeout=60) == 0  # a clean drain exits 0 (it was killed by the signal)
    assert "graceful shutdown exceeded" not in server["stderr"].read_text()


@pytest.mark.parametrize("flags, named", [(["--max-json-depth", "0"], "--max-json-depth"),
                                          (["--keep-alive-s", "0"], "--keep-alive-s"),
                                          (["--header-timeout-s", "inf"], "--header-timeout-s")])
def test_bad_server_flags_are_refused_naming_the_flag(flags, named):
    from deepserve.cli import build_parser
    from deepserve.serve.cli import ServerOptionError, check_server_flags

    args = build_parser().parse_args(["serve", "--repository", ".", *flags])
    with pytest.raises(ServerOptionError, match=named):
        check_server_flags(args)
