"""The running batch's rows in one step: how each row's token is chosen (``StepPlan``: logit processors, one
argmax for the greedy rows, one vectorised draw for the sampled ones, one selection per beam width) and where
each row goes next (``RowMoves``). The scheduler owns the requests; this module only sees their rows."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from deepserve.serve.generation.jobs import Job
from deepserve.serve.generation.strategies import BeamSearch, Sampling, greedy_tokens, log_softmax, sample_tokens


@dataclass
class StepPlan:
    """How this step picks each running row's token: the rows by strategy, and the requests it must visit.
    Rebuilt only when the batch changes."""

    greedy: slice | np.ndarray  # Rows chosen by argmax (``slice(None)`` when that is every row).
    starts: list[int]  # Each running request's first row, in order (to find the request behind a row).
    sample: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # sampled rows; their settings:
    temperature: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    top_k: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    top_p: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    samplers: list[Job] = field(default_factory=list)
    """The sampling requests, in row order (each draws its rows' uniforms from its own generator)."""
    beams: list[Job] = field(default_factory=list)  # Beam requests selected one at a time.
    beam_groups: dict[int, list[Job]] = field(default_factory=dict)  # Those selected together, by width.
    processed: list[Job] = field(default_factory=list)  # Row requests with logit processors.
    with_logprobs: list[Job] = field(default_factory=list)  # Row requests that return logprobs.
    visited: list[Job] = field(default_factory=list)  # requests looked at every step (all but ``Job.plain`` ones)
    streamed: list[tuple[Job, int]] = field(default_factory=list)  # streaming plain rows: (request, output index)
    stream_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    early: tuple = ()  # plain rows with min_new_tokens: (rows, log column from which EOS may come, EOS id)

    @classmethod
    def of(cls, running: list[Job], rows: int) -> StepPlan:
        """Group the running requests' rows (``rows`` in all) by how their tokens are chosen."""
        sampled = [j for j in running if isinstance(j.strategy, Sampling)]
        greedy = [r for j in running if j.strategy is None for r in range(j.start, j.start + j.rows)]

        def per_row(name: str, dtype: type) -> np.ndarray:
            return np.repeat(np.asarray([getattr(j.strategy, name) for j in sampled], dtype), [j.rows for j in sampled])

        row_jobs = [j for j in running if not j.is_beam]
        together = [j for j in running if j.is_beam and j.strategy.rows == j.params.num_beams and not j.needs_history
                    and not j.stops and j.params.logprobs is None]  # full width (a width change rebuilds the plan)
        mins = [(r, j.col0 + p.min_new_tokens, p.eos_id) for j in row_jobs if j.plain for p in j.processors
                for r in range(j.start, j.start + j.rows)]
        return cls(greedy=slice(None) if len(greedy) == rows else np.asarray(greedy, np.int64),
            starts=[j.start for j in running],
            sample=np.asarray([r for j in sampled for r in range(j.start, j.start + j.rows)], np.int64),
            temperature=per_row("temperature", np.float32), top_k=per_row("top_k", np.int64),
            top_p=per_row("top_p", np.float64), samplers=sampled,
            beams=[j for j in running if j.is_beam and j not in together],
            beam_groups={k: [j for j in together if j.params.num_beams == k]
                         for k in dict.fromkeys(j.params.num_beams for j in together)},
            processed=[j for j in row_jobs if j.processors and not j.plain],
            early=(*(np.asarray(a, np.int64) for a in list(zip(*mins))[:2]), mins[0][2]) if mins else (),
            with_logprobs=[j for j in row_jobs if j.params.logprobs is not None],
            visited=[j for j in running if not j.plain],
            streamed=[(j, s.index) for j in running if j.plain and j.stream for s in j.live],
            stream_rows=np.asarray([r for j in running if j.plain and j.stream for r in range(j.start, j.start + j.rows)],
                                   np.int64))

    def process(self, logits: np.ndarray, col: int) -> dict[int, np.ndarray]:
        """Row requests' logprobs (the model's distribution, before the processors, for every strategy: see
        ``GenerationParams.logprobs``) and their logit processors, applied to their blocks in place; plain rows
        below min_new_tokens at log column ``col`` (``early``) get EOS blocked in one write."""
        if self.early:
            logits[self.early[0][self.early[1] > col], self.early[2]] = -np.inf
        raw_lp = {j.id: log_softmax(logits[j.start: j.start + j.rows]) for j in self.with_logprobs}
        for j in self.processed:
            j.apply_processors(logits[j.start: j.start + j.rows])
        return raw_lp

    def select(self, logits: np.ndarray) -> np.ndarray:
        """Every greedy row in one argmax, every sampled row in one vectorised draw (beams: ``select_beams``
        and the scheduler's ``_beam_step``, which move rows)."""
        if isinstance(self.greedy, slice):  # every row greedy: one argmax, no scatter
            return greedy_tokens(logits)
        chosen = np.full(len(logits), -1, np.int64)  # beam rows keep -1: no token (EOS included) of their own
        if len(self.greedy):
            chosen[self.greedy] = greedy_tokens(logits[self.greedy])
        if len(self.sample):
            u = np.concatenate([j.strategy.rng.random(j.rows) for j in self.samplers])  # a uniform per row
            chosen[self.sample] = sample_tokens(logits[self.sample], self.temperature, self.top_k, self.top_p, u)
        return chosen

    def select_beams(self, logits: np.ndarray) -> None:
        """Each beam request's next beams (``Job.beam_out``): one ``select_many`` per width for ``beam_groups``, the
        others one at a time; processors rank the candidates, logprobs report the model's own distribution."""
        for k, jobs in self.beam_groups.items():
            rows = jobs[0].beam_rows() if len(jobs) == 1 else np.concatenate([j.beam_rows() for j in jobs])
            scores = log_softmax(logits[rows]).reshape(len(jobs), k, -1)
            for j, block in zip(jobs, scores):
                j.apply_processors(block)
            for j, (toks, parents) in zip(jobs, BeamSearch.select_many([j.strategy for j in jobs], scores)):
                j.beam_out = (parents, toks)
        for j in self.beams:
            model_lp = log_softmax(logits[j.beam_rows()])
            scores = j.apply_processors(model_lp.copy() if j.params.logprobs is not None else model_lp)
            toks, parents = j.strategy.select(scores, model_lp)
            j.beam_out = (parents, toks)


def place_beams(slots: np.ndarray, parents: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Rows (within the block) of the next beams, children of ``parents`` of the beams in rows ``slots``, and per row
    the row it continues (None: none moves). Only a parent's extra children move (a row copy each); the beams'
    order, which breaks score ties, does not depend on where they live."""
    src = slots[parents].tolist()
    if len(src) != len(slots):  # a new width: rows in beam order
        return np.arange(len(src)), np.asarray(src, np.int64)
    spare = sorted(set(range(len(src))) - set(src))  # rows whose beam has no child
    rows = np.asarray([s if src.index(s) == b else spare.pop(0) for b, s in enumerate(src)], np.int64)
    source = np.empty_like(rows)
    source[rows] = src
    return rows, source if len(set(src)) < len(src) else None


class RowMoves:
    """Where this step's rows go: runs of rows that stay in place, cut only by requests that moved (beams, finished
    ones), so a step where nothing leaves builds no index at all."""

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.index: list[np.ndarray] = []
        self.tokens: list[np.ndarray] = []
        self.run_start = 0  # First row of the current run of unchanged rows.
        self.moved = False
        self.regroup = False
        """Whether a request left or changed width (requests are renumbered, the model regroups its sources)."""
        self.new_tokens = rows

    def move(self, start: int, end: int, kept: tuple[np.ndarray, np.ndarray] | None, chosen: np.ndarray) -> None:
        """Rows [start, end) changed: close the run before them, then keep ``kept`` (rows, tokens) if any."""
        self.moved = True
        if self.run_start < start:
            self.index.append(np.arange(self.run_start, start))
            self.tokens.append(chosen[self.run_start:start])
        self.run_start = end
        if kept is not None:
            self.index.append(kept[0])
            self.tokens.append(kept[1])

    def finish(self, chosen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The index of the rows kept, in their new order, and their next tokens."""
        if self.run_start < self.rows:
            self.move(self.rows, self.rows, None, chosen)
        if not self.index:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(self.index), np.concatenate(self.tokens)

