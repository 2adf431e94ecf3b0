"""Reduced-precision variants (int8 ONNX for CPU, fp16 ONNX for GPU) and what they cost in accuracy.

The variants are not held to the fp32 tolerance; instead the manifest's ``variants`` section records how far
they move: for classifiers the test-split accuracy of fp32 vs int8 when the checkpoint's dataset can be
loaded (``digits``), else the top-1 agreement with fp32 on random inputs (stated as such); for generators the
agreement of greedy tokens and of next-token top-1 with fp32 (char-LM: through each graph, the worst is the
headline). The int8 record also states which op types were
quantized and why the rest were not (``int8_plan``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from deepserve.export import parity
from deepserve.export.formats import Runner
from deepserve.manifest import StepGraphContract


CONV_MODELS = ("cnn", "resnet")
"""Model types whose int8 variant keeps its convolutions in fp32."""
CONV_NOTE = (
    "kept fp32: ONNX Runtime's CPU ConvInteger (plus the per-run activation quantization) measured 3-7x slower "
    "than its fp32 Conv (ResNet-18 3x32x32, 1 thread: batch 1 19 -> 71 ms, batch 64 0.94 -> 4.7 s; digits CNN "
    "batch 64 0.55 -> 3.8 ms), so only the MatMul / Gemm layers are quantized"
)


def int8_plan(model_type: str) -> tuple[tuple[str, ...] | None, dict[str, Any]]:
    """Op types to quantize for ``model_type`` (None: all that ORT's dynamic quantization supports) and the
    manifest record of that choice (completed with the quantized node counts by the caller)."""
    record: dict[str, Any] = {
        "method": "onnxruntime quantize_dynamic: int8 weights (per tensor), activations quantized at run time",
    }
    if model_type in CONV_MODELS:
        record.update(op_types=["MatMul", "Gemm"], not_quantized={"Conv": CONV_NOTE})
        return ("MatMul", "Gemm"), record
    record["op_types"] = "all supported by quantize_dynamic"
    return None, record


def evaluate_variant(
    task: str, ref: parity.Reference, fp32: dict[str, Runner], variant: dict[str, Runner], payload: dict[str, Any],
    contract: StepGraphContract | None,
) -> dict[str, Any]:
    """Compare ``variant`` runners against ``fp32`` runners (both graph name -> runner)."""
    checks = parity.run_checks(task, ref, variant, contract)
    summary: dict[str, Any] = {
        "max_abs_diff_vs_eager": {f"{c['graph']}/{c['check']}": c["max_abs_diff"] for c in checks if c["max_abs_diff"] is not None},
    }
    if task == "image-classification":
        summary.update(_classifier_accuracy(fp32["model"], variant["model"], payload))
    else:
        greedy = {c["graph"]: c for c in checks if c["check"] == "greedy"}
        summary.update({
            "metric": "greedy token agreement with the eager fp32 model on the parity inputs",
            "greedy_token_agreement": min(c["token_agreement"] for c in greedy.values()),
            "greedy_tokens_equal": all(c["tokens_equal"] for c in greedy.values()),
        })
        if task == "char-lm":
            top1 = {g: _charlm_top1(ref, g, fp32[g], variant[g]) for g in parity.CHARLM_GRAPHS if g in variant}
            summary.update(greedy_token_agreement_by_graph={g: c["token_agreement"] for g, c in greedy.items()},
                           next_token_top1_agreement=min(top1.values()), next_token_top1_agreement_by_graph=top1)
    return summary


def _top1(run: Runner, images: np.ndarray) -> np.ndarray:
    return np.concatenate([run({"images": images[i : i + 256]})["logits"].argmax(-1) for i in range(0, len(images), 256)])


def _classifier_accuracy(fp32: Runner, variant: Runner, payload: dict[str, Any]) -> dict[str, Any]:
    data = payload["data"]
    test = load_test_split(payload)
    if test is not None:
        images, labels, source = test
        acc32 = float(np.mean(_top1(fp32, images) == labels))
        acc_v = float(np.mean(_top1(variant, images) == labels))
        return {"metric": "accuracy", "dataset": source, "samples": int(len(labels)),
                "accuracy_fp32": acc32, "accuracy": acc_v, "accuracy_delta": acc_v - acc32}
    rng = np.random.default_rng(0)
    shape = (512, int(data["channels"]), int(data["height"]), int(data["width"]))
    images = rng.standard_normal(shape, dtype=np.float32)
    agree = float(np.mean(_top1(fp32, images) == _top1(variant, images)))
    return {"metric": "top1_agreement_with_fp32",
            "dataset": f"none loadable ({data.get('dataset', 'unknown')!s}): 512 random normal images",
            "samples": 512, "top1_agreement": agree, "accuracy_delta": None}


def load_test_split(payload: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, str] | None:
    """Normalised test images and labels of the checkpoint's dataset, carved exactly as training carved them
    (same data config and split seed), when the dataset is available offline (digits always is); else None."""
    data = payload["data"]
    if not data.get("dataset"):
        return None
    try:
        from deepserve.train.data.images import ImageDataConfig, load_image_data
    except ImportError:
        return None
    raw = (payload.get("config") or {}).get("data") or {}
    known = {f.name for f in dataclasses.fields(ImageDataConfig)}
    kwargs = {k: v for k, v in raw.items() if k in known} if isinstance(raw, dict) else {}
    kwargs.update(dataset=data["dataset"], download=False)
    try:
        loaded = load_image_data(ImageDataConfig(**kwargs))
    except (ValueError, TypeError, OSError):  # not present offline, or an unknown dataset: fall back, stated
        return None
    images = loaded.test.images.numpy().astype(np.float32) / loaded.scale  # (N,C,H,W) in [0, 1]
    if images.shape[1:] != (data["channels"], data["height"], data["width"]) or len(loaded.labels) != len(data["labels"]):
        return None
    mean = np.asarray(data["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(data["std"], dtype=np.float32).reshape(1, -1, 1, 1)
    return (images - mean) / std, loaded.test.labels.numpy(), f"{data['dataset']} test split"


def _charlm_top1(ref: parity.Reference, graph: str, fp32: Runner, variant: Runner) -> float:
    """Next-token top-1 agreement of ``variant`` with ``fp32`` on every position ``graph`` answers when fed the
    parity sequence as serve feeds it (``prefill``: the prompt's last position, then each single step)."""
    a, b = (np.concatenate([logits for *_, logits in parity.charlm_calls(ref, graph, run)], axis=1).argmax(-1)
            for run in (fp32, variant))
    return float(np.mean(a == b))
