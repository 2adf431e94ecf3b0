"""Smoke tests of the benchmark suite's load generator and result writer (no timing assertions)."""

from __future__ import annotations

import asyncio
import http.client
import json
import selectors
import socket
import threading
import time
from pathlib import Path

import pytest

from benchmarks import servers
from benchmarks.common import paired, paired_ratio
from benchmarks.loadgen import LoadError, LoadSpec, Request, Response, json_request, percentile, run_load
from benchmarks.reliability import Outcome, sigterm_client
from benchmarks.results import Plot, Report, Table, fmt


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: list[bytes]) -> None:
    """A minimal keep-alive HTTP/1.1 server: /ok (JSON), /fail (503), /stream (chunked server-sent events)."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length")), 0)
            body = await reader.readexactly(length)
            seen.append(body)
            path = head.split(b" ")[1]
            if path == b"/fail":
                writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 2\r\n\r\nno")
            elif path == b"/closing":  # a draining server's refusal: no body, no Content-Length, then close
                writer.write(b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\n\r\n")
                await writer.drain()
                writer.close()
                return
            elif path == b"/stream":
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/event-stream\r\n\r\n")
                for i in range(3):
                    event = f"data: {json.dumps({'text_output': str(i)})}\n\n".encode()
                    writer.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
                    await writer.drain()
                writer.write(b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n")
            else:
                answer = json.dumps({"usage": {"completion_tokens": 5}}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(answer) + answer)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


async def _load(requests: list[Request], *, stream: bool = False, max_requests: int = 40, concurrency: int = 4,
                count=None):
    seen: list[bytes] = []
    server = await asyncio.start_server(lambda r, w: _serve(r, w, seen), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        spec = LoadSpec("127.0.0.1", port, tuple(requests), concurrency, duration_s=30.0, max_requests=max_requests,
                        warmup_requests=3, stream=stream)
        return await run_load(spec, count), seen
    finally:
        server.close()
        await server.wait_closed()


def test_loadgen_stops_at_the_request_bound_and_counts_tokens() -> None:
    def tokens(response: Response) -> int:
        return json.loads(response.body)["usage"]["completion_tokens"]

    result, seen = asyncio.run(_load([json_request("/ok", {"x": 1}), json_request("/ok", {"x": 2})], count=tokens))
    assert result.ok == 40 and not result.errors
    assert len(seen) == 43  # 3 warm-up requests + the 40 measured ones, then it stopped by itself
    assert {json.loads(b)["x"] for b in seen} == {1, 2}  # round-robin over the pre-encoded requests
    assert result.tokens == 200
    summary = result.summary()
    assert summary["p50_ms"] <= summary["p90_ms"] <= summary["p99_ms"]
    assert summary["rps"] > 0 and summary["tokens_per_s"] > 0


def test_loadgen_reports_errors_by_status() -> None:
    result, _ = asyncio.run(_load([Request("POST", "/fail", b"{}"), Request("POST", "/ok", b"{}")], max_requests=10,
                                  concurrency=1))
    assert result.ok == 5
    assert result.errors == {"503": 5}
    assert result.summary()["errors"] == {"503": 5}


@pytest.mark.parametrize("path, outcome", [("/ok", Outcome.OK), ("/closing", Outcome.REFUSED_503)])
def test_the_sigterm_client_reads_answers_with_and_without_content_length(path: str, outcome: Outcome) -> None:
    async def run() -> list[tuple[float, Outcome]]:
        server = await asyncio.start_server(lambda r, w: _serve(r, w, []), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        outcomes: list[tuple[float, Outcome]] = []
        try:
            await sigterm_client(port, Request("POST", path, b"{}").encode("127.0.0.1", port),
                                 time.perf_counter() + 0.2, outcomes)
        finally:
            server.close()
            await server.wait_closed()
        return outcomes

    outcomes = asyncio.run(run())
    assert outcomes and {o for _, o in outcomes} == {outcome}


def test_loadgen_streams_record_first_token_and_time_per_token() -> None:
    result, _ = asyncio.run(_load([Request("POST", "/stream", b"{}")], stream=True, max_requests=6,
                                  count=lambda r: len(r.events)))
    assert result.ok == 6
    assert result.tokens == 18  # 3 events each; [DONE] is not a token
    assert len(result.ttft_s) == 6 and len(result.tpot_s) == 6
    assert all(t >= 0 for t in result.ttft_s + result.tpot_s)


def test_loadgen_refuses_non_loopback_targets_and_bad_values() -> None:
    with pytest.raises(LoadError, match="host must be a loopback address"):
        LoadSpec("example.com", 80, (Request("GET", "/"),), 1, 1.0, 1)
    with pytest.raises(LoadError, match="concurrency must be >= 1, got 0"):
        LoadSpec("127.0.0.1", 80, (Request("GET", "/"),), 0, 1.0, 1)
    with pytest.raises(LoadError, match="path must start with '/'"):
        Request("GET", "nope")


def test_paired_alternates_order_and_takes_the_median_ratio() -> None:
    calls: list[str] = []
    clock = iter(range(100))

    def side(name: str):
        def measure() -> float:
            calls.append(name)
            return float(next(clock) + (10 if name == "a" else 5))
        return measure

    pairs = paired(side("a"), side("b"), 3)
    assert calls == ["a", "b", "b", "a", "a", "b"]  # ABBA: drift hits both sides alike
    assert pairs == [(10.0, 6.0), (13.0, 7.0), (14.0, 10.0)]
    assert paired_ratio(pairs) == pytest.approx(10.0 / 6.0)  # ratios 1.67, 1.86, 1.4
    assert paired_ratio([(1.0, 2.0), (3.0, 2.0)]) == pytest.approx(1.0)
    assert paired_ratio([(1.0, 0.0)]) is None and paired_ratio([]) is None


def test_percentile_interpolates() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([0.0, 10.0], 90) == pytest.approx(9.0)


def test_report_writes_markdown_json_and_plots(tmp_path: Path) -> None:
    report = Report("bench smoke", settings={"plan": "quick"})
    report.target("digits CNN: server / echo", ">= 0.70", 0.81, True, "fine")
    report.target("char-LM: cb / one", ">= 10", 4.2, False, "profile: 40% step")
    section = report.section("Scenario X")
    table = Table(["backend", "req/s", "errors"], title="digits")
    table.add("onnx", 1234.5, {"503": 2})
    table.add("torchscript", None, {})
    with pytest.raises(ValueError, match="2 cells, the header 3"):
        table.add("x", 1)
    section.blocks += [table, Plot("rps", "req/s", {"onnx": ([1, 16, 64], [10.0, 50.0, None])}, "concurrency",
                                   "req/s"),
                       Plot("bars", "by protocol", {"on": (["json", "binary"], [1.0, 2.0])}, "protocol", "req/s",
                            kind="bar"),
                       Plot("empty", "nothing", {"x": ([1], [None])}, "x", "y")]
    report.data["raw"] = {"a": 1}
    path = report.write(tmp_path, "run")
    text = path.read_text()
    assert path.name == "run.md"
    assert "Hardware:" in text and "cores available" in text
    assert "| digits CNN: server / echo | 0.81 | >= 0.70 | **met** | fine |" in text
    assert "**missed**" in text
    assert "| onnx | 1234 | 503: 2 |" in text and "| torchscript | — | 0 |" in text
    assert (tmp_path / "run-rps.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "run-bars.png").is_file()
    assert not (tmp_path / "run-empty.png").exists() and "nothing" not in text  # nothing to draw: no image link
    saved = json.loads((tmp_path / "run.json").read_text())
    assert saved["data"] == {"raw": {"a": 1}} and saved["targets"][1]["met"] is False


def test_fmt() -> None:
    assert fmt(None) == "—" and fmt(True) == "yes" and fmt(1234.56) == "1235" and fmt(12.34) == "12.3"
    assert fmt(0.01234) == "0.012" and fmt("a|b") == "a\\|b"


def test_model_level_feeds_fit_every_graph_of_every_task(tmp_path: Path) -> None:
    from benchmarks.modellevel import feeds
    from deepserve.manifest import load_manifest
    from deepserve.serve.runtime import open_runtime
    from tests.artifacts import make_charlm_artifact, make_classifier_artifact, make_seq2seq_artifact

    for make in (make_classifier_artifact, make_charlm_artifact, make_seq2seq_artifact):
        directory = make(tmp_path, formats=("onnx",), quantize=False)
        manifest = load_manifest(directory)
        vocab = int(manifest.model.get("vocab_size", 16))
        for name, spec in manifest.graphs.items():
            runtime = open_runtime(spec, directory, backend="onnx", device="cpu", threads=1)
            for batch in (1, 3):
                outputs = runtime.run(feeds(spec, batch, vocab))
                first = outputs[spec.outputs[0].name]  # logits / memory: rows on axis 0
                assert len(first) == batch, (directory.parent.name, name, batch)


def test_ceiling_scenario_measures_every_side_and_leaves_the_step_model_empty(tmp_path: Path) -> None:
    import asyncio

    from benchmarks.ceiling import measure, step_ceiling
    from deepserve.manifest import load_manifest
    from deepserve.serve.generation.step_models import open_step_model
    from tests.artifacts import make_charlm_artifact

    directory = make_charlm_artifact(tmp_path, formats=("onnx",), quantize=False)
    runs = asyncio.run(measure(directory, 3, 0.2, 1))
    assert set(runs) == {"ceiling", "ceiling + prefill", "prefill", "step only"}
    assert all(len(v) == 1 and v[0] > 0 for v in runs.values())
    model = open_step_model(load_manifest(directory), directory, backend="onnx", device="cpu", threads=1)
    assert step_ceiling(model, 0.05, [[3, 4, 5]], 2) > 0 and model.rows == 0


def test_a_bench_server_runs_from_the_checkout_it_is_given(tmp_path: Path) -> None:
    """What commit_ab does for each commit: the server runs in ``root`` (and `python -m` imports from there)."""
    (tmp_path / "benchmarks").symlink_to(servers.ROOT / "benchmarks")
    with servers.ServerProcess("echo", root=tmp_path) as server:
        assert Path(f"/proc/{server.pid}/cwd").resolve() == tmp_path.resolve()
        assert server.get("/v2/health/ready")[0] == 200



class _HandshakeCountingServer(threading.Thread):
    """A keep-alive HTTP/1.1 server on real sockets answering every request ``{}``. When the first request's bytes
    arrive it counts the connections whose TCP handshake had completed by then: those it had accepted and those
    still in its accept queue (a handshake completes in the kernel, before the server accepts)."""

    ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.handshakes_at_first_request: int | None = None
        self.accepted = 0
        self._stop_reader, self._stop_writer = socket.socketpair()
        self._selector = selectors.DefaultSelector()
        self._pending: dict[socket.socket, bytes] = {}

    def __enter__(self) -> _HandshakeCountingServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop_writer.send(b"x")
        self.join(10)
        for sock in [*self._pending, self.listener, self._stop_reader, self._stop_writer]:
            sock.close()
        self._selector.close()

    def run(self) -> None:
        self._selector.register(self.listener, selectors.EVENT_READ)
        self._selector.register(self._stop_reader, selectors.EVENT_READ)
        while True:
            for key, _ in self._selector.select():
                if key.fileobj is self._stop_reader:
                    return
                if key.fileobj is self.listener:
                    self._accept_queued()
                else:
                    self._read(key.fileobj)

    def _accept_queued(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except BlockingIOError:
                return
            self.accepted += 1
            self._pending[conn] = b""
            self._selector.register(conn, selectors.EVENT_READ)

    def _read(self, conn: socket.socket) -> None:
        data = conn.recv(1 << 16)
        if not data:
            self._selector.unregister(conn)
            conn.close()
            del self._pending[conn]
            return
        if self.handshakes_at_first_request is None:
            self._accept_queued()
            self.handshakes_at_first_request = self.accepted
        buffer = self._pending[conn] + data
        while b"\r\n\r\n" in buffer:
            head, rest = buffer.split(b"\r\n\r\n", 1)
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length")), 0)
            if len(rest) < length:
                break
            buffer = rest[length:]
            conn.sendall(self.ANSWER)
        self._pending[conn] = buffer


def test_loadgen_opens_every_connection_before_its_first_request() -> None:
    """Every connect returns (the client's handshake done) before any request is sent, even connections whose
    request budget runs out first; their times are kept apart. The server's accept is not: it may come later."""
    with _HandshakeCountingServer() as server:
        spec = LoadSpec("127.0.0.1", server.port, (json_request("/ok", {}),), 8, duration_s=30.0, max_requests=4)
        result = asyncio.run(run_load(spec))
    assert server.handshakes_at_first_request == 8
    assert result.ok == 4 and server.accepted == 8
    assert len(result.connect_s) == 8 and all(s > 0 for s in result.connect_s)


def test_the_bare_asgi_app_reads_the_body_and_answers_the_echo_body() -> None:
    from benchmarks.echo import ANSWER
    from benchmarks.tail import BareAsgiServer

    body = b"x" * 200_000  # several receive() messages: the app must read them all
    with BareAsgiServer() as server:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        try:
            for _ in range(2):  # the same keep-alive connection: the first body was consumed to its end
                connection.request("POST", "/v2/models/any/infer", body, {"Content-Type": "application/json"})
                answer = connection.getresponse()
                assert (answer.status, answer.read()) == (200, ANSWER)
                assert answer.getheader("x-body-bytes") == str(len(body))
        finally:
            connection.close()
