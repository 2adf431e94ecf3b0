"""The manifests in ``deploy/``: every document validates against the Kubernetes and KServe schemas
(``tests/k8s_schemas.py``), they agree with each other and with the server's flags, and the server started
exactly as they start it (command, args and env, the artifact mounted where KServe mounts it, in a temp dir)
answers KServe v2 requests."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
import pytest
import yaml

from tests import k8s_schemas
from tests.artifacts import make_classifier_artifact
from tests.servers import free_port, wait_ready
from tests.test_serve_socket import body, images

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def kind(name: str, folder: str) -> list[dict[str, Any]]:
    return [d for f in sorted((DEPLOY / folder).glob("*.yaml")) for d in documents(f) if d["kind"] == name]


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_every_manifest_validates() -> None:
    files = sorted(DEPLOY.rglob("*.yaml"))
    kinds = sorted(d["kind"] for f in files for d in documents(f))
    assert kinds == ["ClusterServingRuntime", "Deployment", "HorizontalPodAutoscaler", *["InferenceService"] * 6,
                     "PodDisruptionBudget", "Service", "ServiceMonitor"]
    for f in files:
        for doc in documents(f):
            k8s_schemas.validate(doc)


@pytest.mark.parametrize("breakage", [
    ("InferenceService", lambda d: d["spec"]["predictor"]["model"].__setitem__("storageURI", "pvc://x/y")),
    ("InferenceService", lambda d: d["spec"]["predictor"].__setitem__("minReplicas", "1")),
    ("InferenceService", lambda d: d["spec"]["predictor"]["model"].pop("modelFormat")),
    ("InferenceService", lambda d: d["spec"]["predictor"]["model"]["readinessProbe"]["httpGet"].pop("port")),
    ("ClusterServingRuntime", lambda d: d["spec"]["containers"][0].__setitem__("imagee", "x")),
    ("ClusterServingRuntime", lambda d: d["spec"].pop("containers")),
    ("Deployment", lambda d: d["spec"]["template"]["spec"]["containers"][0]["securityContext"].__setitem__(
        "readOnlyRootFilesystem", "yes")),
    ("Service", lambda d: d["spec"].__setitem__("portz", [])),
    ("ServiceMonitor", lambda d: d["spec"]["endpoints"][0].__setitem__("paht", "/metrics")),
    ("ServiceMonitor", lambda d: d["spec"]["endpoints"][0].__setitem__("interval", "often")),
    ("ServiceMonitor", lambda d: d["spec"].pop("selector")),
], ids=["isvc-unknown-field", "isvc-wrong-type", "isvc-missing-required", "isvc-probe-without-port",
        "runtime-container-unknown-field", "runtime-missing-containers", "deployment-wrong-type",
        "service-unknown-field", "servicemonitor-unknown-field", "servicemonitor-bad-interval",
        "servicemonitor-missing-selector"])
def test_the_checks_refuse_broken_manifests(breakage: tuple[str, Any]) -> None:
    name, breaks = breakage
    doc = copy.deepcopy(kind(name, "kserve" if name in k8s_schemas.KSERVE_KINDS else "k8s")[0])
    breaks(doc)
    with pytest.raises((AssertionError, ValueError, TypeError, k8s_schemas.jsonschema.ValidationError)):
        k8s_schemas.validate(doc)


def test_manifests_agree_with_each_other_and_the_server() -> None:
    runtime = kind("ClusterServingRuntime", "kserve")[0]
    container = runtime["spec"]["containers"][0]
    assert runtime["spec"]["protocolVersions"] == ["v2"]
    assert flag(container["args"], "--model-dir") == "/mnt/models"
    assert container["ports"][0]["containerPort"] == 8080 and "--port" not in container["args"]  # Knative's PORT
    assert "PORT" not in {e["name"] for e in container.get("env", [])}  # Knative reserves it
    formats = {(f["name"], f["version"]) for f in runtime["spec"]["supportedModelFormats"]}
    graceful = float(flag(container["args"], "--graceful-timeout-s"))
    for isvc in kind("InferenceService", "kserve"):
        predictor = isvc["spec"]["predictor"]
        model = predictor["model"]
        assert model["runtime"] == runtime["metadata"]["name"] and model["protocolVersion"] == "v2"
        assert (model["modelFormat"]["name"], model["modelFormat"]["version"]) in formats
        assert model["storageUri"].endswith(f"/{isvc['metadata']['name']}/1")
        assert model["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
        assert model["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": 8080}
        assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"] and predictor["scaleMetric"] == "concurrency"
        assert graceful + 10 <= predictor["terminationGracePeriodSeconds"]  # drain fits the grace period
    assert {i["metadata"]["name"] for i in kind("InferenceService", "kserve")} == {
        "digits-cnn", "charlm-lstm", "seq2seq-math"}
    pod = kind("Deployment", "k8s")[0]["spec"]["template"]["spec"]
    main = pod["containers"][0]
    drain = float(flag(main["args"], "--graceful-timeout-s")) + main["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert drain + 5 <= pod["terminationGracePeriodSeconds"]
    assert pod["securityContext"]["runAsNonRoot"] and main["securityContext"]["readOnlyRootFilesystem"]
    assert {m["mountPath"] for m in main["volumeMounts"]} >= {"/models", "/tmp"}
    for probe, path in (("readinessProbe", "/v2/health/ready"), ("livenessProbe", "/v2/health/live")):
        assert main[probe]["httpGet"]["path"] == path and main[probe]["httpGet"]["port"] == "http"
    service, hpa = kind("Service", "k8s")[0], kind("HorizontalPodAutoscaler", "k8s")[0]
    assert service["spec"]["selector"] == pod_labels() == kind("PodDisruptionBudget", "k8s")[0]["spec"][
        "selector"]["matchLabels"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == kind("Deployment", "k8s")[0]["metadata"]["name"]
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    monitor = kind("ServiceMonitor", "k8s")[0]["spec"]
    assert monitor["selector"]["matchLabels"] == service["metadata"]["labels"]  # it finds the Service ...
    endpoint = monitor["endpoints"][0]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]} and endpoint["path"] == "/metrics"


def pod_labels() -> dict[str, str]:
    return kind("Deployment", "k8s")[0]["spec"]["template"]["metadata"]["labels"]


def start_like(container: dict[str, Any], mounts: dict[str, Path], env: dict[str, str],
               log: Path) -> subprocess.Popen:
    """Run the container's command and args (``deepserve`` is ``python -m deepserve.cli``), with paths under
    the pod's mounts moved to ``mounts``' temp dirs and the container's env plus ``env``."""
    assert container["command"][0] == "deepserve"
    args = []
    for arg in [*container["command"][1:], *container["args"]]:
        for mount, local in mounts.items():
            if arg == mount or arg.startswith(mount + "/"):
                arg = str(local) + arg[len(mount):]
        args.append(arg)
    values = {e["name"]: e["value"] for e in container.get("env", [])}
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "deepserve.cli", *args], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, **values, **env})


@pytest.fixture
def running() -> Iterator[list[subprocess.Popen]]:
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def infer(base: str, model: str) -> np.ndarray:
    import tritonclient.http as triton

    client = triton.InferenceServerClient(url=base.removeprefix("http://"))
    assert client.is_server_live() and client.is_model_ready(model)
    x = images(2, seed=5)
    inp = triton.InferInput("images", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    logits = client.infer(model, [inp]).as_numpy("logits")
    client.close()
    as_json = httpx.post(f"{base}/v2/models/{model}/infer", json=body(x), timeout=30).json()["outputs"][0]
    np.testing.assert_allclose(logits, np.asarray(as_json["data"], np.float32).reshape(as_json["shape"]), rtol=1e-6)
    return logits


def test_kserve_runtime_starts_as_kserve_starts_it(tmp_path: Path, running: list[subprocess.Popen]) -> None:
    """KServe: the runtime's command and args, {{.Name}} filled in with the InferenceService's name, the
    storageUri's artifact at /mnt/models, PORT from Knative; the model answers v2 under that name."""
    runtime = kind("ClusterServingRuntime", "kserve")[0]
    isvc = kind("InferenceService", "kserve")[0]
    container = copy.deepcopy(runtime["spec"]["containers"][0])
    name = isvc["metadata"]["name"]
    container["args"] = [a.replace("{{.Name}}", name) for a in container["args"]]
    artifact = make_classifier_artifact(tmp_path / "repo", "tiny-cnn", quantize=False)
    shutil.copytree(artifact, tmp_path / "mnt" / "models")  # what the storage initializer leaves there
    port = free_port()
    log = tmp_path / "log.txt"
    running.append(start_like(container, {"/mnt/models": tmp_path / "mnt" / "models"}, {"PORT": str(port)}, log))
    base = f"http://127.0.0.1:{port}"
    wait_ready(running[0], base, log)
    assert httpx.get(f"{base}/v2/models").json()["models"][0]["name"] == name
    infer(base, name)
    assert httpx.get(f"{base}/v2/models/tiny-cnn").status_code == 404  # routed by the service's name only


def test_k8s_deployment_starts_as_its_pod_does(tmp_path: Path, running: list[subprocess.Popen]) -> None:
    """The Deployment's command, args and env with the repository volume at /models; only PORT's value moves to
    a free port (the manifest's 8000 may be taken on a test machine)."""
    container = kind("Deployment", "k8s")[0]["spec"]["template"]["spec"]["containers"][0]
    make_classifier_artifact(tmp_path / "models", "digits-cnn", quantize=False)
    port = free_port()
    log = tmp_path / "log.txt"
    running.append(start_like(container, {"/models": tmp_path / "models"}, {"PORT": str(port)}, log))
    base = f"http://127.0.0.1:{port}"
    wait_ready(running[0], base, log)
    infer(base, "digits-cnn")


def test_model_dir_flags_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from deepserve.cli import main

    artifact = make_classifier_artifact(tmp_path / "repo", "tiny-cnn", quantize=False)
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "1").symlink_to(artifact, target_is_directory=True)
    cases = {
        ("--model-dir", str(tmp_path / "linked"), "--model-name", "m"): "version folder 1 is a symlink out of it",
        ("--model-dir", str(artifact)): "--model-dir needs --model-name",
        ("--model-dir", str(tmp_path / "nope"), "--model-name", "m"): "is not a directory",
        ("--model-dir", str(tmp_path), "--model-name", "m"): "neither manifest.json",
        ("--model-dir", str(artifact), "--model-name", "a/b"): "--model-name must be",
        ("--repository", str(tmp_path / "repo"), "--model-name", "m"): "--model-name goes with --model-dir",
        ("--repository", str(tmp_path / "repo"), "--model-dir", str(artifact), "--model-name", "m"): "not both",
        (): "give --repository DIR",
    }
    for argv, message in cases.items():
        assert main(["serve", *argv, "--port", "1"]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and message in err, (argv, err)
