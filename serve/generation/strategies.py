"""How tokens are chosen: greedy and sampling row-wise over the whole batch (``greedy_tokens``, ``sample_tokens``),
beam search per request (``BeamSearch.select``, vectorised over requests by ``select_many``). Greedy and sampled
rows keep their places; a beam step returns, for each next beam, the row (within the request's block) it continues.
Row-wise selection is numerically row-independent: a row's result never depends on the other rows, which is what
makes batched and lone results identical."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from deepserve.serve.generation.params import GenerationParams


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of (R, V) float32."""
    z = x - x.max(axis=1, keepdims=True)
    z -= np.log(np.exp(z).sum(axis=1, keepdims=True))  # in place: the same arithmetic, one (R, V) array fewer
    return z


def greedy_tokens(logits: np.ndarray) -> np.ndarray:
    """(R, V) -> (R,) int64, the first maximum of each row."""
    return logits.argmax(axis=1)


def _inverse_cdf(probs: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Index of the first cumulative probability >= (1 - u) * total, per row; (1 - u) in (0, 1] never picks a
    zero-probability token."""
    cdf = np.cumsum(probs, axis=1)
    threshold = (1.0 - u)[:, None] * cdf[:, -1:]
    return np.minimum((cdf < threshold).sum(axis=1), probs.shape[1] - 1)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def sample_tokens(logits: np.ndarray, temperature: np.ndarray, top_k: np.ndarray, top_p: np.ndarray,
                  u: np.ndarray) -> np.ndarray:
    """Sample one token per row with its own temperature / top-k / top-p and uniform draw ``u`` in [0, 1).

    Rows with filtering go through a sorted path, the others through a plain softmax: each row's arithmetic
    depends only on its own settings, never on which other rows share the batch."""
    x = logits / temperature[:, None].astype(np.float32)
    filtered = (top_k > 0) | (top_p < 1.0)
    n_filtered = int(np.count_nonzero(filtered))
    if n_filtered == len(x):  # the usual batch: every row filters
        return _sample_filtered(x, top_k, top_p, u)
    if n_filtered == 0:
        return _inverse_cdf(_softmax(x), u)
    out = np.empty(len(x), np.int64)
    plain = np.flatnonzero(~filtered)
    out[plain] = _inverse_cdf(_softmax(x[plain]), u[plain])
    idx = np.flatnonzero(filtered)
    out[idx] = _sample_filtered(x[idx], top_k[idx], top_p[idx], u[idx])
    return out


def _sample_filtered(x: np.ndarray, top_k: np.ndarray, top_p: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Top-k / top-p sampling of scaled logits ``x`` (R, V). Sorted descending (ties by lower id), the tokens
    both filters keep are a prefix of each row, so one cumulative sum of the unnormalised probabilities
    answers everything: how long the prefix is and where the draw lands in it."""
    R, V = x.shape
    order = np.argsort(-x, axis=1, kind="stable")  # (R, V)
    rows = np.arange(R)
    xs = x[rows[:, None], order]
    e = np.exp(xs - xs[:, :1])  # the first is the maximum
    c = np.cumsum(e, axis=1)
    k = np.where(top_k > 0, np.minimum(top_k, V), V)  # top-k prefix length
    # nucleus: keep a token while the mass before it (within the top-k) is under top_p; the first is always kept
    before = (c - e) / c[rows, k - 1][:, None]
    keep = np.minimum(k, (before < top_p[:, None]).sum(axis=1))
    threshold = (1.0 - u) * c[rows, keep - 1]  # (1 - u) in (0, 1]: never a token past the kept prefix
    pick = np.minimum((c < threshold[:, None]).sum(axis=1), keep - 1)
    return order[rows, pick]


def top_candidates(cand: np.ndarray, m: int) -> np.ndarray:
    """Indices of the ``m`` largest of ``cand`` (1-D), best first, ties by lower index (NaN ranks with -inf).
    For beam widths up to 8, m argmax passes (~20 us for 4,000 candidates) beat a partition and a sort (~40 us);
    either way a tie at the m-th place keeps the lower index, where a partition alone keeps any of them."""
    if m > 16:  # wide beams
        return np.argsort(-cand, kind="stable")[:m]
    work = np.fmax(cand, -np.inf)  # a copy with NaN as -inf: the picks overwrite it
    top = np.empty(m, np.int64)
    for i in range(m):
        f = work.argmax()
        top[i] = f
        work[f] = -np.inf
    return top


class Sampling:
    """A sampling request's settings and its own generator (one uniform per row per step); the scheduler samples
    every sampled row of the batch at once with ``sample_tokens``."""

    def __init__(self, params: GenerationParams) -> None:
        self.rng = np.random.Generator(np.random.PCG64(params.seed))
        self.temperature, self.top_k, self.top_p = params.temperature, params.top_k, params.top_p


@dataclass
class Hypothesis:
    tokens: list[int]
    score: float
    """Length-penalised: sum of log-probs / generated_length ** length_penalty."""
    finish_reason: str
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None


@dataclass
class BeamSearch:
    """Beam search as a flattened top-k over (live beams x vocab), with Hugging Face's BeamHypotheses rules:
    the 2 x num_beams best candidates are scanned in order; an EOS (or stop-string) candidate ranked below
    num_beams is dropped, one ranked within becomes a finished hypothesis; the others fill the next beams.
    The generated length in the length penalty counts the EOS token. Beams start as one row and widen as
    candidates allow (no duplicate dummy beams)."""

    num_beams: int
    max_new_tokens: int
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    eos_id: int | None = None
    logprobs: int | None = None
    ends_with_stop: Callable[[list[int]], bool] | None = None
    """Given a candidate sequence, whether it completes a stop string (only when the request has stops)."""
    rows: int = 1
    done: bool = False
    seqs: np.ndarray = field(init=False)  # (rows, t) generated tokens of the live beams
    scores: np.ndarray = field(init=False)  # (rows,) sum of log-probs
    hyps: list[Hypothesis] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.seqs = np.zeros((1, 0), np.int64)
        self.scores = np.zeros(1, np.float64)
        self.token_lp = np.zeros((1, 0), np.float64)
        self.top_lp: list[list[list[tuple[int, float]]]] = [[]]

    @property
    def generated(self) -> int:
        return self.seqs.shape[1]

    def _penalised(self, sum_logprobs: float, length: int) -> float:
        return sum_logprobs / (length ** self.length_penalty)

    def _worst(self) -> float:
        return min(h.score for h in self.hyps)

    def _add(self, tokens: list[int], sum_logprobs: float, length: int, reason: str, beam: int,
             lp: float | None, tops: list[tuple[int, float]] | None) -> None:
        score = self._penalised(sum_logprobs, length)
        if len(self.hyps) >= self.num_beams and score <= self._worst():
            return
        hyp = Hypothesis(tokens, score, reason)
        if self.logprobs is not None:
            hyp.logprobs = self.token_lp[beam].tolist() + ([lp] if lp is not None else [])
            hyp.top_logprobs = list(self.top_lp[beam]) + ([tops] if tops is not None else [])
        self.hyps.append(hyp)
        if len(self.hyps) > self.num_beams:
            self.hyps.remove(min(self.hyps, key=lambda h: h.score))

    def _is_done(self, best_sum: float, length: int) -> bool:
        if len(self.hyps) < self.num_beams:
            return False
        if self.early_stopping is True:
            return True
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            best = self._penalised(best_sum, self.max_new_tokens)  # the best a live beam could reach at the end
        else:
            best = self._penalised(best_sum, length)
        return self._worst() >= best

    def select(self, scores: np.ndarray, model_lp: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """scores: log-probs (rows, V) after processors, which rank the candidates; ``model_lp``: the model's own
        log-probs before them (what logprobs report, as for greedy and sampling; default ``scores``). Returns
        the next beams' tokens and parents; sets ``done`` (then ``rows`` is 0) when the search is over."""
        lps = scores if model_lp is None else model_lp
        cand = (self.scores[:, None] + scores).ravel()  # (k*V,)
        top = top_candidates(cand, min(2 * self.num_beams, cand.size))  # by score, ties by (beam, token) order
        length = self.generated + 1  # generated tokens including this one
        parents, tokens, sums = self._scan(cand, top, lps, length)
        if self.logprobs is not None:
            self.token_lp = np.concatenate([self.token_lp[parents], lps[parents, tokens][:, None]], axis=1)
            self.top_lp = [self.top_lp[b] + [_tops(lps[b], self.logprobs)] for b in parents.tolist()]
        self._after_step(parents, tokens, sums, float(cand[top[0]]) if len(top) else -np.inf)
        return tokens, parents

    def _scan(self, cand: np.ndarray, top: np.ndarray, lps: np.ndarray, length: int) -> tuple[np.ndarray, ...]:
        """Walk the ranked candidates ``top`` (flat indices into ``cand``, (beams x V)): an ending one ranked within
        num_beams becomes a hypothesis, the others fill the next beams: their parents, tokens and sums."""
        V = lps.shape[1]
        picked: list[tuple[int, int, float]] = []  # (parent beam, token, sum of log-probs)
        for rank, f in enumerate(top.tolist()):
            s = float(cand[f])
            if not s > -np.inf:  # -inf (a blocked token) or NaN: no candidates left
                break
            beam, tok = divmod(f, V)
            ended = tok == self.eos_id
            reason = "eos"
            if not ended and self.ends_with_stop is not None:
                ended = self.ends_with_stop(self.seqs[beam].tolist() + [tok])
                reason = "stop"
            if ended:
                if rank >= self.num_beams:
                    continue
                tokens = self.seqs[beam].tolist() + ([] if reason == "eos" else [tok])
                lp = float(lps[beam, tok]) if self.logprobs is not None and reason == "stop" else None
                tops = _tops(lps[beam], self.logprobs) if lp is not None else None
                self._add(tokens, s, length, reason, beam, lp, tops)
            else:
                picked.append((beam, tok, s))
                if len(picked) == self.num_beams:
                    break
        parents, tokens, sums = zip(*picked) if picked else ((), (), ())
        return np.asarray(parents, np.int64), np.asarray(tokens, np.int64), np.asarray(sums, np.float64)

    def _after_step(self, parents: np.ndarray, tokens: np.ndarray, sums: np.ndarray, best_sum: float) -> None:
        """Extend the chosen next beams; the search is done when none is left, when they cannot beat the finished
        hypotheses, or at max_new_tokens (then the live beams compete as they are)."""
        self.seqs = np.concatenate([self.seqs[parents], tokens[:, None]], axis=1)
        self.scores = sums
        length = self.seqs.shape[1]
        if not len(tokens) or self._is_done(best_sum, length):
            self.done = True
        elif length >= self.max_new_tokens:
            for b in range(len(tokens)):
                self._add(self.seqs[b].tolist(), float(sums[b]), length, "length", b, None, None)
            self.done = True
        self.rows = 0 if self.done else len(tokens)

    @staticmethod
    def select_many(beams: list[BeamSearch], scores: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """``select`` for J requests at once: scores (J, k, V) log-probs, every request with k = num_beams live
        beams, no stop strings and no logprobs. Requests whose top k candidates hold an EOS go through
        ``select``; the others take the top k directly: the same arithmetic and tie-breaks as ``select``."""
        J, k, V = scores.shape
        sums = np.stack([b.scores for b in beams])  # (J,k)
        cand = (sums[:, :, None] + scores).reshape(J, k * V)  # a fresh array: the picks below overwrite it
        # the k best candidates in order, ties by (beam, token) order as in ``select`` (``top_candidates``), by k
        # argmax passes over all requests at once: a partition of the whole (J, k*V) array costs ~5x more. A
        # request left with fewer than k finite candidates (or with NaN) has a non-finite pick: ``select`` takes it
        rows = np.arange(J)
        if k > 8:  # wide beams: one request at a time
            top = np.stack([top_candidates(c, k) for c in cand])
            vals = np.take_along_axis(cand, top, axis=1)
        else:
            top = np.empty((J, k), np.int64)
            vals = np.empty((J, k), cand.dtype)
            for i in range(k):
                f = cand.argmax(axis=1)
                top[:, i] = f
                vals[:, i] = cand[rows, f]
                cand[rows, f] = -np.inf
        parents, tokens = np.divmod(top, V)
        eos = beams[0].eos_id
        slow = (tokens == eos).any(axis=1) | ~np.isfinite(vals[:, :k]).all(axis=1) if eos is not None \
            else ~np.isfinite(vals[:, :k]).all(axis=1)
        out = []
        for j, beam in enumerate(beams):
            if slow[j]:
                out.append(beam.select(scores[j]))
            else:
                beam._after_step(parents[j], tokens[j], vals[j, :k].astype(np.float64), float(vals[j, 0]))
                out.append((tokens[j], parents[j]))
        return out

    def best(self, n: int) -> list[Hypothesis]:
        """The n best finished hypotheses, best first."""
        return sorted(self.hyps, key=lambda h: -h.score)[:n]

    def live_sequences(self) -> list[list[int]]:
        return self.seqs.tolist()


def _tops(logprobs_row: np.ndarray, n: int | None) -> list[tuple[int, float]]:
    if not n:
        return []
    idx = np.argpartition(-logprobs_row, n - 1)[:n]
    idx = idx[np.argsort(-logprobs_row[idx], kind="stable")]
    return [(int(i), float(logprobs_row[i])) for i in idx]
