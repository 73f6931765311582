"""Cross-layer equalization (CLE) of convolutional graphs before INT8 (Nagel et al. 2019, "Data-free
quantization through weight equalization and bias correction").

Trained CNNs, depthwise-separable ones most of all, have output channels whose weights (and so activations)
are orders of magnitude larger than their neighbours'; one per-tensor activation scale then leaves the small
channels a handful of integer levels. ReLU is positively homogeneous (``relu(s*x) = s*relu(x)`` for s > 0),
so for a chain ``Conv1 -> Relu -> Conv2`` output channel i of Conv1 can be divided by ``s_i`` and input
channel i of Conv2 multiplied by it without changing the function. CLE picks ``s_i = sqrt(r1_i * r2_i) / r2_i``
(r1_i: range of Conv1's output channel i, r2_i: range of Conv2's input channel i), which gives both the same
range, and sweeps over all chains until the scales settle.

Works on the exported ONNX graph (BatchNorm is already folded into the Convs), so it applies to every CNN
imgembed exports, registry families and users' own modules alike. Chains are matched only where the
intermediate tensors have no other consumer; Conv2 may be a plain or a depthwise convolution.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

SWEEPS = 8


@dataclass
class _Conv:
    node: onnx.NodeProto
    weight: np.ndarray
    bias: np.ndarray | None
    groups: int


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((int(a.i) for a in node.attribute if a.name == name), default)


def equalize(src: str | Path, dst: str | Path, sweeps: int = SWEEPS) -> dict:
    """Write the cross-layer-equalized copy of ``src`` to ``dst`` (an unchanged copy when no chain qualifies:
    ``pairs`` is then 0); returns a record (pairs, sweeps, the largest channel-range ratio before and after)."""
    model = onnx.load(str(src))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}

    def const(name: str) -> np.ndarray | None:
        """An initializer's value, following Identity nodes (the exporter shares equal initializers)."""
        while name not in inits and name in producer and producer[name].op_type == "Identity":
            name = producer[name].input[0]
        return numpy_helper.to_array(inits[name]).copy() if name in inits else None

    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in graph.output}
    convs: dict[str, _Conv] = {}
    for n in graph.node:
        if n.op_type == "Conv" and len(n.input) >= 2:
            w = const(n.input[1])
            b = const(n.input[2]) if len(n.input) > 2 and n.input[2] else None
            if w is not None and w.ndim == 4:
                convs[n.name or n.output[0]] = _Conv(n, w.astype(np.float32), None if b is None else
                                                     b.astype(np.float32), _attr(n, "group", 1))

    def only(tensor: str) -> onnx.NodeProto | None:
        users = consumers.get(tensor, [])
        return users[0] if len(users) == 1 and tensor not in outputs else None

    by_node = {id(c.node): c for c in convs.values()}
    pairs: list[tuple[_Conv, _Conv]] = []
    for c1 in convs.values():
        relu = only(c1.node.output[0])
        if relu is None or relu.op_type != "Relu":
            continue
        nxt = only(relu.output[0])
        c2 = by_node.get(id(nxt)) if nxt is not None else None
        if c2 is None or c2.node.input[0] != relu.output[0]:
            continue
        channels = c1.weight.shape[0]
        depthwise = c2.groups == channels and c2.weight.shape[1] == 1
        if c2.groups != 1 and not depthwise:
            continue
        if c2.groups == 1 and c2.weight.shape[1] != channels:
            continue
        pairs.append((c1, c2))
    if not pairs:
        onnx.save(model, str(dst))
        return {"pairs": 0, "sweeps": 0, "worst_ratio_before": None, "worst_ratio_after": None}

    def in_ranges(c2: _Conv, channels: int) -> np.ndarray:
        if c2.groups == 1:
            return np.abs(c2.weight).max(axis=(0, 2, 3))
        per = c2.weight.shape[0] // channels  # depthwise multiplier
        return np.abs(c2.weight.reshape(channels, per, -1)).max(axis=(1, 2))

    def worst() -> float:
        ratios = []
        for c1, _ in pairs:
            r = np.abs(c1.weight).reshape(c1.weight.shape[0], -1).max(axis=1)
            ratios.append(float(r.max() / max(r[r > 0].min(initial=r.max()), 1e-12)))
        return max(ratios)

    before = worst()
    done = 0
    while done < sweeps:
        done += 1
        moved = 0.0
        for c1, c2 in pairs:
            channels = c1.weight.shape[0]
            r1 = np.abs(c1.weight).reshape(channels, -1).max(axis=1)
            r2 = in_ranges(c2, channels)
            ok = (r1 > 0) & (r2 > 0)
            s = np.ones(channels, np.float32)
            s[ok] = np.sqrt(r1[ok] * r2[ok]) / r2[ok]
            c1.weight /= s[:, None, None, None]
            if c1.bias is not None:
                c1.bias /= s
            if c2.groups == 1:
                c2.weight *= s[None, :, None, None]
            else:
                c2.weight *= np.repeat(s, c2.weight.shape[0] // channels)[:, None, None, None]
            moved = max(moved, float(np.abs(np.log(s)).max()))
        if moved < 1e-3:
            break
    touched = {id(c.node): c for pair in pairs for c in pair}
    for c in touched.values():  # fresh initializers: the originals may be shared with untouched Convs
        base = (c.node.name or c.node.output[0]).replace("/", "_")
        w = numpy_helper.from_array(c.weight, f"{base}_cle_weight")
        graph.initializer.append(w)
        c.node.input[1] = w.name
        if c.bias is not None:
            b = numpy_helper.from_array(c.bias, f"{base}_cle_bias")
            graph.initializer.append(b)
            c.node.input[2] = b.name
    _prune(graph)
    onnx.save(model, str(dst))
    return {"pairs": len(pairs), "sweeps": done, "worst_ratio_before": round(before, 2),
            "worst_ratio_after": round(worst(), 2)}


def _prune(graph: onnx.GraphProto) -> None:
    """Drop Identity nodes and initializers nothing reads any more (the replaced weights)."""
    outputs = {o.name for o in graph.output}
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if n.op_type == "Identity" and not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {i for n in graph.node for i in n.input} | outputs
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
