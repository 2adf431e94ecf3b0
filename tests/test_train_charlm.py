"""CharRNN model and the char-LM training task: state handling, learning, checkpoints, config, export."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deepserve.train.charlm import CharLMModelConfig, CharLMRunConfig, CharLMTask
from deepserve.train.checkpoint import load_checkpoint, restore_model, save_checkpoint
from deepserve.train.config import ConfigError, TrainConfig, build_config, load_yaml, to_dict
from deepserve.train.data.text import TextDataConfig
from deepserve.train.models import args_dict, build_model
from deepserve.train.models.charlm import CharRNN, CharRNNArgs

# "Ω" only occurs in the validation tail, so it is out of the vocabulary there
CORPUS = "the quick brown fox jumps over the lazy dog, naïve café. " * 50 + "Ωmega"


@pytest.fixture(autouse=True)
def _one_thread():
    # the machine's cores are shared: with more threads than free cores, OpenMP spin-waits make tiny ops ~50x slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(corpus: Path, cell: str = "lstm", **train) -> CharLMRunConfig:
    train_cfg = dict(batch_size=4, lr=1e-2, warmup_steps=0, eval_every=0, tensorboard=False, progress=False, seed=0)
    train_cfg.update(train)
    return CharLMRunConfig(
        train=TrainConfig(**train_cfg),
        data=TextDataConfig(source="file", path=str(corpus), seq_len=16),
        model=CharLMModelConfig(type=cell, embed_dim=8, hidden_size=32, num_layers=2, dropout=0.0),
    )


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(CORPUS, encoding="utf-8")
    return path


def make_task(config: CharLMRunConfig, out_dir: Path) -> CharLMTask:
    torch.manual_seed(0)
    task = CharLMTask(config, torch.device("cpu"), out_dir)
    task.setup()
    return task


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_model_shapes_and_state_layout(cell):
    args = CharRNNArgs(vocab_size=11, cell=cell, embed_dim=4, hidden_size=6, num_layers=3)
    model = build_model(cell, args_dict(args))
    assert isinstance(model, CharRNN)
    state = model.init_state(2)
    assert len(state) == (2 if cell == "lstm" else 1)
    assert all(s.shape == (3, 2, 6) for s in state)
    logits, new_state = model(torch.randint(0, 11, (2, 5)), state)
    assert logits.shape == (2, 5, 11)
    assert [s.shape for s in new_state] == [s.shape for s in state]
    # state=None means a zero state
    torch.testing.assert_close(model(torch.ones(2, 5, dtype=torch.long), None)[0],
                               model(torch.ones(2, 5, dtype=torch.long), model.init_state(2))[0])


def test_task_data_and_checkpoint_data(corpus, tmp_path):
    task = make_task(tiny_config(corpus), tmp_path)
    data = task.checkpoint_data()
    assert data["unk_id"] == 0 and data["vocab"][0] == "<unk>"
    train_text = CORPUS[: len(CORPUS) - int(len(CORPUS) * 0.1)]
    assert data["vocab"][1:] == sorted(set(train_text))
    assert "ï" in data["vocab"] and "Ω" not in data["vocab"]
    assert task.val_ids[-5].item() == 0  # unknown in validation -> <unk>
    assert task.model_type == "lstm" and task.model_args.vocab_size == len(data["vocab"])
    x, y = next(iter(task.train_batches(0)))
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert task.steps_per_epoch() == len(list(task.train_batches(0)))


def test_state_is_carried_between_batches_and_reset_each_epoch(corpus, tmp_path):
    task = make_task(tiny_config(corpus), tmp_path)
    task.model.eval()  # no dropout, so losses can be recomputed exactly
    batches = task.train_batches(0)
    b0, b1 = next(batches), next(batches)
    task.training_loss(b0)
    carried = task._state
    assert carried is not None and not any(s.requires_grad for s in carried)
    loss1, items = task.training_loss(b1)
    assert items == b1[1].numel()
    with torch.no_grad():
        logits, _ = task.model(b1[0], carried)
        expected = F.cross_entropy(logits.flatten(0, 1), b1[1].flatten())
        fresh, _ = task.model(b1[0], None)
        from_zero = F.cross_entropy(fresh.flatten(0, 1), b1[1].flatten())
    torch.testing.assert_close(loss1.detach(), expected)
    assert abs(loss1.item() - from_zero.item()) > 1e-6  # the carried state made a difference
    next(task.train_batches(1))  # a new epoch starts from a zero state
    assert task._state is None


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_a_few_steps_lower_the_loss(corpus, tmp_path, cell):
    task = make_task(tiny_config(corpus, cell), tmp_path)
    task.model.eval()
    before = task.evaluate()
    assert before["val_bpc"] == pytest.approx(before["val_loss"] / np.log(2))
    task.model.train()
    optimizer = torch.optim.Adam(task.model.parameters(), lr=1e-2)
    for _ in range(2):
        for batch in task.train_batches(0):
            loss, _ = task.training_loss(batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    task.model.eval()
    after = task.evaluate()
    assert after["val_loss"] < before["val_loss"] - 0.5, (before, after)


def test_sample_is_logged_and_deterministic(corpus, tmp_path):
    task = make_task(tiny_config(corpus), tmp_path)
    logged: list[str] = []
    task.on_evaluate({"val_loss": 1.0}, logged.append)
    task.on_evaluate({"val_loss": 1.0}, logged.append)
    assert len(logged) == 2 and logged[0] == logged[1]
    sample = logged[0].split("\n", 1)[1]
    assert len(sample) == 200 and set(sample) <= set(task.vocab.itos[1:])
    assert task.model.training  # mode restored


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_checkpoint_round_trip_gives_identical_logits(corpus, tmp_path, cell):
    config = tiny_config(corpus, cell)
    task = make_task(config, tmp_path)
    path = save_checkpoint(
        tmp_path / "charlm.pt", task=task.task, model_type=task.model_type, model_args=args_dict(task.model_args),
        state_dict=task.model.state_dict(), config=to_dict(config), data=task.checkpoint_data(),
    )
    payload = load_checkpoint(path, expected_task="char-lm")
    assert payload["model"]["type"] == cell and payload["data"]["vocab"] == task.vocab.itos
    restored = restore_model(payload, path)
    tokens = task.vocab.encode("the lazy fox").unsqueeze(0)  # (1, T)
    task.model.eval()
    with torch.no_grad():
        a, sa = task.model(tokens, None)
        b, sb = restored(tokens, None)
    assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(sa, sb))


def test_training_through_the_generic_loop(corpus, tmp_path):
    from deepserve.train.loop import run_training

    config = tiny_config(corpus, epochs=2, eval_every=20)
    lines: list[str] = []
    result = run_training("charlm", config, out_path=tmp_path / "run" / "charlm.pt", log=lines.append)
    assert set(result.metrics) >= {"val_loss", "val_bpc"}
    assert result.metrics["val_loss"] < np.log(len(set(CORPUS)))  # better than uniform
    payload = load_checkpoint(result.checkpoint, expected_task="char-lm")
    assert payload["data"]["vocab"][0] == "<unk>" and payload["data"]["unk_id"] == 0
    assert payload["config"]["data"]["seq_len"] == 16
    assert any(line.startswith("sample (200 chars") for line in lines)
    restore_model(payload, result.checkpoint)


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"model": {"hidden_size": 0}}, "model.hidden_size"),
        ({"model": {"type": "rnn"}}, "model.type"),
        ({"model": {"dropout": 1.0}}, "model.dropout"),
        ({"data": {"seq_len": -1}}, "data.seq_len"),
        ({"data": {"source": "file"}}, "data.path"),
        ({"train": {"lr": 0}}, "train.lr"),
        ({"modle": {}}, "modle"),
    ],
)
def test_bad_config_values_raise_config_error_naming_the_field(raw, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        build_config(CharLMRunConfig, raw)


def test_model_args_are_validated():
    with pytest.raises(ConfigError, match="vocab_size"):
        CharRNNArgs(vocab_size=1)
    with pytest.raises(ConfigError, match="cell"):
        CharRNNArgs(vocab_size=5, cell="rnn")  # type: ignore[arg-type]


def test_text_too_short_for_the_batch_size_names_the_field(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("abcdefghijklmnopqrstuvwxyz" * 2, encoding="utf-8")
    config = tiny_config(path, batch_size=64)
    with pytest.raises(ConfigError, match="train.batch_size=64"):
        make_task(config, tmp_path)


def test_presets_build_and_the_default_preset_is_the_config_default():
    presets = files("deepserve.train") / "presets"
    default = build_config(CharLMRunConfig, load_yaml(str(presets / "charlm-lstm.yaml")))
    assert default == CharLMRunConfig()
    assert default.data.source == "pydoc" and default.train.max_time_s <= 180
    gpu = build_config(CharLMRunConfig, load_yaml(str(presets / "shakespeare-lstm.yaml")))
    assert gpu.data.source == "tiny-shakespeare" and gpu.model.hidden_size > default.model.hidden_size


class _LSTMStep(torch.nn.Module):
    """The exporter's view: (tokens, h, c) -> (logits, h_out, c_out)."""

    def __init__(self, model: CharRNN) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens, h, c):
        logits, (h_out, c_out) = self.model(tokens, (h, c))
        return logits, h_out, c_out


class _GRUStep(torch.nn.Module):
    def __init__(self, model: CharRNN) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens, h):
        logits, (h_out,) = self.model(tokens, (h,))
        return logits, h_out


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_exports_with_torchscript_and_onnx_opset17(tmp_path, cell):
    import onnx
    import onnxruntime as ort

    torch.manual_seed(0)
    model = CharRNN(CharRNNArgs(vocab_size=13, cell=cell, embed_dim=4, hidden_size=8, num_layers=2)).eval()
    step = _LSTMStep(model) if cell == "lstm" else _GRUStep(model)
    names_in = ["tokens", "h", "c"] if cell == "lstm" else ["tokens", "h"]
    names_out = ["logits", "h_out", "c_out"] if cell == "lstm" else ["logits", "h_out"]
    example = (torch.randint(0, 13, (2, 5)), *model.init_state(2))
    # other batch and time sizes than traced with: the axes must stay dynamic
    other = (torch.randint(0, 13, (3, 7)), *(torch.randn(2, 3, 8) for _ in names_in[1:]))
    with torch.no_grad():
        expected = step(*other)
        traced = torch.jit.trace(step, example)
        for got, want in zip(traced(*other), expected):
            torch.testing.assert_close(got, want)

        axes = {"tokens": {0: "B", 1: "T"}, "logits": {0: "B", 1: "T"}}
        axes.update({name: {1: "B"} for name in names_in[1:] + names_out[1:]})
        path = tmp_path / f"{cell}.onnx"
        torch.onnx.export(step, example, str(path), input_names=names_in, output_names=names_out,
                          dynamic_axes=axes, opset_version=17, dynamo=False)
    assert onnx.load(str(path)).opset_import[0].version == 17
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {name: t.numpy() for name, t in zip(names_in, other)})
    for got, want in zip(outputs, expected):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-5)
