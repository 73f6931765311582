"""Accuracy-aware mixed precision: the last-resort INT8 recipe, for graphs no full-INT8 recipe quantizes
within the parity gate (trained depthwise-separable CNNs: EfficientNet-Lite, MobileNet).

1. Quantize every layer of the preset (per-channel weights, depthwise convolutions included) and score the
   result against the float graph on the *calibration* images (the parity images stay unseen).
2. When that misses the gate's cosine thresholds (plus :data:`MARGIN` of the remaining distance to 1):
   rank the quantized layers by sensitivity: the gain in embedding cosine on calibration images when that
   layer alone computes in float (:func:`leave_one_out`; the float layer is switched by graph surgery on the
   quantized graph, :func:`keep_float`, so no layer is recalibrated).
3. Keep the most sensitive layers in float, the fewest that meet the thresholds: the ranked layers are
   admitted while the float layers' multiply-accumulates stay within ``max_float_macs`` of the graph's, then
   the shortest passing prefix is found by doubling and bisection (a handful of re-quantizations).

The recipe record lists every float layer with its op, MACs and sensitivity (why it stayed float), the float
share of MACs, and the calibration scores; the race adds the speed against FP32. Float layers run in FP32
(ONNX Runtime has no fast BF16 CPU kernels).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx

from imgembed.errors import ExportError
from imgembed.export.int8_search import _session, score
from imgembed.export.onnx_export import INPUT_NAME
from imgembed.export.quantize import QuantConfig, prepared, quantize

DEFAULT_MAX_FLOAT_MACS = 0.25   # at most this share of the graph's multiply-accumulates stays in float
MARGIN = 0.2                    # calibration target: threshold + MARGIN * (1 - threshold)
SENSITIVITY_IMAGES = 8
RANKED_OPS = ("Conv", "MatMul", "Gemm", "Add")
Step = Callable[[str], None]


@dataclass(frozen=True)
class Layer:
    name: str
    op_type: str
    macs: int          # multiply-accumulates per image


def layers(prepped: str | Path, op_types: Sequence[str]) -> list[Layer]:
    """The nodes of ``prepped`` (a graph after :func:`.quantize.prepare_static`) the preset quantizes, with
    their multiply-accumulates per image (Conv / MatMul / Gemm with a constant weight; 0 for the others)."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(prepped)))
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    shapes = {v.name: tuple(d.dim_value for d in v.type.tensor_type.shape.dim)
              for v in [*model.graph.value_info, *model.graph.output]}
    out = []
    for n in model.graph.node:
        if n.op_type not in op_types or n.op_type not in RANKED_OPS:
            continue
        out.append(Layer(n.name, n.op_type, _macs(n, inits, shapes)))
    return out


def _macs(node: onnx.NodeProto, inits: dict, shapes: dict) -> int:
    """Multiply-accumulates per image of a Conv / MatMul / Gemm with a constant weight."""
    weight = next((inits[i] for i in node.input[1:2] if i in inits), None)
    y = shapes.get(node.output[0])
    if weight is None or len(y or ()) < 2 or 0 in y[1:]:
        return 0
    per_output = int(np.prod(weight[1:])) if node.op_type == "Conv" else int(weight[0])
    return int(np.prod(y[1:])) * per_output


def _target(thresholds: dict[str, float]) -> dict[str, float]:
    return {k: v + MARGIN * (1 - v) for k, v in thresholds.items() if k in ("min_cosine", "mean_cosine")}


def _meets(s: dict, target: dict[str, float]) -> bool:
    return all(s[k] >= v for k, v in target.items())


def mixed_int8(plain: Path, directory: Path, config: QuantConfig, batches: list[np.ndarray], reference: np.ndarray,
               thresholds: dict[str, float], *, max_float_macs: float = DEFAULT_MAX_FLOAT_MACS,
               threads: int | None = None, step: Step = lambda s: None,
               cache: Path | None = None) -> tuple[Path, dict]:
    """The INT8 graph of ``plain`` with the fewest float layers that meet ``thresholds`` on the calibration
    ``batches`` (``reference``: the float graph's embeddings of them), and its record (see module docstring).
    Raises ExportError when even every admissible layer in float misses them. ``cache``: see
    :func:`~imgembed.export.quantize.quantize`."""
    if not 0 <= max_float_macs <= 1:
        raise ExportError(f"max_float_macs {max_float_macs!r} must be a share of the MACs between 0 and 1")
    directory.mkdir(parents=True, exist_ok=True)
    target = _target(thresholds)
    prepped = prepared(plain, cache, directory / "prepped.onnx")
    ranked_layers = layers(prepped, config.op_types or RANKED_OPS)
    total = sum(la.macs for la in ranked_layers) or 1
    step("mixed precision: quantizing every layer")
    full = quantize(plain, directory / "int8-full.onnx", config, batches, cache=cache)
    scores = {0: score(full, batches, reference, threads)}
    record = {"max_float_macs": max_float_macs, "target": target, "layers": len(ranked_layers),
              "total_macs": total, "full_int8_score": scores[0]}
    if _meets(scores[0], target):
        return full, {**record, "float_layers": [], "float_macs_share": 0.0, "calibration_score": scores[0]}
    step(f"mixed precision: ranking {len(ranked_layers)} layers by sensitivity")
    by_name = {la.name: la for la in ranked_layers}
    order = leave_one_out(full, prepped, [la.name for la in ranked_layers], batches, reference, directory, threads)
    admitted, used = [], 0
    for name, err in order:
        if used + by_name[name].macs <= max_float_macs * total:
            admitted.append((name, err))
            used += by_name[name].macs
    graphs = {0: full}

    def attempt(k: int) -> bool:
        if k not in scores:
            graphs[k] = keep_float(full, prepped, [n for n, _ in admitted[:k]], directory / f"int8-float{k}.onnx")
            scores[k] = score(graphs[k], batches, reference, threads)
            step(f"mixed precision: {k} layer(s) in float: {scores[k]}")
        return _meets(scores[k], target)

    k = _shortest_passing(len(admitted), attempt)
    if k is None:
        raise ExportError(f"mixed precision: {len(admitted)} most sensitive layer(s) in float (the most within "
                          f"{max_float_macs:.0%} of the MACs) still score {scores[len(admitted)]} on the calibration "
                          f"images; the gate needs {target}")
    floats = [{"name": n, "op_type": by_name[n].op_type, "macs": by_name[n].macs, "cosine_gain": round(e, 6),
               "why": "among the most sensitive layers (embedding cosine gained with it alone in float)"}
              for n, e in admitted[:k]]
    share = sum(f["macs"] for f in floats) / total
    return graphs[k], {**record, "float_layers": floats, "float_macs_share": round(share, 4),
                       "calibration_score": scores[k], "tried": {str(i): s for i, s in sorted(scores.items())}}


def keep_float(qdq: Path, prepped: Path, names: Sequence[str], dst: Path) -> Path:
    """``qdq`` (a QDQ INT8 graph of ``prepped``) with the nodes ``names`` computing in float: each reads its
    float activation input (the tensor its input Q/DQ pair quantized) and its float weights and bias. The
    other layers keep the calibrated scales, so no recalibration runs."""
    model, source = onnx.load(str(qdq)), onnx.load(str(prepped))
    float_nodes = {n.name: n for n in source.graph.node}
    float_inits = {t.name: t for t in source.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    float_producer = {o: n for n in source.graph.node for o in n.output}
    inputs = {i.name for i in model.graph.input}
    have = {t.name for t in model.graph.initializer}

    def copy_init(original: str) -> str:
        name = f"{original}_float"
        if name not in have:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(float_inits[original])
            tensor.name = name
            model.graph.initializer.append(tensor)
            have.add(name)
        return name

    added = []
    for node in list(model.graph.node):
        if node.name not in names:
            continue
        for i, original in enumerate(float_nodes[node.name].input):
            if original in float_inits:
                node.input[i] = copy_init(original)
            elif original in inputs or (original in producer and
                                        producer[original].op_type == float_producer[original].op_type):
                node.input[i] = original
            elif original in producer and float_producer[original].op_type in ("Relu", "Clip"):
                # the activation folded into the producer's output range: applied again in float
                act = float_producer[original]
                extra = [copy_init(t) if t in float_inits else t for t in act.input[1:]]
                added.append(onnx.helper.make_node(act.op_type, [original, *extra], [f"{original}_float"],
                                                   name=f"{act.name}_float"))
                node.input[i] = f"{original}_float"
    for n in added:  # each right after the node producing its input keeps the graph topologically sorted
        position = list(model.graph.node).index(producer[n.input[0]]) + 1
        model.graph.node.insert(position, n)
    onnx.save(model, str(dst))
    return dst


def leave_one_out(full: Path, prepped: Path, names: Sequence[str], batches: list[np.ndarray],
                  reference: np.ndarray, directory: Path, threads: int | None = None) -> list[tuple[str, float]]:
    """Per layer of ``names``: how much the embeddings' cosine to ``reference`` (1 - min, then 1 - mean, on the
    first :data:`SENSITIVITY_IMAGES` calibration images) improves when that layer alone computes in float,
    most sensitive first."""
    sample = [np.concatenate(batches)[:SENSITIVITY_IMAGES]]
    ref = reference[:SENSITIVITY_IMAGES]
    base = score(full, sample, ref, threads)
    gains = []
    for name in names:
        s = score(keep_float(full, prepped, [name], directory / "one-float.onnx"), sample, ref, threads)
        gains.append((name, (s["min_cosine"] - base["min_cosine"]) + (s["mean_cosine"] - base["mean_cosine"])))
    return sorted(gains, key=lambda e: -e[1])


def sensitivity(float_graph: Path, int8_graph: Path, names: Sequence[str], pixels: np.ndarray,
                threads: int | None = None) -> list[tuple[str, float]]:
    """Per node of ``names`` (nodes of the float graph): the relative error its quantization adds (error of its
    output minus error of its input, INT8 graph vs float graph), most sensitive first. A Relu / Clip folded
    into the node's output range is part of the node: its output is compared."""
    model = onnx.load(str(float_graph))
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    nodes = {n.name: n for n in model.graph.node}
    ends = {}
    for name in names:
        out = nodes[name].output[0]
        while len(consumers.get(out, [])) == 1 and consumers[out][0].op_type in ("Relu", "Clip"):
            out = consumers[out][0].output[0]
        ends[name] = (nodes[name].input[0], out)
    tensors = sorted({t for pair in ends.values() for t in pair})
    ref = dict(zip(tensors, _session(float_graph, threads, tensors).run(tensors, {INPUT_NAME: pixels}), strict=True))
    got = dict(zip(tensors, _session(int8_graph, threads, tensors).run(tensors, {INPUT_NAME: pixels}), strict=True))

    def rel(t: str) -> float:
        return float(np.linalg.norm(ref[t] - got[t]) / max(np.linalg.norm(ref[t]), 1e-12))

    return sorted(((n, rel(o) - rel(i)) for n, (i, o) in ends.items()), key=lambda e: -e[1])


def _shortest_passing(n: int, attempt: Callable[[int], bool]) -> int | None:
    """The smallest k in 1..n with ``attempt(k)`` true, assuming it stays true for larger k: doubling, then
    bisection between the last failing and the first passing k. None when ``attempt(n)`` fails."""
    if n == 0:
        return None
    lo, hi = 0, 1
    while not attempt(hi):
        if hi == n:
            return None
        lo, hi = hi, min(2 * hi, n)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if attempt(mid):
            hi = mid
        else:
            lo = mid
    return hi
