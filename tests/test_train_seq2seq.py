"""Seq2seq Transformer: cached step decoding == teacher forcing, tracing, the task, checkpoints and config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deepserve.train.checkpoint import load_checkpoint, restore_model, save_checkpoint
from deepserve.train.config import ConfigError, build_config, to_dict
from deepserve.train.models import args_dict, build_model
from deepserve.train.models.seq2seq import Seq2SeqArgs, Seq2SeqTransformer, affine, greedy_decode
from deepserve.train.seq2seq import Seq2SeqRunConfig, Seq2SeqTask
from deepserve.train.tokenizer import Tokenizer

PAD, BOS, EOS = 0, 2, 3


def tiny_model(seed: int = 0) -> Seq2SeqTransformer:
    torch.manual_seed(seed)
    args = Seq2SeqArgs(vocab_size=40, d_model=32, n_heads=4, n_encoder_layers=2, n_decoder_layers=2, d_ff=64,
                       dropout=0.1, max_len=32, pad_id=PAD)
    return Seq2SeqTransformer(args).eval()


def ragged_batch() -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """src right-padded to 3 lengths; tgt_in = BOS + tokens, right-padded; returns the target lengths."""
    g = torch.Generator().manual_seed(1)
    src = torch.randint(4, 40, (3, 7), generator=g)
    src[1, 5:] = PAD
    src[2, 3:] = PAD
    lengths = [6, 4, 2]
    tgt = torch.randint(4, 40, (3, 6), generator=g)
    tgt[:, 0] = BOS
    for i, n in enumerate(lengths):
        tgt[i, n:] = PAD
    return src, tgt, lengths


def test_forward_shape_and_type_registry() -> None:
    model = build_model("transformer", args_dict(tiny_model().args))
    src, tgt, _ = ragged_batch()
    assert model(src, tgt).shape == (3, 6, 40)


def test_cached_step_decoding_matches_teacher_forcing_with_left_padding() -> None:
    """Rows join at different steps (continuous batching): before its start a row's slots are empty
    (``past_pad_mask``) and its positions restart at 0; every real step must equal ``forward``."""
    model = tiny_model()
    src, tgt, lengths = ragged_batch()
    with torch.no_grad():
        reference = model(src, tgt)  # (B,T,V)
        src_mask = src.eq(PAD)
        memory, cross_k, cross_v = model.encode(src, src_mask)
        assert memory.shape == (3, 7, 32) and cross_k.shape == (2, 3, 4, 7, 8) == cross_v.shape
        past_k, past_v, past_mask = model.empty_cache(3)  # P = 0
        starts = [0, 2, 3]
        checked = 0
        for t in range(max(s + n for s, n in zip(starts, lengths))):
            live = [0 <= t - s < n for s, n in zip(starts, lengths)]
            tokens = torch.tensor([[int(tgt[i, t - s]) if live[i] else PAD] for i, s in enumerate(starts)])
            positions = torch.tensor([t - s if live[i] else 0 for i, s in enumerate(starts)])
            logits, past_k, past_v = model.decode_step(
                tokens, positions, cross_k, cross_v, src_mask, past_k, past_v, past_mask
            )
            assert logits.shape == (3, 40) and past_k.shape == (2, 3, 4, t + 1, 8)
            past_mask = torch.cat([past_mask, torch.tensor([[not x] for x in live])], dim=1)
            for i, s in enumerate(starts):
                if live[i]:
                    torch.testing.assert_close(logits[i], reference[i, t - s], atol=1e-5, rtol=0)
                    checked += 1
    assert checked == sum(lengths)


def test_greedy_decode_matches_uncached_argmax() -> None:
    model = tiny_model(seed=3)
    src, _, _ = ragged_batch()
    got = greedy_decode(model, src, max_len=5, bos=BOS, eos=EOS)
    with torch.no_grad():
        ys = torch.full((3, 1), BOS)
        for _ in range(5):
            ys = torch.cat([ys, model(src, ys)[:, -1].argmax(-1, keepdim=True)], dim=1)
    for row, ids in zip(ys[:, 1:].tolist(), got):
        expected = row[: row.index(EOS)] if EOS in row else row
        assert ids == expected


def test_step_api_traces_with_dynamic_shapes() -> None:
    """The exporter traces one small wrapper per method; the trace must hold for other B, S and P (P = 0)."""
    model = tiny_model()

    class Step(torch.nn.Module):
        def __init__(self, m: Seq2SeqTransformer) -> None:
            super().__init__()
            self.m = m

        def forward(self, *inputs: torch.Tensor):
            return self.m.decode_step(*inputs)

    def inputs(b: int, s: int, p: int):
        src = torch.randint(4, 40, (b, s))
        mask = torch.zeros(b, s, dtype=torch.bool)
        _, ck, cv = model.encode(src, mask)
        past_mask = torch.zeros(b, p, dtype=torch.bool)
        if p:
            past_mask[0, : p - 1] = True  # a left-padded row
        return (torch.randint(4, 40, (b, 1)), torch.arange(b), ck, cv, mask,
                torch.randn(2, b, 4, p, 8), torch.randn(2, b, 4, p, 8), past_mask)

    with torch.no_grad():
        traced = torch.jit.trace(Step(model), inputs(2, 5, 3))
        for shape in ((4, 9, 0), (1, 3, 6)):
            args = inputs(*shape)
            for got, want in zip(traced(*args), model.decode_step(*args)):
                torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


# ---- the task -------------------------------------------------------------------------------------------


def tiny_config(**data) -> Seq2SeqRunConfig:
    raw = {
        "train": {"batch_size": 32, "lr": 3e-3, "warmup_steps": 0, "progress": False, "tensorboard": False,
                  "max_steps": 8, "eval_every": 4, "max_time_s": 0.0, "device": "cpu"},
        "data": {"tasks": ["place_value", "sort"], "train_size": 192, "val_size": 16, "test_size": 16,
                 "extrapolate_size": 16, "max_target_length": 40, **data},
        "tokenizer": {"vocab_size": 80},
        "model": {"d_model": 32, "n_heads": 4, "n_encoder_layers": 1, "n_decoder_layers": 1, "d_ff": 64},
    }
    return build_config(Seq2SeqRunConfig, raw)


def make_task(tmp_path: Path, **data) -> Seq2SeqTask:
    torch.manual_seed(0)
    task = Seq2SeqTask(tiny_config(**data), torch.device("cpu"), tmp_path / "run")
    task.setup()
    return task


def test_a_few_steps_lower_the_loss(tmp_path: Path) -> None:
    task = make_task(tmp_path)
    batch = next(iter(task.train_batches(0)))
    assert batch.tgt_in[:, 0].eq(BOS).all() and torch.equal(batch.tgt_in[:, 1:], batch.tgt_out[:, :-1].masked_fill(
        batch.tgt_out[:, :-1].eq(EOS), PAD))  # shifted by one (EOS only ever in the output)
    optimizer = torch.optim.AdamW(task.model.parameters(), lr=3e-3)
    task.model.train()
    first = task.training_loss(batch)[0].item()
    for _ in range(15):
        loss, items = task.training_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert items == len(batch)
    assert task.training_loss(batch)[0].item() < 0.7 * first


def test_evaluate_report_and_checkpoint_round_trip(tmp_path: Path) -> None:
    task = make_task(tmp_path)
    task.model.eval()
    metrics = task.evaluate()
    assert {"val_loss", "val_exact_match", "val_exact_match_place_value", "val_exact_match_sort"} <= set(metrics)
    report = task.final_report()
    for split in ("test", "extrapolate"):
        assert 0.0 <= report[f"{split}_exact_match"] <= 1.0
        assert f"{split}_exact_match_place_value" in report and f"{split}_exact_match_sort" in report
        assert (tmp_path / "run" / f"predictions_{split}.tsv").read_text().count("\n") == 17

    data = task.checkpoint_data()
    assert data["pad_id"] == 0 and data["unk_id"] == 1 and data["bos_id"] == 2 and data["eos_id"] == 3
    assert data["tokenizer_type"] == "bpe" and data["max_source_length"] == 96 and data["max_target_length"] == 40
    path = save_checkpoint(tmp_path / "s2s.pt", task="seq2seq", model_type=task.model_type,
                           model_args=args_dict(task.model_args), state_dict=task.model.state_dict(),
                           config=to_dict(task.config), data=data, metrics=report)
    payload = load_checkpoint(path, expected_task="seq2seq")
    model = restore_model(payload, path)
    tok = Tokenizer(payload["data"]["spm_model"])
    question = task.splits["test"][0].source
    src = torch.tensor([tok.encode(question) + [EOS]])
    with torch.no_grad():
        tgt = torch.tensor([[BOS, 5, 6]])
        torch.testing.assert_close(model(src, tgt), task.model(src, tgt))
    assert greedy_decode(model, src, 8, BOS, EOS) == greedy_decode(task.model, src, 8, BOS, EOS)


def test_tsv_source_and_length_limits(tmp_path: Path) -> None:
    lines = [f"say {i} {i + 1}\t{i + 1} {i}" for i in range(60)]
    (tmp_path / "train.tsv").write_text("\n".join(lines) + "\n")
    task = make_task(tmp_path, source="tsv", train_path=str(tmp_path / "train.tsv"), test_path=str(tmp_path / "train.tsv"))
    assert len(task.splits["val"]) == 3 and len(task.splits["train"]) == 57 and not task.splits["extrapolate"]
    assert task.encoded["train"][0].src[-1] == EOS
    with pytest.raises(ConfigError, match=r"data\.max_source_length is 4 .*train example"):
        make_task(tmp_path, source="tsv", train_path=str(tmp_path / "train.tsv"), max_source_length=4)


def test_training_through_the_loop(tmp_path: Path) -> None:
    from deepserve.train.loop import run_training

    result = run_training("seq2seq", tiny_config(), out_path=tmp_path / "s2s.pt", log=lambda s: None)
    assert result.steps == 8
    assert {"test_exact_match", "extrapolate_exact_match", "val_exact_match"} <= set(result.metrics)
    payload = load_checkpoint(result.checkpoint, expected_task="seq2seq")
    assert payload["model"]["type"] == "transformer" and isinstance(payload["data"]["spm_model"], bytes)
    restore_model(payload, result.checkpoint)


# ---- config -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"model": {"n_heads": 3}}, "model.n_heads"),
        ({"model": {"label_smoothing": 1.5}}, "model.label_smoothing"),
        ({"data": {"tasks": ["calculus"]}}, "data.tasks"),
        ({"data": {"tasks": []}}, "data.tasks"),
        ({"data": {"source": "tsv"}}, "data.train_path"),
        ({"data": {"source": "csv"}}, "data.source"),
        ({"data": {"max_target_length": 0}}, "data.max_target_length"),
        ({"tokenizer": {"type": "word"}}, "tokenizer.type"),
        ({"tokenizer": {"vocab_size": 2}}, "tokenizer.vocab_size"),
        ({"model": {"d_model": "big"}}, "model.d_model"),
    ],
)
def test_bad_config_names_the_field(raw: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        build_config(Seq2SeqRunConfig, raw)


def test_preset_is_the_default_config() -> None:
    from deepserve.train.config import load_yaml

    preset = Path(__file__).parents[1] / "train" / "presets" / "seq2seq-math.yaml"
    assert to_dict(build_config(Seq2SeqRunConfig, load_yaml(preset))) == to_dict(Seq2SeqRunConfig())


def test_model_args_validation() -> None:
    with pytest.raises(ConfigError, match="n_heads"):
        Seq2SeqArgs(d_model=30, n_heads=4)


class _Affine(torch.nn.Module):
    def __init__(self, rows: int | None) -> None:
        super().__init__()
        self.fc, self.rows = torch.nn.Linear(8, 6), rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return affine(x, self.fc, 0.5, self.rows)


@pytest.mark.parametrize("rows", [None, 2])
def test_affine_scales_its_first_rows_outputs_or_all_of_them_eager_and_traced(rows: int | None) -> None:
    torch.manual_seed(0)
    module, x = _Affine(rows).eval(), torch.randn(3, 8)
    with torch.no_grad():
        expected = module.fc(x)
        expected[:, : 6 if rows is None else rows] *= 0.5
        traced = torch.jit.freeze(torch.jit.trace(module, x))
        torch.testing.assert_close(module(x), expected)
        torch.testing.assert_close(traced(x), expected)


def test_seq2seq_eager_step_reads_the_q_projection_weights_only_in_its_product() -> None:
    """Eager steps (training's greedy validation, export parity) scale Q after the product, rather than
    building scaled copies of the Q projections' weights in every layer on every step."""
    model = Seq2SeqTransformer(Seq2SeqArgs(vocab_size=16, d_model=16, n_heads=2)).eval()
    params = [p for block in model.decoder for lin in (block.self_attn.qkv, block.cross_attn.q)
              for p in (lin.weight, lin.bias)]

    class Readers(torch.overrides.TorchFunctionMode):  # the torch functions given one of those parameters
        def __init__(self) -> None:
            super().__init__()
            self.seen: set[str] = set()

        def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            flat = [a for x in (*args, *(kwargs or {}).values()) for a in (x if isinstance(x, (list, tuple)) else [x])]
            if any(a is p for a in flat for p in params):
                self.seen.add(func.__name__)
            return func(*args, **(kwargs or {}))

    src, readers = torch.tensor([[5, 6, 7, 3]]), Readers()
    with torch.no_grad():
        _, cross_k, cross_v = model.encode(src, src.eq(0))
        with readers:
            model.decode_step(torch.tensor([[1]]), torch.tensor([0]), cross_k, cross_v, src.eq(0),
                              *model.empty_cache(1))
    assert readers.seen == {"t", "addmm"}  # the weight transposed into the product, the bias added in it
