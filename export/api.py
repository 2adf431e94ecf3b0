"""``export_checkpoint``: checkpoint -> ``<repository>/<name>/<version>/``; ``verify_artifact``: re-check one.

Order of work: validate the request and the checkpoint (cheap, before anything is written), build the task's
graphs and the eager parity reference, write every file into a staging directory, check parity of each fp32
format (refusing the artifact on failure), add the int8 / fp16 variants with their accuracy change, the
tokenizer / label files and the manifest, then rename the directory into place.
"""

from __future__ import annotations

import json
import platform
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

import deepserve
from deepserve.export import formats as fmt
from deepserve.export import parity, writer
from deepserve.export.quantize import evaluate_variant, int8_plan
from deepserve.export.errors import ExportError, ParityError
from deepserve.export.graphs import MODEL_TASKS, GraphDef, TaskGraphs, build_graphs
from deepserve import signing
from deepserve.manifest import (
    GraphSpec, Manifest, ManifestError, StepGraphContract, hash_directory, load_manifest, sha256_file,
)
from deepserve.serve.runtime import open_runtime

REFERENCE_FILE = "parity.npz"


def export_checkpoint(
    checkpoint: Path,
    *,
    repository: Path,
    name: str,
    version: int | None = None,
    formats: Sequence[str] = ("torchscript", "onnx"),
    quantize: bool = True,
    fp16: bool = False,
    overwrite: bool = False,
    sign_key: Path | None = None,
    log: Callable[[str], Any] = print,
) -> Path:
    """Export ``checkpoint`` and return the artifact directory. Raises ``ExportError`` (nothing written).
    With ``sign_key`` (a PEM private key) the artifact also gets ``manifest.sig``."""
    if sign_key is not None:
        _check_sign_key(sign_key)  # before minutes of export work, not after
    with _one_thread():
        return _export_checkpoint(checkpoint, repository, name, version, formats, quantize, fp16, overwrite,
                                  sign_key, log)


@contextmanager
def _one_thread() -> Iterator[None]:
    """Export works on small tensors, where intra-op threads only contend (many times slower on busy cores)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _restore(checkpoint: Path) -> tuple[dict[str, Any], torch.nn.Module]:
    """The checkpoint's payload and its model, on the CPU in fp32 and in eval mode."""
    payload = _load(checkpoint)
    from deepserve.train.checkpoint import CheckpointError, restore_model

    try:
        model = restore_model(payload, checkpoint)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    return payload, model.cpu().float().eval()


def _export_checkpoint(checkpoint: Path, repository: Path, name: str, version: int | None, formats: Sequence[str],
                       quantize: bool, fp16: bool, overwrite: bool, sign_key: Path | None,
                       log: Callable[[str], Any]) -> Path:
    started = time.perf_counter()
    formats = check_formats(formats)
    if fp16 and "onnx" not in formats:
        raise ExportError("--fp16 derives from the ONNX graph: add onnx to --format")
    writer.check_name(name)
    checkpoint, repository = Path(checkpoint), Path(repository)
    writer.check_repository(repository)
    version = writer.resolve_version(repository / name, version, overwrite)
    payload, model = _restore(checkpoint)
    task, model_type, data = payload["task"], payload["model"]["type"], payload["data"]
    where = f"checkpoint {checkpoint}"
    tg = build_graphs(task, model_type, model, data, where)
    if task == "seq2seq":
        _check_spm(data, where)
    ref = parity.build_reference(task, model, tg, data)

    with writer.staging(repository, name, version, overwrite) as tmp:
        files: dict[str, dict[str, str]] = {g: {} for g in tg.graphs}
        for graph in tg.graphs.values():
            for variant in formats:
                path = tmp / fmt.file_name(graph.name, variant)
                _export_one(graph, variant, path)
                files[graph.name][variant] = path.name
        np.savez(tmp / REFERENCE_FILE, **ref)
        specs = {g.name: GraphSpec(tuple(g.inputs), tuple(g.outputs), files[g.name]) for g in tg.graphs.values()}
        checks = check_parity(task, tmp, specs, ref, tg.contract, formats)
        variants = _reduced_precision(tmp, specs, ref, payload, tg.contract, formats, quantize, fp16, log)
        sections = _write_task_files(task, tmp, data, tg)
        manifest = Manifest(
            name=name,
            version=version,
            task=task,
            graphs=specs,
            files=hash_directory(tmp),
            model=tg.model_facts,
            variants=variants,
            parity=_parity_section(checks),
            provenance=_provenance(checkpoint, payload, started),
            **sections,
        )
        _save_manifest(manifest, tmp, sign_key)
    final = repository / name / str(version)
    worst = manifest.parity["max_abs_diff"]
    signed = f"; signed with {Path(sign_key).name}" if sign_key is not None else ""
    log(f"exported {checkpoint} -> {final} ({', '.join(formats)}; parity max abs diff {worst:.2e}{signed}; "
        f"{time.perf_counter() - started:.1f}s)")
    return final


def verify_artifact(directory: Path, trusted_keys: Sequence[signing.TrustedKey] = ()) -> dict[str, Any]:
    """Re-check the sha256 of every file and replay the parity checks; with ``trusted_keys`` also require a good
    signature by one of them. Raises ``ExportError`` on failure. The report's ``signature`` says what was found:
    the trusted key's file name, or ``unsigned`` / ``present, not checked`` without keys."""
    with _one_thread():
        return _verify_artifact(Path(directory), tuple(trusted_keys))


def _verify_artifact(directory: Path, trusted_keys: tuple[signing.TrustedKey, ...]) -> dict[str, Any]:
    if not directory.is_dir():
        raise ExportError(f"{directory} is not an artifact directory")
    try:
        manifest = load_manifest(directory, verify=True)
        signature = _check_signature(directory, trusted_keys)
    except ManifestError as e:
        raise ExportError(f"{directory}: {e}" if isinstance(e, signing.SignatureError) else str(e)) from None
    contract = None
    if manifest.task == "seq2seq":
        try:
            contract = StepGraphContract.of(manifest)  # the layout, sizes and ids serve will drive
        except ManifestError as e:
            raise ExportError(f"{directory}: {e}") from None
    unlisted = sorted(set(hash_directory(directory)) - set(manifest.files))
    if unlisted:
        raise ExportError(f"{directory}: {', '.join(unlisted)} not listed in manifest.json")
    ref_name = manifest.parity.get("reference", REFERENCE_FILE)
    if ref_name not in manifest.files:
        raise ExportError(f"{directory}: manifest lists no parity reference ({ref_name})")
    with np.load(directory / ref_name, allow_pickle=False) as npz:
        ref = {k: npz[k] for k in npz.files}
    fp32 = [v for v in fmt.FORMATS if all(v in g.files for g in manifest.graphs.values())]
    checks = check_parity(manifest.task, directory, manifest.graphs, ref, contract, fp32)
    if all("onnx-int8" in g.files for g in manifest.graphs.values()):  # reduced precision: must run, no tolerance
        parity.run_checks(manifest.task, ref, _runners(directory, manifest.graphs, "onnx-int8"), contract)
    return {"directory": str(directory), "name": manifest.name, "version": manifest.version,
            "files_checked": len(manifest.files), "signature": signature, **_parity_section(checks)}


def _save_manifest(manifest: Manifest, directory: Path, sign_key: Path | None) -> None:
    manifest.save(directory)
    load_manifest(directory)  # the artifact must read back under the serve-side contract
    if sign_key is not None:  # inside the staging folder, so the artifact never appears unsigned
        signing.sign_manifest(directory, sign_key)


def _check_signature(directory: Path, trusted_keys: tuple[signing.TrustedKey, ...]) -> str:
    if trusted_keys:
        return f"signed by trusted key {signing.verify_manifest(directory, trusted_keys).name}"
    present = (directory / signing.SIGNATURE_FILE).is_file()
    return "signed, not checked (no trusted keys given)" if present else "unsigned"


def _check_sign_key(sign_key: Path) -> None:
    try:
        signing.check_private_key(sign_key)
    except signing.KeyFileError as e:
        raise ExportError(f"--sign-key {e}") from None


# ---------------------------------------------------------------------------------------------- pieces


def check_formats(formats: Sequence[str]) -> tuple[str, ...]:
    if isinstance(formats, str):
        formats = [formats]
    out = tuple(dict.fromkeys(f.strip() for f in formats if f.strip()))
    bad = [f for f in out if f not in fmt.FORMATS]
    if bad or not out:
        raise ExportError(f"--format {','.join(formats)!r}: choose from {', '.join(fmt.FORMATS)} (comma-separated)")
    return out


def special_ids(task: str, data: dict[str, Any]) -> dict[str, int]:
    if task == "seq2seq":
        return {k: int(data[f"{k}_id"]) for k in ("pad", "unk", "bos", "eos")}
    if task == "char-lm":
        return {"unk": int(data.get("unk_id", 0))}
    return {}


def _load(checkpoint: Path) -> dict[str, Any]:
    from deepserve.train.checkpoint import CheckpointError, load_checkpoint

    try:
        payload = load_checkpoint(checkpoint)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    model = payload.get("model")
    if not isinstance(model, dict) or "type" not in model or "args" not in model:
        raise ExportError(f"checkpoint {checkpoint}: model section needs type and args")
    if model["type"] not in MODEL_TASKS:
        raise ExportError(f"checkpoint {checkpoint}: unknown model type {model['type']!r}; known: {', '.join(MODEL_TASKS)}")
    if not isinstance(payload["data"], dict):
        raise ExportError(f"checkpoint {checkpoint}: data must be a dict")
    return payload


def _check_spm(data: dict[str, Any], where: str) -> None:
    import sentencepiece as spm

    try:
        spm.SentencePieceProcessor(model_proto=data["spm_model"])
    except (RuntimeError, TypeError) as e:
        raise ExportError(f"{where}: data.spm_model is not a SentencePiece model: {e}") from None


def _export_one(graph: GraphDef, variant: str, path: Path) -> None:
    try:
        if variant == "torchscript":
            fmt.export_torchscript(graph, path)
        else:
            fmt.export_onnx(graph, path)
    except ExportError:
        raise
    except (RuntimeError, torch.jit.Error) as e:  # tracer / exporter failures name no graph on their own
        raise ExportError(f"graph {graph.name!r}: {variant} export failed: {e}") from None


def _runners(directory: Path, graphs: dict[str, GraphSpec], variant: str) -> dict[str, fmt.Runner]:
    """Each graph's ``variant`` file opened as serve opens it; one ONNX Runtime thread: parity runs beside other
    work on few cores, and tiny graphs gain nothing (TorchScript keeps the process's thread setting)."""
    backend, _, precision = variant.partition("-")  # onnx-int8 -> ONNX Runtime at int8
    threads = None if backend == "torchscript" else 1
    with warnings.catch_warnings():  # torch.jit.load warns that TorchScript is deprecated: it is what serve loads
        warnings.simplefilter("ignore", DeprecationWarning)
        return {name: open_runtime(spec, directory, backend=backend, device="cpu", precision=precision or "fp32",
                                   threads=threads).run
                for name, spec in graphs.items()}


def check_parity(task: str, directory: Path, graphs: dict[str, GraphSpec], ref: parity.Reference,
                 contract: StepGraphContract | None, variants: Sequence[str]) -> list[dict[str, Any]]:
    """Run every parity check on every fp32 variant; raise ``ParityError`` naming the first failure."""
    results = []
    for variant in variants:
        for result in parity.run_checks(task, ref, _runners(directory, graphs, variant), contract):
            result = {"format": variant, **result, "passed": parity.passed(result)}
            results.append(result)
            if not result["passed"]:
                raise ParityError(_describe_failure(result))
    return results


def _describe_failure(r: dict[str, Any]) -> str:
    what = f"parity check failed for graph {r['graph']!r} ({r['format']}, {r['check']}): "
    if r.get("tokens_equal") is False:
        what += f"greedy tokens differ from the eager model (agreement {r['token_agreement']:.1%})"
    else:
        what += f"max abs difference {r['max_abs_diff']:.3g} > tolerance {parity.TOLERANCE:g}"
        if r.get("worst"):
            what += f" at {r['worst']}"
    return what + "; nothing written"


def _parity_section(checks: list[dict[str, Any]]) -> dict[str, Any]:
    diffs = [c["max_abs_diff"] for c in checks if c["max_abs_diff"] is not None]
    return {"tolerance": parity.TOLERANCE, "device": "cpu", "reference": REFERENCE_FILE,
            "max_abs_diff": max(diffs, default=0.0), "passed": all(c["passed"] for c in checks), "checks": checks}


def _reduced_precision(tmp: Path, specs: dict[str, GraphSpec], ref: parity.Reference, payload: dict[str, Any],
                       contract: StepGraphContract | None, formats: Sequence[str], quantize: bool, fp16: bool,
                       log: Callable[[str], Any]) -> dict[str, Any]:
    """The int8 / fp16 variants asked for, written into ``tmp`` beside the fp32 files: their manifest records by
    name. Both derive from the ONNX graph; the log says why one asked for is not made."""
    task = payload["task"]
    variants: dict[str, Any] = {}
    if quantize and "onnx" in formats:
        op_types, plan = int8_plan(payload["model"]["type"])
        variants["onnx-int8"] = _add_variant("onnx-int8", partial(fmt.quantize_int8, op_types=op_types), task,
                                             tmp, specs, ref, payload, contract, plan)
    elif quantize:
        log("note: no int8 variant (it is derived from the ONNX graph, which was not requested)")
    if fp16 and task == "char-lm":
        log("note: no fp16 variant for recurrent char-LMs (ONNX Runtime's fp16 LSTM/GRU crash its CPU provider, "
            "and a single-token RNN step gains little from fp16)")
    elif fp16:
        variants["onnx-fp16"] = _add_variant("onnx-fp16", fmt.convert_fp16, task, tmp, specs, ref, payload, contract)
    return variants


def _add_variant(variant: str, convert: Callable[[Path, Path], dict[str, int] | None], task: str, tmp: Path,
                 specs: dict[str, GraphSpec], ref: parity.Reference, payload: dict[str, Any],
                 contract: StepGraphContract | None, record: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``variant`` of every graph with ``convert`` (which may return the nodes it changed, by op type)
    and return its manifest record: ``record`` plus those counts plus its accuracy change."""
    summary = dict(record or {})
    for name, spec in specs.items():
        out = tmp / fmt.file_name(name, variant)
        changed = convert(tmp / spec.files["onnx"], out)
        if changed is not None:
            summary.setdefault("quantized_nodes", {})[name] = changed
        spec.files[variant] = out.name
    fp32 = _runners(tmp, specs, "onnx")
    try:
        return {**summary, **evaluate_variant(task, ref, fp32, _runners(tmp, specs, variant), payload, contract)}
    except RuntimeError as e:  # e.g. fp16 kernels missing from the CPU provider: the variant is for GPU
        return {**summary, "checked": False,
                "note": f"not runnable on the CPU provider ({str(e).splitlines()[0][:200]})"}


def _write_task_files(task: str, tmp: Path, data: dict[str, Any], tg: TaskGraphs) -> dict[str, Any]:
    """Labels / tokenizer files and the manifest sections describing them."""
    if task == "image-classification":
        labels = [str(x) for x in data["labels"]]
        if any("\n" in x for x in labels):
            raise ExportError("checkpoint data.labels: a label contains a newline")
        (tmp / "labels.txt").write_text("".join(f"{x}\n" for x in labels))
        c = int(data["channels"])
        return {
            "labels": labels,
            "preprocessing": {
                "channels": c, "height": int(data["height"]), "width": int(data["width"]),
                "mean": [float(x) for x in data["mean"]], "std": [float(x) for x in data["std"]],
                "resize": "bilinear", "color_mode": "L" if c == 1 else "RGB", "scale": 1 / 255,
                "layout": "NCHW", "labels_file": "labels.txt",
            },
            "limits": {"num_classes": len(labels)},
        }
    if task == "char-lm":
        vocab = list(data["vocab"])
        (tmp / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n")
        return {"tokenizer": {"type": "char", "file": "vocab.json", "special_ids": special_ids(task, data)},
                "limits": {"vocab_size": len(vocab)}}
    (tmp / "tokenizer.model").write_bytes(bytes(data["spm_model"]))
    return {
        "tokenizer": {"type": "sentencepiece", "file": "tokenizer.model", "model_type": data.get("tokenizer_type"),
                      "special_ids": special_ids(task, data)},
        "limits": {"vocab_size": tg.model_facts["vocab_size"], "max_source_length": int(data["max_source_length"]),
                   "max_target_length": int(data["max_target_length"])},
    }


def _provenance(checkpoint: Path, payload: dict[str, Any], started: float) -> dict[str, Any]:
    import onnx
    import onnxruntime

    return {
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": sha256_file(checkpoint),
        "model_args": payload["model"]["args"],
        "metrics": {k: float(v) for k, v in (payload.get("metrics") or {}).items() if isinstance(v, (int, float))},
        "dataset": payload["data"].get("dataset"),
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "export_seconds": round(time.perf_counter() - started, 2),
        "onnx_opset": fmt.OPSET,
        "libraries": {
            "deepserve": deepserve.__version__, "python": platform.python_version(), "torch": torch.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
        },
    }
