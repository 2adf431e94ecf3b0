"""``GenerationServable``: a char-LM or seq2seq artifact behind a continuous-batching scheduler. Routes ``submit``
text and parameters (validated, tokenized, queued as a ``Job``), then ``wait`` for the result or read its
``events``; ``cancel`` frees a job's rows at the next step."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, AsyncIterator

from deepserve.generation import GenerationParams as BaseParams
from deepserve.manifest import Manifest
from deepserve.serve import backends
from deepserve.serve.errors import DeadlineExceeded, NotReady
from deepserve.serve.generation.jobs import Event, EventKind, Job, Result, StopMatcher
from deepserve.serve.generation.params import GenerationParams, InvalidParameter, Limits, build_processors, check
from deepserve.serve.generation.scheduler import Scheduler
from deepserve.serve.generation.step_models import StepModel, open_step_model
from deepserve.serve.generation.strategies import BeamSearch, Sampling
from deepserve.serve.generation.tokenizers import Tokenizer, load_tokenizer
from deepserve.serve.servable import Servable


class GenerationServable(Servable):
    """One char-lm / seq2seq model version. ``step_model`` and ``tokenizer`` may be given ready-made (tests
    with toy models); otherwise ``start`` opens them from the artifact."""

    def __init__(self, manifest: Manifest, directory: Path, settings: Any, device: str, *,
                 step_model: StepModel | None = None, tokenizer: Tokenizer | None = None) -> None:
        self.manifest, self.directory, self.settings, self.device = manifest, Path(directory), settings, device
        self.ready = False
        self.reason: str | None = "not started"
        self.model, self.tokenizer = step_model, tokenizer
        self.scheduler: Scheduler | None = None
        self.is_seq2seq = manifest.task == "seq2seq"
        self.limits = Limits(
            max_prompt_length=min(settings.max_prompt_length,
                                  int(manifest.limits.get("max_source_length") or settings.max_prompt_length))
            if self.is_seq2seq else settings.max_prompt_length,
            max_new_tokens=settings.max_new_tokens, max_beams_x_n=settings.max_beams_x_n,
            max_running_rows=settings.max_running_rows)

    # ---- Servable ------------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self.manifest.task not in ("char-lm", "seq2seq"):
            raise ValueError(f"task {self.manifest.task!r} is not a generation task")
        if self.tokenizer is None:
            self.tokenizer = await asyncio.to_thread(load_tokenizer, self.manifest, self.directory)
        if self.model is None:
            self.model = await asyncio.to_thread(
                open_step_model, self.manifest, self.directory, backend=self.settings.backend, device=self.device,
                precision=getattr(self.settings, "precision", "fp32"), threads=backends.cpu_threads(1))
        self.scheduler = Scheduler(self.model, self.tokenizer, max_running_rows=self.settings.max_running_rows,
                                   max_waiting=self.settings.max_waiting, name=self.manifest.name,
                                   version=str(self.manifest.version))
        self.scheduler.start()
        self.reason = "warming up"

    async def warmup(self) -> None:
        """Greedy and beam search once each, so the first request pays for nothing."""
        n = min(2, self.limits.max_new_tokens)
        await self.generate("a", GenerationParams(max_new_tokens=n, temperature=0.0), ready_check=False)
        if self.limits.max_beams_x_n >= 2 and self.limits.max_running_rows >= 2:
            await self.generate("a", GenerationParams(max_new_tokens=n, num_beams=2), ready_check=False)
        self.ready, self.reason = True, None

    async def stop(self) -> None:
        self.ready, self.reason = False, "stopped"
        if self.scheduler is not None and self.scheduler.thread is not None:
            self.scheduler.close()
            await asyncio.to_thread(self.scheduler.thread.join)

    @property
    def platform(self) -> str:
        return self.model.platform if self.model is not None else "deepserve"

    def metadata(self) -> dict[str, Any]:
        return {"name": self.manifest.name, "versions": [str(self.manifest.version)], "platform": self.platform,
                "inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1]}],
                "outputs": [{"name": "text_output", "datatype": "BYTES", "shape": [-1]}],
                "parameters": {"task": self.manifest.task, "endpoints": ["generate", "generate_stream"]}}

    # ---- requests ------------------------------------------------------------------------------------------

    def encode_prompt(self, text: str) -> list[int]:
        tok = self.tokenizer
        assert tok is not None
        ids = tok.encode(text)
        if not ids and self.is_seq2seq:  # nothing to attend to: the encoder output would be empty
            raise InvalidParameter.of("prompt", "must have at least one token for a seq2seq model", text)
        if not ids:  # a language model needs a first token to condition on
            start = tok.encode("\n")
            ids = start if start and start[0] != tok.unk_id else [tok.unk_id]
        self.limits.check_prompt(len(ids), "prompt")
        return ids

    def make_strategy(self, params: GenerationParams, max_new: int) -> BeamSearch | Sampling | None:
        """The request's beam search or sampler; None for greedy decoding (an argmax needs no state)."""
        if params.strategy == "beam":
            stops = StopMatcher(self.tokenizer, params.stop, params.min_new_tokens) if params.stop else None
            return BeamSearch(num_beams=params.num_beams, max_new_tokens=max_new,
                              length_penalty=params.length_penalty, early_stopping=params.early_stopping,
                              eos_id=self.model.eos_id, logprobs=params.logprobs, ends_with_stop=stops)
        return Sampling(params) if params.strategy == "sample" else None

    def submit(self, text: str, params: GenerationParams | dict | None, *, stream: bool = False,
               timeout_s: float | None = None, deadline: float | None = None, ready_check: bool = True) -> Job:
        """Validate, tokenize and queue one request. Raises ``BadRequest`` / ``Overloaded`` / ``NotReady``.
        ``deadline`` (``time.monotonic()``) wins over ``timeout_s``, which wins over the model's setting."""
        if ready_check and not self.ready:
            raise NotReady(f"model {self.manifest.name!r} is not ready: {self.reason}")
        if self.scheduler is None or self.model is None:
            raise NotReady(f"model {self.manifest.name!r} is not started")
        check(isinstance(text, str), "prompt", "must be a string", type(text).__name__)
        if not isinstance(params, BaseParams):  # the SDK's GenerateParams is one too
            params = GenerationParams.from_dict(params)
        max_new = self.limits.apply(params)
        if deadline is None:
            deadline = time.monotonic() + (timeout_s if timeout_s is not None else self.settings.request_timeout_s)
        self.scheduler.admit(params.rows, max_new, deadline)
        job = Job(params, self.encode_prompt(text), max_new, strategy=self.make_strategy(params, max_new),
                  processors=build_processors(params, self.model.eos_id), tokenizer=self.tokenizer,
                  stream=stream, deadline=deadline, loop=asyncio.get_running_loop(),
                  history_includes_prompt=not self.is_seq2seq)
        self.scheduler.submit(job)
        return job

    def check_admission(self) -> None:
        """Refuse (429 + Retry-After, 503 when closing) before the body is read when a typical request would be:
        under overload most refusals then cost no body parsing."""
        if self.scheduler is not None:
            self.scheduler.refuse_if_full()

    def cancel(self, job: Job) -> None:
        if self.scheduler is not None and not job.finished:
            self.scheduler.cancel(job)

    async def event_batches(self, job: Job) -> AsyncIterator[list[Event]]:
        """A job's events until ``done``, all that are ready each time (one write: a loop that fell behind catches
        up); errors raise. Leaving early, or the deadline passing (plus a grace second), cancels the job. One
        timer per request, not a ``wait_for`` (a task) per event: 32 streams make thousands of events a second."""
        timer = _deadline_timer(job)
        queue = job.events
        try:
            while True:
                batch = [await queue.get()]
                while not queue.empty() and batch[-1].kind == EventKind.DELTA:
                    batch.append(queue.get_nowait())
                last = batch[-1]
                if last.kind in (EventKind.TIMEOUT, EventKind.ERROR) and len(batch) > 1:
                    yield batch[:-1]  # the text before the error still goes out
                result = _result(last)
                yield batch
                if result is not None:
                    return
        finally:
            timer.cancel()
            if not job.finished:
                self.cancel(job)

    async def wait(self, job: Job) -> Result:
        """The job's result (errors raise; a stream's deltas are passed over): ``get`` under the deadline timer,
        without the async generator of ``event_batches``."""
        timer = _deadline_timer(job)
        result = None
        try:
            while result is None:
                result = _result(await job.events.get())
        finally:  # also when the caller is cancelled (client gone): the job's rows are freed next step
            timer.cancel()
            if not job.finished:
                self.cancel(job)
        return result

    async def generate(self, text: str, params: GenerationParams | dict | None = None, *,
                       timeout_s: float | None = None, ready_check: bool = True) -> Result:
        job = self.submit(text, params, timeout_s=timeout_s, ready_check=ready_check)
        return await self.wait(job)


def _deadline_timer(job: Job) -> asyncio.TimerHandle:
    """The engine's own deadline for a waiting caller: a ``timeout`` event a grace second after the job's
    deadline (the scheduler normally reports it itself, between steps), for a job it dropped or never saw."""
    return asyncio.get_running_loop().call_later(max(0.0, job.deadline - time.monotonic()) + 1.0,
                                                 job.events.put_nowait, Event(EventKind.TIMEOUT))


def _result(event: Event) -> Result | None:
    """The result a ``done`` event carries, None for a delta; raises the error a failed request ends with."""
    if event.kind == EventKind.TIMEOUT:
        raise DeadlineExceeded("the request's deadline passed during generation")
    if event.kind == EventKind.ERROR:
        assert event.error is not None
        raise event.error
    return event.result
