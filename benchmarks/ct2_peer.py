"""CTranslate2 as a peer of the seq2seq engine: the benchmark checkpoint's own weights in a CTranslate2 model.

deepserve's seq2seq Transformer maps one to one onto CTranslate2's ``TransformerSpec``: pre-norm layers, fused
self-attention QKV, cross-attention Q and fused KV, GELU feed-forward, final LayerNorms, embeddings scaled by
sqrt(d_model) and tied to the output projection, sinusoidal positions (our table is written as the position
encodings, so both engines compute the same network; ``greedy_agrees`` checks it). Needs ``pip install
ctranslate2`` (the ``bench`` extra).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

PAD, UNK, BOS, EOS = "<blank>", "<unk>", "<s>", "</s>"
SUPPRESSED = [[PAD], [BOS]]
"""Never generated, as in deepserve's engine (``Seq2SeqStepModel.suppress``)."""


def _vocabulary(size: int) -> list[str]:
    """Our ids 0-3 are pad, unk, bos, eos; the rest get placeholder names (CTranslate2 takes token strings)."""
    return [PAD, UNK, BOS, EOS] + [f"t{i}" for i in range(4, size)]


def _linear(spec: Any, weight: Any, bias: Any) -> None:
    spec.weight, spec.bias = weight.numpy(), bias.numpy()


def _norm(spec: Any, state: dict[str, Any], name: str) -> None:
    spec.gamma, spec.beta = state[f"{name}.weight"].numpy(), state[f"{name}.bias"].numpy()


def build_spec(model: Any) -> Any:
    """A ``TransformerSpec`` holding ``model``'s (a ``Seq2SeqTransformer``) weights."""
    import torch
    from ctranslate2.specs import common_spec, transformer_spec

    args, state = model.args, model.state_dict()
    spec = transformer_spec.TransformerSpec.from_config(
        (args.n_encoder_layers, args.n_decoder_layers), args.n_heads, pre_norm=True,
        activation=common_spec.Activation.GELU)
    with torch.no_grad():
        table = model.positional(torch.arange(args.max_len)).numpy()  # (max_len, D)
    for side in (spec.encoder, spec.decoder):
        embeddings = side.embeddings[0] if isinstance(side.embeddings, list) else side.embeddings
        embeddings.weight = state["embed.weight"].numpy()
        side.scale_embeddings = True
        side.position_encodings.encodings = table
    spec.decoder.projection.weight = state["embed.weight"].numpy()
    spec.decoder.projection.bias = np.zeros(args.vocab_size, np.float32)
    _norm(spec.encoder.layer_norm, state, "enc_ln")
    _norm(spec.decoder.layer_norm, state, "dec_ln")
    for i, layer in enumerate(spec.encoder.layer):
        p = f"encoder.{i}"
        _norm(layer.self_attention.layer_norm, state, f"{p}.ln1")
        _linear(layer.self_attention.linear[0], state[f"{p}.attn.qkv.weight"], state[f"{p}.attn.qkv.bias"])
        _linear(layer.self_attention.linear[1], state[f"{p}.attn.proj.weight"], state[f"{p}.attn.proj.bias"])
        _feed_forward(layer.ffn, state, p, "ln2")
    for i, layer in enumerate(spec.decoder.layer):
        p = f"decoder.{i}"
        _norm(layer.self_attention.layer_norm, state, f"{p}.ln1")
        _linear(layer.self_attention.linear[0], state[f"{p}.self_attn.qkv.weight"], state[f"{p}.self_attn.qkv.bias"])
        _linear(layer.self_attention.linear[1], state[f"{p}.self_attn.proj.weight"], state[f"{p}.self_attn.proj.bias"])
        _norm(layer.attention.layer_norm, state, f"{p}.ln2")
        for k, name in enumerate(("q", "kv", "proj")):
            _linear(layer.attention.linear[k], state[f"{p}.cross_attn.{name}.weight"],
                    state[f"{p}.cross_attn.{name}.bias"])
        _feed_forward(layer.ffn, state, p, "ln3")
    vocabulary = _vocabulary(args.vocab_size)
    spec.register_source_vocabulary(vocabulary)
    spec.register_target_vocabulary(vocabulary)
    return spec


def _feed_forward(ffn: Any, state: dict[str, Any], prefix: str, norm: str) -> None:
    _norm(ffn.layer_norm, state, f"{prefix}.{norm}")
    _linear(ffn.linear_0, state[f"{prefix}.ff.fc.weight"], state[f"{prefix}.ff.fc.bias"])
    _linear(ffn.linear_1, state[f"{prefix}.ff.out.weight"], state[f"{prefix}.ff.out.bias"])


def convert(checkpoint: Path, out: Path, quantization: str) -> Path:
    """Write a CTranslate2 model of ``checkpoint``'s seq2seq weights to ``out`` (``float32`` or ``int8``)."""
    from ctranslate2.converters.converter import Converter

    from deepserve.train.checkpoint import load_checkpoint
    from deepserve.train.models import build_model

    ckpt = load_checkpoint(checkpoint)
    model = build_model(ckpt["model"]["type"], ckpt["model"]["args"]).eval()
    model.load_state_dict(ckpt["state_dict"])

    class _Ours(Converter):
        def _load(self) -> Any:
            return build_spec(model)

    _Ours().convert(str(out), quantization=quantization, force=True)
    return out


def run_cell(model_dir: Path, sources: list[list[int]], beams: int, new_tokens: int, compute_type: str,
             threads: int, rounds: int = 1) -> dict[str, Any]:
    """Target tokens/s of CTranslate2 translating ``sources`` (token ids) as one batch with exactly
    ``new_tokens`` target tokens each; the best of ``rounds``."""
    import ctranslate2

    translator = ctranslate2.Translator(str(model_dir), device="cpu", compute_type=compute_type,
                                        inter_threads=1, intra_threads=threads)
    vocabulary = _vocabulary(max(max(s) for s in sources) + 1)
    batch = [[vocabulary[t] for t in s] for s in sources]
    kw = dict(beam_size=beams, max_decoding_length=new_tokens, min_decoding_length=new_tokens,
              suppress_sequences=SUPPRESSED)
    translator.translate_batch(batch[:1], **kw)  # warm up
    rates = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        out = translator.translate_batch(batch, **kw)
        wall = time.perf_counter() - t0
        rates.append(sum(len(r.hypotheses[0]) for r in out) / wall)
    return {"tokens_per_s": max(rates), "threads": threads, "rounds": rates}


def greedy_tokens(model_dir: Path, source: list[int], new_tokens: int) -> list[int]:
    """CTranslate2's greedy target ids for one source (to compare with the engine's)."""
    import ctranslate2

    translator = ctranslate2.Translator(str(model_dir), device="cpu", compute_type="float32")
    vocabulary = _vocabulary(4)
    names = {PAD: 0, UNK: 1, BOS: 2, EOS: 3}
    out = translator.translate_batch([[vocabulary[t] if t < 4 else f"t{t}" for t in source]], beam_size=1,
                                     max_decoding_length=new_tokens, suppress_sequences=SUPPRESSED)[0].hypotheses[0]
    return [names.get(t, int(t[1:]) if t.startswith("t") else 1) for t in out]


GRID = [(beams, batch, precision) for precision in ("fp32", "int8") for beams in (4, 1) for batch in (1, 8, 32)]
"""Cells: beam 4 and greedy, batch 1 / 8 / 32, fp32 and int8 (ONNX Runtime's dynamically quantized graphs vs
CTranslate2's int8 compute type)."""


def run_scenario(report: Any, repository: Path, checkpoints: Path, p: Any,
                 cells: list[tuple[int, int, str]] | None = None) -> dict[str, Any]:
    """Both engines over ``cells`` (default ``GRID``), 32-token sources and exactly ``p.gen_tokens * 2`` (64 in the
    full plan) target tokens, each cell measured back to back (ABBA over ``p.paired_rounds`` rounds); ratio = ours /
    CTranslate2."""
    from benchmarks.common import paired_ratio
    from benchmarks.results import Table

    section = report.section("Scenario 3d — seq2seq engine vs CTranslate2 (in process)")
    new_tokens = 2 * p.gen_tokens
    setup = _setup(repository, checkpoints)
    table = Table(["beams", "batch", "precision", "deepserve tokens/s", "CTranslate2 tokens/s (best threads)",
                   "ratio (median of rounds)", "every round", "TorchScript tokens/s", "TorchScript / ORT"])
    results = {}
    for beams, batch, precision in cells or GRID:
        pairs, torchscript = measure_cell(setup, beams, batch, precision, new_tokens, p.paired_rounds)
        ratio = paired_ratio(pairs)
        ts_ratio = paired_ratio(list(zip(torchscript, (a for a, _ in pairs)))) if torchscript else None
        results[f"beam{beams}-b{batch}-{precision}"] = {"pairs": pairs, "ratio": ratio,
                                                       "torchscript": torchscript, "torchscript_ratio": ts_ratio}
        table.add(beams, batch, precision, _median([a for a, _ in pairs]), _median([b for _, b in pairs]), ratio,
                  ", ".join(f"{a / b:.2f}" for a, b in pairs), _median(torchscript) if torchscript else "-",
                  ts_ratio if ts_ratio is not None else "-")
    section.blocks.append(f"Same weights in both engines (the benchmark checkpoint converted to a CTranslate2 "
                          f"model; greedy scores agree to 1e-3 over 10 tokens), 32-token sources, exactly "
                          f"{new_tokens} target tokens per sequence, one batch of all requests; deepserve is the "
                          "in-process engine on ONNX Runtime with its default threads (one intra-op thread below 64 "
                          "rows, both cores above), CTranslate2 the better of 1 and 2 intra-op threads. fp32 cells "
                          "also run the TorchScript backend right after ONNX Runtime in every round. Each cell "
                          "alternates the engines over the rounds; the ratio is the median of the per-round ratios "
                          "(this shared VM drifts between minutes).")
    section.blocks.append(table)
    _targets(report, results)
    report.data["ctranslate2"] = results
    return results


def _setup(repository: Path, checkpoints: Path) -> dict[str, Any]:
    """The artifact, the sources (token ids) and both CTranslate2 models of the benchmark checkpoint."""
    from benchmarks import generation
    from benchmarks.generation import _cut, set_tokenizer
    from benchmarks.models import corpus_lines, manifest

    directory = repository / "seq2seq" / "1"
    set_tokenizer(directory / manifest(repository, "seq2seq").tokenizer["file"])
    sources = [generation._SPM.encode(_cut(t, 32)) for t in corpus_lines(32)]
    models = {q: convert(checkpoints / "seq2seq.pt", checkpoints / f"ct2-{q}", q) for q in ("float32", "int8")}
    return {"directory": directory, "sources": sources, "models": models}


def measure_cell(setup: dict[str, Any], beams: int, batch: int, precision: str, new_tokens: int,
                 rounds: int) -> tuple[list[tuple[float, float]], list[float]]:
    """(ours, CTranslate2) tokens/s per round, ABBA; for fp32 also TorchScript's, right after ours each round."""
    import asyncio

    from benchmarks.common import paired
    from benchmarks.generation import _engine_run

    waves = max(1, 16 // batch)  # about as many tokens per measurement in every cell
    torchscript: list[float] = []
    q = "float32" if precision == "fp32" else "int8"

    def engine(backend: str) -> float:
        run = asyncio.run(_engine_run(setup["directory"], batch, 32, new_tokens, "cpu", backend, precision, waves,
                                      beams))
        return run["tokens_per_s"]

    def ours() -> float:
        rate = engine("onnx")
        if precision == "fp32":
            torchscript.append(engine("torchscript"))
        return rate

    def theirs() -> float:
        return max(run_cell(setup["models"][q], setup["sources"][:batch], beams, new_tokens, q, threads,
                            rounds=waves)["tokens_per_s"] for threads in (1, 2))

    return paired(ours, theirs, rounds), torchscript


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def _targets(report: Any, results: dict[str, Any]) -> None:
    """The CTranslate2 ratio target (every cell) and the TorchScript / ONNX Runtime target (fp32 cells)."""
    below = [k for k, v in results.items() if v["ratio"] is not None and v["ratio"] < 1.0]
    report.target("seq2seq engine / CTranslate2 target tokens/s, every cell", ">= 1.0",
                  min((v["ratio"] for v in results.values() if v["ratio"] is not None), default=None),
                  not below if results else None, f"below 1.0: {', '.join(below)}" if below else "")
    ts = {k: v["torchscript_ratio"] for k, v in results.items() if v["torchscript_ratio"] is not None}
    low = [k for k, r in ts.items() if r < 0.8]
    report.target("TorchScript / ONNX Runtime engine tokens/s, fp32 cells", ">= 0.8", min(ts.values(), default=None),
                  not low if ts else None, f"below 0.8: {', '.join(low)}" if low else "")


def main(argv: list[str] | None = None) -> None:
    """Some cells, printed (no results file): ``python -m benchmarks.ct2_peer --cache DIR --cell beam4-b8-int8``."""
    import argparse

    from benchmarks.models import prepare

    parser = argparse.ArgumentParser(prog="python -m benchmarks.ct2_peer", description=main.__doc__)
    parser.add_argument("--cache", type=Path, required=True, help="as benchmarks.run --cache (exports if empty)")
    parser.add_argument("--cell", action="append", required=True, metavar="beam<B>-b<N>-<fp32|int8>")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    repository, checkpoints = args.cache / "repository", args.cache / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    prepare(repository, checkpoints, ["seq2seq"])
    setup = _setup(repository, checkpoints)
    for cell in args.cell:
        beams, batch, precision = cell.split("-")
        pairs, ts = measure_cell(setup, int(beams[4:]), int(batch[1:]), precision, 64, args.rounds)
        print(f"{cell}: ours / CTranslate2 {_median([a / b for a, b in pairs]):.2f} (every round "
              f"{', '.join(f'{a:.0f}/{b:.0f}' for a, b in pairs)})" + (f", TorchScript {ts}" if ts else ""), flush=True)


if __name__ == "__main__":
    main()
