"""Schema checks for the manifests in ``deploy/``: Kubernetes kinds with ``kubernetes-validate`` (the API's
published JSON schemas), KServe kinds with the KServe SDK's typed models, the Prometheus Operator's
``ServiceMonitor`` with ``cloudcoil-models-prometheus-operator`` (pydantic models generated from its CRDs).

The ``kserve`` package cannot go into the dev extras: it pins ``protobuf<7`` (our environment has 7.x) and pulls
a model server's dependencies. Its typed models (``kserve/models/v1beta1_*.py``, generated from KServe's OpenAPI
spec) need none of that, so the Makefile installs the SDK without dependencies into ``.cache/kserve-sdk`` and
this module loads ``kserve.models`` from there without running the package's ``__init__``. Each mapping of a
manifest is built into its model class: unknown fields are refused, every typed field is checked, and the
classes' own setters refuse missing required fields; Kubernetes core types inside them (``V1Container``,
``V1Probe``...) are checked against kubernetes-validate's schema of that type.
"""

from __future__ import annotations

import importlib
import re
import sys
import types
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
from kubernetes_validate.utils import latest_version, schema_contents
from referencing import Registry, Resource

ROOT = Path(__file__).resolve().parents[1]
KSERVE_SDK = ROOT / ".cache" / "kserve-sdk"
K8S_VERSION = "1.33"
"""The Kubernetes release the manifests target (KServe 0.15+ supports it)."""
KSERVE_GROUP = "serving.kserve.io"
PROMETHEUS_OPERATOR_GROUP = "monitoring.coreos.com"


def kserve_models() -> types.ModuleType:
    """``kserve.models`` from the SDK in ``.cache/kserve-sdk`` (``make install-dev`` puts it there)."""
    if not (KSERVE_SDK / "kserve" / "models").is_dir():
        raise RuntimeError(f"{KSERVE_SDK} has no KServe SDK: run `make install-dev` (pip install --no-deps "
                           f"--target .cache/kserve-sdk kserve)")
    if "kserve" not in sys.modules:
        package = types.ModuleType("kserve")
        package.__path__ = [str(KSERVE_SDK / "kserve")]  # a namespace for the submodules, without __init__
        sys.modules["kserve"] = package
    return importlib.import_module("kserve.models")


def validate_core(doc: dict[str, Any]) -> None:
    """A Kubernetes kind against the API's schema (strict: unknown fields are errors)."""
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def _core_validator(type_name: str) -> jsonschema.protocols.Validator:
    stem = re.sub(r"^V1", "", type_name).lower()
    folder = f"kubernetes-json-schema/v{latest_version()}-local-strict"
    candidates = [f"{stem}-v1.json", f"{stem}-meta-v1.json"]
    for name in candidates:
        try:
            schema = schema_contents(f"{folder}/{name}", K8S_VERSION)
        except FileNotFoundError:
            continue
        definitions = Resource.from_contents(schema_contents(f"{folder}/_definitions.json", K8S_VERSION))
        registry = definitions @ (Resource.from_contents(schema) @ Registry())
        return jsonschema.Draft202012Validator(schema, registry=registry)
    raise LookupError(f"no Kubernetes schema for {type_name} (tried {candidates})")


def _value(type_name: str, value: Any, where: str) -> Any:
    models = kserve_models()
    if type_name.startswith("list[") and type_name.endswith("]"):
        assert isinstance(value, list), f"{where}: expected a list, got {value!r}"
        return [_value(type_name[5:-1], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if type_name.startswith("dict(str, ") and type_name.endswith(")"):
        assert isinstance(value, dict), f"{where}: expected a mapping, got {value!r}"
        return {k: _value(type_name[10:-1], v, f"{where}.{k}") for k, v in value.items()}
    simple = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object,
              "ResourceQuantity": (str, int, float)}
    if type_name in simple:
        assert isinstance(value, simple[type_name]) and not (type_name == "int" and isinstance(value, bool)), \
            f"{where}: expected {type_name}, got {value!r}"
        return value
    if hasattr(models, type_name):
        return build(type_name, value, where)
    errors = sorted(_core_validator(type_name).iter_errors(value), key=str)
    assert not errors, f"{where} ({type_name}): {errors[0].message} at {list(errors[0].absolute_path)}"
    return value


def build(type_name: str, data: Any, where: str = "") -> Any:
    """``data`` (a manifest mapping) as an instance of the KServe model ``type_name``."""
    cls = getattr(kserve_models(), type_name)
    assert isinstance(data, dict), f"{where or type_name}: expected a mapping, got {data!r}"
    by_json = {json_key: attr for attr, json_key in cls.attribute_map.items()}
    unknown = sorted(set(data) - set(by_json))
    assert not unknown, f"{where or type_name}: unknown field(s) {unknown} for {type_name}"
    kwargs = {by_json[k]: _value(cls.openapi_types[by_json[k]], v, f"{where}.{k}".lstrip("."))
              for k, v in data.items()}
    return cls(**kwargs)  # the setters refuse missing required fields and values outside enums


KSERVE_KINDS = {"ClusterServingRuntime": ("v1alpha1", "V1alpha1ClusterServingRuntime"),
                "ServingRuntime": ("v1alpha1", "V1alpha1ServingRuntime"),
                "InferenceService": ("v1beta1", "V1beta1InferenceService")}


def validate_prometheus_operator(doc: dict[str, Any]) -> None:
    """A Prometheus Operator kind with its typed models: pydantic checks types, patterns and required fields;
    the models drop fields they do not know, so a document must come back whole from a round trip."""
    from cloudcoil.models.prometheus_operator import v1

    assert doc["apiVersion"] == f"{PROMETHEUS_OPERATOR_GROUP}/v1", f"{doc['kind']}: only v1 kinds are checked"
    cls = getattr(v1, doc.get("kind", ""), None)
    assert cls is not None, f"{doc.get('kind')}: not a Prometheus Operator v1 kind"
    back = cls.model_validate(doc).model_dump(by_alias=True, exclude_none=True, mode="json")
    assert back == doc, f"{doc['kind']}: unknown or misplaced field(s): {_lost(doc, back)}"


def _lost(doc: Any, back: Any, where: str = "") -> list[str]:
    """The paths of ``doc`` that ``back`` lacks or changed."""
    if isinstance(doc, dict) and isinstance(back, dict):
        return [p for k, v in doc.items() for p in (_lost(v, back[k], f"{where}.{k}") if k in back
                                                     else [f"{where}.{k}"])]
    if isinstance(doc, list) and isinstance(back, list) and len(doc) == len(back):
        return [p for i, (a, b) in enumerate(zip(doc, back)) for p in _lost(a, b, f"{where}[{i}]")]
    return [] if doc == back else [where]


def validate(doc: dict[str, Any]) -> None:
    """One manifest document: a KServe kind with the SDK's models, a Prometheus Operator kind with its models,
    anything else with the Kubernetes schemas."""
    if doc.get("apiVersion", "").startswith(PROMETHEUS_OPERATOR_GROUP + "/"):
        validate_prometheus_operator(doc)
        return
    if not doc.get("apiVersion", "").startswith(KSERVE_GROUP + "/"):
        validate_core(doc)
        return
    assert doc.get("kind") in KSERVE_KINDS, f"{doc.get('kind')}: not a KServe kind these checks know"
    version, type_name = KSERVE_KINDS[doc["kind"]]
    assert doc["apiVersion"] == f"{KSERVE_GROUP}/{version}", f"{doc['kind']} is {KSERVE_GROUP}/{version}"
    build(type_name, doc, doc["kind"])
