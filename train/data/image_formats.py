"""Readers for image dataset files: IDX (MNIST, Fashion-MNIST), CIFAR-10 python batches, ImageFolder trees.

Each ``load_*`` returns a ``RawImages``: uint8 pixels ``(N, C, H, W)`` and int64 labels for the official train
and test splits, plus the label names. Missing files raise ``DataError`` naming the files and the folder they
belong in; with ``download=True`` they are fetched (SHA-256 checked) into that folder first.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from deepserve.train.data.download import DataError, fetch, offline

# --- IDX (MNIST family) ------------------------------------------------------------------------------------

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_SOURCES: dict[str, dict[str, Any]] = {
    "mnist": {
        "url": "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "sha256": {  # of the .gz files, as published by TFDS / torchvision mirrors
            "train-images-idx3-ubyte": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            "train-labels-idx1-ubyte": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            "t10k-images-idx3-ubyte": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            "t10k-labels-idx1-ubyte": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        },
        "labels": [str(i) for i in range(10)],
    },
    "fashion-mnist": {
        "url": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "sha256": {
            "train-images-idx3-ubyte": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
            "train-labels-idx1-ubyte": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
            "t10k-images-idx3-ubyte": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
            "t10k-labels-idx1-ubyte": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
        },
        "labels": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
    },
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass
class RawImages:
    """Official train/test splits as uint8 ``(N, C, H, W)`` pixels and int64 labels."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray | None
    """None when the dataset has no official test split (it is then carved from train)."""
    test_labels: np.ndarray | None
    labels: list[str]


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an IDX file, gzipped or not (detected from the content, not the name)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read IDX file {path}: {e}") from None
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"IDX file {path} is truncated (header)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = int(np.prod(dims))
    if len(raw) - header < count * dtype.itemsize:
        raise DataError(f"IDX file {path} is truncated: header says shape {dims}, too few bytes follow")
    return np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(dims).copy()  # writable


def _find_idx(data_dir: Path, stem: str) -> Path | None:
    for name in (stem, f"{stem}.gz"):
        if (data_dir / name).is_file():
            return data_dir / name
    return None


def load_idx_dataset(name: str, data_dir: Path, download: bool) -> RawImages:
    """MNIST-format dataset from ``data_dir`` (``train-images-idx3-ubyte[.gz]`` etc.)."""
    source = IDX_SOURCES[name]
    stems = [stem for pair in IDX_FILES.values() for stem in pair]
    found = {stem: _find_idx(data_dir, stem) for stem in stems}
    failures = []
    if download and not offline():
        for stem in [s for s, p in found.items() if p is None]:
            try:
                found[stem] = fetch(source["url"] + stem + ".gz", source["sha256"][stem], data_dir, stem + ".gz")
            except DataError as e:
                failures.append(str(e))
    missing = [stem for stem, path in found.items() if path is None]
    if missing:
        how = "download failed: " + "; ".join(failures[:1]) if failures else (
            "offline" if download else "data.download is false")
        raise DataError(
            f"{name}: missing {', '.join(m + '[.gz]' for m in missing)} in {data_dir} ({how}). "
            f"Put the IDX files there, gzipped or not (from {source['url']}), or set data.data_dir to the folder "
            "that holds them"
        )
    splits = {}
    for split, (images_stem, labels_stem) in IDX_FILES.items():
        images, labels = read_idx(found[images_stem]), read_idx(found[labels_stem])
        if images.ndim != 3 or images.dtype != np.uint8:
            raise DataError(f"{found[images_stem]}: expected uint8 images (N, H, W), got {images.dtype} {images.shape}")
        if labels.ndim != 1 or len(labels) != len(images):
            raise DataError(f"{found[labels_stem]}: expected {len(images)} labels, got shape {labels.shape}")
        splits[split] = (images[:, None], labels.astype(np.int64))  # (N, 1, H, W)
    return RawImages(*splits["train"], *splits["test"], labels=list(source["labels"]))


# --- CIFAR-10 python batches -------------------------------------------------------------------------------

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_SHA256 = "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"
CIFAR10_TAR = "cifar-10-python.tar.gz"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR10_FILES = [*CIFAR10_TRAIN, "test_batch", "batches.meta"]


class _BatchUnpickler(pickle.Unpickler):
    """The CIFAR batches are pickles: allow only what a dict of numpy arrays and lists needs, never code."""

    _ALLOWED = {
        ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("numpy.core"):  # files pickled by numpy < 2
            module = "numpy._core" + module[len("numpy.core"):]
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _unpickle(f: BinaryIO, where: str) -> dict[str, Any]:
    try:
        obj = _BatchUnpickler(f, encoding="bytes").load()
    except Exception as e:  # pickle raises many types on corrupt input
        raise DataError(f"{where} is not a CIFAR python batch: {e}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where} is not a CIFAR python batch (no dict inside)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_batch(batch: dict[str, Any], where: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)  # rows are R, G, B planes
        labels = np.asarray(batch["labels"], dtype=np.int64)
    except (KeyError, ValueError) as e:
        raise DataError(f"{where}: expected 'data' (N, 3072) and 'labels', {e}") from None
    if len(labels) != len(data):
        raise DataError(f"{where}: {len(data)} images but {len(labels)} labels")
    return data, labels


def load_cifar10(data_dir: Path, download: bool) -> RawImages:
    """CIFAR-10 from ``data_dir/cifar-10-batches-py/``, ``data_dir/`` itself, or ``data_dir/cifar-10-python.tar.gz``."""
    readers: dict[str, Any] = {}
    for folder in (data_dir / CIFAR10_FOLDER, data_dir):
        present = [f for f in CIFAR10_FILES if (folder / f).is_file()]
        if present:
            absent = [f for f in CIFAR10_FILES if f not in present]
            if absent:
                raise DataError(f"cifar10: {folder} holds {', '.join(present)} but is missing {', '.join(absent)}")
            readers = {f: (lambda f=f, folder=folder: (folder / f).read_bytes(), str(folder / f)) for f in CIFAR10_FILES}
            break
    tar_path = data_dir / CIFAR10_TAR
    if not readers:
        if not tar_path.is_file():
            if not download or offline():
                raise DataError(
                    f"cifar10: no data in {data_dir} ({'offline' if download else 'data.download is false'}). "
                    f"Put {CIFAR10_TAR} (from {CIFAR10_URL}) there, or its extracted batches "
                    f"({', '.join(CIFAR10_FILES)}) in {data_dir / CIFAR10_FOLDER}/"
                )
            tar_path = fetch(CIFAR10_URL, CIFAR10_SHA256, data_dir, CIFAR10_TAR)
        readers = _tar_readers(tar_path)
    batches = {}
    for name, (read, where) in readers.items():
        batches[name] = _unpickle(io.BytesIO(read()), where)
    train = [_cifar_batch(batches[n], readers[n][1]) for n in CIFAR10_TRAIN]
    test_x, test_y = _cifar_batch(batches["test_batch"], readers["test_batch"][1])
    names = batches["batches.meta"].get("label_names")
    if not isinstance(names, list):
        raise DataError(f"{readers['batches.meta'][1]}: no label_names list")
    labels = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return RawImages(
        np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]), test_x, test_y, labels
    )


def _tar_readers(tar_path: Path) -> dict[str, Any]:
    try:
        with tarfile.open(tar_path, "r:*") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            absent = [f for f in CIFAR10_FILES if f not in members]
            if absent:
                raise DataError(f"cifar10: {tar_path} does not contain {', '.join(absent)}")
            contents = {f: tar.extractfile(members[f]).read() for f in CIFAR10_FILES}  # type: ignore[union-attr]
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"cifar10: cannot read {tar_path}: {e}") from None
    return {f: (lambda b=b: b, f"{tar_path}:{f}") for f, b in contents.items()}


# --- ImageFolder -------------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def _scan_classes(root: Path) -> dict[str, list[Path]]:
    classes = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if files:
            classes[folder.name] = files
    return classes


def _read_images(files: list[Path], size: int, grayscale: bool) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    out = np.empty((len(files), 1 if grayscale else 3, size, size), dtype=np.uint8)
    for i, path in enumerate(files):
        try:
            with Image.open(path) as img:
                img = img.convert("L" if grayscale else "RGB").resize((size, size), Image.Resampling.BILINEAR)
                pixels = np.asarray(img, dtype=np.uint8)
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"imagefolder: cannot read image {path}: {e}") from None
        out[i] = pixels[None] if grayscale else pixels.transpose(2, 0, 1)  # (H, W, C) -> (C, H, W)
    return out


def load_image_folder(root: Path, image_size: int, grayscale: bool) -> RawImages:
    """``root/<class>/*.png|jpg`` (test carved later) or ``root/train/<class>/...`` plus optional ``root/test/<class>/...``.
    Images are converted to RGB (or grayscale) and resized to ``image_size`` squared."""
    if not root.is_dir():
        raise DataError(f"imagefolder: data.data_dir {root} is not a folder; expected {root}/<class name>/<image>.png")
    train_root = root / "train" if (root / "train").is_dir() else root
    classes = _scan_classes(train_root)
    if len(classes) < 2:
        raise DataError(
            f"imagefolder: found {len(classes)} class folder(s) with PNG/JPEG images in {train_root}; "
            f"expected one sub-folder per class (at least 2), e.g. {train_root}/cat/001.png, {train_root}/dog/001.png"
        )
    labels = list(classes)
    train_files = [f for name in labels for f in classes[name]]
    train_y = np.array([i for i, name in enumerate(labels) for _ in classes[name]], dtype=np.int64)
    test_x = test_y = None
    if train_root != root and (root / "test").is_dir():
        test_classes = _scan_classes(root / "test")
        unknown = sorted(set(test_classes) - set(labels))
        if unknown:
            raise DataError(f"imagefolder: {root / 'test'} has classes not in {train_root}: {', '.join(unknown)}")
        test_files = [f for name in test_classes for f in test_classes[name]]
        test_y = np.array([labels.index(n) for n in test_classes for _ in test_classes[n]], dtype=np.int64)
        test_x = _read_images(test_files, image_size, grayscale)
    return RawImages(_read_images(train_files, image_size, grayscale), train_y, test_x, test_y, labels)
