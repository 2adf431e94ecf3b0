"""Classifier family: models, task, loop integration, checkpoint round trip, confusion matrix, config errors."""

from __future__ import annotations

import csv
import gzip
import io
import struct
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from deepserve.train.checkpoint import load_checkpoint, restore_model, save_checkpoint
from deepserve.train.classification import ClassificationTask, ClassifierRunConfig
from deepserve.train.config import ConfigError, TrainConfig, build_config, load_yaml, to_dict
from deepserve.train.data.images import ImageDataConfig
from deepserve.train.models import args_dict, build_model
from deepserve.train.models.cnn import CNNArgs
from deepserve.train.models.mlp import MLPArgs
from deepserve.train.models.resnet import ResNetArgs

PRESETS = Path(__file__).resolve().parent.parent / "train" / "presets"
TINY_MODELS = {
    "mlp": {"arch": "mlp", "hidden": [32]},
    "cnn": {"arch": "cnn", "channels": [8, 16], "hidden": [32]},
    "resnet": {"arch": "resnet", "blocks": [1, 1], "widths": [8, 16]},
}


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Learnable 8x8 MNIST-format data: class k lights up a 2x2 patch at one of ten positions and raises the
    background brightness (a translation-invariant cue, for the globally pooled ResNet), plus noise."""
    root = tmp_path_factory.mktemp("idx")
    rng = np.random.default_rng(0)
    corners = [(r, c) for r in (0, 3, 6) for c in (0, 3, 6)] + [(3, 1)]

    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 40, (n, 8, 8)) + 16 * labels[:, None, None]
        for i, k in enumerate(labels):
            r, c = corners[k]
            images[i, r : r + 2, c : c + 2] = 255
        return images, labels

    for prefix, n in (("train", 320), ("t10k", 80)):
        images, labels = make(n)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is several times faster than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_config(idx_dir: Path, model: dict, augment: bool = True, **train: object) -> ClassifierRunConfig:
    return build_config(ClassifierRunConfig, {
        "train": {"batch_size": 32, "lr": 3e-3, "warmup_steps": 0, "progress": False, "tensorboard": False,
                  "device": "cpu", "num_threads": 1, **train},
        "data": {"dataset": "mnist", "data_dir": str(idx_dir), "download": False, "val_fraction": 0.2,
                 "augment": augment, "crop_padding": 1, "hflip": False},
        "model": model,
    })


@pytest.mark.parametrize("arch", list(TINY_MODELS))
def test_each_arch_learns_and_round_trips_through_a_checkpoint(arch: str, idx_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    task = ClassificationTask(run_config(idx_dir, TINY_MODELS[arch], augment=False), torch.device("cpu"), tmp_path)
    task.setup()
    assert task.model_type == arch and task.model_args.num_classes == 10 and task.model_args.image_size == 8
    task.model.eval()
    before = task.evaluate()["val_loss"]
    task.model.train()
    optimizer = torch.optim.AdamW(task.model.parameters(), lr=1e-2)
    for epoch in range(3):
        for batch in task.train_batches(epoch):
            loss, items = task.training_loss(batch)
            assert items == 32 and loss.shape == ()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    task.model.eval()
    metrics = task.evaluate()
    assert metrics["val_loss"] < 0.6 * before and 0 <= metrics["val_accuracy"] <= 1

    path = save_checkpoint(tmp_path / "model.pt", task=task.task, model_type=task.model_type,
                           model_args=args_dict(task.model_args), state_dict=task.model.state_dict(),
                           config=to_dict(task.config), data=task.checkpoint_data())
    payload = load_checkpoint(path, expected_task="image-classification")
    restored = restore_model(payload, path)
    x = task.preprocess(task.data.test.images)  # (N, 1, 8, 8)
    assert torch.equal(restored(x), task.model(x))
    assert payload["data"]["channels"] == 1 and payload["data"]["labels"] == [str(i) for i in range(10)]


def tiny_model(arch: str) -> torch.nn.Module:
    args = {k: v for k, v in TINY_MODELS[arch].items() if k != "arch"}
    return build_model(arch, {"in_channels": 3, "image_size": 12, "num_classes": 5, **args}).eval()


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
@pytest.mark.parametrize("arch", list(TINY_MODELS))
def test_models_script_and_trace(arch: str) -> None:
    model = tiny_model(arch)
    x = torch.randn(4, 3, 12, 12)
    expected = model(x)  # (B, K)
    assert expected.shape == (4, 5)
    assert torch.allclose(torch.jit.script(model)(x), expected, atol=1e-6)
    assert torch.allclose(torch.jit.trace(model, x[:2])(x), expected, atol=1e-6)  # traced at batch 2, run at 4


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_resnet_exports_to_onnx_opset_17(tmp_path: Path) -> None:
    # the ResNet is the one with a pitfall (global mean pooling needs opset 18); MLP/CNN ops are all plain
    model = tiny_model("resnet")
    x = torch.randn(4, 3, 12, 12)
    program = torch.onnx.export(model, (x[:2],), input_names=["images"], output_names=["logits"], opset_version=17,
                                dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, verbose=False)
    program.save(tmp_path / "model.onnx")
    proto = onnx.load(tmp_path / "model.onnx")
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [17]
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].name == "images"
    (logits,) = session.run(["logits"], {"images": x.numpy()})
    np.testing.assert_allclose(logits, model(x).detach().numpy(), atol=1e-4)


def test_training_loop_writes_checkpoint_metrics_and_confusion_matrix(idx_dir: Path, tmp_path: Path) -> None:
    from deepserve.train.loop import run_training

    config = run_config(idx_dir, TINY_MODELS["cnn"], epochs=3, max_steps=20)
    result = run_training("classifier", config, out_path=tmp_path / "clf.pt", log=lambda _: None)
    metrics = result.metrics
    assert {"val_accuracy", "val_loss", "test_accuracy", "test_loss"} <= set(metrics)
    assert metrics["test_accuracy"] > 0.5  # ten well-separated patterns: far above chance after 20 steps

    payload = load_checkpoint(result.checkpoint, expected_task="image-classification")
    data = payload["data"]
    assert set(data) == {"labels", "channels", "height", "width", "mean", "std", "dataset"}
    assert (data["channels"], data["height"], data["width"], data["dataset"]) == (1, 8, 8, "mnist")
    assert payload["model"]["type"] == "cnn" and payload["config"]["model"]["channels"] == [8, 16]
    # the checkpoint alone (weights + stored normalisation) reproduces the reported test accuracy
    model = restore_model(payload)
    raw = np.frombuffer(gzip.decompress((idx_dir / "t10k-images-idx3-ubyte.gz").read_bytes())[16:], np.uint8)
    images = torch.from_numpy(raw.reshape(-1, 1, 8, 8).copy()).float() / 255
    mean, std = torch.tensor(data["mean"]).view(1, -1, 1, 1), torch.tensor(data["std"]).view(1, -1, 1, 1)
    labels = np.frombuffer(gzip.decompress((idx_dir / "t10k-labels-idx1-ubyte.gz").read_bytes())[8:], np.uint8)
    with torch.no_grad():
        predicted = model((images - mean) / std).argmax(1).numpy()
    assert (predicted == labels).mean() == pytest.approx(metrics["test_accuracy"])

    out_dir = tmp_path / "clf"
    assert (out_dir / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.reader(io.StringIO((out_dir / "confusion_matrix.csv").read_text())))
    assert rows[0][1:] == data["labels"] and len(rows) == 11
    counts = np.array([[int(v) for v in row[1:]] for row in rows[1:]])
    assert counts.sum() == 80 and np.trace(counts) / 80 == pytest.approx(metrics["test_accuracy"])


def test_train_batches_are_seeded_per_epoch(idx_dir: Path, tmp_path: Path) -> None:
    def first_batches(seed: int) -> list[list[torch.Tensor]]:
        task = ClassificationTask(run_config(idx_dir, TINY_MODELS["mlp"], seed=seed), torch.device("cpu"), tmp_path)
        task.setup()
        epochs = [list(task.train_batches(e)) for e in (0, 1)]
        assert len(epochs[0]) == task.steps_per_epoch() == 256 // 32
        return [epoch[0][0] for epoch in epochs]

    a, b, c = first_batches(0), first_batches(0), first_batches(1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # reproducible (and so resumable)
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[0], c[0])  # reshuffled per epoch and per seed


def test_bad_config_values_raise_config_error_naming_the_field(idx_dir: Path, tmp_path: Path) -> None:
    cases = [
        ({"model": {"arch": "vgg"}}, "model.arch"),
        ({"model": {"widths": [8, 16]}}, "model.widths"),
        ({"model": {"dropout": 1.5}}, "model.dropout"),
        ({"model": {"kernel_size": 4}}, "model.kernel_size"),
        ({"model": {"hidden": [0]}}, "model.hidden"),
        ({"model": {"blocks": "two"}}, "model.blocks"),
        ({"train": {"lr": -1}}, "train.lr"),
        ({"data": {"val_fraction": 0}}, "data.val_fraction"),
    ]
    for raw, field in cases:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            build_config(ClassifierRunConfig, raw)
    for make, field in ((lambda: MLPArgs(num_classes=1), "num_classes"), (lambda: CNNArgs(channels=[]), "channels"),
                        (lambda: ResNetArgs(blocks=[1], widths=[4, 8]), "widths")):
        with pytest.raises(ConfigError, match=field):
            make()
    # too many pooling stages for 8x8 images is only known once the data is loaded: still named
    task = ClassificationTask(run_config(idx_dir, {"arch": "cnn", "channels": [4, 4, 4, 4]}), torch.device("cpu"), tmp_path)
    with pytest.raises(ConfigError, match=r"model\.channels has 4 pooling stages"):
        task.setup()


def test_presets_are_valid_and_the_default_is_digits_cnn() -> None:
    names = sorted(p.stem for p in PRESETS.glob("*.yaml"))
    assert {"digits-cnn", "cifar10-resnet18", "mnist-lenet"} <= set(names)
    configs = {n: build_config(ClassifierRunConfig, load_yaml(PRESETS / f"{n}.yaml")) for n in
               ("digits-cnn", "cifar10-resnet18", "mnist-lenet")}
    assert to_dict(configs["digits-cnn"]) == to_dict(ClassifierRunConfig())
    resnet = configs["cifar10-resnet18"]
    assert (resnet.model.arch, resnet.model.blocks, resnet.model.widths) == ("resnet", [2, 2, 2, 2], [64, 128, 256, 512])
    assert resnet.data.dataset == "cifar10" and resnet.data.augment and resnet.data.crop_padding == 4 and resnet.data.hflip
    assert configs["mnist-lenet"].model.arch == "cnn" and configs["mnist-lenet"].data.dataset == "mnist"
    assert isinstance(ClassifierRunConfig().train, TrainConfig) and ClassifierRunConfig().data == ImageDataConfig(
        dataset="digits", augment=True, crop_padding=1, hflip=False)
