"""Decoding, parameters and continuous batching on toy step models whose logits the tests control."""

from __future__ import annotations

import asyncio
import itertools
import math
import threading
import time
from contextlib import aclosing
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pytest

from deepserve.manifest import GraphSpec, KVUpdate, Manifest, StepGraphContract, TensorSpec
from deepserve.serve.errors import BadRequest, DeadlineExceeded, InferenceFailed, Overloaded
from deepserve.serve.generation.batch import StepPlan
from deepserve.serve.generation.engine import GenerationServable
from deepserve.serve.generation.jobs import Event, Job
from deepserve.serve.generation.params import GenerationParams, Limits
from deepserve.serve.generation.scheduler import PREFILL_HOLD, Scheduler
from deepserve.serve.generation.seq2seq_step import Seq2SeqStepModel
from deepserve.serve.generation.step_models import MAX_CHUNK, CharLMStepModel, Graph, StepModel
from deepserve.serve.generation.strategies import BeamSearch, log_softmax, sample_tokens
from deepserve.serve.generation.tokenizers import CharTokenizer

# ---------------------------------------------------------------------------------------------- toy models


class TableModel(StepModel):
    """Logits are a fixed pseudo-random function of a row's whole history (prompt + fed tokens), so beams
    matter and every result can be recomputed by brute force. ``gate``, when set, blocks each step until the
    test releases it."""

    def __init__(self, vocab_size: int = 4, eos_id: int | None = 3, scale: float = 2.0, seed: int = 0) -> None:
        self.vocab_size, self.eos_id, self.scale, self.seed = vocab_size, eos_id, scale, seed
        self.histories: list[tuple[int, ...]] = []
        self.rows = 0
        self.gate: threading.Semaphore | None = None

    def logits_for(self, history: tuple[int, ...]) -> np.ndarray:
        rng = np.random.default_rng([self.seed, len(history), *history])
        return (self.scale * rng.standard_normal(self.vocab_size)).astype(np.float32)

    def join(self, prompts: list[list[int]], copies: list[int]) -> np.ndarray:
        first = []
        for p, c in zip(prompts, copies):
            for _ in range(c):
                self.histories.append(tuple(p[:-1]))
                first.append(p[-1])
        self.rows = len(self.histories)
        return np.asarray(first, np.int64)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        if self.gate is not None:
            self.gate.acquire()
        self.histories = [h + (int(t),) for h, t in zip(self.histories, tokens)]
        return np.stack([self.logits_for(h) for h in self.histories]) if self.histories else \
            np.zeros((0, self.vocab_size), np.float32)

    def reorder(self, index: np.ndarray, regroup: bool = True) -> None:
        self.histories = [self.histories[i] for i in index]
        self.rows = len(self.histories)


VOCAB = ["<unk>", "a", "b", "c"]  # with TableModel(eos_id=3), id 3 is EOS


def toy_settings(**kw) -> SimpleNamespace:
    base = dict(max_running_rows=64, max_waiting=256, max_prompt_length=64, max_new_tokens=64, max_beams_x_n=16,
                request_timeout_s=30.0, backend="auto", precision="fp32")
    return SimpleNamespace(**{**base, **kw})


def toy_manifest(task: str = "char-lm") -> Manifest:
    spec = GraphSpec(inputs=(TensorSpec("tokens", "int64", ("batch", "time")),),
                     outputs=(TensorSpec("logits", "float32", ("batch", "time", 4)),), files={"onnx": "x.onnx"})
    graphs = {"step": spec} if task == "char-lm" else {"encode": spec, "decode_step": spec}
    return Manifest(name="toy", version=1, task=task, graphs=graphs, files={"x.onnx": "0"},
                    tokenizer={"type": "char", "file": "vocab.json"})


async def started(model: StepModel, vocab=VOCAB, task: str = "char-lm", **settings) -> GenerationServable:
    s = GenerationServable(toy_manifest(task), "/nonexistent", toy_settings(**settings), "cpu", step_model=model,
                           tokenizer=CharTokenizer(vocab))
    await s.start()
    s.ready = True  # no warmup: tests count steps and rows exactly
    return s


def run(coro):
    return asyncio.run(coro)


async def events(s: GenerationServable, job):
    """``s.event_batches(job)`` one event at a time (closing this closes that at once: the job is cancelled)."""
    async with aclosing(s.event_batches(job)) as batches:
        async for batch in batches:
            for event in batch:
                yield event


# ---------------------------------------------------------------------------------------------- parameters


@pytest.mark.parametrize("field, value", [
    ("max_new_tokens", 0), ("max_new_tokens", "10"), ("min_new_tokens", -1), ("temperature", -0.5),
    ("temperature", True), ("top_k", -3), ("top_k", 1.5), ("top_p", 0.0), ("top_p", 1.5),
    ("repetition_penalty", 0.0), ("no_repeat_ngram_size", -1), ("seed", -7), ("seed", "abc"), ("stop", [""]),
    ("stop", 5), ("num_beams", 0), ("length_penalty", "long"), ("early_stopping", "sometimes"),
    ("num_return_sequences", 0), ("logprobs", 9), ("logprobs", "yes"),
])
def test_every_parameter_error_names_its_field_and_value(field, value):
    with pytest.raises(BadRequest) as err:
        GenerationParams.from_dict({field: value})
    assert err.value.message.startswith(field) and repr(value) in err.value.message, err.value.message


def test_parameter_combinations_and_caps_name_the_field():
    with pytest.raises(BadRequest, match="^num_return_sequences .*num_beams"):
        GenerationParams(num_beams=2, num_return_sequences=3)
    with pytest.raises(BadRequest, match="^num_return_sequences .*greedy"):
        GenerationParams(temperature=0, num_return_sequences=2)
    with pytest.raises(BadRequest, match="^min_new_tokens"):
        GenerationParams(max_new_tokens=2, min_new_tokens=5)
    with pytest.raises(BadRequest, match="unknown parameter.*'topk'"):
        GenerationParams.from_dict({"topk": 3})
    limits = Limits(max_prompt_length=8, max_new_tokens=32, max_beams_x_n=8, max_running_rows=64)
    with pytest.raises(BadRequest, match="^max_new_tokens .*cap of 32.*33"):
        limits.apply(GenerationParams(max_new_tokens=33))
    with pytest.raises(BadRequest, match="^num_beams .*max_beams_x_n=8"):
        limits.apply(GenerationParams(num_beams=4, num_return_sequences=3))
    with pytest.raises(BadRequest, match="^prompt .*max_prompt_length=8"):
        limits.check_prompt(9)
    assert limits.apply(GenerationParams()) == 32  # the default is lowered to the cap


def test_one_declaration_gives_the_checks_the_schemas_and_the_error_data():
    """The request schemas carry the bounds the server enforces, renamed for OpenAI; errors carry the parameter
    as data; the SDK's GenerateParams is the same declaration, keyword-only."""
    from deepserve.clients import GenerateParams
    from deepserve.serve.generation.params import InvalidParameter
    from deepserve.serve.generation.schemas import COMPLETION_FIELDS, generate_request_schema

    declared = generate_request_schema()["properties"]["parameters"]["anyOf"][0]["properties"]
    assert declared["top_p"]["exclusiveMinimum"] == 0 and declared["top_p"]["maximum"] == 1
    assert declared["repetition_penalty"]["exclusiveMinimum"] == 0 and declared["temperature"]["maximum"] == 100
    assert COMPLETION_FIELDS["max_tokens"]["anyOf"][0]["minimum"] == 1 and COMPLETION_FIELDS["max_tokens"]["default"] == 16
    assert COMPLETION_FIELDS["top_k"]["anyOf"][0]["minimum"] == -1
    for name, too_low in (("top_p", 0.0), ("repetition_penalty", 0), ("temperature", -1), ("num_beams", 0)):
        bound = declared[name].get("minimum", declared[name].get("exclusiveMinimum"))
        assert too_low <= bound
        with pytest.raises(InvalidParameter) as err:
            GenerationParams.from_dict({name: too_low})
        assert (err.value.parameter, err.value.error.value, err.value.status) == (name, too_low, 400)
    assert GenerateParams is not GenerationParams and issubclass(GenerationParams, GenerateParams)
    with pytest.raises(TypeError):
        GenerateParams(64)  # keyword-only
    assert GenerateParams(num_beams=4, stop="x").changed() == {"num_beams": 4, "stop": ["x"]}


def test_defaults_do_not_depend_on_a_parameters_object():
    assert GenerationParams.from_dict(None) == GenerationParams.from_dict({}) == GenerationParams()
    assert GenerationParams(stop="x").stop == ["x"] and GenerationParams(logprobs=True).logprobs == 0


# ---------------------------------------------------------------------------------------------- beam search


def drive_beam(model: TableModel, prompt: tuple[int, ...], beam: BeamSearch) -> None:
    """Run a BeamSearch directly against the toy model's logits (the history includes the fed tokens)."""
    seqs = [()]
    while not beam.done:
        logits = np.stack([model.logits_for(prompt + s) for s in seqs])
        toks, parents = beam.select(log_softmax(logits))
        seqs = [seqs[p] + (int(t),) for p, t in zip(parents, toks)]


def exhaustive(model: TableModel, prompt: tuple[int, ...], max_len: int, length_penalty: float):
    """Every finished sequence (EOS at any step, or max_len tokens) with its score, best first."""
    V, eos = model.vocab_size, model.eos_id
    out = []
    for L in range(1, max_len + 1):
        for seq in itertools.product(range(V), repeat=L):
            if eos in seq[:-1] or (L < max_len and seq[-1] != eos):
                continue
            lp = sum(float(log_softmax(model.logits_for(prompt + seq[:i])[None])[0, t]) for i, t in enumerate(seq))
            tokens = list(seq[:-1]) if seq[-1] == eos else list(seq)
            out.append((lp / L ** length_penalty, tokens))
    return sorted(out, key=lambda x: -x[0])


@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0])
def test_wide_beam_finds_the_exhaustive_optimum_and_n_best_order(length_penalty):
    model, prompt, L = TableModel(vocab_size=4, eos_id=3, seed=1), (1,), 3
    beam = BeamSearch(num_beams=4 ** L, max_new_tokens=L, length_penalty=length_penalty, eos_id=3)
    drive_beam(model, prompt, beam)
    truth = exhaustive(model, prompt, L, length_penalty)
    got = beam.best(10)
    assert [h.tokens for h in got] == [t for _, t in truth[:10]]
    np.testing.assert_allclose([h.score for h in got], [s for s, _ in truth[:10]], rtol=1e-5)


def test_wide_beam_through_the_engine_returns_the_same_n_best():
    model = TableModel(vocab_size=4, eos_id=3, seed=2)

    async def main():
        s = await started(model, max_beams_x_n=1024, max_running_rows=64)
        try:
            return await s.generate("a", GenerationParams(num_beams=64, num_return_sequences=5, max_new_tokens=3))
        finally:
            await s.stop()

    result = run(main())
    truth = exhaustive_from_first(model, 1, 3)  # prompt "a" (id 1) is the first token fed
    assert [o.token_ids for o in result.outputs] == [t for _, t in truth[:5]]
    assert [o.finish_reason for o in result.outputs] == ["length" if len(t) == 3 else "eos" for _, t in truth[:5]]


def exhaustive_from_first(model: TableModel, first: int, max_len: int):
    """``exhaustive`` for a char-LM prompt of one token: the first logits come after feeding it."""
    V, eos = model.vocab_size, model.eos_id
    out = []
    for L in range(1, max_len + 1):
        for seq in itertools.product(range(V), repeat=L):
            if eos in seq[:-1] or (L < max_len and seq[-1] != eos):
                continue
            fed = (first,) + seq
            lp = sum(float(log_softmax(model.logits_for(fed[: i + 1])[None])[0, t]) for i, t in enumerate(seq))
            out.append((lp / L, list(seq[:-1]) if seq[-1] == eos else list(seq)))
    return sorted(out, key=lambda x: -x[0])


def greedy_reference(model: TableModel, prompt: tuple[int, ...], max_len: int) -> list[int]:
    seq: tuple[int, ...] = ()
    for _ in range(max_len):
        t = int(model.logits_for(prompt + seq).argmax())
        if t == model.eos_id:
            break
        seq += (t,)
    return list(seq)


@pytest.mark.parametrize("seed,k", [(0, 4), (1, 4), (2, 2), (3, 12)])
def test_batched_beam_selection_equals_one_request_at_a_time(seed, k):
    """``select_many`` (the scheduler's path for full-width beams) picks exactly what ``select`` picks one request at
    a time, with or without a stop check (one that never matches here), ties (coarse logits tie often, also at
    the k-th place), -inf scores and EOS candidates included."""
    rng = np.random.default_rng(seed)
    J, V, eos = 12, 7, 3

    def fresh() -> list[BeamSearch]:
        beams = []
        for j in range(J):
            b = BeamSearch(num_beams=k, max_new_tokens=50, eos_id=eos)
            b.seqs, b.scores, b.rows = np.full((k, 2), j, np.int64), np.round(rng.normal(size=k), 1), k
            beams.append(b)
        return beams

    for _ in range(20):
        state = rng.bit_generator.state
        scan = fresh()
        for b in scan:
            b.ends_with_stop = lambda seq: False
        rng.bit_generator.state = state
        alone = fresh()
        rng.bit_generator.state = state
        batched = fresh()
        scores = np.round(rng.normal(size=(J, k, V)), 1).astype(np.float32)  # coarse: many ties
        scores[rng.random((J, k, V)) < 0.1] = -np.inf
        scores[:, :, eos] -= 3.0  # EOS in some requests' top k only
        expected = [b.select(scores[j]) for j, b in enumerate(scan)]
        for got, beams in (([b.select(scores[j]) for j, b in enumerate(alone)], alone),
                           (BeamSearch.select_many(batched, scores), batched)):
            for (et, ep), (gt, gp), a, b in zip(expected, got, scan, beams):
                assert et.tolist() == gt.tolist() and ep.tolist() == gp.tolist()
                assert a.seqs.tolist() == b.seqs.tolist() and a.scores.tolist() == b.scores.tolist()
                assert a.done == b.done
                assert [(h.tokens, h.score) for h in a.hyps] == [(h.tokens, h.score) for h in b.hyps]


@pytest.mark.parametrize("seed", range(4))
def test_beam_of_one_equals_greedy(seed):
    model = TableModel(vocab_size=5, eos_id=4, seed=seed, scale=1.0)
    beam = BeamSearch(num_beams=1, max_new_tokens=8, eos_id=4)
    drive_beam(model, (1, 2), beam)
    assert beam.best(1)[0].tokens == greedy_reference(model, (1, 2), 8)


def test_early_stopping_true_stops_once_enough_hypotheses_finished():
    model = TableModel(vocab_size=4, eos_id=3, seed=3, scale=0.5)
    eager = BeamSearch(num_beams=2, max_new_tokens=30, eos_id=3, early_stopping=True)
    never = BeamSearch(num_beams=2, max_new_tokens=30, eos_id=3, early_stopping="never")
    drive_beam(model, (1,), eager)
    drive_beam(model, (1,), never)
    assert len(eager.hyps) == 2 and eager.generated <= never.generated
    assert never.best(1)[0].score >= eager.best(1)[0].score


# ---------------------------------------------------------------------------------------------- seq2seq state


def toy_seq2seq_graphs(seen: list[int], kv_update: KVUpdate = KVUpdate.CONCAT) -> tuple[Graph, Graph]:
    """encode: cross K = the source ids; decode_step under the shared-cross contract (B = N * G rows, row b
    reads source b // G): logits put 1 on the row's source's first id plus its cache length, so a row that read
    the wrong source, or lost its cache, picks the wrong token. ``seen`` records N of every decode call. The
    step returns the new K/V (``KVUpdate.SLOT``) or the grown caches (``CONCAT``)."""

    def encode(src, src_pad):
        k = src.astype(np.float32)[:, None, :, None]  # (N,1,S,1)
        return [np.zeros((*src.shape, 1), np.float32), k, k.copy()]

    def decode(tokens, positions, src_pad, past_pad, cross_k, cross_v, past_k, past_v):
        B, N = len(tokens), len(cross_k)
        assert B % N == 0 and src_pad.shape == cross_k.shape[::2][:2]
        seen.append(N)
        first = cross_k[np.arange(B) // (B // N), 0, 0, 0].astype(np.int64)  # (B,)
        logits = np.zeros((B, 64), np.float32)
        logits[np.arange(B), first + (~past_pad).sum(1)] = 1.0
        new = tokens.astype(np.float32)[:, None, :, None]  # (B,1,1,1)
        if kv_update is KVUpdate.SLOT:
            return [logits, new, new.copy()]
        return [logits, np.concatenate([past_k, new], 2), np.concatenate([past_v, new], 2)]

    cross, kind = ["cross_k_0", "cross_v_0"], "new" if kv_update is KVUpdate.SLOT else "present"
    return (Graph(encode, ["memory", *cross], input_names=["src", "src_pad_mask"]),
            Graph(decode, ["logits", f"{kind}_k_0", f"{kind}_v_0"],
                  input_names=["tokens", "positions", "src_pad_mask", "past_pad_mask", *cross, "past_k_0", "past_v_0"]))


@pytest.mark.parametrize("kv_update", list(KVUpdate))
def test_seq2seq_rows_keep_reading_their_own_source_through_joins_and_reorders(kv_update):
    """The step runner keeps one cross K/V per source: rows of one source in equal contiguous groups feed it as
    is (N < B), other layouts a per-row copy, and joins, beam moves and leaving requests keep every row on its
    own source and cache."""
    seen: list[int] = []
    contract = StepGraphContract(layers=1, heads=1, head_dim=1, vocab_size=64, kv_update=kv_update)
    step = Seq2SeqStepModel(*toy_seq2seq_graphs(seen, kv_update), contract)
    tokens = step.join([[10, 5], [20, 6, 7]], [3, 3])  # two beam requests of 3 rows each
    assert step.step(tokens).argmax(1).tolist() == [10] * 3 + [20] * 3 and seen[-1] == 2
    assert step.step(np.arange(40, 46)).argmax(1).tolist() == [11] * 3 + [21] * 3
    step.reorder(np.asarray([2, 2, 0, 4, 3, 3]), regroup=False)  # beams follow their parents (in place)
    assert [x[:, 0, : step.fill, 0].tolist() for x in step.past] == [[[2, 42], [2, 42], [2, 40], [2, 44], [2, 43],
                                                                       [2, 43]]] * 2
    tokens = np.full(6, 7)
    assert step.step(tokens).argmax(1).tolist() == [12] * 3 + [22] * 3 and seen[-1] == 2
    tokens = np.concatenate([tokens, step.join([[30, 4]], [1])])  # a greedy request: uneven groups
    assert step.step(tokens).argmax(1).tolist() == [13] * 3 + [23] * 3 + [30] and seen[-1] == 7
    step.reorder(np.asarray([3, 4, 5, 6]), regroup=True)  # the first request leaves
    assert step.sources == 2 and step.step(tokens[:4]).argmax(1).tolist() == [24] * 3 + [31] and seen[-1] == 4
    step.reorder(np.asarray([3]), regroup=True)  # then the second: one row, one source
    assert step.sources == 1 and step.rows == 1
    assert step.step(tokens[:1]).argmax(1).tolist() == [32] and seen[-1] == 1
    assert [x.shape for x in step.cross] == [(1, 1, 2, 1)] * 2  # the source axis trimmed to what is left


# ---------------------------------------------------------------------------------------------- sampling


def test_top_k_one_sampling_equals_greedy_and_seeds_reproduce():
    model = TableModel(vocab_size=4, eos_id=None, seed=5, scale=1.0)

    async def main():
        s = await started(model)
        try:
            g = await s.generate("ab", {"temperature": 0, "max_new_tokens": 12})
            k1 = await s.generate("ab", {"temperature": 1.3, "top_k": 1, "seed": 9, "max_new_tokens": 12})
            a = await s.generate("ab", {"seed": 7, "max_new_tokens": 12, "num_return_sequences": 2})
            b = await s.generate("ab", {"seed": 7, "max_new_tokens": 12, "num_return_sequences": 2})
            c = await s.generate("ab", {"seed": 8, "max_new_tokens": 12, "num_return_sequences": 2})
            return g, k1, a, b, c
        finally:
            await s.stop()

    g, k1, a, b, c = run(main())
    assert k1.outputs[0].token_ids == g.outputs[0].token_ids == greedy_reference(model, (1, 2), 12)
    assert [o.text for o in a.outputs] == [o.text for o in b.outputs]
    assert [o.text for o in a.outputs] != [o.text for o in c.outputs]
    assert all(o.finish_reason == "length" and len(o.token_ids) == 12 for o in a.outputs)


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.8),
                                                       (1.3, 4, 0.9)])
def test_sampled_distribution_matches_the_model(temperature, top_k, top_p):
    logits = np.array([1.5, 0.2, -0.3, 1.1, 0.0, -1.0], np.float32)
    x = logits / temperature
    order = np.argsort(-x, kind="stable")
    keep = np.zeros_like(x, bool)
    keep[order[: top_k or len(x)]] = True
    p = np.where(keep, np.exp(x - x.max()), 0.0)
    p /= p.sum()
    mass = 0.0
    for i in order:  # nucleus: keep tokens until the mass before them reaches top_p
        if mass >= top_p:
            keep[i] = False
        mass += p[i]
    expected = np.where(keep, p, 0.0)
    expected /= expected.sum()
    n = 20000
    rng = np.random.Generator(np.random.PCG64(0))
    tokens = sample_tokens(np.tile(logits, (n, 1)), np.full(n, temperature, np.float32), np.full(n, top_k),
                           np.full(n, top_p), rng.random(n))
    counts = np.bincount(tokens, minlength=len(logits))
    assert np.all(counts[expected == 0] == 0)
    nz = expected > 0
    stat = float((((counts[nz] - n * expected[nz]) ** 2) / (n * expected[nz])).sum())
    dof = int(nz.sum()) - 1
    try:
        from scipy.stats import chi2

        critical = float(chi2.ppf(0.999, dof)) if dof > 0 else 0.0
    except ImportError:  # chi-square 0.999 quantiles for 0..5 degrees of freedom
        critical = [0.0, 10.83, 13.82, 16.27, 18.47, 20.52][dof]
    assert stat <= critical, (stat, critical, counts, expected)


def test_filtered_sampling_picks_what_a_row_by_row_reference_picks():
    """Mixed top-k / top-p / temperature rows in one batch: each pick is the reference's inverse-CDF pick."""
    rng = np.random.Generator(np.random.PCG64(7))
    n, V = 400, 50
    logits = rng.standard_normal((n, V)).astype(np.float32) * 3
    temperature = rng.uniform(0.3, 1.5, n).astype(np.float32)
    top_k = rng.choice([0, 1, 5, 20, 60], n)
    top_p = rng.choice([1.0, 0.9, 0.5, 0.01], n)
    top_p[top_k == 0] = np.minimum(top_p[top_k == 0], 0.9)  # every row filtered
    u = rng.random(n)
    got = sample_tokens(logits, temperature, top_k, top_p, u)
    for i in range(n):
        x = logits[i].astype(np.float64) / float(temperature[i])
        order = np.argsort(-x, kind="stable")[: top_k[i] or V]
        p = np.exp(x[order] - x[order[0]])
        p /= p.sum()
        kept = max(1, int(((np.cumsum(p) - p) < top_p[i]).sum()))
        q = np.cumsum(p[:kept])
        want = order[min(int((q < (1 - u[i]) * q[-1]).sum()), kept - 1)]
        assert got[i] == want, (i, top_k[i], top_p[i])


# ---------------------------------------------------------------------------------------------- batching


def test_continuous_batching_does_not_change_greedy_beam_or_seeded_results():
    model = TableModel(vocab_size=4, eos_id=3, seed=11, scale=1.5)
    probes = [("ab", {"temperature": 0, "max_new_tokens": 10}),
              ("ba", {"num_beams": 4, "num_return_sequences": 2, "max_new_tokens": 8}),
              ("a", {"seed": 3, "max_new_tokens": 10, "num_return_sequences": 2, "top_p": 0.9})]

    def others(i: int):
        kinds = [{"temperature": 0, "max_new_tokens": 3 + i % 7}, {"num_beams": 2, "max_new_tokens": 5},
                 {"seed": i, "max_new_tokens": 9, "top_k": 2}, {"temperature": 0.5, "max_new_tokens": 2}]
        return "abc"[: 1 + i % 3] * (1 + i % 4), kinds[i % 4]

    async def main():
        s = await started(model, max_running_rows=64)
        try:
            alone = [await s.generate(t, p) for t, p in probes]
            crowd = [s.generate(*others(i)) for i in range(31 - len(probes) + 1)]
            together = await asyncio.gather(*[s.generate(t, p) for t, p in probes], *crowd)
            staggered = []  # probes joining a batch already mid-way
            first = [asyncio.ensure_future(s.generate(*others(i))) for i in range(10)]
            await asyncio.sleep(0)
            staggered = await asyncio.gather(*[s.generate(t, p) for t, p in probes])
            await asyncio.gather(*first)
            return alone, together[: len(probes)], staggered
        finally:
            await s.stop()

    alone, together, staggered = run(main())
    key = [[(o.token_ids, o.finish_reason) for o in r.outputs] for r in alone]
    assert [[(o.token_ids, o.finish_reason) for o in r.outputs] for r in together] == key
    assert [[(o.token_ids, o.finish_reason) for o in r.outputs] for r in staggered] == key


@pytest.mark.parametrize("eos_id", [None, 3])
def test_requests_kept_in_the_token_log_match_their_lone_runs(eos_id):
    """Greedy and sampled requests without streaming, stops, logprobs or processors keep their tokens in the
    scheduler's per-step token log: long ones outgrow its first width while others join mid-way and leave,
    and rows that pick EOS leave the log for the general path; none of it changes a result."""
    model = TableModel(vocab_size=4, eos_id=eos_id, seed=7, scale=0.7)
    probes = [("ab", {"temperature": 0, "max_new_tokens": 150}),
              ("b", {"seed": 5, "max_new_tokens": 90, "num_return_sequences": 3}),
              ("ca", {"temperature": 0, "max_new_tokens": 1}),
              ("a", {"seed": 1, "max_new_tokens": 130, "top_k": 2}),
              ("bb", {"temperature": 0, "max_new_tokens": 70})]

    async def main():
        s = await started(model, max_new_tokens=300)
        try:
            alone = [await s.generate(t, p) for t, p in probes]
            sched = s.scheduler
            tasks = []
            for i, (t, p) in enumerate(probes):  # join a batch that is already 25 steps further each time
                tasks.append(asyncio.ensure_future(s.generate(t, p)))
                steps = sched.steps + 25
                await asyncio.sleep(0)
                await asyncio.to_thread(sched.wait_until, lambda: sched.steps >= steps or not sched.running, 10)
            return alone, await asyncio.gather(*tasks)
        finally:
            await s.stop()

    alone, together = run(main())
    key = [[(o.token_ids, o.finish_reason) for o in r.outputs] for r in alone]
    assert [[(o.token_ids, o.finish_reason) for o in r.outputs] for r in together] == key
    assert alone[0].outputs[0].token_ids == greedy_reference(model, (1, 2), 150)
    assert alone[2].outputs[0].token_ids == greedy_reference(model, (3, 1), 1)
    reasons = {o.finish_reason for r in alone for o in r.outputs}
    assert reasons == ({"length", "eos"} if eos_id is not None else {"length"})
    if eos_id is None:
        assert [len(o.token_ids) for r in alone for o in r.outputs] == [150, 90, 90, 90, 1, 130, 70]


@pytest.mark.parametrize("eos_id", [None, 3])
def test_streams_kept_in_the_token_log_send_the_events_of_the_general_path(eos_id):
    """Character-level streams without stops, logprobs or processors but min_new_tokens stream their pieces from
    the token log, all rows at once; a stop string that never matches sends them down the general path: the same
    deltas (text, output index, finish reason) either way, through joins, EOS, min_new_tokens and length."""
    model = TableModel(vocab_size=4, eos_id=eos_id, seed=7, scale=0.7)
    probes = [("ab", {"temperature": 0, "max_new_tokens": 40}), ("ca", {"temperature": 0, "max_new_tokens": 1}),
              ("b", {"seed": 5, "max_new_tokens": 30, "num_return_sequences": 3}),
              ("ab", {"temperature": 0, "max_new_tokens": 40, "min_new_tokens": 25}),
              ("b", {"seed": 5, "max_new_tokens": 30, "num_return_sequences": 3, "min_new_tokens": 9})]

    async def streamed(s, text, params):
        job = s.submit(text, params, stream=True)
        return [(e.kind, e.index, e.text, e.extra.get("finish_reason")) for e in [e async for e in events(s, job)]
                if e.kind == "delta"], [(o.token_ids, o.finish_reason) for o in job.result().outputs]

    async def main(extra):
        s = await started(model)
        try:
            return await asyncio.gather(*(streamed(s, t, {**p, **extra}) for t, p in probes))
        finally:
            await s.stop()

    plain, general = run(main({})), run(main({"stop": ["zz"]}))
    assert plain == general and sum(len(deltas) for deltas, _ in plain) > 6
    assert {f for deltas, _ in plain for *_, f in deltas if f} == ({"length", "eos"} if eos_id else {"length"})


def test_cancel_frees_rows_within_a_step_and_deadlines_and_queue_limits():
    model = TableModel(vocab_size=4, eos_id=None, seed=1)
    model.gate = threading.Semaphore(0)

    async def main():
        s = await started(model, max_running_rows=4, max_waiting=1, max_new_tokens=100)
        try:
            job = s.submit("ab", {"temperature": 0, "max_new_tokens": 50}, stream=True)
            model.gate.release()
            stream = events(s, job)
            first = await stream.__anext__()
            assert first.kind == "delta" and s.scheduler.model.rows == 1
            blocker = s.submit("a", {"num_beams": 4, "max_new_tokens": 100})  # needs all 4 rows: waits
            with pytest.raises(Overloaded) as over:
                s.submit("a", {"temperature": 0})
            assert over.value.status == 429 and "Retry-After" in over.value.headers
            await stream.aclose()  # the client goes away
            model.gate.release()  # at most one more step: the cancelled rows are gone before the next
            assert await asyncio.to_thread(s.scheduler.wait_until, lambda: job not in s.scheduler.running, 10.0)
            model.gate.release(100)  # the beam request's steps
            result = await s.wait(blocker)
            assert result.outputs[0].finish_reason == "length"
            # a request whose deadline passes while running ends with DeadlineExceeded
            late = s.submit("ab", {"temperature": 0, "max_new_tokens": 50})
            model.gate.release()
            late.deadline = time.monotonic() - 1.0
            for _ in range(3):
                model.gate.release()
            with pytest.raises(DeadlineExceeded):
                await s.wait(late)
            assert await asyncio.to_thread(s.scheduler.wait_rows, 0, 10.0)
        finally:
            gate, model.gate = model.gate, None
            gate.release(100)
            await s.stop()

    run(main())


class JoinLoggingModel(TableModel):
    """Logs how many prompts each join takes (one prefill call each)."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.joins: list[int] = []

    def join(self, prompts: list[list[int]], copies: list[int]) -> np.ndarray:
        self.joins.append(len(prompts))
        return super().join(prompts, copies)


def greedy_job_for(sched: Scheduler) -> Callable[[list[int], int], Job]:
    """A maker of greedy requests (prompt ids, max_new_tokens) for a scheduler the test drives itself."""
    def job(prompt: list[int], n: int) -> Job:
        return Job(GenerationParams(temperature=0, max_new_tokens=n), prompt, n, strategy=None, processors=[],
                   tokenizer=sched.tokenizer, stream=False, deadline=time.monotonic() + 60, loop=None,
                   history_includes_prompt=True)
    return job


def test_requests_arriving_step_after_step_share_one_prefill_while_rows_run():
    """While requests keep arriving and rows run, staged prompts wait for the burst to end (at most
    ``PREFILL_HOLD`` steps) and join in one call, with the results they get alone. The scheduler is driven one
    iteration at a time, each after one more arrival."""
    model = JoinLoggingModel(vocab_size=4, eos_id=None, seed=3)
    sched = Scheduler(model, CharTokenizer(VOCAB), max_running_rows=16, max_waiting=16)
    job = greedy_job_for(sched)
    first = job([1], 40)
    sched.submit(first)
    sched.iteration()  # nothing runs yet: it joins at once
    burst = [job([2, i % 3 + 1], 5) for i in range(3)]
    for j in burst:
        sched.submit(j)
        sched.iteration()
    sched.iteration()  # no arrival: the burst's prompts join together
    long_burst = [job([3, i % 3 + 1], 5) for i in range(PREFILL_HOLD + 2)]
    for j in long_burst:
        sched.submit(j)
        sched.iteration()
    while sched.running or sched.prefilling:
        sched.iteration()
    assert model.joins[:2] == [1, 3]
    assert model.joins[2] == PREFILL_HOLD + 1 and sum(model.joins) == 1 + 3 + PREFILL_HOLD + 2
    for j in (first, *burst, *long_burst):
        assert j.result().outputs[0].token_ids == greedy_reference(model, tuple(j.prompt_ids), j.max_new_tokens)


@pytest.mark.parametrize("arriving", [[2], [2, 3]], ids=["nothing-to-prefill", "one-token-to-prefill"])
def test_a_long_prompt_joins_after_one_prefill_call_per_chunk_while_requests_keep_arriving(arriving):
    """A char-LM prompt of many chunks is not held back for a burst, nor held to the pace of short prompts staged
    beside it (fed in calls of their own, not all by the shortest remainder): with rows running and a short
    request arriving at every iteration, it joins about one iteration per chunk after it arrived."""

    def counting_graph(tokens: np.ndarray, h: np.ndarray) -> list[np.ndarray]:  # h counts the positions fed
        return [np.tile(np.arange(4, dtype=np.float32), (len(tokens), 1)), h + tokens.shape[1]]

    model = CharLMStepModel(Graph(counting_graph, ["logits", "h_out"]), 1, 1, 1, 4, last_only=True)
    sched = Scheduler(model, CharTokenizer(VOCAB), max_running_rows=64, max_waiting=256)
    job = greedy_job_for(sched)
    sched.submit(job([1], 1000))
    sched.iteration()
    long, shorts = job([1] * 500, 2), []
    sched.submit(long)
    iterations = 0
    while long.t_first is None and iterations < 500:
        shorts.append(job(arriving, 1))
        sched.submit(shorts[-1])
        sched.iteration()
        iterations += 1
    assert iterations <= math.ceil(499 / MAX_CHUNK) + 2
    assert float(model.state[0][0, long.start, 0]) == 500  # every prompt position fed once, then its first step
    while sched.running[1:] or sched.prefilling:  # the short ones finish too
        sched.iteration()
    assert all(j.result().outputs[0].token_ids for j in shorts)


class FailingJoinModel(TableModel):
    """``join`` raises once when ``fail_next_join`` is set (an encoder error, an out-of-memory)."""

    fail_next_join = False

    def join(self, prompts: list[list[int]], copies: list[int]) -> np.ndarray:
        if self.fail_next_join:
            self.fail_next_join = False
            raise RuntimeError("join failed")
        return super().join(prompts, copies)


def test_a_failed_join_fails_the_batch_and_the_next_request_starts_clean():
    """A join that raises ends the running and joining requests with an error; the model's rows and stage are
    reset with the scheduler's, so the next request gets exactly its lone-run tokens."""
    model = FailingJoinModel(vocab_size=4, eos_id=None, seed=3)
    model.gate = threading.Semaphore(0)

    async def main():
        s = await started(model, max_new_tokens=100)
        try:
            running = s.submit("ab", {"temperature": 0, "max_new_tokens": 50}, stream=True)
            model.gate.release()
            stream = events(s, running)  # held open: a closed stream would cancel the running row
            assert (await stream.__anext__()).kind == "delta" and model.rows == 1
            model.fail_next_join = True
            joining = s.submit("ca", {"temperature": 0, "max_new_tokens": 5})
            model.gate.release(2)  # the running row steps on; the join (held a step: it just arrived) fails
            with pytest.raises(InferenceFailed):
                await s.wait(joining)
            with pytest.raises(InferenceFailed):  # the running request fails with the batch
                async for event in stream:
                    assert event.kind == "delta"
            assert await asyncio.to_thread(s.scheduler.wait_rows, 0, 10.0) and model.rows == 0
            model.gate.release(100)
            return await s.generate("bb", {"temperature": 0, "max_new_tokens": 5})
        finally:
            gate, model.gate = model.gate, None
            gate.release(100)
            await s.stop()

    result = run(main())
    assert result.outputs[0].token_ids == greedy_reference(model, (2, 2), 5)


def test_admission_predicts_the_wait_from_rows_and_sheds_what_would_wait_too_long():
    """Rows free at max_running_rows / typical_steps per step: a request that finds more rows wanted than free
    waits in proportion, and is refused at once with Retry-After when that exceeds a quarter of a typical run,
    or would miss its deadline. Refusing a typical request needs nothing of it (the check before the body)."""
    from deepserve.serve.generation.admission import QUEUE_BUDGET, Admission, Slot

    a = Admission(max_running_rows=8)
    a.observe(0.01)
    a.check(0, Slot(2, 40), 1.0)  # rows free: admitted, and 40 steps is now the typical length
    assert a.typical_steps == 40 and a.wait_steps(6, 2) == 0
    a.waiting_rows = 2
    assert a.wait_steps(8, 2) == 4 * 40 / 8  # 4 rows short: half a batch must free up first
    a.waiting_rows = 1
    a.check(8, Slot(1, 40), 10.0)  # 2 rows short: 10 steps = QUEUE_BUDGET of a 40-step run
    assert QUEUE_BUDGET * 40 == 10
    with pytest.raises(Overloaded) as late:
        a.check(8, Slot(1, 40), 0.45)  # 0.10 s waiting + 0.40 s running > 0.45 s left
    assert "deadline" in late.value.message
    a.waiting_rows = 2
    with pytest.raises(Overloaded) as full:
        a.check(8, Slot(1, 40), 10.0)  # 15 steps > 10
    assert full.value.status == 429 and full.value.headers["Retry-After"] == "1" and "0.150 s" in full.value.message
    with pytest.raises(Overloaded):
        a.refuse_if_full(8)
    a.refuse_if_full(7)  # one row frees: a typical request would wait 10 steps, within the budget


def test_a_burst_is_admitted_up_to_what_finishes_in_time_and_the_rest_refused_at_once():
    """Four rows, requests of 20 steps: four run and one waits (a quarter of a batch), the others would wait
    longer and are refused with 429 before they cost a step, as is a request twice as long. Every admitted one
    completes."""
    model = TableModel(vocab_size=4, eos_id=None, seed=1)

    async def main():
        s = await started(model, max_running_rows=4, max_waiting=100)
        try:
            await s.generate("a", {"temperature": 0, "max_new_tokens": 3})  # the scheduler learns its step time
            model.gate = threading.Semaphore(0)  # hold the batch still while the burst arrives
            admitted, refused = [], []
            for n in [20] * 12 + [40]:
                try:
                    admitted.append(s.submit("ab", {"temperature": 0, "max_new_tokens": n}))
                except Overloaded as e:
                    refused.append(e)
            model.gate.release(1000)
            results = [await s.wait(j) for j in admitted]
            return results, refused
        finally:
            gate, model.gate = model.gate, None
            gate.release(1000)
            await s.stop()

    results, refused = run(main())
    assert [r.completion_tokens for r in results] == [20] * 5
    assert len(refused) == 8 and all(e.status == 429 and "Retry-After" in e.headers for e in refused)


def test_stop_strings_processors_and_streaming_text():
    model = TableModel(vocab_size=4, eos_id=None, seed=4, scale=1.0)

    async def main():
        s = await started(model)
        try:
            plain = await s.generate("a", {"temperature": 0, "max_new_tokens": 20})
            text = plain.outputs[0].text
            stop = text[5:7]
            cut = await s.generate("a", {"temperature": 0, "max_new_tokens": 20, "stop": [stop, "zz"]})
            job = s.submit("a", {"temperature": 0, "max_new_tokens": 20, "stop": [stop]}, stream=True)
            pieces = [e async for e in events(s, job)]
            nrep = await s.generate("a", {"temperature": 0, "max_new_tokens": 6, "no_repeat_ngram_size": 2})
            rep = await s.generate("a", {"temperature": 0, "max_new_tokens": 20, "repetition_penalty": 5.0})
            beam_job = s.submit("b", {"num_beams": 3, "max_new_tokens": 6}, stream=True)
            beam_pieces = [e async for e in events(s, beam_job)]
            empty = await s.generate("", {"temperature": 0, "max_new_tokens": 3})
            odd = await s.generate("x\ud800é", {"temperature": 0, "max_new_tokens": 3})
            return text, stop, cut, pieces, nrep, rep, beam_job, beam_pieces, empty, odd
        finally:
            await s.stop()

    text, stop, cut, pieces, nrep, rep, beam_job, beam_pieces, empty, odd = run(main())
    assert cut.outputs[0].text == text[: text.index(stop)] and cut.outputs[0].finish_reason == "stop"
    streamed = "".join(e.text for e in pieces if e.kind == "delta")
    assert streamed == cut.outputs[0].text and pieces[-1].kind == "done"
    seq = [1] + nrep.outputs[0].token_ids  # the char-LM history includes the prompt
    grams = [tuple(seq[i: i + 2]) for i in range(len(seq) - 1)]
    assert len(grams) == 6 and len(grams) == len(set(grams))
    assert rep.outputs[0].text != text
    final = beam_pieces[-1].result.outputs[0].text
    prefix = "".join(e.text for e in beam_pieces if e.kind == "delta")
    assert final.startswith(prefix)
    assert len(empty.outputs[0].token_ids) == 3 and len(odd.outputs[0].token_ids) == 3


def test_stream_events_ready_together_come_as_one_batch_and_errors_follow_their_text():
    """A stream that falls behind gets every ready event at once (one write); an error still comes after the
    text that preceded it, and the deadline timer (one per request) ends a request the scheduler forgot."""
    model = TableModel(vocab_size=4, eos_id=None, seed=2)
    model.gate = threading.Semaphore(0)

    async def main():
        s = await started(model)
        try:
            job = s.submit("ab", {"temperature": 0, "max_new_tokens": 3}, stream=True)
            model.gate.release(3)
            assert await asyncio.to_thread(s.scheduler.wait_until, lambda: job.finished, 10.0)
            await asyncio.sleep(0)  # let the scheduler's call_soon_threadsafe delivery run
            batches = [b async for b in s.event_batches(job)]
            assert len(batches) == 1 and [e.kind for e in batches[0]][-2:] == ["delta", "done"]
            failing = s.submit("ab", {"temperature": 0, "max_new_tokens": 3}, stream=True)
            failing.events.put_nowait(Event("delta", text="x"))
            failing.events.put_nowait(Event("error", error=BadRequest("boom")))
            got = []
            with pytest.raises(BadRequest):
                async for event in events(s, failing):
                    got.append(event.text)
            assert got == ["x"] and failing.cancelled
            late = s.submit("ab", {"temperature": 0, "max_new_tokens": 3}, stream=True, timeout_s=0.0)
            s.scheduler.cancel(late)  # the scheduler drops it silently: only the engine's timer can end it
            with pytest.raises(DeadlineExceeded):
                async for _ in events(s, late):
                    pass
        finally:
            model.gate.release(100)
            await s.stop()

    run(main())


def test_beams_with_min_new_tokens_take_the_batched_selection_with_the_per_request_result(monkeypatch):
    from deepserve.serve.generation import params as processors

    prompts = ["a", "b", "ab", "ba", "c", "cab"]

    def outputs(min_new: int) -> list:
        async def main():
            s = await started(TableModel(vocab_size=4, eos_id=3, seed=5), max_running_rows=64)
            try:
                params = GenerationParams(num_beams=4, num_return_sequences=2, min_new_tokens=min_new,
                                          max_new_tokens=5)
                results = await asyncio.gather(*(s.generate(p, params) for p in prompts))
            finally:
                await s.stop()
            return [[(o.token_ids, o.finish_reason, round(o.score, 5)) for o in r.outputs] for r in results]

        return run(main())

    assert any(len(ids) < 3 for r in outputs(0) for ids, _, _ in r)  # EOS comes early without the floor
    batched = outputs(3)
    assert all(len(ids) >= 3 for r in batched for ids, _, _ in r)
    monkeypatch.setattr(processors.MinNewTokens, "needs_history", True)  # forces the per-request selection
    assert outputs(3) == batched


def test_the_step_plan_is_rebuilt_only_when_the_batch_changes_and_eos_of_other_rows_leaves_plain_ones_alone(
        monkeypatch):
    """Beside a plain request (``Job.plain``), a beam request and a request with stop strings that ends on EOS: only
    a plain row's EOS takes its request off the token log, so the step plan is built only when a request joins,
    leaves or changes width, and every request gets its lone-run tokens."""
    model, builds = TableModel(seed=1), []
    build = StepPlan.of

    def counted(running: list[Job], rows: int) -> StepPlan:
        builds.append(tuple((j.id, j.rows, j.plain) for j in running))
        return build(running, rows)

    monkeypatch.setattr(StepPlan, "of", staticmethod(counted))

    async def main():
        s = await started(model)
        try:
            return await asyncio.gather(s.generate("ab", {"temperature": 0, "max_new_tokens": 20}),
                                        s.generate("ba", {"num_beams": 2, "max_new_tokens": 12}),
                                        s.generate("abc", {"temperature": 0, "max_new_tokens": 20, "stop": ["ccc"]}))
        finally:
            await s.stop()

    plain, _, stopped = run(main())
    assert plain.outputs[0].token_ids == greedy_reference(model, (1, 2), 20)
    assert stopped.outputs[0].token_ids == greedy_reference(model, (1, 2, 3), 20)  # EOS after its 4 tokens
    assert all(a != b for a, b in zip(builds, builds[1:])) and len(builds) >= 3


class MoveCountingModel(TableModel):
    """Counts the rows a reorder within the batch (``regroup=False``) fills from another row: cache row copies."""

    copies = 0

    def reorder(self, index: np.ndarray, regroup: bool = True) -> None:
        if not regroup:
            self.copies += int(np.count_nonzero(index != np.arange(len(index))))
        super().reorder(index, regroup)


def test_beams_move_rows_only_for_the_extra_children_of_a_parent():
    """A beam continues in its parent's row: only a parent's second, third... child takes another row (a copy),
    with the same n-best as a search run directly on the model, and beside other requests."""
    vocab = ["<unk>", *"abcdefghijklmno"]
    model, prompt = MoveCountingModel(vocab_size=16, eos_id=None, seed=4, scale=1.0), (1, 2)
    direct = BeamSearch(num_beams=4, max_new_tokens=12)
    seqs, want = [()], 0
    while not direct.done:
        logits = np.stack([model.logits_for(prompt + s) for s in seqs])
        toks, parents = direct.select(log_softmax(logits))
        if len(seqs) == len(parents) and not direct.done:  # full width before and after: a move in place
            want += len(parents) - len(set(parents.tolist()))
        seqs = [seqs[p] + (int(t),) for p, t in zip(parents, toks)]

    async def main():
        s = await started(model, vocab=vocab, max_new_tokens=12)
        try:
            lone = await s.generate("ab", {"num_beams": 4, "num_return_sequences": 4, "max_new_tokens": 12})
            copies, model.copies = model.copies, 0
            crowd = await asyncio.gather(s.generate("ab", {"num_beams": 4, "num_return_sequences": 4,
                                                           "max_new_tokens": 12}),
                                         *(s.generate("ba", {"temperature": 0, "max_new_tokens": n}) for n in (3, 9)))
            return lone, copies, crowd[0]
        finally:
            await s.stop()

    lone, copies, crowded = run(main())
    assert [o.token_ids for o in lone.outputs] == [h.tokens for h in direct.best(4)]
    assert [o.token_ids for o in crowded.outputs] == [o.token_ids for o in lone.outputs]
    assert 0 < copies == want


# ---------------------------------------------------------------------------------------------- transformers parity


class HFModel(TableModel):
    """The scheduler's rows driven by a Hugging Face causal LM: each step recomputes the row's whole history
    (tiny model; no cache to get wrong)."""

    def __init__(self, model, eos_id: int) -> None:
        super().__init__(vocab_size=model.config.vocab_size, eos_id=eos_id)
        self.model = model

    def logits_for(self, history: tuple[int, ...]) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.model(torch.tensor([history])).logits[0, -1].numpy().astype(np.float32)


@pytest.mark.parametrize("length_penalty, early_stopping", [(0.7, True), (1.0, False), (2.0, "never")])
def test_beam_search_n_best_equals_transformers_generate(length_penalty, early_stopping):
    """Same weights, same prompt: our n-best hypotheses, their order and length-penalised scores are those of
    ``transformers``' ``generate(num_beams=...)``."""
    import torch
    import transformers
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=12, n_positions=32, n_embd=16, n_layer=1, n_head=2, bos_token_id=0,
                                     eos_token_id=3, pad_token_id=0)
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.mul_(8)  # peaked distributions
        hf.transformer.wte.weight[3] *= 2  # (tied to the output) EOS wins often enough for finished hypotheses
    vocab = ["<unk>", *"abcdefghijk"]  # id 3 ("c") is EOS
    params = dict(num_beams=4, num_return_sequences=3, max_new_tokens=6, length_penalty=length_penalty,
                  early_stopping=early_stopping)

    async def ours(prompt: str):
        s = await started(HFModel(hf, eos_id=3), vocab=vocab)
        try:
            return await s.generate(prompt, params)
        finally:
            await s.stop()

    reasons = set()
    for prompt in ("efg", "jab", "k"):  # ids [5, 6, 7], [10, 1, 2], [11]
        ids = [vocab.index(ch) for ch in prompt]
        theirs = hf.generate(torch.tensor([ids]), do_sample=False, output_scores=True, return_dict_in_generate=True,
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long), pad_token_id=0, eos_token_id=3,
                             **params)
        want = [[t for t in seq[len(ids):].tolist()] for seq in theirs.sequences]
        want = [seq[: seq.index(3)] if 3 in seq else seq for seq in want]  # EOS and the padding after it
        got = run(ours(prompt)).outputs
        reasons.update(o.finish_reason for o in got)
        assert [o.token_ids for o in got] == want, prompt
        np.testing.assert_allclose([o.score for o in got], theirs.sequences_scores.numpy(), rtol=1e-4, atol=1e-5)
    assert reasons == {"eos", "length"}  # finished hypotheses competed with live beams


def test_logprobs_are_the_models_distribution_for_every_strategy():
    """With a repetition penalty changing the ranking, greedy, sampled and beam tokens all report the model's own
    log-probability (before temperature and processors), as the OpenAI API does."""
    model = TableModel(vocab_size=4, eos_id=None, seed=7)

    async def main():
        s = await started(model)
        try:
            return [await s.generate("ab", {**p, "max_new_tokens": 5, "logprobs": 1, "repetition_penalty": 3.0})
                    for p in ({"temperature": 0}, {"temperature": 0.7, "seed": 3}, {"num_beams": 3})]
        finally:
            await s.stop()

    prompt = (1, 2)
    for result in run(main()):
        out = result.outputs[0]
        want = [float(log_softmax(model.logits_for(prompt + tuple(out.token_ids[:i]))[None])[0, t])
                for i, t in enumerate(out.token_ids)]
        np.testing.assert_allclose(out.logprobs, want, rtol=1e-5)


def test_a_short_prompt_staged_behind_long_ones_is_ready_after_one_prefill_call():
    """Prefill feeds the prompts that finish in a call first: a 2-token prompt staged after 32 prompts of 1,000
    tokens is ready after the first budgeted call, not once the long ones have had their chunks."""

    def counting_graph(tokens: np.ndarray, h: np.ndarray) -> list[np.ndarray]:  # h counts the positions fed
        return [np.tile(np.arange(4, dtype=np.float32), (len(tokens), 1)), h + tokens.shape[1]]

    model = CharLMStepModel(Graph(counting_graph, ["logits", "h_out"]), 1, 1, 1, 4, last_only=True)
    model.stage([[1] * 1000] * 32 + [[2, 3]])
    assert 32 in model.prefill(256)
    assert float(model.staged[32].state[0][0, 0, 0]) == 1  # its one token before the last, fed once
    assert sum(s.left < 999 for s in model.staged[:32]) >= 1  # the rest of the budget went to the long ones
