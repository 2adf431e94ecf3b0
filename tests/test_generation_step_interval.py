"""The server's own inter-token time: the step-interval histogram the scheduler keeps, and how the tail benchmark
reads quantiles out of it."""

from __future__ import annotations

import time

from prometheus_client import REGISTRY

from benchmarks.tail import histogram_ms
from deepserve.serve.generation.jobs import Job
from deepserve.serve.generation.params import GenerationParams
from deepserve.serve.generation.scheduler import Scheduler
from deepserve.serve.generation.tokenizers import CharTokenizer
from tests.test_generation_decoding import VOCAB, TableModel


def test_every_interval_between_two_steps_with_running_rows_is_observed_once():
    sched = Scheduler(TableModel(vocab_size=4, eos_id=None, seed=1), CharTokenizer(VOCAB), max_running_rows=4,
                      max_waiting=4, name="interval-test")
    labels = {"model": "interval-test", "version": "1"}
    job = Job(GenerationParams(temperature=0, max_new_tokens=6), [1, 2], 6, strategy=None, processors=[],
              tokenizer=sched.tokenizer, stream=False, deadline=time.monotonic() + 60, loop=None,
              history_includes_prompt=True)
    sched.submit(job)
    while not job.finished:
        sched.iteration()
    sched.iteration()  # idle: nothing runs, nothing observed
    count = REGISTRY.get_sample_value("deepserve_generation_step_interval_seconds_count", labels)
    assert count == sched.steps - 1 == 5
    assert REGISTRY.get_sample_value("deepserve_generation_step_interval_seconds_sum", labels) > 0


def test_histogram_quantiles_interpolate_within_a_bucket_between_two_reads():
    before = {0.001: 10.0, 0.002: 10.0, 0.004: 10.0, float("inf"): 10.0}
    after = {0.001: 60.0, 0.002: 108.0, 0.004: 110.0, float("inf"): 110.0}  # 50, 48 and 2 new observations
    q = histogram_ms(before, after)
    assert q["p50"] == 1.0  # the 50th of 100 is the last of the first bucket
    assert abs(q["p99"] - (2.0 + 2.0 * (99 - 98) / 2)) < 1e-9  # the 99th: half-way through the (2, 4] ms bucket
    assert histogram_ms(after, after) == {"p50": None, "p99": None}  # nothing observed between the reads
