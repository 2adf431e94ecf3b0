"""Start-up and the cyclic garbage collector: every batch size is warmed before ready, the start-up heap is
frozen, the collector stays on, and a soak of many requests of every kind leaves no growing set of objects.

The server runs in this process (uvicorn in a thread, on a real socket) so that the test can count the objects
the collector tracks after each round of requests.
"""

from __future__ import annotations

import gc
import io
import json
import threading
import weakref
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image

from deepserve.serve.app import create_app
from deepserve.serve.cli import uvicorn_config
from deepserve.serve.heap import GC_THRESHOLDS, settle
from tests.artifacts import make_charlm_artifact, make_classifier_artifact, make_seq2seq_artifact
from tests.servers import free_port
from tests.test_serve_socket import body, images

ROUNDS = 6
LEAK_LIMIT = 100
"""Objects the late rounds may hold beyond the early ones (3 rounds apart): requests in flight at a count (a
keep-alive timer, a closing stream) come and go by tens; one object leaked per JSON request adds 180."""


class _Server(uvicorn.Server):
    """uvicorn that says when its lifespan (loading and warming every model) is done."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.up = threading.Event()

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        self.up.set()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Iterator[str]:
    """The server's base URL; ``spare-cnn`` is there to be unloaded."""
    root = tmp_path_factory.mktemp("soak-repo")
    make_classifier_artifact(root, "tiny-cnn", quantize=False)
    make_classifier_artifact(root, "spare-cnn", seed=1, quantize=False)
    make_charlm_artifact(root, "tiny-charlm")
    make_seq2seq_artifact(root, "tiny-seq2seq")
    args = SimpleNamespace(host="127.0.0.1", port=free_port(), log_level="warning", graceful_timeout_s=5.0)
    server = _Server(uvicorn_config(create_app(Path(root), device="cpu"), args, {"loop": "auto", "http": "auto"}))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        assert server.up.wait(120) and server.started, "server did not start"
        yield f"http://127.0.0.1:{args.port}"
    finally:
        server.should_exit = True
        thread.join(30)
        gc.unfreeze()  # the app froze this test process's heap: give the rest of the suite its collector back


def one_round(c: httpx.Client, seed: int) -> None:
    """Twenty requests of every kind the server answers, good and bad."""
    png = io.BytesIO()
    Image.new("L", (8, 8), 100 + seed).save(png, "PNG")
    x = images(2, seed)
    head = json.dumps({"inputs": [{"name": "images", "datatype": "FP32", "shape": [2, 1, 8, 8],
                                   "parameters": {"binary_data_size": x.nbytes}}]}).encode()
    for _ in range(20):
        assert c.post("/v2/models/tiny-cnn/infer", json=body(x)).status_code == 200
        assert c.post("/v2/models/tiny-cnn/infer", content=head + x.tobytes(),
                      headers={"Inference-Header-Content-Length": str(len(head))}).status_code == 200
        assert c.post("/predictions/tiny-cnn?top_k=3", content=png.getvalue()).status_code == 200
        assert c.post("/v2/models/tiny-cnn/infer", json={"inputs": []}).status_code == 400
        assert c.post("/v2/models/nope/infer", json=body(x)).status_code == 404
        r = c.post("/v2/models/tiny-charlm/generate", json={"text_input": "ab", "parameters": {
            "max_new_tokens": 4, "temperature": 0.8, "seed": seed}})
        assert r.status_code == 200, r.text
        r = c.post("/v2/models/tiny-seq2seq/generate_stream", json={"text_input": "12", "parameters": {
            "max_new_tokens": 4, "num_beams": 2}})
        assert r.status_code == 200, r.text
        r = c.post("/v1/completions", json={"model": "tiny-charlm", "prompt": "a", "max_tokens": 3, "seed": 1})
        assert r.status_code == 200, r.text


def test_start_up_warms_every_batch_size_then_freezes_the_heap(base):
    """Runs first: the only batches so far are the warm-up's, one of each size up to max_batch_size (32)."""
    metrics = httpx.get(f"{base}/metrics").text
    labels = '{model="tiny-cnn",version="1"}'
    assert f"deepserve_batch_size_count{labels} 32.0" in metrics
    assert f"deepserve_batch_size_sum{labels} 528.0" in metrics  # 1 + 2 + ... + 32
    assert gc.get_freeze_count() > 10_000  # modules, routes, schemas and graphs of the start-up
    assert gc.isenabled() and gc.get_threshold() == GC_THRESHOLDS


def test_a_soak_of_requests_leaves_no_growing_set_of_objects(base):
    tracked: list[Counter] = []
    with httpx.Client(base_url=base, timeout=60) as c:
        for seed in range(ROUNDS):
            one_round(c, seed)
            gc.collect()
            tracked.append(Counter(type(o).__qualname__ for o in gc.get_objects()))
    assert not gc.garbage  # nothing uncollectable
    # Round 0 creates what lives on (metric children, connections). A request in flight at the count (a
    # keep-alive timer, a closing stream) shows up in one round only, so each pair of rounds counts its smaller;
    # a leak grows in every round.
    sizes = [sum(t.values()) for t in tracked]
    early, late = (min(range(a, a + 2), key=sizes.__getitem__) for a in (1, ROUNDS - 2))
    growth = tracked[late] - tracked[early]
    assert sizes[late] - sizes[early] < LEAK_LIMIT, f"rounds' objects {sizes}; grew: {growth.most_common(8)}"


class _Cycle:
    """An object in a reference cycle: only the collector frees it."""

    def __init__(self) -> None:
        self.me = self


def test_unloading_a_model_frees_cycles_that_were_frozen(base):
    """Frozen objects are never collected, not even by gc.collect(): an unload at run time re-settles the heap
    (unfreeze, collect, freeze), so what the model left in reference cycles is freed."""
    cycle = _Cycle()
    gone = weakref.ref(cycle)
    settle()  # as at start-up: the cycle is frozen with the rest
    del cycle
    gc.collect()
    kept = gone() is not None  # not inside an assert: pytest would keep it in a local
    assert kept, "a frozen cycle was collected: freezing did not happen"
    r = httpx.post(f"{base}/v2/repository/models/spare-cnn/unload", timeout=60)
    assert r.status_code == 200, r.text
    freed = gone() is None
    assert freed, "the unload left the frozen cycle frozen"
    assert gc.get_freeze_count() > 10_000  # the rest is frozen again
