"""Parity: exported graphs against the eager model.

At export time ``build_reference`` draws random valid inputs and records the eager model's answers; the
reference travels with the artifact (``parity.npz``, hashed like every file) so that ``--verify`` can replay
the same checks without the checkpoint. Checks, per task:

- ``random-inputs`` (every graph): three or more batch sizes / lengths, max abs difference of every output.
- ``cached-decoding`` (generators): step-by-step decoding through the exported cache reproduces the eager
  full-sequence (teacher-forcing) logits. For seq2seq one row joins mid-way, left-padded, at its own position;
  each char-LM graph (``prefill``, which serve decodes with, and ``step``) takes the prompt in two calls, then
  one token per call, as serve feeds it.
- ``greedy`` (generators): greedy decoding with the exported graphs gives exactly the eager tokens.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn as nn

from deepserve.export.formats import Runner
from deepserve.export.graphs import TaskGraphs
from deepserve.manifest import KVUpdate, StepGraphContract

TOLERANCE = 1e-4
"""Max abs difference allowed between fp32 exported graphs and the eager model."""
GREEDY_STEPS = 12
CHARLM_GRAPHS = ("step", "prefill")
"""The char-LM graphs, each checked on its own: serve decodes with ``prefill`` (``step`` for older artifacts)."""
PROMPT_CALLS = ((0, 3), (3, 5))
"""How the char-LM checks feed the parity sequence's prompt: in two calls, as serve prefills a long prompt in
chunks (the second call starts from the state the first returned); single steps follow."""

Reference = dict[str, np.ndarray]


# ---------------------------------------------------------------------------------------------- references


def build_reference(task: str, model: nn.Module, tg: TaskGraphs, data: dict[str, Any], seed: int = 0) -> Reference:
    """Random valid inputs and the eager outputs for every check of ``task``."""
    gen = torch.Generator().manual_seed(seed)
    ref: Reference = {}
    with torch.no_grad():
        if task == "image-classification":
            c, h, w = tg.model_facts["input_shape"]
            for i, b in enumerate((1, 3, 8)):
                _record(ref, tg, "model", i, (torch.randn(b, c, h, w, generator=gen),))
        elif task == "char-lm":
            _charlm_reference(ref, model, tg, gen)
        else:
            _seq2seq_reference(ref, model, tg, data, gen)
    return ref


def _record(ref: Reference, tg: TaskGraphs, graph: str, case: int, inputs: tuple[torch.Tensor, ...]) -> None:
    g = tg.graphs[graph]
    out = g.module(*inputs)
    out = out if isinstance(out, (tuple, list)) else (out,)
    for spec, t in zip(g.inputs, inputs):
        ref[f"{graph}/{case}/in/{spec.name}"] = t.numpy()
    for spec, t in zip(g.outputs, out):
        ref[f"{graph}/{case}/out/{spec.name}"] = t.numpy()


def _charlm_reference(ref: Reference, model: nn.Module, tg: TaskGraphs, gen: torch.Generator) -> None:
    vocab = tg.model_facts["vocab_size"]
    for i, (b, t) in enumerate(((1, 1), (2, 4), (5, 9))):
        state = tuple(0.5 * torch.randn(s.shape, generator=gen) for s in model.init_state(b))
        tokens = torch.randint(0, vocab, (b, t), generator=gen)
        for graph in ("step", "prefill"):
            if graph in tg.graphs:
                _record(ref, tg, graph, i, (tokens, *state))
    # teacher forcing from the initial state
    tokens = torch.randint(0, vocab, (2, 12), generator=gen)
    state = tuple(model.init_state(2))
    ref["cached/tokens"] = tokens.numpy()
    for name, s in zip("hc", state):
        ref[f"cached/{name}"] = s.numpy()
    ref["cached/logits"] = model(tokens, state)[0].numpy()
    # greedy: the eager side re-reads the whole sequence every step (no cache)
    seq = torch.randint(1, vocab, (3, 4), generator=gen)
    ref["greedy/prompt"] = seq.numpy()
    for name, s in zip("hc", model.init_state(3)):
        ref[f"greedy/{name}"] = s.numpy()
    for _ in range(GREEDY_STEPS):
        logits = model(seq, tuple(model.init_state(seq.shape[0])))[0][:, -1]
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    ref["greedy/tokens"] = seq[:, 4:].numpy()


def _src_batch(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    s = max(len(r) for r in rows)
    src = torch.full((len(rows), s), pad_id, dtype=torch.int64)
    for i, r in enumerate(rows):
        src[i, : len(r)] = torch.tensor(r)
    return src, src == pad_id


def _random_src(b: int, s: int, vocab: int, pad_id: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [torch.randint(4, vocab, (max(1, s - (i % 3)),), generator=gen).tolist() for i in range(b)]
    return _src_batch(rows, pad_id)


def held_out_sources(data: dict[str, Any]) -> list[list[int]]:
    """A few arithmetic lines through the checkpoint's own tokenizer (the default seq2seq task is maths)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=data["spm_model"])
    lines = ["12+7", "3*(4+5)", "81-19*2"]
    limit = int(data["max_source_length"])
    return [(sp.encode(line) + [int(data["eos_id"])])[:limit] for line in lines]


def _seq2seq_reference(ref: Reference, model: nn.Module, tg: TaskGraphs, data: dict, gen: torch.Generator) -> None:
    vocab, pad, bos = tg.model_facts["vocab_size"], int(data["pad_id"]), int(data["bos_id"])
    facts = tg.model_facts
    for i, (b, s) in enumerate(((1, 3), (2, 7), (4, 12))):
        _record(ref, tg, "encode", i, _random_src(b, s, vocab, pad, gen))
    for i, (b, s, p) in enumerate(((1, 3, 0), (2, 5, 3), (3, 7, 6))):
        src, src_mask = _random_src(b, s, vocab, pad, gen)
        _, cross_k, cross_v = model.encode(src, src_mask)  # (L,B,H,S,Dh)
        kv = (b, facts["n_heads"], p, facts["head_dim"])
        empty = [min(r, p) for r in range(b)]  # row r has r empty (left-padded) slots
        named = {
            "tokens": torch.randint(4, vocab, (b, 1), generator=gen),
            "positions": torch.tensor([p - e for e in empty], dtype=torch.int64),
            "src_pad_mask": src_mask,
            "past_pad_mask": torch.tensor([[j < e for j in range(p)] for e in empty], dtype=torch.bool).reshape(b, p),
        }
        for layer in range(facts["n_decoder_layers"]):  # one cache tensor per layer (the model's decode_step_layers)
            named.update({f"cross_k_{layer}": cross_k[layer], f"cross_v_{layer}": cross_v[layer],
                          f"past_k_{layer}": 0.5 * torch.randn(kv, generator=gen),
                          f"past_v_{layer}": 0.5 * torch.randn(kv, generator=gen)})
        _record(ref, tg, "decode_step", i, tuple(named[n] for n in tg.graphs["decode_step"].input_names))
    # cached decoding: row a decodes alone for 4 steps, then row b joins (left-padded) for 6 steps
    src, src_mask = _random_src(2, 9, vocab, pad, gen)
    tgt_a = torch.cat([torch.tensor([[bos]]), torch.randint(4, vocab, (1, 9), generator=gen)], dim=1)
    tgt_b = torch.cat([torch.tensor([[bos]]), torch.randint(4, vocab, (1, 5), generator=gen)], dim=1)
    ref.update({"cached/src": src.numpy(), "cached/src_pad_mask": src_mask.numpy(),
                "cached/tgt_a": tgt_a.numpy(), "cached/tgt_b": tgt_b.numpy()})
    ref["cached/logits_a"] = model(src[:1], tgt_a)[0].numpy()
    ref["cached/logits_b"] = model(src[1:], tgt_b)[0].numpy()
    # greedy on held-out sources; the eager side re-reads the whole prefix every step (no cache)
    src, src_mask = _src_batch(held_out_sources(data), pad)
    ys = torch.full((src.shape[0], 1), bos, dtype=torch.int64)
    for _ in range(GREEDY_STEPS):
        logits = model(src, ys)[:, -1]
        ys = torch.cat([ys, _greedy_pick(logits.numpy(), pad)[:, None]], dim=1)
    ref.update({"greedy/src": src.numpy(), "greedy/src_pad_mask": src_mask.numpy(), "greedy/tokens": ys[:, 1:].numpy()})


def _greedy_pick(logits: np.ndarray, pad_id: int | None = None) -> torch.Tensor:
    """argmax; seq2seq never picks pad (a pad inside the target would be masked by the eager forward)."""
    logits = np.array(logits, dtype=np.float32)
    if pad_id is not None:
        logits[:, pad_id] = -np.inf
    return torch.from_numpy(logits.argmax(-1).astype(np.int64))


# ---------------------------------------------------------------------------------------------- checks


def run_checks(task: str, ref: Reference, runners: dict[str, Runner],
               contract: StepGraphContract | None = None) -> list[dict[str, Any]]:
    """Replay every check of ``task`` on ``runners`` (graph name -> runner); seq2seq needs the ``contract`` its
    manifest records (special ids, ``kv_update``). Returns one result per check: ``{"check", "graph", "cases",
    "max_abs_diff"}`` plus ``tokens_equal`` / ``token_agreement`` for greedy."""
    results = [_random_inputs(graph, ref, runner) for graph, runner in runners.items()]
    if task == "char-lm":
        for graph in (g for g in CHARLM_GRAPHS if g in runners):
            results.append(_charlm_cached(ref, graph, runners[graph]))
            results.append(_charlm_greedy(ref, graph, runners[graph]))
    elif task == "seq2seq":
        if contract is None:
            raise ValueError("seq2seq parity checks need the artifact's StepGraphContract")
        results.append(_seq2seq_cached(ref, runners["encode"], runners["decode_step"], contract))
        results.append(_seq2seq_greedy(ref, runners["encode"], runners["decode_step"], contract))
    return results


def passed(result: dict[str, Any], tolerance: float = TOLERANCE) -> bool:
    if result.get("tokens_equal") is False:
        return False
    diff = result.get("max_abs_diff")
    return diff is None or (np.isfinite(diff) and diff <= tolerance)


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return float("inf")
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def _random_inputs(graph: str, ref: Reference, run: Runner) -> dict[str, Any]:
    cases = sorted({int(k.split("/")[1]) for k in ref if k.startswith(f"{graph}/")})
    worst, worst_case, names = 0.0, "", []
    for i in cases:
        feeds = {k.rsplit("/", 1)[1]: v for k, v in ref.items() if k.startswith(f"{graph}/{i}/in/")}
        expected = {k.rsplit("/", 1)[1]: v for k, v in ref.items() if k.startswith(f"{graph}/{i}/out/")}
        out = run(feeds)
        case = ",".join(f"{n}{list(v.shape)}" for n, v in feeds.items() if n in ("images", "tokens", "src", "past_k_0"))
        names.append(case)
        for name, value in expected.items():
            d = _diff(out[name], value)
            if not np.isfinite(d) or d > worst:
                worst, worst_case = d, f"{case} output {name}"
    return {"check": "random-inputs", "graph": graph, "cases": names, "max_abs_diff": worst, "worst": worst_case}


def _charlm_state(ref: Reference, prefix: str) -> dict[str, np.ndarray]:
    return {n: ref[f"{prefix}/{n}"] for n in "hc" if f"{prefix}/{n}" in ref}


def _charlm_feed(run: Runner, tokens: np.ndarray, state: dict[str, np.ndarray]):
    out = run({"tokens": tokens, **state})
    return out["logits"], {n: out[f"{n}_out"] for n in state}


def charlm_calls(ref: Reference, graph: str, run: Runner) -> list[tuple[int, int, np.ndarray]]:
    """The parity sequence (``cached/tokens``) fed to char-LM ``graph`` as serve feeds it: the prompt in
    ``PROMPT_CALLS``, then one token per call, each call from the state the previous one returned. Per call
    ``(first, end, logits [B, end - first, V])``: ``step`` returns every position fed, ``prefill`` the last."""
    tokens, state = ref["cached/tokens"], _charlm_state(ref, "cached")
    calls = [*PROMPT_CALLS, *((t, t + 1) for t in range(PROMPT_CALLS[-1][1], tokens.shape[1]))]
    out = []
    for a, b in calls:
        logits, state = _charlm_feed(run, tokens[:, a:b], state)
        out.append((a, b, logits) if graph == "step" else (b - 1, b, logits[:, None]))
    return out


def _charlm_cached(ref: Reference, graph: str, run: Runner) -> dict[str, Any]:
    expected, prompt = ref["cached/logits"], PROMPT_CALLS[-1][1]
    worst, worst_case = 0.0, ""
    for first, end, logits in charlm_calls(ref, graph, run):
        d = _diff(logits, expected[:, first:end])
        if not np.isfinite(d) or d > worst:
            worst, worst_case = d, f"positions {first}..{end - 1} ({'prompt' if end <= prompt else 'single step'})"
    calls = " + ".join(str(b - a) for a, b in PROMPT_CALLS)
    return {"check": "cached-decoding", "graph": graph, "max_abs_diff": worst, "worst": worst_case,
            "cases": [f"tokens{list(ref['cached/tokens'].shape)}: prompt in {calls} tokens, then single steps"]}


def _charlm_greedy(ref: Reference, graph: str, run: Runner) -> dict[str, Any]:
    prompt = ref["greedy/prompt"]
    logits, state = _charlm_feed(run, prompt, _charlm_state(ref, "greedy"))
    tokens = []
    for _ in range(GREEDY_STEPS):
        last = logits[:, -1] if graph == "step" else logits  # prefill: the last position's logits only
        nxt = last.argmax(-1).astype(np.int64)[:, None]
        tokens.append(nxt)
        logits, state = _charlm_feed(run, nxt, state)
    return _greedy_result(graph, np.concatenate(tokens, axis=1), ref["greedy/tokens"])


def _greedy_result(graph: str, got: np.ndarray, expected: np.ndarray) -> dict[str, Any]:
    return {"check": "greedy", "graph": graph, "cases": [f"{expected.shape[0]} inputs x {expected.shape[1]} steps"],
            "max_abs_diff": None, "tokens_equal": bool(np.array_equal(got, expected)),
            "token_agreement": float(np.mean(got == expected)) if got.shape == expected.shape else 0.0}


# seq2seq state between graph calls: per-layer tensors by graph name ({"cross_k_0": ..., "past_v_1": ...}),
# batch on axis 0 of each


def _encode(run: Runner, src: np.ndarray, src_mask: np.ndarray) -> dict[str, np.ndarray]:
    """The cross K/V of every decoder layer for ``src``."""
    out = run({"src": src, "src_pad_mask": src_mask})
    return {name: value for name, value in out.items() if name.startswith("cross_")}


def _empty_past(cross: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Zero-length self-attention caches (past_k_i / past_v_i [B,H,0,Dh]) and past_pad_mask [B,0]."""
    past = {}
    for name, value in cross.items():
        b, h, _, dh = value.shape
        past[name.replace("cross_", "past_")] = np.zeros((b, h, 0, dh), dtype=np.float32)
    return past, np.zeros((len(next(iter(cross.values()))), 0), dtype=bool)


def _rows(state: dict[str, np.ndarray], rows: slice) -> dict[str, np.ndarray]:
    return {name: value[rows] for name, value in state.items()}


def _step(run: Runner, c: StepGraphContract, tokens: np.ndarray, positions: np.ndarray, cross: dict[str, np.ndarray],
          src_mask: np.ndarray, past: dict[str, np.ndarray], past_mask: np.ndarray):
    """One decode step -> (logits, the grown past caches, the grown past_pad_mask)."""
    out = run({"tokens": tokens, "positions": positions, "src_pad_mask": src_mask, "past_pad_mask": past_mask,
               **cross, **past})
    if c.kv_update is KVUpdate.SLOT:  # this step's K/V (new_*), appended here
        past = {name: np.concatenate([value, out[f"new_{name[5:]}"]], axis=2) for name, value in past.items()}
    else:  # the grown caches (present_*)
        past = {name: out[f"present_{name[5:]}"] for name in past}
    past_mask = np.concatenate([past_mask, np.zeros((tokens.shape[0], 1), dtype=bool)], axis=1)
    return out["logits"], past, past_mask


def _seq2seq_cached(ref: Reference, encode: Runner, decode: Runner, c: StepGraphContract) -> dict[str, Any]:
    src, src_mask = ref["cached/src"], ref["cached/src_pad_mask"]
    tgt_a, tgt_b = ref["cached/tgt_a"], ref["cached/tgt_b"]
    cross = _encode(encode, src, src_mask)
    join = tgt_a.shape[1] - tgt_b.shape[1]
    cross_a = _rows(cross, slice(0, 1))
    past, pm = _empty_past(cross_a)
    got_a, got_b = [], []
    for t in range(join):  # row a alone
        logits, past, pm = _step(decode, c, tgt_a[:, t : t + 1], np.array([t]), cross_a, src_mask[:1], past, pm)
        got_a.append(logits[0])
    # row b joins with `join` empty slots on the left
    past = {name: np.concatenate([value, np.zeros_like(value)], axis=0) for name, value in past.items()}
    pm = np.concatenate([pm, np.ones_like(pm)], axis=0)
    for t in range(tgt_b.shape[1]):
        tokens = np.array([[tgt_a[0, join + t]], [tgt_b[0, t]]], dtype=np.int64)
        logits, past, pm = _step(decode, c, tokens, np.array([join + t, t]), cross, src_mask, past, pm)
        got_a.append(logits[0])
        got_b.append(logits[1])
    diff = max(_diff(np.stack(got_a), ref["cached/logits_a"]), _diff(np.stack(got_b), ref["cached/logits_b"]))
    return {"check": "cached-decoding", "graph": "encode+decode_step", "max_abs_diff": diff,
            "cases": [f"row a {tgt_a.shape[1]} steps, row b joins at step {join} for {tgt_b.shape[1]} steps"]}


def _seq2seq_greedy(ref: Reference, encode: Runner, decode: Runner, c: StepGraphContract) -> dict[str, Any]:
    src, src_mask = ref["greedy/src"], ref["greedy/src_pad_mask"]
    cross = _encode(encode, src, src_mask)
    b = src.shape[0]
    past, pm = _empty_past(cross)
    tokens = np.full((b, 1), c.bos_id, dtype=np.int64)
    out = []
    for t in range(ref["greedy/tokens"].shape[1]):
        logits, past, pm = _step(decode, c, tokens, np.full(b, t, dtype=np.int64), cross, src_mask, past, pm)
        tokens = _greedy_pick(logits, c.pad_id).numpy()[:, None]
        out.append(tokens)
    return _greedy_result("encode+decode_step", np.concatenate(out, axis=1), ref["greedy/tokens"])
