"""The raw hot path (v2 infer and predictions answered by ``HotPath`` with two ASGI messages of its own) on a real
socket: bodies that arrive in pieces or chunked, a client that leaves mid-body, methods the route does not take,
the body limit from Content-Length and from a chunked body, and the request id, metrics and errors it must keep."""

from __future__ import annotations

import json
import socket
import time

import httpx
import numpy as np
import pytest

from tests.artifacts import make_classifier_artifact
from tests.live_server import running_server, scrape
from tests.servers import read_all

INFER = "/v2/models/tiny-cnn/infer"
MAX_BODY_BYTES = 8192


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("hot-repo")
    make_classifier_artifact(root, "tiny-cnn", quantize=False)
    with running_server(root, tmp_path_factory.mktemp("hot-log"), "--max-body-mb",
                        str(MAX_BODY_BYTES / 1024 / 1024)) as s:
        yield s


def infer_body(seed: int = 0) -> bytes:
    x = np.random.default_rng(seed).standard_normal((1, 1, 8, 8)).astype(np.float32)
    return json.dumps({"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 1, 8, 8],
                                   "data": x.ravel().tolist()}]}).encode()


def exchange(port: int, head: bytes, pieces: list[bytes]) -> tuple[int, dict[str, str], bytes]:
    """Send ``head`` then each piece as its own write (a pause between them, so that the server reads them
    apart), on a connection closed after the answer; the answer's status, headers and body."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head)
        for piece in pieces:
            time.sleep(0.05)
            sock.sendall(piece)
        raw = read_all(sock)
    head_part, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head_part.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


def request_head(length: int | None, extra: str = "") -> bytes:
    size = f"Content-Length: {length}\r\n" if length is not None else "Transfer-Encoding: chunked\r\n"
    return (f"POST {INFER} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"{size}{extra}\r\n").encode()


def chunked(data: bytes, size: int) -> list[bytes]:
    parts = [data[i : i + size] for i in range(0, len(data), size)]
    return [b"%x\r\n%s\r\n" % (len(p), p) for p in parts] + [b"0\r\n\r\n"]


def logits(body: bytes) -> list[float]:
    return json.loads(body)["outputs"][0]["data"]


def test_a_body_in_pieces_or_chunked_is_answered_as_one_sent_at_once(server):
    body = infer_body(1)
    whole = httpx.post(server["base"] + INFER, content=body, headers={"Content-Type": "application/json"})
    assert whole.status_code == 200
    thirds = [body[: len(body) // 3], body[len(body) // 3 : 2 * len(body) // 3], body[2 * len(body) // 3 :]]
    status, _, answer = exchange(server["port"], request_head(len(body)), thirds)
    assert status == 200 and logits(answer) == whole.json()["outputs"][0]["data"]
    status, headers, answer = exchange(server["port"], request_head(None), chunked(body, 200))
    assert status == 200, answer
    if headers.get("transfer-encoding") == "chunked":  # the answer has a length, but read it either way
        answer = b"".join(answer.split(b"\r\n")[1::2])
    assert logits(answer) == whole.json()["outputs"][0]["data"]


def test_a_client_leaving_mid_body_is_counted_and_the_server_serves_on(server):
    base = server["base"]
    before = scrape(base, 'deepserve_requests_total{endpoint="infer",model="tiny-cnn",status="499"}')
    body = infer_body(2)
    with socket.create_connection(("127.0.0.1", server["port"]), timeout=30) as sock:
        sock.sendall(request_head(len(body)) + body[: len(body) // 2])
        time.sleep(0.2)  # the server has read the first half and waits for the rest: leave now
    deadline = time.monotonic() + 30
    while scrape(base, 'deepserve_requests_total{endpoint="infer",model="tiny-cnn",status="499"}') <= before:
        assert time.monotonic() < deadline, "the request of a client that left was never counted"
        time.sleep(0.05)
    assert httpx.post(base + INFER, content=infer_body(3), headers={"Content-Type": "application/json"}
                      ).status_code == 200
    assert "Traceback" not in server["stderr"].read_text()  # a client leaving is not a server error


@pytest.mark.parametrize("method", ["GET", "HEAD", "DELETE"])
def test_methods_the_infer_route_does_not_take_answer_405_naming_post(server, method):
    r = httpx.request(method, server["base"] + INFER)
    assert r.status_code == 405 and "POST" in r.headers["allow"]
    if method != "HEAD":  # a HEAD answer has no body
        assert "POST" in r.json()["error"]


def test_a_body_over_the_limit_is_refused_with_413_by_length_and_when_chunked(server):
    base = server["base"]
    refused = scrape(base, 'deepserve_rejected_requests_total{reason="body_too_large"}')
    # by its declared length: answered before the body is sent
    status, _, answer = exchange(server["port"], request_head(MAX_BODY_BYTES + 1), [])
    assert status == 413 and "exceeds the limit" in json.loads(answer)["error"]
    big = json.dumps({"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 1, 8, 8],
                                  "data": [0.123456789] * 1000}]}).encode()
    assert len(big) > MAX_BODY_BYTES
    # in one write: the server reads it all before it answers, so it closes without unread data (no reset)
    status, _, answer = exchange(server["port"], request_head(None) + b"".join(chunked(big, 1000)), [])
    assert status == 413 and "exceeds the limit" in json.loads(answer)["error"]
    assert scrape(base, 'deepserve_rejected_requests_total{reason="body_too_large"}') == refused + 2


def test_hot_answers_carry_the_request_id_length_and_type_and_are_counted(server):
    base = server["base"]
    ok_before = scrape(base, 'deepserve_requests_total{endpoint="infer",model="tiny-cnn",status="200"}')
    r = httpx.post(base + INFER, content=infer_body(4), headers={"Content-Type": "application/json",
                                                                  "X-Request-Id": "hot-path-1"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "hot-path-1"
    assert r.headers["content-type"] == "application/json" and int(r.headers["content-length"]) == len(r.content)
    bad = httpx.post(base + INFER, content=b'{"inputs": [{"name": "images"}]}',
                     headers={"Content-Type": "application/json", "X-Request-Id": "hot-path-2"})
    assert bad.status_code == 400 and bad.headers["x-request-id"] == "hot-path-2" and "datatype" in bad.json()["error"]
    binary = httpx.post(base + INFER, content=b"\0" * 4, headers={"Content-Type": "application/octet-stream",
                                                                  "Inference-Header-Content-Length": "x"})
    assert binary.status_code == 400 and "Inference-Header-Content-Length" in binary.json()["error"]
    assert scrape(base, 'deepserve_requests_total{endpoint="infer",model="tiny-cnn",status="200"}') == ok_before + 1
    assert scrape(base, 'deepserve_request_latency_seconds_count{endpoint="infer",model="tiny-cnn"}') >= ok_before + 1


def test_predictions_over_the_hot_path_take_post_and_put(server):
    from io import BytesIO

    from PIL import Image

    png = BytesIO()
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(png, format="PNG")
    for method in ("POST", "PUT"):
        r = httpx.request(method, server["base"] + "/predictions/tiny-cnn?top_k=3", content=png.getvalue(),
                          headers={"Content-Type": "image/png"})
        assert r.status_code == 200 and len(r.json()) == 3 and r.headers["server-timing"].startswith("classify;dur=")
    wrong = httpx.post(server["base"] + "/predictions/tiny-cnn?top_k=0", content=png.getvalue())
    assert wrong.status_code == 400 and "top_k" in wrong.json()["error"]
