"""The dynamic batcher, driven with plain functions (no model needed)."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from deepserve.serve.batcher import Batcher
from deepserve.serve.errors import DeadlineExceeded, InferenceFailed, Overloaded, PayloadTooLarge, ShuttingDown

pytestmark = pytest.mark.anyio


def _double(inputs):
    return {"y": inputs["x"] * 2}


def _request(i: int, rows: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.arange(i * 100, i * 100 + rows, dtype=np.float32)[:, None]}


class Gate:
    """A batch function that blocks until released, recording every batch it saw."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.batches: list[np.ndarray] = []

    def __call__(self, inputs):
        self.batches.append(inputs["x"].copy())
        self.entered.set()
        self.release.wait(10)
        return {"y": inputs["x"] + 1}


async def _wait_thread_event(event: threading.Event) -> None:
    await asyncio.to_thread(event.wait, 10)


async def test_batched_results_match_unbatched_in_order():
    sizes: list[int] = []

    def fn(inputs):
        sizes.append(len(inputs["x"]))
        return _double(inputs)

    b = Batcher(fn, max_batch_size=8, max_queue_delay_ms=50, name="t")
    b.start()
    rows = [1 + i % 3 for i in range(64)]
    results = await asyncio.gather(*(b.submit(_request(i, r)) for i, r in enumerate(rows)))
    await b.stop()
    for i, (r, out) in enumerate(zip(rows, results)):
        np.testing.assert_array_equal(out["y"], _double(_request(i, r))["y"])
    assert max(sizes) <= 8 and sum(sizes) == sum(rows)
    assert len(sizes) < 64, "requests were not batched together"


async def test_request_rows_never_split_unless_too_big():
    seen: list[np.ndarray] = []

    async def fn(inputs):  # async batch functions are awaited directly
        seen.append(inputs["x"][:, 0].copy())
        return _double(inputs)

    b = Batcher(fn, max_batch_size=4, max_queue_delay_ms=20, name="t")
    b.start()
    a, big, c = await asyncio.gather(b.submit(_request(1, 3)), b.submit(_request(2, 10)), b.submit(_request(3, 2)))
    await b.stop()
    np.testing.assert_array_equal(big["y"], _request(2, 10)["x"] * 2)
    np.testing.assert_array_equal(a["y"], _request(1, 3)["x"] * 2)
    np.testing.assert_array_equal(c["y"], _request(3, 2)["x"] * 2)
    assert all(len(s) <= 4 for s in seen)
    for start, rows in ((100, 3), (300, 2)):  # each small request sits whole inside one batch
        assert any(np.array_equal(s[i : i + rows], np.arange(start, start + rows)) for s in seen for i in range(len(s)))


async def test_queue_overflow_and_sync_fn_runs_off_loop():
    gate = Gate()
    loop_thread = threading.get_ident()
    threads = []

    def fn(inputs):
        threads.append(threading.get_ident())
        return gate(inputs)

    b = Batcher(fn, max_batch_size=1, max_queue_delay_ms=0, max_queue_size=2, name="m")
    b.start()
    first = asyncio.ensure_future(b.submit(_request(0)))
    await _wait_thread_event(gate.entered)  # first is in flight; the queue is empty
    queued = [asyncio.ensure_future(b.submit(_request(i))) for i in (1, 2)]
    await asyncio.sleep(0)
    with pytest.raises(Overloaded) as err:
        await b.submit(_request(3))
    assert err.value.status == 429 and "Retry-After" in err.value.headers
    gate.release.set()
    outs = await asyncio.gather(first, *queued)
    assert [o["y"][0, 0] for o in outs] == [1, 101, 201]
    await b.stop()
    assert threads and loop_thread not in threads


async def test_deadline_expired_requests_are_dropped_before_running():
    gate = Gate()
    b = Batcher(gate, max_batch_size=1, max_queue_delay_ms=0, name="m")
    b.start()
    first = asyncio.ensure_future(b.submit(_request(0)))
    await _wait_thread_event(gate.entered)
    with pytest.raises(DeadlineExceeded):
        await b.submit(_request(7), deadline=time.monotonic() + 0.05)
    with pytest.raises(DeadlineExceeded):  # already expired: refused at once
        await b.submit(_request(8), deadline=time.monotonic() - 1)
    gate.release.set()
    await first
    await b.stop()
    assert [int(x[0, 0]) for x in gate.batches] == [0], "an expired request reached the model"


async def test_failing_batch_fails_only_its_requests():
    calls = 0

    def fn(inputs):
        nonlocal calls
        calls += 1
        if (inputs["x"] == 500).any():
            raise RuntimeError("boom")
        return _double(inputs)

    b = Batcher(fn, max_batch_size=2, max_queue_delay_ms=30, name="m")
    b.start()
    results = await asyncio.gather(*(b.submit(_request(i)) for i in (4, 5, 6, 7)), return_exceptions=True)
    assert isinstance(results[1], InferenceFailed) and "boom" in results[1].detail
    assert "boom" not in results[1].message and "RuntimeError" not in results[1].message  # the runtime's text: log only
    assert not isinstance(results[2], Exception) and not isinstance(results[3], Exception)
    after = await b.submit(_request(9))  # the batcher keeps running
    np.testing.assert_array_equal(after["y"], _request(9)["x"] * 2)
    await b.stop()


async def test_stop_drains_queue_then_refuses():
    gate = Gate()
    b = Batcher(gate, max_batch_size=1, max_queue_delay_ms=0, name="m")
    b.start()
    pending = [asyncio.ensure_future(b.submit(_request(i))) for i in range(3)]
    await _wait_thread_event(gate.entered)
    stopping = asyncio.ensure_future(b.stop())
    await asyncio.sleep(0)
    with pytest.raises(ShuttingDown):
        await b.submit(_request(9))
    gate.release.set()
    outs = await asyncio.gather(*pending)
    await stopping
    assert [o["y"][0, 0] for o in outs] == [1, 101, 201]


async def test_idle_model_does_not_wait_for_company_that_is_not_coming():
    """A lone request on an idle model runs at once, even with a long max_queue_delay_ms."""
    b = Batcher(_double, max_batch_size=8, max_queue_delay_ms=60_000, name="t")
    b.start()
    out = await asyncio.wait_for(b.submit(_request(1)), timeout=10)  # would sit out the 60 s delay before
    await b.stop()
    np.testing.assert_array_equal(out["y"], _request(1)["x"] * 2)


async def test_under_load_the_next_batch_waits_for_company():
    """Requests that arrive while a batch runs mark the model as loaded: the next batch gathers for
    max_queue_delay_ms, so a request sent just after the running batch ends still joins it."""
    gate = Gate()
    b = Batcher(gate, max_batch_size=8, max_queue_delay_ms=60_000, name="t")
    b.start()
    first = asyncio.ensure_future(b.submit(_request(0)))
    await _wait_thread_event(gate.entered)
    second = asyncio.ensure_future(b.submit(_request(1)))  # arrives while the first batch runs
    await asyncio.sleep(0)
    gate.release.set()
    await first
    third = asyncio.ensure_future(b.submit(_request(2)))  # arrives after the first batch finished
    await asyncio.sleep(0.05)
    assert not second.done(), "the loaded batcher should still be gathering"
    stopping = asyncio.ensure_future(b.stop())  # closing flushes what was gathered
    await asyncio.wait_for(asyncio.gather(second, third, stopping), timeout=10)
    assert [len(batch) for batch in gate.batches] == [1, 2]


async def test_cheap_batches_run_on_the_loop_and_costly_ones_on_the_worker_thread():
    from concurrent.futures import ThreadPoolExecutor

    loop_thread = threading.get_ident()
    seen: list[tuple[bool, int]] = []  # (ran on the loop thread, rows)
    cost = {"per_row_s": 0.0}

    def run(inputs):
        time.sleep(cost["per_row_s"] * len(inputs["x"]))  # stands in for the model's work
        seen.append((threading.get_ident() == loop_thread, len(inputs["x"])))
        return _double(inputs)

    executor = ThreadPoolExecutor(1)
    # The threshold and the costs are far apart, so a loaded machine's scheduling delays (tens of ms) can't
    # move a batch across it.
    b = Batcher(run, max_batch_size=8, executor=executor, inline_below_ms=250.0)
    b.start()
    try:
        await b.submit(_request(0))  # no estimate yet: the worker thread
        await b.submit(_request(1))  # ~0 ms per row measured: on the loop
        cost["per_row_s"] = 0.2
        await b.submit(_request(2, rows=2))  # predicted cheap, so inline; measures 200 ms per row
        await b.submit(_request(3, rows=2))  # estimate now 400 ms for 2 rows: the worker thread
        off = Batcher(run, max_batch_size=8, executor=executor, inline_below_ms=0.0)
        off.start()
        cost["per_row_s"] = 0.0
        await off.submit(_request(4))
        await off.submit(_request(5))  # inline_below_ms 0: never on the loop
        await off.stop()
    finally:
        await b.stop()
        executor.shutdown()
    assert seen == [(False, 1), (True, 1), (True, 2), (False, 2), (False, 1), (False, 1)]


async def test_a_busy_event_loop_does_not_count_as_the_cost_of_a_worker_thread_batch():
    """A worker-thread batch is timed where it runs: the loop being busy when it finishes (other requests)
    is not the batch's cost, else one busy moment would keep cheap batches off the loop for good."""
    from concurrent.futures import ThreadPoolExecutor

    loop_thread = threading.get_ident()
    on_loop: list[bool] = []
    started = threading.Event()

    def run(inputs):
        started.set()
        on_loop.append(threading.get_ident() == loop_thread)
        return _double(inputs)  # ~0 ms

    executor = ThreadPoolExecutor(1)
    # The threshold and the costs are far apart, so a loaded machine's scheduling delays (tens of ms) can't
    # move a batch across it.
    b = Batcher(run, max_batch_size=8, executor=executor, inline_below_ms=250.0)
    b.start()
    try:
        first = asyncio.ensure_future(b.submit(_request(0)))  # no estimate yet: the worker thread
        while not started.is_set():
            await asyncio.sleep(0)
        time.sleep(0.05)  # the loop is busy for 50 ms while the batch finishes on the worker
        await first
        await b.submit(_request(1))  # the batch took ~0 ms, so the next one runs on the loop
    finally:
        await b.stop()
        executor.shutdown()
    assert on_loop == [False, True]


async def test_under_load_a_batch_cheap_enough_to_run_inline_does_not_wait_for_company():
    from concurrent.futures import ThreadPoolExecutor

    def run(inputs):
        time.sleep(0.005 * len(inputs["x"]))  # ~5 ms per row: costly next to nothing, cheap next to 60 s
        return _double(inputs)

    executor = ThreadPoolExecutor(1)
    b = Batcher(run, max_batch_size=8, max_queue_delay_ms=60_000, executor=executor, inline_below_ms=50.0)
    b.start()
    try:
        first = asyncio.ensure_future(b.submit(_request(0)))  # no estimate yet: the worker thread
        await asyncio.sleep(0.001)
        second = asyncio.ensure_future(b.submit(_request(1)))  # arrives while it runs: the model is loaded
        await asyncio.wait_for(asyncio.gather(first, second), timeout=10)  # gathering would sit out 60 s
    finally:
        await b.stop()
        executor.shutdown()


def _slow(seconds: float):
    def fn(inputs):
        time.sleep(seconds)  # a batch costs at least this: the predicted waits below are lower bounds
        return _double(inputs)

    return fn


async def _learn_cost(b: Batcher, batches: int) -> None:
    for i in range(batches):  # one at a time: the batcher's cost per row converges on the sleep
        await b.submit(_request(i))


async def test_a_request_predicted_to_wait_past_the_queue_budget_is_refused_at_once():
    b = Batcher(_slow(0.05), max_batch_size=1, max_queue_delay_ms=0, max_queue_wait_ms=100, name="m")
    b.start()
    await _learn_cost(b, 12)  # >= 0.05 * (1 - 0.8**11) = 46 ms per row
    outcomes = await asyncio.gather(*(b.submit(_request(i)) for i in range(10)), return_exceptions=True)
    assert not isinstance(outcomes[0], Exception)  # nothing ahead of it: admitted
    refused = [o for o in outcomes if isinstance(o, Exception)]
    assert len(refused) >= 7  # the third waits >= 3 x 46 ms > 100 ms, and so on
    for error in refused:
        assert isinstance(error, Overloaded) and error.status == 429 and "max_queue_wait_ms 100" in error.message
        assert int(error.headers["Retry-After"]) >= 1
    assert b.depth == 0
    await b.stop()


async def test_the_default_queue_budget_adapts_to_the_model():
    """Unset, the budget is AUTO_WAIT_ROWS rows' worth of the recent cost per row: a slow model's burst is
    admitted up to 1.5 rows ahead and the rest refused; a fast model's burst stays under the floor, all
    admitted."""
    from deepserve.serve.batcher import AUTO_WAIT_ROWS

    slow = Batcher(_slow(0.05), max_batch_size=1, max_queue_delay_ms=0, max_queue_wait_ms=None, name="m")
    slow.start()
    await _learn_cost(slow, 12)
    outcomes = await asyncio.gather(*(slow.submit(_request(i)) for i in range(10)), return_exceptions=True)
    refused = [o for o in outcomes if isinstance(o, Exception)]
    assert AUTO_WAIT_ROWS == 1.5 and len(refused) == 8  # waits of 0 and 1 rows admitted, 2-9 refused
    assert all(isinstance(e, Overloaded) and "adaptive" in e.message for e in refused)
    await slow.stop()
    fast = Batcher(_double, max_batch_size=8, max_queue_delay_ms=0, max_queue_wait_ms=None, name="m")
    fast.start()
    await _learn_cost(fast, 4)
    outcomes = await asyncio.gather(*(fast.submit(_request(i)) for i in range(64)), return_exceptions=True)
    assert not [o for o in outcomes if isinstance(o, Exception)]
    await fast.stop()


async def test_one_stalled_batch_does_not_shed_a_fast_models_burst_but_a_sustained_rise_does():
    """A batch that waited behind a process-wide stall (a full collection holding the GIL right after a load) is
    timed at the stall's length: for a tiny model, thousands of its rows. The burst after it is admitted; a
    model that stays slow is still learned, and its burst shed."""
    sleeps = [0.0, 0.0, 0.0, 0.08]  # the warm-up, two batches at the model's cost (microseconds), one stalled 80 ms

    def fn(inputs):
        time.sleep(sleeps.pop(0) if sleeps else 0.005)  # then a sustained 5 ms per batch
        return _double(inputs)

    b = Batcher(fn, max_batch_size=32, max_queue_delay_ms=0, max_queue_wait_ms=None, name="m")
    b.start()
    await _learn_cost(b, 4)
    outcomes = await asyncio.gather(*(b.submit(_request(i)) for i in range(12)), return_exceptions=True)
    assert not [o for o in outcomes if isinstance(o, Exception)], outcomes  # was: 8 of 12 refused (429)
    await _learn_cost(b, 80)
    outcomes = await asyncio.gather(*(b.submit(_request(i)) for i in range(12)), return_exceptions=True)
    assert all(isinstance(o, Overloaded) for o in outcomes[6:]), outcomes  # 5 ms a row: 15 ms is 3 rows ahead
    await b.stop()


async def test_a_request_predicted_to_finish_past_its_deadline_is_refused_not_timed_out():
    b = Batcher(_slow(0.05), max_batch_size=1, max_queue_delay_ms=0, name="m")  # no queue budget
    b.start()
    await _learn_cost(b, 12)
    queued = [asyncio.ensure_future(b.submit(_request(i))) for i in range(5)]
    await asyncio.sleep(0)
    with pytest.raises(Overloaded, match="past its deadline"):  # >= 6 x 46 ms ahead, 100 ms to go
        await b.submit(_request(9), deadline=time.monotonic() + 0.1)
    await asyncio.gather(*queued)
    await b.stop()


async def test_a_request_that_can_never_fit_the_queue_is_413_naming_the_limit():
    b = Batcher(_double, max_batch_size=2, max_queue_size=3, name="m")
    b.start()
    with pytest.raises(PayloadTooLarge, match="max_queue_size 3") as refused:  # 4 batches of 2 > 3 entries
        await b.submit(_request(0, rows=7))
    assert refused.value.status == 413 and "at most 6 rows" in refused.value.message
    assert len((await b.submit(_request(0, rows=6)))["y"]) == 6  # what fits is served
    await b.stop()
