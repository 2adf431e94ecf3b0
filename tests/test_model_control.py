"""Model control inside one process: load, reload, unload, version policies, poll mode and the drain of replaced
servables, on a real ``ModelRepository`` with tiny real artifacts. The socket-level behaviour (tritonclient, the
reload under load, keys) is in ``test_operations.py``."""

from __future__ import annotations

import asyncio
import gc
import json
import shutil
import weakref
from pathlib import Path

import numpy as np
import pytest

from deepserve.serve.errors import LoadFailed, NotReady
from deepserve.serve.model_state import ModelState, VersionPolicy, request_leases
from deepserve.serve.repository import ModelRepository
from deepserve.serve.settings import SettingsError, resolve_settings
from tests.artifacts import make_classifier_artifact

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def versions(tmp_path_factory) -> dict[int, Path]:
    """Two versions of one tiny classifier with different weights, exported once, copied in by each test."""
    root = tmp_path_factory.mktemp("cnn-versions")
    return {v: make_classifier_artifact(root, "cnn", version=v, seed=v, quantize=False) for v in (1, 2, 3)}


def repo_with(tmp_path: Path, versions: dict[int, Path], present: tuple[int, ...], config: dict | None = None,
              **kwargs) -> ModelRepository:
    root = tmp_path / "repo"
    for v in present:
        shutil.copytree(versions[v], root / "cnn" / str(v))
    if config is not None:
        (root / "cnn" / "config.json").write_text(json.dumps(config))
    return ModelRepository(root, device="cpu", use_env=False, **kwargs)


X = np.random.default_rng(0).standard_normal((1, 1, 8, 8)).astype(np.float32)


async def logits(repo: ModelRepository, version: int | None = None) -> np.ndarray:
    servable = repo.get("cnn", version)
    return (await servable.infer({"images": X}))["logits"]


def states(repo: ModelRepository) -> dict[str, str]:
    return {r["version"]: r["state"] for r in repo.triton_index()}


@pytest.mark.parametrize("raw,available,picked", [
    ("all", [1, 2, 3], [1, 2, 3]), ("latest 2", [1, 2, 5], [2, 5]), ({"latest": {"num_versions": 1}}, [1, 2], [2]),
    ([1, 3], [1, 2, 3], [1, 3]), ({"specific": {"versions": [2]}}, [1, 2], [2]),
])
def test_version_policy_forms(raw, available, picked):
    assert VersionPolicy.parse(raw).select(available) == picked


@pytest.mark.parametrize("raw", ["latest 0", "newest", [], [0], {"latest": {}}, 3])
def test_version_policy_refuses_bad_values_by_name(raw):
    with pytest.raises(SettingsError, match="version_policy"):
        resolve_settings(None, None, {"version_policy": raw})


async def test_reload_switches_atomically_and_drains_the_old_servable(tmp_path, versions):
    repo = repo_with(tmp_path, versions, (1,))
    await repo.start()
    try:
        before = await logits(repo)
        with request_leases():  # a request that looked the model up before the reload...
            held = repo.get("cnn")
            await repo.load_model("cnn")
            assert repo.get("cnn") is not held  # ...new requests get the new servable at once
            assert held.ready  # ...while the one it holds keeps working until it is answered
            np.testing.assert_allclose((await held.infer({"images": X}))["logits"], before)
        await repo.drained()
        assert not held.ready and held.reason == "stopped"  # released, then stopped
        np.testing.assert_allclose(await logits(repo), before)
        assert states(repo) == {"1": "READY"}
    finally:
        await repo.stop()


async def test_new_version_becomes_default_and_latest_policy_retires_the_old(tmp_path, versions):
    repo = repo_with(tmp_path, versions, (1,), config={"version_policy": "latest 1"})
    await repo.start()
    try:
        v1 = await logits(repo)
        shutil.copytree(versions[2], repo.path / "cnn" / "2")
        await repo.load_model("cnn")
        await repo.drained()
        assert states(repo) == {"1": "UNAVAILABLE", "2": "READY"}
        assert "version_policy latest 1" in repo.resolve("cnn", 1).reason
        assert not np.allclose(await logits(repo), v1)
        with pytest.raises(NotReady, match="version 1 is UNAVAILABLE"):
            repo.get("cnn", 1)
    finally:
        await repo.stop()


async def test_failed_loads_keep_the_old_version_serving_and_say_why(tmp_path, versions):
    repo = repo_with(tmp_path, versions, (1,), config={"version_policy": "latest 1"})
    await repo.start()
    try:
        v1 = await logits(repo)
        with pytest.raises(LoadFailed, match="max_batch_size must be an integer >= 1"):
            await repo.load_model("cnn", config={"max_batch_size": 0})
        broken = shutil.copytree(versions[2], repo.path / "cnn" / "2")
        with open(broken / "model.onnx", "r+b") as f:  # a corrupt (or half-copied) new version
            f.truncate(100)
        with pytest.raises(LoadFailed, match="version 2: .*model.onnx") as failed:
            await repo.load_model("cnn")
        assert str(tmp_path) not in failed.value.message  # the load's answer names no server path (the log does)
        rows = {r["version"]: r for r in repo.triton_index()}
        assert rows["1"]["state"] == "READY" and rows["2"]["state"] == "UNAVAILABLE"
        np.testing.assert_allclose(await logits(repo), v1)  # still the default: the new one never served
        assert repo.metrics.loads.labels("cnn", "failure")._value.get() == 1
    finally:
        await repo.stop()


async def test_unload_refuses_new_requests_naming_the_state_and_frees_after_the_last(tmp_path, versions):
    repo = repo_with(tmp_path, versions, (1,))
    await repo.start()
    try:
        with request_leases():
            held = repo.get("cnn")
            unloading = asyncio.create_task(repo.unload_model("cnn"))
            await asyncio.sleep(0)  # let the unload begin: it waits for this request
            with pytest.raises(NotReady, match="UNLOADING") as info:
                repo.get("cnn", 1)
            assert info.value.code == "model_unavailable"
            await held.infer({"images": X})  # the request in flight still finishes
            assert not unloading.done()
        graph = weakref.ref(held.runtimes[0])
        await unloading
        assert not held.ready and states(repo) == {"1": "UNAVAILABLE"}
        gc.collect()
        assert graph() is None  # the model's memory is freed, though this test still holds the servable
        with pytest.raises(NotReady, match="UNAVAILABLE: unloaded"):
            repo.get("cnn")
        await repo.load_model("cnn")  # and back
        assert states(repo) == {"1": "READY"}
    finally:
        await repo.stop()


async def test_explicit_mode_loads_only_what_it_is_told(tmp_path, versions):
    repo = repo_with(tmp_path, versions, (1,), model_control="explicit")
    await repo.start()
    try:
        assert states(repo) == {"1": "UNAVAILABLE"} and "not loaded (--model-control explicit)" in \
            repo.triton_index()[0]["reason"]
        assert repo.triton_index(ready_only=True) == []
        await repo.load_model("cnn")
        assert states(repo) == {"1": "READY"}
    finally:
        await repo.stop()


async def test_poll_mode_never_loads_a_half_copied_version(tmp_path, versions):
    repo = repo_with(tmp_path, versions, (1,), model_control="poll", poll_interval_s=3600.0)
    await repo.start()
    try:
        v1 = await logits(repo)
        target = repo.path / "cnn" / "2"
        target.mkdir()
        shutil.copy(versions[2] / "manifest.json", target)  # the copy has begun: the manifest, half a graph
        data = (versions[2] / "model.onnx").read_bytes()
        (target / "model.onnx").write_bytes(data[: len(data) // 2])
        await repo.poller.poll_once()
        assert states(repo) == {"1": "READY", "2": "UNAVAILABLE"}
        np.testing.assert_allclose(await logits(repo), v1)
        await repo.poller.poll_once()  # nothing changed: not retried
        assert repo.metrics.loads.labels("cnn", "failure")._value.get() == 1
        for item in versions[2].iterdir():  # the copy completes
            if item.is_file():
                shutil.copy(item, target / item.name)
        await repo.poller.poll_once()
        assert states(repo) == {"1": "READY", "2": "READY"}
        assert not np.allclose(await logits(repo), v1)  # the new version is the default now
        shutil.rmtree(target)
        await repo.poller.poll_once()  # removed from disk: unloaded, dropped from the index
        assert states(repo) == {"1": "READY"}
        np.testing.assert_allclose(await logits(repo), v1)
    finally:
        await repo.stop()


async def test_poll_mode_reloads_on_a_config_change(tmp_path, versions):
    repo = repo_with(tmp_path, versions, (1,), config={"max_batch_size": 8}, model_control="poll",
                     poll_interval_s=3600.0)
    await repo.start()
    try:
        first = repo.get("cnn")
        assert first.settings.max_batch_size == 8
        (repo.path / "cnn" / "config.json").write_text(json.dumps({"max_batch_size": 2}))
        await repo.poller.poll_once()
        assert repo.get("cnn") is not first and repo.get("cnn").settings.max_batch_size == 2
        assert repo.resolve("cnn", 1).state is ModelState.READY
    finally:
        await repo.stop()
