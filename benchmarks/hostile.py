"""Hostile and malformed requests for the reliability sweep (``benchmarks/reliability.py``, and
``tests/test_serve_hostile.py`` in process): each must be answered with a 4xx and a JSON error body, and the
server must stay ready."""

from __future__ import annotations

import base64
import gzip
import io
import json
from typing import Any, Iterator

JSON = {"content-type": "application/json"}
HostileRequest = tuple[str, str, str, dict[str, Any]]
"""(name, method, path, httpx request keyword arguments)."""


def _tensor(data: Any, shape: list[int], datatype: str = "FP32", name: str = "images") -> dict[str, Any]:
    return {"inputs": [{"name": name, "datatype": datatype, "shape": shape, "data": data}]}


def _png(size: int = 32, truncate: int | None = None) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size)).save(buf, "PNG")
    return buf.getvalue()[:truncate]


def _bodies(classifier: str, generator: str) -> Iterator[tuple[str, str, bytes]]:
    """(name, path, raw JSON body) for the JSON routes."""
    infer, generate = f"/v2/models/{classifier}/infer", f"/v2/models/{generator}/generate"
    ok_image = [0.5] * (3 * 32 * 32)
    for depth in (100, 5000, 100_000):
        for path, wrap in ((infer, '{"inputs": %s}'), (generate, '{"text_input": %s}'),
                           ("/v1/completions", '{"model": "%s", "prompt": %%s}' % generator)):
            yield f"nested {depth} {path}", path, (wrap % ("[" * depth + "]" * depth)).encode()
    for literal in ("NaN", "Infinity", "-Infinity", "1e999"):
        data = json.dumps(_tensor(ok_image, [1, 3, 32, 32])).replace("0.5", literal, 1)
        yield f"non-finite {literal}", infer, data.encode()
    for name, body in (
        ("empty object", {}), ("inputs not a list", {"inputs": 5}), ("no inputs", {"inputs": []}),
        ("wrong dtype", _tensor(ok_image, [1, 3, 32, 32], "INT8")), ("unknown dtype", _tensor([1], [1], "FP8")),
        ("shape mismatch", _tensor(ok_image, [2, 3, 32, 32])), ("negative shape", _tensor([1], [-1])),
        ("huge shape", _tensor([1], [2**40, 3, 32, 32])), ("wrong input name", _tensor(ok_image, [1, 3, 32, 32], name="x")),
        ("bad base64", _tensor(["%%%"], [1], "BYTES")), ("not an image", _tensor([base64.b64encode(b"hi").decode()], [1], "BYTES")),
        ("non-string id", {**_tensor(ok_image, [1, 3, 32, 32]), "id": {"a": 1}}),
        ("timeout not an integer", {**_tensor(ok_image, [1, 3, 32, 32]), "parameters": {"timeout": 1.5}}),
        ("unknown output", _tensor([0.5] * (3 * 32 * 32) * 2, [2, 3, 32, 32]) | {"outputs": [{"name": "nope"}]}),
    ):
        yield name, infer, json.dumps(body).encode()
    for name, body in (
        ("generate empty", {}), ("generate text not a string", {"text_input": 5}),
        ("generate unknown field", {"text_input": "a", "wat": 1}),
        ("generate negative tokens", {"text_input": "a", "parameters": {"max_new_tokens": -1}}),
        ("generate huge tokens", {"text_input": "a", "parameters": {"max_new_tokens": 10**9}}),
        ("generate huge beams", {"text_input": "a", "parameters": {"num_beams": 10**6}}),
        ("generate bad temperature", {"text_input": "a", "parameters": {"temperature": -1}}),
        ("generate long prompt", {"text_input": "a" * 100_000}),
        ("completions no model", {"prompt": "a"}), ("completions unknown model", {"model": "nope", "prompt": "a"}),
        ("completions echo", {"model": generator, "prompt": "a", "echo": True}),
        ("completions bad n", {"model": generator, "prompt": "a", "n": 0}),
    ):
        yield name, "/v1/completions" if name.startswith("completions") else generate, json.dumps(body).encode()
    yield "not JSON", infer, b"{not json"
    yield "invalid UTF-8", infer, b'{"inputs": "\xff\xfe"}'


def hostile_requests(classifier: str = "resnet18", generator: str = "charlm") -> Iterator[HostileRequest]:
    """About seventy requests a careless or hostile client might send, to a 3x32x32 ``classifier`` and a
    ``generator`` model."""
    infer = f"/v2/models/{classifier}/infer"
    for name, path, body in _bodies(classifier, generator):
        yield name, "POST", path, {"content": body, "headers": JSON}
    body = json.dumps(_tensor([0.5] * (3 * 32 * 32), [1, 3, 32, 32])).encode()
    for header, value in (("x-request-timeout-ms", "nan"), ("x-request-timeout-ms", "inf"),
                          ("x-request-timeout-ms", "-1"), ("x-request-timeout-ms", "1e300"),
                          ("x-request-id", "bad id"), ("x-request-id", "x" * 500),
                          ("content-encoding", "br"), ("content-encoding", "gzip"),
                          ("inference-header-content-length", "99999"), ("inference-header-content-length", "x"),
                          ("content-type", "text/plain"), ("content-type", "multipart/form-data")):
        yield f"header {header}: {value[:20]}", "POST", infer, {"content": body, "headers": {**JSON, header: value}}
    yield "gzip bomb", "POST", infer, {"content": gzip.compress(b"[" * 80_000_000),
                                       "headers": {**JSON, "content-encoding": "gzip"}}
    for name, content in (("truncated PNG", _png(truncate=60)), ("empty image", b""), ("text as image", b"hello"),
                          ("huge PNG", _png(size=8000))):
        yield name, "POST", f"/predictions/{classifier}", {"content": content, "headers": {"content-type": "image/png"}}
    yield "top_k zero", "POST", f"/predictions/{classifier}?top_k=0", {"content": _png()}
    for method, path in (("GET", "/v2/models/nope"), ("GET", "/v2/models/nope/ready"),
                         ("POST", "/v2/models/nope/infer"), ("GET", f"/v2/models/{classifier}/versions/99"),
                         ("GET", "/v2/models/..%2F..%2Fetc/ready"), ("OPTIONS", infer), ("DELETE", f"/v2/models/{classifier}"),
                         ("GET", infer), ("POST", f"/v2/models/{generator}/infer"),
                         ("POST", f"/v2/models/{classifier}/generate")):
        yield f"{method} {path}", method, path, {"content": body if method == "POST" else None, "headers": JSON}
