"""mosec (a Rust HTTP front end, Python workers) serving a benchmark classifier: the peer server of the tail scenario.

    MOSEC_PORT=8001 python -m benchmarks.mosec_peer ARTIFACT_DIR {json,image}

Same model file (the artifact's ``model.onnx``, opened with deepserve's session options), same bodies and load
generator as deepserve's cells: ``json`` takes the KServe v2 JSON body on ``/inference`` and answers v2 JSON
(msgspec, which mosec ships, both ways); ``image`` takes the raw PNG and answers the top 5 ``{label,
probability}``. One worker process, batching as deepserve's defaults do (up to 32 rows, 2 ms wait). Needs
``pip install mosec`` (the ``bench`` extra).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
from mosec import Server, Worker

from deepserve.manifest import load_manifest
from deepserve.serve.backends import onnx_session
from deepserve.serve.classifier import top_k_labels
from deepserve.serve.preprocess import ImagePreprocessor

ARTIFACT_ENV = "BENCH_MOSEC_ARTIFACT"
MAX_BATCH_SIZE, MAX_WAIT_MS = 32, 2


class _Classifier(Worker):
    def __init__(self) -> None:
        super().__init__()
        directory = Path(os.environ[ARTIFACT_ENV])
        self.manifest = load_manifest(directory)
        graph = self.manifest.graphs["model"]
        self.session = onnx_session(directory / graph.files["onnx"], "cpu")
        self.input_name, self.output_name = graph.inputs[0].name, graph.outputs[0].name

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: batch})[0]

    def serialize(self, data: Any) -> bytes:
        return msgspec.json.encode(data)  # compact and fast (mosec's default JSON is indented)


class JsonWorker(_Classifier):
    """KServe v2 JSON in and out, decoded and encoded by msgspec (which mosec ships with)."""

    def deserialize(self, data: bytes) -> dict[str, Any]:
        return msgspec.json.decode(data)

    def forward(self, data: list[dict[str, Any]]) -> list[dict[str, Any]]:
        arrays = [np.asarray(d["inputs"][0]["data"], np.float32).reshape(d["inputs"][0]["shape"]) for d in data]
        logits = self.run(np.concatenate(arrays))
        out, offset = [], 0
        for a in arrays:
            rows = logits[offset : offset + len(a)]
            offset += len(a)
            out.append({"model_name": self.manifest.name, "outputs": [
                {"name": self.output_name, "datatype": "FP32", "shape": list(rows.shape), "data": rows.ravel().tolist()}]})
        return out


class ImageWorker(_Classifier):
    """A raw encoded image in, its top 5 labels out (as deepserve's ``/predictions``)."""

    def __init__(self) -> None:
        super().__init__()
        self.preprocessor = ImagePreprocessor.from_manifest(self.manifest.preprocessing)

    def deserialize(self, data: bytes) -> bytes:
        return data

    def forward(self, data: list[bytes]) -> list[list[dict[str, Any]]]:
        pixels = np.stack([self.preprocessor.to_array(self.preprocessor.open(d)) for d in data])
        return top_k_labels(self.run(pixels), self.manifest.labels, 5)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1] not in ("json", "image"):
        print(__doc__, file=sys.stderr)
        return 2
    os.environ[ARTIFACT_ENV] = str(Path(argv[0]).resolve())
    sys.argv = sys.argv[:1]  # mosec parses the command line itself: port and address come from MOSEC_* variables
    server = Server()
    server.append_worker(JsonWorker if argv[1] == "json" else ImageWorker, num=1, max_batch_size=MAX_BATCH_SIZE,
                         max_wait_time=MAX_WAIT_MS)
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
