"""Image dataset loaders on tiny files generated in tmp_path, splits, statistics, augmentation, downloads."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deepserve.train.config import ConfigError, build_config
from deepserve.train.data.download import DataError, fetch
from deepserve.train.data.image_formats import CIFAR10_FILES, read_idx
from deepserve.train.data.images import ImageDataConfig, Preprocessor, load_image_data, random_crop, random_hflip


def write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if gz else payload)


def make_idx_dataset(root: Path, n_train: int = 40, n_test: int = 10, size: int = 6) -> dict[str, np.ndarray]:
    """Train files gzipped, test files plain; pixel [0, 0] of train image i is i, so images are identifiable."""
    rng = np.random.default_rng(0)
    train_x = rng.integers(0, 256, (n_train, size, size), dtype=np.uint8)
    train_x[:, 0, 0] = np.arange(n_train)
    train_y = np.arange(n_train) % 10
    test_x = rng.integers(0, 256, (n_test, size, size), dtype=np.uint8)
    test_y = (np.arange(n_test) * 3) % 10
    root.mkdir(parents=True, exist_ok=True)
    write_idx(root / "train-images-idx3-ubyte.gz", train_x, gz=True)
    write_idx(root / "train-labels-idx1-ubyte.gz", train_y, gz=True)
    write_idx(root / "t10k-images-idx3-ubyte", test_x, gz=False)
    write_idx(root / "t10k-labels-idx1-ubyte", test_y, gz=False)
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}


def test_idx_gz_and_plain_load_with_deterministic_disjoint_splits(tmp_path: Path) -> None:
    files = make_idx_dataset(tmp_path / "mnist")
    cfg = ImageDataConfig(dataset="mnist", data_dir=str(tmp_path / "mnist"), download=False, val_fraction=0.25)
    data = load_image_data(cfg)
    assert data.labels == [str(i) for i in range(10)] and data.scale == 255.0
    assert (data.channels, data.height, data.width) == (1, 6, 6)
    # the official test split is kept as is, in file order
    assert torch.equal(data.test.images[:, 0], torch.from_numpy(files["test_x"]))
    assert torch.equal(data.test.labels, torch.from_numpy(files["test_y"]).long())
    # val is carved from train: disjoint, together exactly the training file, labels travel with their image
    assert (len(data.train), len(data.val)) == (30, 10)
    ids_train = data.train.images[:, 0, 0, 0].tolist()
    ids_val = data.val.images[:, 0, 0, 0].tolist()
    assert sorted(ids_train + ids_val) == list(range(40))
    assert data.train.labels.tolist() == [i % 10 for i in ids_train]
    # same seed, same split; another seed, another split
    again = load_image_data(cfg)
    assert torch.equal(again.val.images, data.val.images)
    other = load_image_data(ImageDataConfig(dataset="mnist", data_dir=cfg.data_dir, download=False,
                                            val_fraction=0.25, split_seed=1))
    assert other.val.images[:, 0, 0, 0].tolist() != ids_val
    # statistics of the training split only, pixels in [0, 1]
    train_pixels = data.train.images.double() / 255
    assert data.mean == pytest.approx([train_pixels.mean().item()], abs=1e-9)
    assert data.std == pytest.approx([train_pixels.std(unbiased=False).item()], abs=1e-9)
    assert data.checkpoint_data() == {"labels": data.labels, "channels": 1, "height": 6, "width": 6,
                                      "mean": data.mean, "std": data.std, "dataset": "mnist"}


def test_fashion_mnist_label_names_and_max_train_examples(tmp_path: Path) -> None:
    make_idx_dataset(tmp_path)
    data = load_image_data(ImageDataConfig(dataset="fashion-mnist", data_dir=str(tmp_path), download=False,
                                           max_train_examples=7))
    assert data.labels[0] == "T-shirt/top" and data.labels[9] == "Ankle boot"
    assert len(data.train) == 7 and len(data.val) == 4


def test_idx_missing_files_say_which_and_where(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = tmp_path / "mnist"
    make_idx_dataset(files)
    os.remove(files / "t10k-labels-idx1-ubyte")
    with pytest.raises(DataError) as e:
        load_image_data(ImageDataConfig(dataset="mnist", data_dir=str(files), download=False))
    message = str(e.value)
    assert "t10k-labels-idx1-ubyte[.gz]" in message and str(files) in message and "data.download is false" in message
    assert "train-images" not in message  # only what is missing
    monkeypatch.setenv("DEEPSERVE_OFFLINE", "1")
    with pytest.raises(DataError, match="offline"):
        load_image_data(ImageDataConfig(dataset="mnist", data_dir=str(tmp_path / "empty"), download=True))


def test_bad_idx_files_are_data_errors(tmp_path: Path) -> None:
    (tmp_path / "junk").write_bytes(b"\x12\x34\x56\x78 not idx")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(tmp_path / "junk")
    write_idx(tmp_path / "short", np.zeros((4, 3, 3), np.uint8), gz=False)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-5])
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "short")
    (tmp_path / "bad.gz").write_bytes(b"\x1f\x8b" + b"broken gzip")
    with pytest.raises(DataError, match="cannot read"):
        read_idx(tmp_path / "bad.gz")


def make_cifar_files(n: int = 4) -> dict[str, bytes]:
    """The six CIFAR-10 python batches (protocol-2 pickles with bytes keys, like the originals), n images each."""
    rng = np.random.default_rng(1)
    files = {}
    for i, name in enumerate(CIFAR10_FILES[:-1]):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        data[:, :1024] = 10 * i + 1  # red plane of every image in batch i
        labels = [(i + j) % 10 for j in range(n)]
        files[name] = pickle.dumps({b"batch_label": name.encode(), b"data": data, b"labels": labels}, protocol=2)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    files["batches.meta"] = pickle.dumps({b"label_names": names, b"num_vis": 3072}, protocol=2)
    return files


def test_cifar10_from_folder_and_from_tar(tmp_path: Path) -> None:
    files = make_cifar_files()
    folder = tmp_path / "extracted" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, blob in files.items():
        (folder / name).write_bytes(blob)
    tar_dir = tmp_path / "archive"
    tar_dir.mkdir()
    with tarfile.open(tar_dir / "cifar-10-python.tar.gz", "w:gz") as tar:
        for name, blob in files.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    loaded = []
    for root in (tmp_path / "extracted", tar_dir):
        data = load_image_data(ImageDataConfig(dataset="cifar10", data_dir=str(root), download=False, val_fraction=0.2))
        assert data.labels[:2] == ["airplane", "automobile"] and (data.channels, data.height, data.width) == (3, 32, 32)
        assert (len(data.train), len(data.val), len(data.test)) == (16, 4, 4)
        # rows are R, G, B planes: the red plane of test images is the marker 51
        assert (data.test.images[:, 0] == 51).all() and data.test.labels.tolist() == [5, 6, 7, 8]
        assert len(data.mean) == 3 and len(data.std) == 3
        loaded.append(data)
    assert torch.equal(loaded[0].train.images, loaded[1].train.images)


def test_cifar10_missing_and_unsafe_files(tmp_path: Path) -> None:
    with pytest.raises(DataError) as e:
        load_image_data(ImageDataConfig(dataset="cifar10", data_dir=str(tmp_path), download=False))
    assert "cifar-10-python.tar.gz" in str(e.value) and "data_batch_1" in str(e.value) and str(tmp_path) in str(e.value)
    files = make_cifar_files()
    for name, blob in files.items():
        if name != "data_batch_3":
            (tmp_path / name).write_bytes(blob)
    with pytest.raises(DataError, match="missing data_batch_3"):
        load_image_data(ImageDataConfig(dataset="cifar10", data_dir=str(tmp_path), download=False))
    # a pickle that would call a function on load is refused, not executed
    (tmp_path / "data_batch_3").write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")
    with pytest.raises(DataError, match="refusing to load os.system"):
        load_image_data(ImageDataConfig(dataset="cifar10", data_dir=str(tmp_path), download=False))


def make_image_folder(root: Path, classes: dict[str, int]) -> None:
    rng = np.random.default_rng(2)
    for c, (name, count) in enumerate(classes.items()):
        (root / name).mkdir(parents=True)
        for i in range(count):
            pixels = np.full((10 + i, 12, 3), 40 * c, dtype=np.uint8) + rng.integers(0, 5, (10 + i, 12, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.{'png' if i % 2 else 'jpg'}")
    (root / "notes.txt").write_text("not a class")


def test_image_folder_flat_and_train_test_layouts(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "flat", {"cat": 6, "dog": 5, "eel": 4})
    data = load_image_data(ImageDataConfig(dataset="imagefolder", data_dir=str(tmp_path / "flat"), image_size=8,
                                           test_fraction=0.2, val_fraction=0.2))
    assert data.labels == ["cat", "dog", "eel"] and (data.channels, data.height, data.width) == (3, 8, 8)
    assert len(data.train) + len(data.val) + len(data.test) == 15 and len(data.test) == 3
    # class c images are filled with about 40 * c: resized pixels keep their class's value
    for split in (data.train, data.val, data.test):
        assert ((split.images.float().mean(dim=(1, 2, 3)) / 40).round().long() == split.labels).all()

    make_image_folder(tmp_path / "split" / "train", {"a": 3, "b": 3})
    make_image_folder(tmp_path / "split" / "test", {"a": 1, "b": 2})
    data = load_image_data(ImageDataConfig(dataset="imagefolder", data_dir=str(tmp_path / "split"), image_size=4,
                                           grayscale=True))
    assert data.labels == ["a", "b"] and data.channels == 1 and data.test.labels.tolist() == [0, 1, 1]


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="is not a folder"):
        load_image_data(ImageDataConfig(dataset="imagefolder", data_dir=str(tmp_path / "nowhere")))
    (tmp_path / "only" / "cats").mkdir(parents=True)
    with pytest.raises(DataError, match="one sub-folder per class"):
        load_image_data(ImageDataConfig(dataset="imagefolder", data_dir=str(tmp_path / "only")))
    make_image_folder(tmp_path / "bad", {"a": 2, "b": 2})
    (tmp_path / "bad" / "b" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png"):
        load_image_data(ImageDataConfig(dataset="imagefolder", data_dir=str(tmp_path / "bad")))


def test_digits_is_offline_scaled_and_split_deterministically() -> None:
    data = load_image_data(ImageDataConfig())
    assert data.dataset == "digits" and data.scale == 16.0 and data.labels == [str(i) for i in range(10)]
    assert int(data.train.images.max()) == 16 and (data.channels, data.height, data.width) == (1, 8, 8)
    assert len(data.train) + len(data.val) + len(data.test) == 1797 and len(data.test) == 359
    x = Preprocessor(data, "cpu")(data.train.images)
    assert x.mean().abs().item() < 1e-4 and abs(x.std().item() - 1) < 0.05  # normalised with train statistics


def test_augmentation_is_a_per_image_shift_and_flip() -> None:
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5) + 1
    g = torch.Generator().manual_seed(0)
    out = random_crop(x, 2, g)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for b in range(2):
        windows = [padded[b, :, i : i + 5, j : j + 5] for i in range(5) for j in range(5)]
        assert any(torch.equal(out[b], w) for w in windows)
    assert torch.equal(random_crop(x, 2, torch.Generator().manual_seed(0)), out)  # seeded: reproducible
    flipped = random_hflip(x.repeat(8, 1, 1, 1), torch.Generator().manual_seed(1))
    same = [torch.equal(f, x[i % 2]) for i, f in enumerate(flipped)]
    mirrored = [torch.equal(f, x[i % 2].flip(2)) for i, f in enumerate(flipped)]
    assert all(s or m for s, m in zip(same, mirrored)) and any(same) and any(mirrored)


def test_fetch_checks_sha256_caches_and_explains_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "source.bin"
    source.write_bytes(b"payload" * 100)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    cache = tmp_path / "cache"
    path = fetch(source.as_uri(), digest, cache, "file.bin")
    assert path == cache / "file.bin" and path.read_bytes() == source.read_bytes()
    source.unlink()
    assert fetch(source.as_uri(), digest, cache, "file.bin") == path  # cached: no download needed
    with pytest.raises(DataError) as e:
        fetch(source.as_uri(), "0" * 64, cache, "file.bin")  # cached copy has another hash, source is gone
    assert "put it at" in str(e.value) and str(cache / "file.bin") in str(e.value) and "0" * 64 in str(e.value)
    other = tmp_path / "other.bin"
    other.write_bytes(b"something else")
    with pytest.raises(DataError, match="sha256"):
        fetch(other.as_uri(), digest, cache, "new.bin")
    assert sorted(p.name for p in cache.iterdir()) == ["file.bin"]  # nothing half-written is left behind
    with pytest.raises(DataError, match="could not download http://127.0.0.1:1/x.gz"):
        fetch("http://127.0.0.1:1/x.gz", digest, cache, "x.gz", timeout=5)
    monkeypatch.setenv("DEEPSERVE_OFFLINE", "1")
    with pytest.raises(DataError) as e:
        fetch("https://example.invalid/x.gz", digest, cache, "x.gz")
    assert "offline" in str(e.value) and str(cache / "x.gz") in str(e.value) and digest in str(e.value)


def test_bad_data_config_values_name_the_field() -> None:
    with pytest.raises(ConfigError, match="val_fraction"):
        ImageDataConfig(val_fraction=1.5)
    with pytest.raises(ConfigError, match="data_dir"):
        ImageDataConfig(dataset="imagefolder")
    from deepserve.train.classification import ClassifierRunConfig

    cases = [({"data": {"dataset": "imagenet"}}, "data.dataset"), ({"data": {"crop_padding": -1}}, "data.crop_padding"),
             ({"data": {"eval_batch_size": 0}}, "data.eval_batch_size"), ({"data": {"colour": 1}}, "data.colour")]
    for raw, field in cases:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            build_config(ClassifierRunConfig, raw)
