"""Wire encodings: KServe v2 tensors (JSON and the binary tensor extension) and images for /predictions.

Binary tensor extension: the body is the JSON inference header followed by the raw tensor bytes, in the
order of the tensors that carry ``"parameters": {"binary_data_size": n}``; the header's length is sent in
``Inference-Header-Content-Length``. Tensors are row-major, little-endian; ``BOOL`` is one byte per element and
``BYTES`` elements are each prefixed with their 4-byte little-endian length.
"""

from __future__ import annotations

import io
import json
import mimetypes
import os
import struct
import zlib
from pathlib import Path
from typing import Any, Union

import numpy as np

HEADER_LENGTH = "Inference-Header-Content-Length"

# numpy dtype name -> KServe v2 datatype
V2_DATATYPES = {
    "bool": "BOOL",
    "uint8": "UINT8",
    "uint16": "UINT16",
    "uint32": "UINT32",
    "uint64": "UINT64",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "float16": "FP16",
    "float32": "FP32",
    "float64": "FP64",
}
NUMPY_DTYPES = {v: np.dtype(k) for k, v in V2_DATATYPES.items()}


class TensorError(ValueError):
    """A tensor cannot be encoded, or the server's tensor cannot be decoded."""


def v2_datatype(array: np.ndarray, name: str) -> str:
    if array.dtype.kind in "OSU":
        return "BYTES"
    try:
        return V2_DATATYPES[array.dtype.name]
    except KeyError:
        raise TensorError(f"input {name!r}: dtype {array.dtype} has no KServe v2 datatype") from None


def _bytes_elements(array: np.ndarray) -> list[bytes]:
    return [x if isinstance(x, bytes) else str(x).encode() for x in array.reshape(-1).tolist()]


def tensor_bytes(array: np.ndarray, datatype: str) -> bytes:
    """Raw bytes of one tensor for the binary extension."""
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(e)) + e for e in _bytes_elements(array))
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def encode_inputs(inputs: dict[str, Any], *, binary: bool) -> tuple[list[dict[str, Any]], list[bytes]]:
    """The ``inputs`` list of a v2 request and the binary chunks to append after the header (for every input
    with ``binary``, and for BYTES inputs always)."""
    specs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, value in inputs.items():
        array = np.asarray(value)
        datatype = v2_datatype(array, name)
        spec: dict[str, Any] = {"name": name, "shape": list(array.shape), "datatype": datatype}
        # BYTES always go binary: JSON conventions differ between servers (UTF-8 text vs base64).
        if binary or datatype == "BYTES":
            chunk = tensor_bytes(array, datatype)
            spec["parameters"] = {"binary_data_size": len(chunk)}
            chunks.append(chunk)
        else:
            spec["data"] = array.reshape(-1).tolist()
        specs.append(spec)
    return specs, chunks


def build_body(header: dict[str, Any], chunks: list[bytes]) -> tuple[bytes, dict[str, str]]:
    """Request body and headers: plain JSON, or JSON header + binary chunks."""
    raw = json.dumps(header, separators=(",", ":")).encode()
    if not chunks:
        return raw, {"Content-Type": "application/json"}
    headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(raw))}
    return raw + b"".join(chunks), headers


def split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """Split a v2 response into its JSON header and the binary part (empty without the extension)."""
    try:
        if header_length is None:
            return json.loads(body), b""
        n = int(header_length)
        return json.loads(body[:n]), body[n:]
    except ValueError as e:
        raise TensorError(f"the server's inference response is not valid JSON: {e}") from None


def _decode_bytes(raw: bytes, count: int, name: str) -> np.ndarray:
    items: list[bytes] = []
    offset = 0
    for _ in range(count):
        if offset + 4 > len(raw):
            raise TensorError(f"output {name!r}: BYTES data ends early")
        (n,) = struct.unpack_from("<I", raw, offset)
        items.append(raw[offset + 4 : offset + 4 + n])
        offset += 4 + n
    out = np.empty(count, dtype=object)
    out[:] = items
    return out


def decode_outputs(outputs: list[dict[str, Any]], binary: bytes) -> dict[str, np.ndarray]:
    """Output name -> array, reading ``data`` from JSON or the binary part in order."""
    result: dict[str, np.ndarray] = {}
    offset = 0
    for spec in outputs:
        name, datatype = spec.get("name", "?"), spec.get("datatype", "")
        shape = [int(d) for d in spec.get("shape", [])]
        count = int(np.prod(shape)) if shape else 1
        size = (spec.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            raw = binary[offset : offset + int(size)]
            if len(raw) != int(size):
                raise TensorError(f"output {name!r}: expected {size} binary bytes, got {len(raw)}")
            offset += int(size)
            if datatype == "BYTES":
                array = _decode_bytes(raw, count, name)
            elif datatype in NUMPY_DTYPES:
                array = np.frombuffer(raw, dtype=NUMPY_DTYPES[datatype].newbyteorder("<")).astype(
                    NUMPY_DTYPES[datatype]
                )
            else:
                raise TensorError(f"output {name!r}: unknown datatype {datatype!r}")
        elif "data" in spec:
            if datatype == "BYTES":  # UTF-8 text in JSON; bytes like the binary form
                array = np.empty(len(spec["data"]), dtype=object)
                array[:] = [d.encode() if isinstance(d, str) else d for d in spec["data"]]
            else:
                array = np.asarray(spec["data"], dtype=NUMPY_DTYPES.get(datatype, np.dtype(object)))
        else:
            raise TensorError(f"output {name!r} has neither data nor binary_data_size")
        if array.size != count:
            raise TensorError(f"output {name!r}: {array.size} elements do not fit shape {shape}")
        result[name] = array.reshape(shape)
    return result


# ---- images -------------------------------------------------------------------------------------------

ImageInput = Union[str, "os.PathLike[str]", bytes, np.ndarray, Any]  # Any: a PIL.Image.Image

_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF8", "image/gif"),
    (b"BM", "image/bmp"),
)


def sniff_content_type(data: bytes) -> str:
    for magic, kind in _MAGIC:
        if data.startswith(magic):
            return kind
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


def png_bytes(array: np.ndarray) -> bytes:
    """Encode an ``H x W`` or ``H x W x C`` (C = 1, 3, 4) array as PNG; floats are read as pixels in [0, 1]."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise TensorError(f"image array must be HxW or HxWxC with C in 1, 3, 4, got shape {array.shape}")
    if array.dtype.kind == "f":
        array = np.clip(np.rint(array * 255.0), 0, 255)
    elif array.dtype.kind in "iub" and (array.min(initial=0) < 0 or array.max(initial=0) > 255):
        raise TensorError(f"integer image pixels must be in [0, 255], got [{array.min()}, {array.max()}]")
    pixels = np.ascontiguousarray(array, dtype=np.uint8)
    height, width = pixels.shape[:2]
    color_type = {2: 0, 3: 2 if pixels.ndim == 3 and pixels.shape[2] == 3 else 6}[pixels.ndim]
    rows = pixels.reshape(height, -1)
    raw = b"".join(b"\x00" + rows[y].tobytes() for y in range(height))  # filter type 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def encode_image(image: ImageInput) -> tuple[bytes, str]:
    """Bytes and content type for an image given as a path, encoded bytes, a numpy array or a PIL image."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        return data, sniff_content_type(data)
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise FileNotFoundError(f"cannot read image {str(path)!r}: {e.strerror or e}") from None
        guessed = mimetypes.guess_type(path.name)[0]
        return data, guessed if guessed and guessed.startswith("image/") else sniff_content_type(data)
    if isinstance(image, np.ndarray):
        return png_bytes(image), "image/png"
    if hasattr(image, "save") and hasattr(image, "mode"):  # a PIL image, without importing PIL
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue(), "image/png"
    raise TypeError(f"image must be a path, bytes, a numpy array or a PIL image, got {type(image).__name__}")
