"""Outlier-aware static INT8 for ONNX Runtime: SmoothQuant with a searched alpha, then a bounded fallback.

1. Per-channel activation maxima of every LayerNorm -> Linear pair on the calibration images (PyTorch hooks).
2. For each alpha of ``alphas``: smooth a copy of the original (:mod:`.smoothquant`, exact in FP32) and
   score its simulated static INT8 (:func:`.smoothquant.simulate_int8`, PyTorch) against the original's FP32
   embeddings of the *calibration* images (the parity images stay unseen). Best: highest min cosine, then
   mean. Only that alpha is exported to ONNX, quantized with the static Q/DQ preset and scored for real.
3. Fallback, only when the best alpha misses the gate's cosine thresholds on the calibration images: keep
   the most sensitive MatMuls in float (``nodes_to_exclude``), one at a time, at most ``max_excluded`` of
   the quantized MatMuls. Sensitivity of a MatMul = the relative error its quantization adds (error of its
   output minus error of its input, INT8 graph vs float graph, on calibration images).

The recipe (alpha, scores per alpha, excluded nodes) goes into the candidate's record in the manifest.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from imgembed.export.onnx_export import INPUT_NAME, export_onnx
from imgembed.export.quantize import QuantConfig, prepared, quantize
from imgembed.export.smoothquant import ALPHAS, activation_absmax, norm_linear_pairs, simulate_int8, smooth

SENSITIVITY_IMAGES = 8


def _cosines(ref: np.ndarray, out: np.ndarray) -> np.ndarray:
    ref = ref / np.maximum(np.linalg.norm(ref, axis=1, keepdims=True), 1e-12)
    out = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return (ref * out).sum(axis=1)


def _session(path: Path, threads: int | None, outputs: Sequence[str] = ()):
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    if not outputs:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    model = onnx.load(str(path))
    have = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in outputs if n not in have)
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _embed(path: Path, batches: Sequence[np.ndarray], threads: int | None) -> np.ndarray:
    sess = _session(path, threads)
    return np.concatenate([sess.run(None, {INPUT_NAME: b})[0] for b in batches])


def score(path: Path, batches: Sequence[np.ndarray], reference: np.ndarray, threads: int | None = None) -> dict:
    """Min and mean cosine of ``path``'s embeddings of ``batches`` to ``reference``."""
    cos = _cosines(reference, _embed(path, batches, threads))
    return {"min_cosine": round(float(cos.min()), 6), "mean_cosine": round(float(cos.mean()), 6)}


def _meets(s: dict, thresholds: dict[str, float]) -> bool:
    return all(s[k] >= thresholds[k] for k in ("min_cosine", "mean_cosine") if k in thresholds)


def _matmuls(prepped: Path) -> list:
    import onnx

    model = onnx.load(str(prepped), load_external_data=False)
    weights = {i.name for i in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "MatMul" and any(i in weights for i in n.input)]


def sensitivity(float_graph: Path, int8_graph: Path, nodes: list, pixels: np.ndarray,
                threads: int | None = None) -> list[tuple[str, float]]:
    """Per MatMul (``nodes`` of the pre-processed float graph): the relative error its quantization adds,
    most sensitive first."""
    def rel(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-12))

    names = sorted({t for n in nodes for t in (n.input[0], n.output[0])})
    feeds = {INPUT_NAME: pixels}
    ref = dict(zip(names, _session(float_graph, threads, names).run(names, feeds), strict=True))
    got = dict(zip(names, _session(int8_graph, threads, names).run(names, feeds), strict=True))
    errors = [(n.name, rel(ref[n.output[0]], got[n.output[0]]) - rel(ref[n.input[0]], got[n.input[0]]))
              for n in nodes]
    return sorted(errors, key=lambda e: -e[1])


def smoothquant_int8(head, spec, pixels: np.ndarray, directory: Path, config: QuantConfig, opset: int,
                     thresholds: dict[str, float], *, threads: int | None = None,
                     alphas: Sequence[float] = ALPHAS, max_excluded: float = 0.1,
                     step: Callable[[str], None] = lambda s: None,
                     cache: Path | None = None) -> tuple[Path, Path, dict]:
    """Search the recipe (see module docstring) for ``head`` (left unchanged). Returns (INT8 graph, the
    smoothed float graph it was quantized from, record)."""
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    batches = [pixels[i:i + 8] for i in range(0, len(pixels), 8)]
    with torch.no_grad():
        reference = np.concatenate([head(torch.from_numpy(b)).numpy() for b in batches])
    x_absmax = activation_absmax(head, norm_linear_pairs(head), batches)
    tried: dict[float, dict] = {}
    for alpha in alphas:
        step(f"smoothquant: simulating INT8 at alpha {alpha}")
        smoothed = copy.deepcopy(head)
        smooth(smoothed, x_absmax, alpha)
        cos = _cosines(reference, simulate_int8(smoothed, batches))
        tried[alpha] = {"min_cosine": round(float(cos.min()), 6), "mean_cosine": round(float(cos.mean()), 6)}
        del smoothed
    alpha = max(alphas, key=lambda a: (tried[a]["min_cosine"], tried[a]["mean_cosine"]))
    smoothed = copy.deepcopy(head)
    record = smooth(smoothed, x_absmax, alpha)
    step(f"smoothquant: exporting and quantizing at alpha {alpha}")
    plain = export_onnx(smoothed, spec, directory / "smoothed.onnx", opset)
    del smoothed
    int8 = quantize(plain, directory / "int8.onnx", config, batches, cache=cache)
    current = score(int8, batches, reference, threads)
    record = {**record, "simulated_alphas": {str(a): s for a, s in tried.items()}, "calibration_score": current,
              "excluded_nodes": []}
    if not _meets(current, thresholds):
        int8, record = _exclude_sensitive(plain, int8, config, batches, reference, thresholds, record,
                                          max_excluded, threads, step, cache)
    return int8, plain, record


def _exclude_sensitive(plain: Path, int8: Path, config: QuantConfig, batches: list[np.ndarray],
                       reference: np.ndarray, thresholds: dict[str, float], record: dict, max_excluded: float,
                       threads: int | None, step: Callable[[str], None],
                       cache: Path | None = None) -> tuple[Path, dict]:
    """Keep the most sensitive MatMuls in float one at a time until the calibration score meets the gate."""
    prepped = prepared(plain, cache, plain.with_suffix(".prep.onnx"))
    nodes = _matmuls(prepped)
    budget = max(1, int(max_excluded * len(nodes)))
    sample = np.concatenate(batches)[:SENSITIVITY_IMAGES]
    ranked = sensitivity(prepped, int8, nodes, sample, threads)
    excluded: list[str] = []
    current = record["calibration_score"]
    for name, _ in ranked[:budget]:
        excluded.append(name)
        step(f"keeping {len(excluded)} sensitive MatMul(s) in float")
        int8 = quantize(plain, plain.parent / f"int8-excluded-{len(excluded)}.onnx", config, batches,
                        exclude=excluded, cache=cache)
        current = score(int8, batches, reference, threads)
        if _meets(current, thresholds):
            break
    return int8, {**record, "excluded_nodes": list(excluded), "matmuls": len(nodes),
                  "exclusion_budget": budget, "calibration_score": current}
