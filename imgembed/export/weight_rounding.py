"""Post-training weight rounding and bias correction on a static Q/DQ INT8 graph (depthwise-separable CNNs).

Measured on EfficientNet-Lite0 with its trained ImageNet weights (docs/performance.md): the accuracy the
static Q/DQ preset loses is mostly *weight* rounding, not activation ranges: the first depthwise 3x3 kernel
alone, rounded to nearest with per-channel 8-bit scales, takes the worst parity image from cosine 1.0 to
0.957. Nine weights per channel do not average their rounding errors out. The literature's answer is to
choose the rounding by the layer's output error instead of each weight's (AdaRound, Nagel et al. 2020; the
one-shot second-order form of it is OBQ/GPTQ, Frantar et al. 2022), then to remove the mean output error
left over with the bias (bias correction, Nagel et al. 2019). Both act on the quantized graph ONNX Runtime
wrote, so its scales, zero points and kernels stay as they are:

1. Per Conv, in graph order (the graphs are re-run every :data:`GROUP` convolutions so each layer sees the
   activations of the layers already corrected): its input activations as the INT8 graph computes them
   (``X``, after their own Q/DQ) on the calibration images, and ``H = X Xᵀ`` over every output position
   (depthwise: one 9x9 / 25x25 ``H`` per channel, counted only where the float output is not clipped away
   by the ReLU/ReLU6 folded into the Conv).
2. **Rounding** (GPTQ's update with ORT's per-channel scale held fixed): the kernel's columns are rounded one
   at a time, and each column's rounding error is spread over the columns not yet rounded through ``H⁻¹``,
   so that ``‖(W - Ŵ) X‖`` is (approximately) minimal instead of each ``|w - ŵ|``. The int8 weights of the
   graph are replaced; their scales are unchanged. By default (``float_input``) the kernel rounded is not the
   float one but the one that best maps the INT8 graph's inputs ``X`` to the float layer's output on the
   *float* graph's inputs (:func:`_asymmetric_target`; GPTAQ's asymmetric calibration, Li et al. 2025), so each
   layer also takes back part of the error the layers before it left in its input.
3. **Bias correction**: the bias (int32, scale ``s_in·s_w``) is shifted by the mean per-channel difference
   between the float graph's output of that Conv and the INT8 one's, on the same images (only where the
   float output is not clipped by the folded activation).

Neither is exact; :func:`optimize` returns a record of what changed per layer. Measured on Lite0 (parity
images, docs/performance.md): bias correction lifts static Q/DQ from 0.921 / 0.9825 (min / mean cosine) to
0.951 / 0.9934, and to 0.982 / 0.9966 with grayscale copies of the calibration images, short of the gate's min
0.99; rounding toward the float kernel + bias correction on the crops, grayscale copies and mosaics
(:func:`augmented`) reaches 0.9871 / 0.9973 (dampening 0.1; with GPTQ's 0.01 and without the copies it fits the
calibration images and loses on unseen textures), and rounding toward the float-input target with dampening 1.0
0.9947 / 0.9985 (Lite1 0.9909 / 0.9982, Lite2 0.9915 / 0.9978). The recipe ``onnxruntime-int8-rounded``
(:mod:`.recipes.rounded`) builds it for CNNs whose static Q/DQ graph failed its gate.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from imgembed.errors import ExportError

GROUP = 1          # convolutions corrected between two runs of the graphs (more: stale inputs, worse)
DAMP = 1.0         # dampening of H's diagonal (share of its mean); GPTQ's 0.01 overfits the calibration images (Lite0)
FLOAT_BUDGET = 1 << 30  # bytes of float-graph tensors held at once (fewer runs of the float graph)
QMIN, QMAX = -127, 127  # ORT's symmetric int8 weight range
ALL_POSITIONS = 0.05  # weight of the clipped output positions in a depthwise H
Step = Callable[[str], None]


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


class _Conv:
    """One Conv of the Q/DQ graph: its input tensor, its int8 weight, scale and bias initializers."""

    def __init__(self, node: onnx.NodeProto, producers: dict, float_out: str, clip: tuple | None):
        self.node, self.name, self.float_out, self.clip = node, node.name, float_out, clip
        self.x = node.input[0]
        wdq = producers[node.input[1]]
        self.wq, self.ws = wdq.input[0], wdq.input[1]
        self.b = None
        bdq = producers.get(node.input[2]) if len(node.input) > 2 else None
        if bdq is not None and bdq.op_type == "DequantizeLinear":
            self.b, self.bs = bdq.input[0], bdq.input[1]
        self.group = int(_attr(node, "group", 1))
        self.strides = tuple(_attr(node, "strides", (1, 1)))
        self.dilations = tuple(_attr(node, "dilations", (1, 1)))
        pads = tuple(_attr(node, "pads", (0, 0, 0, 0)))
        if len(pads) != 4 or _attr(node, "auto_pad", b"NOTSET") != b"NOTSET":
            raise ValueError("not a 2-D convolution with explicit pads")
        self.pads = (pads[1], pads[3], pads[0], pads[2])  # F.pad order: left, right, top, bottom

    def padded(self, x):
        import torch.nn.functional as F

        return F.pad(x, self.pads) if any(self.pads) else x


def convolutions(qdq: onnx.ModelProto, float_graph: onnx.ModelProto) -> list[_Conv]:
    """The 2-D Convs of ``qdq`` whose weights are int8 initializers behind a DequantizeLinear (per-channel,
    zero point 0), each with the float graph's output it should reproduce (after a folded Relu/Clip, when
    the quantizer folded one: that activation's range is kept for the masks)."""
    producers = {o: n for n in qdq.graph.node for o in n.output}
    inits = {t.name: t for t in qdq.graph.initializer}
    fnodes = {n.name: n for n in float_graph.graph.node}
    finits = {t.name: t for t in float_graph.graph.initializer}
    fconsumers: dict[str, list] = {}
    for n in float_graph.graph.node:
        for i in n.input:
            fconsumers.setdefault(i, []).append(n)
    out = []
    for node in qdq.graph.node:
        if node.op_type != "Conv" or node.name not in fnodes or len(node.input) < 2:
            continue
        wdq = producers.get(node.input[1])
        if wdq is None or wdq.op_type != "DequantizeLinear" or wdq.input[0] not in inits:
            continue
        if inits[wdq.input[0]].data_type != onnx.TensorProto.INT8 or len(inits[wdq.input[0]].dims) != 4:
            continue
        if len(wdq.input) > 2 and wdq.input[2] in inits and np.any(numpy_helper.to_array(inits[wdq.input[2]])):
            continue  # asymmetric weights: not handled
        fout = fnodes[node.name].output[0]
        clip = None
        after = fconsumers.get(fout, [])
        if len(after) == 1 and after[0].op_type in ("Relu", "Clip"):
            act = after[0]
            lo, hi = 0.0, np.inf
            if act.op_type == "Clip":
                vals = [float(numpy_helper.to_array(finits[i])) if i in finits else None for i in act.input[1:3]]
                lo = vals[0] if vals and vals[0] is not None else -np.inf
                hi = vals[1] if len(vals) > 1 and vals[1] is not None else np.inf
            clip = (lo, hi)
        try:
            out.append(_Conv(node, producers, fout, clip))
        except ValueError:
            continue
    return out


def _session(model: onnx.ModelProto, outputs: Sequence[str], threads: int | None):
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    m.graph.output.extend(onnx.ValueInfoProto(name=n) for n in outputs if n not in have)
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _run(model: onnx.ModelProto, outputs: list[str], pixels: np.ndarray, input_name: str, threads: int | None,
         batch: int = 8) -> dict[str, np.ndarray]:
    sess = _session(model, outputs, threads)
    parts = [sess.run(outputs, {input_name: pixels[i:i + batch]}) for i in range(0, len(pixels), batch)]
    return {n: np.concatenate([p[k] for p in parts]) for k, n in enumerate(outputs)}


def _mask(y_float, clip):
    """Where the float output is not clipped away by the folded activation (all positions without one)."""
    if clip is None:
        return None
    return ((y_float > clip[0]) & (y_float < clip[1])).to(y_float.dtype)


def _gptq(w, s, h):
    """Round ``w`` (R, D) to integers on per-row scales ``s`` (R,) minimizing ``(w - q s) H (w - q s)ᵀ`` greedily
    (GPTQ's column order with error feedback); ``h`` (D, D) shared by every row, or (R, D, D) one per row."""
    import torch

    w = w.clone()
    d = w.shape[-1]
    h = h.clone()
    eye = torch.eye(d, dtype=h.dtype)
    diag = torch.diagonal(h, dim1=-2, dim2=-1)
    dead = diag <= 0
    # an input never non-zero on the calibration images is not dead on every image: its weights keep their
    # nearest rounding (its unit diagonal passes no error on to the other columns), never zero
    if h.dim() == 2:
        h[dead, dead] = 1.0
        h = h + DAMP * diag.mean().clamp_min(1e-12) * eye
    else:
        h = h + (DAMP * diag.mean(dim=-1).clamp_min(1e-12))[:, None, None] * eye + dead[..., None] * eye
    chol = torch.linalg.cholesky(h)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)
    q = torch.zeros_like(w)
    for i in range(d):
        col = w[:, i]
        qi = torch.clamp(torch.round(col / s), QMIN, QMAX)
        q[:, i] = qi
        if h.dim() == 2:
            err = (col - qi * s) / hinv[i, i]
            w[:, i:] -= err[:, None] * hinv[i, i:][None, :]
        else:
            err = (col - qi * s) / hinv[:, i, i]
            w[:, i:] -= err[:, None] * hinv[:, i, i:]
    return q


def _asymmetric_target(w, h, cross):
    """The float kernel that, applied to the INT8 graph's inputs ``X_q``, best reproduces the float kernel ``w``
    on the float graph's inputs ``X_f``: ``argmin ‖W' X_q - w X_f‖² + λ‖W' - w‖²`` with ``h = X_q X_qᵀ``,
    ``cross = X_q X_fᵀ`` (per channel for depthwise) and λ the rounding's dampening. Rounding it by ``h`` then
    also undoes the error the layers before left in this layer's input (asymmetric calibration, GPTAQ)."""
    import torch

    diag = torch.diagonal(h, dim1=-2, dim2=-1)
    eye = torch.eye(h.shape[-1], dtype=h.dtype)
    if h.dim() == 2:
        lam = DAMP * diag.mean().clamp_min(1e-12)
        rhs = w @ cross.T + lam * w                              # (R, D): w X_f X_qᵀ + λ w
        return torch.linalg.solve(h + lam * eye, rhs.T).T
    lam = (DAMP * diag.mean(dim=-1).clamp_min(1e-12))[:, None, None]
    rhs = torch.einsum("cd,ced->ce", w, cross) + lam[:, :, 0] * w   # per channel: w_c X_f X_qᵀ + λ w_c
    return torch.linalg.solve(h + lam * eye, rhs.unsqueeze(-1)).squeeze(-1)


def _output_error(w, q, s, h):
    """Per row: ``(w - q s) H (w - q s)ᵀ``, the squared output error of the rounding on the calibration images."""
    import torch

    e = w - q * s[:, None]
    return (e @ h * e).sum(dim=1) if h.dim() == 2 else torch.einsum("cd,cde,ce->c", e, h, e)


def _patches(x, conv: _Conv, kernel: tuple[int, int]):
    import torch.nn.functional as F

    return F.unfold(conv.padded(x), kernel, dilation=conv.dilations, stride=conv.strides)  # (N, C*k*k, L)


def _correct(conv: _Conv, inits: dict, w_float: np.ndarray | None, x: np.ndarray, y_float: np.ndarray,
             rounding: bool, bias: bool, chunk: int = 4, x_float: np.ndarray | None = None) -> dict:
    """Re-round ``conv``'s int8 weights (from ``w_float``, its float kernel) and/or correct its bias, in ``inits``
    (the Q/DQ graph's initializers, edited in place); ``x``: its input in the INT8 graph, ``y_float``: its output in
    the float graph, ``x_float``: its input in the float graph (given: round toward :func:`_asymmetric_target`), on
    the same images."""
    import torch
    import torch.nn.functional as F

    wq_t, ws_t = inits[conv.wq], inits[conv.ws]
    q0 = numpy_helper.to_array(wq_t).astype(np.float64)
    scale = numpy_helper.to_array(ws_t).astype(np.float64).reshape(-1)
    cout, cin_g, kh, kw = q0.shape
    if scale.size == 1:
        scale = np.full(cout, float(scale))
    s = torch.from_numpy(scale)
    cin = x.shape[1]
    depthwise = conv.group == cin and cin_g == 1 and cout == cin
    record: dict = {"name": conv.name, "kind": "depthwise" if depthwise else "conv"}
    q = torch.from_numpy(q0)
    if rounding and (conv.group == 1 or depthwise):
        w = torch.from_numpy(q0 * scale[:, None, None, None])  # the float kernel ORT rounded (to within half a step)
        if w_float is not None:
            w = torch.from_numpy(w_float.astype(np.float64))
        d = cin_g * kh * kw
        asym = x_float is not None
        shape = (cout, d, d) if depthwise else (d, d)
        h = torch.zeros(shape, dtype=torch.float64)
        cross = torch.zeros(shape, dtype=torch.float64) if asym else None
        for i in range(0, len(x), chunk):
            p = _patches(torch.from_numpy(x[i:i + chunk]).double(), conv, (kh, kw))
            pf = _patches(torch.from_numpy(x_float[i:i + chunk]).double(), conv, (kh, kw)) if asym else None
            if depthwise:
                p = p.view(p.shape[0], cout, d, -1)
                m = _mask(torch.from_numpy(y_float[i:i + chunk]).double().flatten(2), conv.clip)
                # where the activation clips the output the weights do not matter; a little of the unmasked H
                # keeps channels that are (almost) always clipped on the calibration images well-posed
                pm = p * ALL_POSITIONS if m is None else p * (m[:, :, None, :] + ALL_POSITIONS)
                h += torch.einsum("ncdl,ncel->cde", pm, p)
                if asym:
                    cross += torch.einsum("ncdl,ncel->cde", pm, pf.view(p.shape))
            else:
                p = p.transpose(1, 2).reshape(-1, d)
                h += p.T @ p
                if asym:
                    cross += p.T @ pf.transpose(1, 2).reshape(-1, d)
        w2 = w.reshape(cout, d)
        if asym:
            w2 = _asymmetric_target(w2, h, cross)
            record["target"] = "float-input"
        q = _gptq(w2, s, h)
        # never worse than rounding to nearest on the calibration images: per output channel, keep the better
        nearest = torch.from_numpy(q0.reshape(cout, d))
        e_gptq, e_nearest = _output_error(w2, q, s, h), _output_error(w2, nearest, s, h)
        q = torch.where((e_gptq <= e_nearest)[:, None], q, nearest)
        record["output_error_nearest"] = float(e_nearest.sum())
        record["output_error"] = float(torch.minimum(e_gptq, e_nearest).sum())
        q = q.reshape(cout, cin_g, kh, kw)
        record["weights_changed"] = int((q.numpy() != q0).sum())
        wq_t.CopyFrom(numpy_helper.from_array(q.numpy().astype(np.int8), wq_t.name))
    if bias and conv.b is not None:
        bq_t, bs_t = inits[conv.b], inits[conv.bs]
        bq = numpy_helper.to_array(bq_t).astype(np.float64)
        bs = numpy_helper.to_array(bs_t).astype(np.float64).reshape(-1) * np.ones(cout)
        wd = torch.from_numpy(q.numpy() * scale[:, None, None, None])
        num = np.zeros(cout)
        den = np.zeros(cout)
        for i in range(0, len(x), chunk):
            yq = F.conv2d(conv.padded(torch.from_numpy(x[i:i + chunk]).double()), wd, torch.from_numpy(bq * bs),
                          conv.strides, 0, conv.dilations, conv.group)
            yf = torch.from_numpy(y_float[i:i + chunk]).double()
            m = _mask(yf, conv.clip)
            diff = yf - yq
            if m is None:
                m = torch.ones_like(diff)
            num += (diff * m).sum(dim=(0, 2, 3)).numpy()
            den += m.sum(dim=(0, 2, 3)).numpy()
        delta = np.where(den > 0, num / np.maximum(den, 1), 0.0)
        new = np.clip(np.round(bq + delta / bs), -2**31, 2**31 - 1)
        bq_t.CopyFrom(numpy_helper.from_array(new.astype(np.int32), bq_t.name))
        record["bias_shift_max"] = round(float(np.abs(delta).max()), 6)
    return record


def augmented(crops: np.ndarray) -> np.ndarray:
    """Calibration crops (uint8 ``(N, H, W, 3)``) for rounding: the crops, their grayscale copies, and 3x3 mosaics
    of every second crop at a third of its scale, in colour and in grayscale (``3 N`` crops for an even ``N``).

    The rounding fits each kernel to the activations it sees; on colour photos alone it fits them and loses on
    content they lack. The default calibration set is colour photos; grayscale copies add colourless inputs and
    the mosaics add the fine, high-frequency texture (grass, gravel, print) that a 3x3 depthwise kernel meets in
    real data. Measured on EfficientNet-Lite0 (real weights, parity images never seen in calibration): min / mean
    cosine 0.9885 / 0.9974 with the crops and grayscale copies, 0.9904 / 0.9976 with the mosaics added."""
    from PIL import Image

    out = [crops, _gray(crops)]
    h, w = crops.shape[1:3]
    tiles = []
    for crop in crops[::2]:
        small = np.asarray(Image.fromarray(crop).resize((max(1, w // 3), max(1, h // 3)), Image.BILINEAR))
        mosaic = np.tile(small, (3, 3, 1))
        canvas = np.empty_like(crop)
        canvas[...] = np.asarray(Image.fromarray(mosaic).resize((w, h), Image.BILINEAR))
        tiles.append(canvas)
    if tiles:
        tiles_a = np.stack(tiles)
        out += [tiles_a, _gray(tiles_a)]
    return np.concatenate(out)


def _gray(crops: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma (PIL's ``convert("L")``) repeated in the three channels."""
    y = crops.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.repeat(np.clip(np.rint(y), 0, 255).astype(np.uint8)[..., None], 3, axis=3)


def optimize(qdq: str | Path, float_graph: str | Path, pixels: np.ndarray, dst: str | Path, *,
             rounding: bool = True, bias_correction: bool = True, float_input: bool = True,
             input_name: str = "pixel_values", threads: int | None = None, group: int = GROUP,
             float_budget: int = FLOAT_BUDGET, step: Step = lambda s: None) -> tuple[Path, dict]:
    """``qdq`` (a static Q/DQ INT8 graph of ``float_graph``, per-channel symmetric int8 weights) with its Conv
    weights re-rounded and its biases corrected on the calibration ``pixels`` (see the module docstring);
    written to ``dst``. ``float_input``: round toward the float layer's output on the *float* graph's inputs
    (:func:`_asymmetric_target`) instead of the float kernel's on the INT8 graph's inputs. Returns the path and
    the record (layers touched, weights changed, bias shifts)."""
    model, fmodel = onnx.load(str(qdq)), onnx.load(str(float_graph))
    convs = convolutions(model, fmodel)
    if not convs:
        raise ExportError("weight rounding: the INT8 graph has no Conv with per-channel int8 weights")
    inits = {t.name: t for t in model.graph.initializer}
    # the float kernels, so the rounding starts from them and not from ORT's rounded ones
    fnodes = {n.name: n for n in fmodel.graph.node}
    finits = {t.name: t for t in fmodel.graph.initializer}
    kernels = {c.name: numpy_helper.to_array(finits[fnodes[c.name].input[1]]) for c in convs
               if fnodes[c.name].input[1] in finits}
    asym = float_input and rounding
    wanted = [[c.float_out, *([fnodes[c.name].input[0]] if asym else [])] for c in convs]
    floats = _FloatTensors(fmodel, pixels, input_name, threads, wanted, float_budget)
    records = []
    for start in range(0, len(convs), group):
        part = convs[start:start + group]
        step(f"weight rounding: layers {start + 1}-{start + len(part)} of {len(convs)}")
        xs = _run(model, sorted({c.x for c in part}), pixels, input_name, threads)
        for k, c in enumerate(part, start):
            got = floats.get(k)
            xf = got[fnodes[c.name].input[0]] if asym else None
            records.append(_correct(c, inits, kernels.get(c.name), xs[c.x], got[c.float_out], rounding,
                                    bias_correction, x_float=xf))
    onnx.save(model, str(dst))
    return Path(dst), {"method": ("gptq-rounding" if rounding else "") + ("+" if rounding and bias_correction else "")
                       + ("bias-correction" if bias_correction else ""),
                       "target": "float-input" if asym else "int8-input",
                       "layers": len(records), "calibration_images": int(len(pixels)), "per_layer": records}


class _FloatTensors:
    """The float graph's tensors each layer needs (``wanted[k]``: names for layer ``k``), on every calibration
    image. They do not change while the INT8 graph is corrected, so one run of the float graph serves the next
    layers until their tensors would exceed ``budget`` bytes."""

    def __init__(self, model: onnx.ModelProto, pixels: np.ndarray, input_name: str, threads: int | None,
                 wanted: list[list[str]], budget: int):
        self.model, self.pixels, self.input_name, self.threads = model, pixels, input_name, threads
        self.wanted, self.budget = wanted, budget
        self.sizes = _tensor_sizes(model)
        self.held: dict[str, np.ndarray] = {}
        self.covers = -1   # the last layer whose tensors are held

    def get(self, k: int) -> dict[str, np.ndarray]:
        if k > self.covers:
            names, end, total = [], k, 0
            while end < len(self.wanted):
                new = [n for n in self.wanted[end] if n not in names and n != self.input_name]
                size = sum(self.sizes.get(n, self.budget) for n in new) * len(self.pixels)
                if names and total + size > self.budget:
                    break
                names += new
                total += size
                end += 1
            self.held = _run(self.model, names, self.pixels, self.input_name, self.threads) if names else {}
            self.held[self.input_name] = self.pixels
            self.covers = end - 1
        return self.held


def _tensor_sizes(model: onnx.ModelProto) -> dict[str, int]:
    """Bytes per image of the float tensors whose shapes shape inference knows (batch dimension excluded)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:   # noqa: BLE001 - without shapes every tensor counts as the whole budget: one per run
        return {}
    out = {}
    for v in [*inferred.graph.value_info, *inferred.graph.output]:
        dims = [d.dim_value for d in v.type.tensor_type.shape.dim][1:]
        if dims and all(d > 0 for d in dims):
            out[v.name] = 4 * int(np.prod(dims))
    return out
