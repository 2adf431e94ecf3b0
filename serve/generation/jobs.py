"""One generation request inside the scheduler: its sequences, text bookkeeping and the events it sends back
to the asyncio side (text deltas while streaming, then the result or an error)."""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable

import numpy as np

from deepserve.serve.generation.params import GenerationParams, MinNewTokens, Processor
from deepserve.serve.generation.strategies import BeamSearch, Sampling, _tops
from deepserve.serve.generation.tokenizers import CharTokenizer, Tokenizer, stable_text

_ids = itertools.count()


@dataclass
class Output:
    """One returned sequence."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str  # length | eos | stop
    score: float | None = None  # Beam search: the length-penalised hypothesis score.
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None

    def token_logprobs(self) -> TokenLogprobs | None:
        """The tokens that carry logprobs (an EOS that ended the sequence does not), with theirs; None if off."""
        if self.logprobs is None:
            return None
        return TokenLogprobs(self.token_ids[: len(self.logprobs)], self.logprobs, self.top_logprobs or [])


@dataclass
class TokenLogprobs:
    """Streamed with a text delta when logprobs were asked for: the tokens generated since the last event."""

    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]
    """Per token, the k most likely (id, logprob) pairs (empty lists for logprobs=0)."""


@dataclass
class Result:
    outputs: list[Output]
    prompt_tokens: int

    @property
    def completion_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)


class SeqState:
    """A greedy or sampled sequence (one batch row while it runs)."""

    __slots__ = ("index", "tokens", "text", "emitted", "finish_reason", "logprobs", "top_logprobs", "lp_sent")

    def __init__(self, index: int, want_logprobs: bool) -> None:
        self.index = index
        self.tokens: list[int] = []
        self.text = ""
        self.emitted = 0
        self.finish_reason: str | None = None
        self.logprobs: list[float] | None = [] if want_logprobs else None
        self.top_logprobs: list[list[tuple[int, float]]] | None = [] if want_logprobs else None
        self.lp_sent = 0  # Streaming: how many of ``logprobs`` were already sent.


def find_stop(text: str, stops: list[str], start: int) -> int:
    """Position of the earliest stop string starting at or after ``start`` (-1 if none)."""
    hits = [p for p in (text.find(s, start) for s in stops) if p >= 0]
    return min(hits) if hits else -1


def holdback(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of ``text`` that could begin a stop string (not yet safe to stream)."""
    longest = min(max((len(s) for s in stops), default=1) - 1, len(text))
    for n in range(longest, 0, -1):
        tail = text[-n:]
        if any(s.startswith(tail) for s in stops):
            return n
    return 0


@dataclass(frozen=True)
class StopMatcher:
    """Beam candidates: whether a sequence's last token completes one of ``stops`` (from ``min_new_tokens`` on).
    Given to the request's ``BeamSearch`` when both are built, so neither refers to the other."""

    tokenizer: Tokenizer
    stops: list[str]
    min_new_tokens: int

    def __call__(self, tokens: list[int]) -> bool:
        if len(tokens) < max(1, self.min_new_tokens):
            return False
        text = stable_text(self.tokenizer, tokens)
        prev = stable_text(self.tokenizer, tokens[:-1])
        width = max(len(s) for s in self.stops)
        return find_stop(text, self.stops, max(0, len(prev) - width + 1)) >= 0


class Job:
    """A request: parameters, prompt ids, strategy, and a queue of events for the asyncio side."""

    def __init__(self, params: GenerationParams, prompt_ids: list[int], max_new_tokens: int, *,
                 strategy: BeamSearch | Sampling | None, processors: list[Processor], tokenizer: Tokenizer,
                 stream: bool, deadline: float, loop: asyncio.AbstractEventLoop | None,
                 history_includes_prompt: bool) -> None:
        self.id, self.params, self.prompt_ids, self.max_new_tokens = next(_ids), params, prompt_ids, max_new_tokens
        self.strategy, self.processors, self.tokenizer = strategy, processors, tokenizer
        self.needs_history = any(p.needs_history for p in processors)
        self.history_prefix = prompt_ids if history_includes_prompt else []
        self.stream, self.deadline, self.loop = stream, deadline, loop
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.cancelled = self.finished = False
        self.stops = params.stop
        self.track_text = stream or bool(self.stops)
        self.is_beam = isinstance(strategy, BeamSearch)
        self.plain = not self.is_beam and not self.stops and params.logprobs is None and \
            all(isinstance(p, MinNewTokens) for p in processors) and (not stream or isinstance(tokenizer, CharTokenizer))
        """Row strategy with nothing to do per token but keep it (and stream its character-level piece): the scheduler
        keeps its tokens in a ``TokenLog``, streams the pieces and blocks EOS below min_new_tokens for all such rows
        at once (``StepPlan.process``), and touches the request only when it ends (length or EOS)."""
        self.col0 = 0  # Plain requests: the ``TokenLog`` column of the first generated token.
        self.reserve = params.rows  # while running (beam search starts narrower but may widen to num_beams)
        n = 1 if self.is_beam else params.num_return_sequences
        want_lp = params.logprobs is not None
        self.seqs = [SeqState(i, want_lp) for i in range(n)]
        self.live: list[SeqState] = list(self.seqs) if not self.is_beam else []
        """Row strategies: the sequence behind each of the request's rows, in row order."""
        self.row_seqs: list[SeqState] = []  # Row strategies: ``live`` as it was at the start of the current step.
        self.beam_out: tuple = ()  # Beam search: (parents, tokens) of the current step.
        self.slots = np.zeros(1, np.int64)  # Beam search: each beam's row within the request's block, in beam order.
        self.generated, self.streamed_beam_text = 0, ""
        self.t_submit = time.perf_counter()
        self.t_first: float | None = None
        self.start = 0  # First row of the request in the running batch.

    @property
    def rows(self) -> int:
        return self.strategy.rows if self.is_beam else len(self.live)

    def beam_rows(self) -> np.ndarray:
        """Beam search: the batch row of each beam, in beam order."""
        return self.start + self.slots

    # ---- one step ------------------------------------------------------------------------------------------

    def apply_processors(self, scores: np.ndarray) -> np.ndarray:
        """The request's logit processors on its rows' ``scores`` (in place, returned), before this step's token."""
        hist = self.histories() if self.needs_history else []
        for p in self.processors:
            p(scores, hist, self.generated)
        return scores

    def advance(self, chosen: np.ndarray, raw_lp: np.ndarray | None, eos: int | None, char_level: bool) -> list[Event]:
        """A greedy / sampled request's step: row r of its block (from ``start``) took ``chosen[start + r]``.
        Sets ``row_seqs`` (the rows as they were) and ``live`` (those still going); returns the stream's events."""
        events: list[Event] = []
        self.row_seqs = list(self.live)
        for r, seq in enumerate(self.row_seqs):
            tok = int(chosen[self.start + r])
            if raw_lp is not None:
                if tok != eos:
                    seq.logprobs.append(float(raw_lp[r, tok]))
                    seq.top_logprobs.append(_tops(raw_lp[r], self.params.logprobs))
            if tok == eos:
                seq.finish_reason = "eos"
            else:
                seq.tokens.append(tok)
                if self.track_text:
                    self.update_text(seq, tok, char_level)
                if seq.finish_reason is None and self.generated >= self.max_new_tokens:
                    seq.finish_reason = "length"
            if self.stream:
                text = self.delta(seq)
                lp = self.logprob_delta(seq)  # None unless logprobs were asked for
                if text or seq.finish_reason or lp is not None:
                    extra = {"finish_reason": seq.finish_reason}
                    if lp is not None:
                        extra["logprobs"] = lp
                    events.append(Event(EventKind.DELTA, index=seq.index, text=text, extra=extra))
        self.live = [s for s in self.row_seqs if s.finish_reason is None]
        return events

    def take_log(self, log: TokenLog, col: int) -> None:
        """A plain request leaving the scheduler's token log: its rows' tokens of the columns before ``col``."""
        for r, seq in enumerate(self.live):
            seq.tokens.extend(log.tokens(self.start + r, self.col0, col))
            if self.stream:  # the pieces streamed from the log so far are its text, all sent
                seq.text = self.tokenizer.decode(seq.tokens)
                seq.emitted = len(seq.text)
        self.generated = col - self.col0

    # ---- text ----------------------------------------------------------------------------------------------

    def update_text(self, seq: SeqState, token: int, char_level: bool) -> None:
        """Advance ``seq.text``; on a stop string cut it there and mark the sequence finished."""
        before = len(seq.text)
        if char_level:
            seq.text += self.tokenizer.decode([token])
        else:
            seq.text = stable_text(self.tokenizer, seq.tokens)
        if self.stops and self.generated >= self.params.min_new_tokens:
            width = max(len(s) for s in self.stops)
            pos = find_stop(seq.text, self.stops, max(0, before - width + 1))
            if pos >= 0:
                seq.text = seq.text[:pos]
                seq.finish_reason = "stop"

    def delta(self, seq: SeqState) -> str:
        """Streamable new text of ``seq`` (all of it once finished)."""
        end = len(seq.text) if seq.finish_reason else len(seq.text) - holdback(seq.text, self.stops)
        if end <= seq.emitted:
            return ""
        out = seq.text[seq.emitted:end]
        seq.emitted = end
        return out

    def logprob_delta(self, seq: SeqState) -> TokenLogprobs | None:
        """Streaming with logprobs: the tokens of ``seq`` not sent yet, with their logprobs (None if none)."""
        if seq.logprobs is None or seq.lp_sent >= len(seq.logprobs):
            return None
        a, b = seq.lp_sent, len(seq.logprobs)
        seq.lp_sent = b
        return TokenLogprobs(seq.tokens[a:b], seq.logprobs[a:b], (seq.top_logprobs or [])[a:b])

    def final_logprobs(self, out: Output) -> TokenLogprobs | None:
        """Streaming with logprobs, once the result is known: what output ``out`` still owes (beam search:
        all of it, as hypotheses only settle at the end)."""
        if out.logprobs is None or self.is_beam:
            return out.token_logprobs()
        return self.logprob_delta(self.seqs[out.index])

    def beam_delta(self) -> str:
        """Beam search: new text of the prefix every live beam and every kept hypothesis shares."""
        beam = self.strategy
        assert isinstance(beam, BeamSearch)
        seqs = beam.live_sequences() + [h.tokens for h in beam.hyps]
        if not seqs:
            return ""
        text = stable_text(self.tokenizer, os.path.commonprefix(seqs))  # any sequences, not only paths
        if self.stops:
            text = text[: len(text) - holdback(text, self.stops)]
            pos = find_stop(text, self.stops, 0) if self.generated >= self.params.min_new_tokens else -1
            text = text[:pos] if pos >= 0 else text
        if len(text) <= len(self.streamed_beam_text) or not text.startswith(self.streamed_beam_text):
            return ""
        out = text[len(self.streamed_beam_text):]
        self.streamed_beam_text = text
        return out

    # ---- results -------------------------------------------------------------------------------------------

    def result(self) -> Result:
        outs: list[Output] = []
        if self.is_beam:
            beam = self.strategy
            assert isinstance(beam, BeamSearch)
            for i, h in enumerate(beam.best(self.params.num_return_sequences)):
                text = self.tokenizer.decode(h.tokens)
                if h.finish_reason == "stop":
                    pos = find_stop(text, self.stops, 0)
                    text = text[:pos] if pos >= 0 else text
                outs.append(Output(i, text, h.tokens, h.finish_reason, h.score, h.logprobs, h.top_logprobs))
        else:
            for seq in self.seqs:
                text = seq.text if seq.finish_reason == "stop" else self.tokenizer.decode(seq.tokens)
                outs.append(Output(seq.index, text, seq.tokens, seq.finish_reason or "length", None,
                                   seq.logprobs, seq.top_logprobs))
        return Result(outs, len(self.prompt_ids))

    def histories(self) -> list[list[int]]:
        """Token history of each row (for processors that need it)."""
        if self.is_beam:
            beam = self.strategy
            assert isinstance(beam, BeamSearch)
            return [self.history_prefix + s for s in beam.live_sequences()]
        return [self.history_prefix + s.tokens for s in self.live]

    def remaining_text(self, index: int, text: str) -> str:
        """What a stream still owes for output ``index`` once the final text is known."""
        sent = self.streamed_beam_text if self.is_beam else self.seqs[index].text[: self.seqs[index].emitted]
        # the streamed text is a prefix of the final text by construction (hold-back of stop prefixes and of
        # half characters); should a tokenizer break that, the client still gets everything after it
        return text[len(sent):]


class TokenLog:
    """Each row's token of every step, a (rows, steps) array in batch order: one column write per step. Columns
    are absolute steps offset by ``base``; those no running request needs are dropped when the array fills."""

    def __init__(self, width: int = 64) -> None:
        self.data = np.zeros((0, width), np.int64)  # (B, W)
        self.base = 0  # Absolute column of ``data[:, 0]``.
        self.col = 0  # Absolute column of the next step.

    def write(self, chosen: np.ndarray, oldest: Callable[[], int]) -> None:
        """Store this step's tokens (B,) in column ``col`` and advance; ``oldest()`` is the first column any
        running request still needs (asked only when the array is full)."""
        c = self.col - self.base
        if c >= self.data.shape[1]:
            drop = min(oldest(), self.col) - self.base
            kept = self.data[:, drop:c]
            width = max(self.data.shape[1], 2 * kept.shape[1])
            self.data = np.zeros((len(self.data), width), np.int64)
            self.data[:, : kept.shape[1]] = kept
            self.base += drop
            c -= drop
        self.data[:, c] = chosen
        self.col += 1

    def tokens(self, row: int, col0: int, col: int) -> list[int]:
        """Row ``row``'s tokens of columns [col0, col)."""
        return self.data[row, col0 - self.base: col - self.base].tolist()

    def add_rows(self, n: int) -> None:
        self.data = np.concatenate([self.data, np.zeros((n, self.data.shape[1]), np.int64)])

    def reorder(self, index: np.ndarray) -> None:
        self.data = self.data[index]


class EventKind(str, Enum):
    """An ``Event``: streamed text (``DELTA``; index -1: the prefix every beam shares), the result (``DONE``), a
    failure (``ERROR``), or the engine's deadline timer (``TIMEOUT``); equal to its string value."""

    DELTA, DONE, ERROR, TIMEOUT = "delta", "done", "error", "timeout"


@dataclass
class Event:
    kind: EventKind
    index: int = 0
    text: str = ""
    result: Result | None = None
    error: Exception | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def deliver(outbox: list[tuple[Job, Event]]) -> None:
    """Hand events to each request's event loop (from the scheduler thread): one thread-safe call per loop."""
    if not outbox:
        return
    by_loop: dict[asyncio.AbstractEventLoop | None, list[tuple[Job, Event]]] = {}
    for job, event in outbox:
        by_loop.setdefault(job.loop, []).append((job, event))
    for loop, items in by_loop.items():
        if loop is None:
            _put_all(items)
        else:
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that loop is closed: nobody is listening any more
                pass


def _put_all(items: list[tuple[Job, Event]]) -> None:
    for job, event in items:
        job.events.put_nowait(event)
