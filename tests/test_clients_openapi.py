"""The client's request and response types against the OpenAPI schema of the real app (GET /openapi.json on
loopback). The request bodies compared are built by the client's own code; the response fields are the
result dataclasses' wire names. Only what the server declares can be compared: undeclared bodies are
listed in ``KNOWN_UNDECLARED``, so a new gap shows up as a failure."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.test_clients_live import LoopbackServer, image


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real app over an empty repository: its schema does not depend on the models."""
    from deepserve.serve.app import create_app

    repo: Path = tmp_path_factory.mktemp("empty-repo")
    with LoopbackServer(create_app(repo, device="cpu")) as live:
        yield live.url


JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}
KNOWN_UNDECLARED: set[str] = set()
"""What the client sends that the server parses by hand but does not declare (reported to the server side)."""


def _resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def _type_ok(declared: Any, actual: str) -> bool:
    declared = declared if isinstance(declared, list) else [declared]
    return actual in declared or (actual == "integer" and "number" in declared)


def compare_value(
    spec: dict[str, Any], schema: dict[str, Any], value: Any, where: str, problems: list[str], undeclared: set[str]
) -> None:
    """Check a JSON value the client sends against a declared schema: types of declared fields, required
    fields present; fields the schema does not declare go to ``undeclared``."""
    schema = _resolve(spec, schema)
    options = schema.get("anyOf") or schema.get("oneOf")
    if options:
        schema = next(
            (
                o
                for o in map(lambda s: _resolve(spec, s), options)
                if "type" not in o or _type_ok(o["type"], JSON_TYPES.get(type(value), "null"))
            ),
            options[0],
        )
    actual = JSON_TYPES.get(type(value), "null")
    if "type" in schema and not _type_ok(schema["type"], actual):
        problems.append(f"{where}: client sends {actual}, server declares {schema['type']}")
        return
    if isinstance(value, dict) and "properties" in schema:
        for key in schema.get("required", []):
            if key not in value:
                problems.append(f"{where}.{key}: required by the server, not sent by the client")
        for key, item in value.items():
            if key in schema["properties"]:
                compare_value(spec, schema["properties"][key], item, f"{where}.{key}", problems, undeclared)
            elif schema.get("additionalProperties") is False:
                problems.append(f"{where}.{key}: sent by the client, forbidden by the server")
            else:
                undeclared.add(f"{where}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for item in value:
            compare_value(spec, schema["items"], item, f"{where}[]", problems, undeclared)


def compare_result(spec: dict[str, Any], schema: dict[str, Any], cls: type, where: str, problems: list[str]) -> None:
    """Check the fields a result dataclass reads against a declared response schema."""
    import dataclasses
    import types
    import typing

    schema = _resolve(spec, schema)
    if "properties" not in schema:
        return  # nothing declared: nothing to compare
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f.metadata.get("wire", f.name)
        if key is None:
            continue
        if key not in schema["properties"]:
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if required:
                problems.append(f"{where}.{key}: the client needs it, the server does not declare it")
            continue
        hint = hints[f.name]
        args = (
            [a for a in typing.get_args(hint) if a is not type(None)]
            if typing.get_origin(hint) in (typing.Union, types.UnionType)
            else [hint]
        )
        wanted = {JSON_TYPES.get(typing.get_origin(a) or a) for a in args} - {None}
        declared = _resolve(spec, schema["properties"][key])
        kinds = [_resolve(spec, o).get("type") for o in declared.get("anyOf", [declared])]
        if wanted and all(k is not None for k in kinds) and not any(_type_ok(k, w) for k in kinds for w in wanted):
            problems.append(f"{where}.{key}: client reads {sorted(wanted)}, server declares {kinds}")


def test_client_wire_types_agree_with_the_servers_openapi(server: str) -> None:
    from urllib.parse import unquote

    import httpx
    from deepserve.clients import (
        GenerateParams, GenerateResult, InferResult, ModelInfo, ModelMetadata, Prediction, RepositoryEntry,
    )
    from deepserve.clients._base import BaseClient

    spec = httpx.get(f"{server}/openapi.json", timeout=30).json()
    base = BaseClient(server)
    m, v = "MODEL", "VERSION"
    arrays = {"images": np.zeros((1, 1, 8, 8), np.float32)}
    calls = [  # (call built by the client's own code, the result type it parses)
        (base._models_call(), None),
        (base._ready_call(None, None), None),
        (base._live_call(), None),
        (base._ready_call(m, None), None),
        (base._ready_call(m, v), None),
        (base._metadata_call(m, None), ModelMetadata),
        (base._metadata_call(m, v), ModelMetadata),
        (base._infer_call(m, arrays, None, None, False, "id", {"timeout": 1}), InferResult),
        (base._infer_call(m, arrays, v, ["logits"], True, None, None), InferResult),
        (base._classify_call(image(), m, None, 3), Prediction),
        (base._classify_call(image(), m, v, 3), Prediction),
        (base._generate_call(m, "a", None, GenerateParams(num_beams=2, stop="x", logprobs=1)), GenerateResult),
        (base._generate_call(m, "a", v, GenerateParams()), GenerateResult),
        (base._stream_call(m, "a", None, GenerateParams(seed=1)), None),
        (base._stream_call(m, "a", v, GenerateParams()), None),
        (base._repository_call("index", body={"ready": True}), None),
        (base._repository_call("load", m, base._load_body({"max_batch_size": 2})), None),
        (base._repository_call("unload", m), None),
    ]
    problems: list[str] = []
    undeclared: set[str] = set()
    for call, result_cls in calls:
        template = unquote(call.path).replace(m, "{model}").replace(v, "{version}")
        operation = spec["paths"].get(template, {}).get(call.method.lower())
        where = f"{call.method} {template}"
        if operation is None:
            problems.append(f"{where}: not in the server's OpenAPI paths")
            continue
        params = {p["name"]: p for p in operation.get("parameters", [])}
        for name, value in (call.params or {}).items():
            if name not in params:
                problems.append(f"{where}: query parameter {name} is not declared")
            else:
                compare_value(spec, params[name].get("schema", {}), value, f"{where}: {name}", problems, undeclared)
        if call.content is not None:
            content = operation.get("requestBody", {}).get("content", {})
            kind = call.headers.get("Content-Type", "")
            declared = content.get(kind) or content.get(kind.split("/")[0] + "/*")
            if declared is None:
                undeclared.add(f"{where.replace('/versions/{version}', '')}: content-type {kind}")
            elif kind == "application/json":
                compare_value(
                    spec, declared.get("schema", {}), json.loads(call.content), f"{where}: body", problems, undeclared
                )
        ok = operation.get("responses", {}).get("200", {}).get("content", {}).get("application/json", {})
        if result_cls is not None and "schema" in ok:
            compare_result(spec, ok["schema"], result_cls, f"{where}: response", problems)
    if "/v2/models" in spec["paths"]:
        index = spec["paths"]["/v2/models"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
        models = _resolve(spec, index).get("properties", {}).get("models", {})
        if "items" in models:
            compare_result(spec, models["items"], ModelInfo, "GET /v2/models: response.models[]", problems)
    for path in ("/v2/repository/index", "/v2/repository/models/{model}/load", "/v2/repository/models/{model}/unload"):
        rows = spec["paths"][path]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
        compare_result(spec, rows["items"], RepositoryEntry, f"POST {path}: response[]", problems)
    assert problems == []
    assert {u.replace("/versions/{version}", "") for u in undeclared} <= KNOWN_UNDECLARED


def test_schema_comparison_catches_mismatches() -> None:
    """The checker above on a hand-written schema: it must see wrong types, missing and forbidden fields."""
    from deepserve.clients import GenerateResult

    spec: dict[str, Any] = {
        "components": {
            "schemas": {
                "Req": {
                    "type": "object",
                    "required": ["text_input", "stream"],
                    "additionalProperties": False,
                    "properties": {"text_input": {"type": "string"}, "parameters": {"type": "array"}},
                }
            }
        }
    }
    problems: list[str] = []
    undeclared: set[str] = set()
    compare_value(
        spec,
        {"$ref": "#/components/schemas/Req"},
        {"text_input": "x", "parameters": {}, "extra": 1},
        "body",
        problems,
        undeclared,
    )
    assert problems == [
        "body.stream: required by the server, not sent by the client",
        "body.parameters: client sends object, server declares array",
        "body.extra: sent by the client, forbidden by the server",
    ]
    response = {
        "type": "object",
        "properties": {
            "model_name": {"type": "string"},
            "usage": {"type": "string"},
            "logprobs": {"anyOf": [{"type": "array"}, {"type": "null"}]},
        },
    }
    problems = []
    compare_result(spec, response, GenerateResult, "resp", problems)
    assert problems == [
        "resp.text_output: the client needs it, the server does not declare it",
        "resp.usage: client reads ['object'], server declares ['string']",
    ]
