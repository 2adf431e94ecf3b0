"""What the repository serves: one model version, loaded, warmed up and answering requests.

Classification servables live in ``serve/classifier.py``; generation servables in
``serve/generation/engine.py``. Both implement this small interface, which is all the repository and the
HTTP layer rely on.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any

from deepserve.manifest import Manifest

# Manifest dtype -> KServe v2 datatype.
V2_DATATYPES = {
    "float32": "FP32", "float16": "FP16", "int64": "INT64", "int32": "INT32", "bool": "BOOL", "uint8": "UINT8",
}


def task_phrase(task: str) -> str:
    """``"an image-classification model"``, ``"a char-lm model"``: a task named in a sentence, with its article."""
    article = "an" if task[:1].lower() in ("a", "e", "i", "o", "u") else "a"  # by spelling: no task says "hour"
    return f"{article} {task} model"


class Servable(abc.ABC):
    """One model version behind the server."""

    manifest: Manifest
    """The artifact's verified manifest."""
    directory: Path
    """The artifact directory ``<repository>/<model>/<version>``."""
    ready: bool = False
    """True once started and warmed up, until stopped."""
    reason: str | None = None
    """Why the servable is not ready (load or warmup error), else None."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Open the graphs and start the workers. Raises on failure (the repository records the reason)."""

    @abc.abstractmethod
    async def warmup(self) -> None:
        """Run one dummy batch through every instance so the first request does not pay for it."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Drain: refuse new work, finish what is queued and in flight, then release the graphs."""

    def metadata(self) -> dict[str, Any]:
        """KServe v2 model metadata: name, versions, platform and the main graph's inputs and outputs."""
        graph_name = "model" if "model" in self.manifest.graphs else next(iter(self.manifest.graphs))
        graph = self.manifest.graphs[graph_name]

        def tensors(specs) -> list[dict[str, Any]]:
            return [{"name": t.name, "datatype": V2_DATATYPES[t.dtype], "shape": t.v2_shape} for t in specs]

        return {
            "name": self.manifest.name,
            "versions": [str(self.manifest.version)],
            "platform": self.platform,
            "inputs": tensors(graph.inputs),
            "outputs": tensors(graph.outputs),
            "parameters": {"task": self.manifest.task},
        }

    @property
    def platform(self) -> str:
        """The runtime in use, e.g. ``onnxruntime_onnx`` or ``pytorch_libtorch`` (Triton's names)."""
        return "deepserve"
