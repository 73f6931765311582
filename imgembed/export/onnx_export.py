"""PyTorch -> ONNX for the image encoder (TorchScript exporter), then ONNX Runtime transformer fusion.

Steps, each testable alone:
  export_onnx(head, spec, path)       plain FP32 graph, dynamic batch axis, checked with onnx.checker
  optimize_transformer(src, dst, ...) ORT transformer optimizer (Attention / LayerNorm / Gelu fusion)
"""
from __future__ import annotations

import contextlib
import io
import warnings
from collections import Counter
from pathlib import Path

import onnx

from imgembed.errors import ExportError
from imgembed.models.families import family_of
from imgembed.models.registry import ModelSpec

DEFAULT_OPSET = 17
INPUT_NAME = "pixel_values"
OUTPUT_NAME = "embedding"


def export_onnx(head, spec: ModelSpec, path: str | Path, opset: int = DEFAULT_OPSET) -> Path:
    """Export ``head`` (an EmbeddingHead) to ``path`` with a dynamic batch axis; returns the path.

    The TorchScript exporter (``dynamo=False``) is used: it needs no onnxscript and keeps eager attention
    as MatMul/Softmax patterns that ORT fuses. Position-embedding interpolation (DINOv2) is traced at the
    registry input size, so it becomes a fixed Resize on a constant, which constant folding removes.
    """
    import torch

    path = Path(path)
    h, w = spec.input_hw
    dummy = torch.zeros(2, 3, h, w, dtype=torch.float32)
    try:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings(), _mha_fastpath_off(), \
                contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")  # TracerWarnings from transformers' shape checks are expected
            torch.onnx.export(
                head.eval(), (dummy,), str(path), dynamo=False, opset_version=opset,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                do_constant_folding=True,
            )
    except Exception as e:  # the exporter raises many internal types; surface one typed error
        raise ExportError(f"torch.onnx.export failed for {spec.name}: {type(e).__name__}: {e}") from e
    check_onnx(path)
    return path


@contextlib.contextmanager
def _mha_fastpath_off():
    """Trace nn.MultiheadAttention / nn.TransformerEncoderLayer as their math: their inference fast path is one
    fused aten op that has no ONNX export (user modules; transformers models do not use it)."""
    import torch

    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def check_onnx(path: str | Path) -> None:
    """Run the ONNX checker (by path, so models over 2 GB work); failures become ExportError."""
    try:
        onnx.checker.check_model(str(path), full_check=False)
    except Exception as e:
        raise ExportError(f"ONNX checker rejected {path}: {e}") from e


def op_counts(path: str | Path) -> dict[str, int]:
    """Node count per op type (including contrib ops), used in manifests and structure tests."""
    model = onnx.load(str(path), load_external_data=False)
    return dict(Counter(n.op_type for n in model.graph.node))


def _is_float_cast(node) -> bool:
    return node.op_type == "Cast" and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT for a in node.attribute)


def prepare_for_attention_fusion(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite today's HF eager attention into the pattern ORT's BERT/ViT fusion matches.

    transformers >= 4.48 computes ``softmax(q @ k.T * scale, dtype=float32).to(q.dtype)``, which exports as
    MatMul -> Mul(const) -> Softmax -> Cast -> Cast. ORT's ViT fusion expects MatMul -> Div -> Softmax with
    no casts, so: drop float->float Casts after Softmax (no-ops in an FP32 graph) and turn the constant
    scaling Mul that feeds a Softmax into a Div by its reciprocal. The parity gate checks the result.
    """
    from onnx import helper, numpy_helper

    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    rename: dict[str, str] = {}
    kept = []
    for n in model.graph.node:
        n.input[:] = [rename.get(x, x) for x in n.input]
        src = producer.get(n.input[0]) if n.input else None
        if _is_float_cast(n) and src is not None and (src.op_type == "Softmax" or _is_float_cast(src)):
            rename[n.output[0]] = n.input[0]
            continue
        const = producer.get(n.input[1]) if n.op_type == "Mul" and len(n.input) == 2 else None
        if const is not None and const.op_type == "Constant" and \
                any(c.op_type == "Softmax" for c in consumers.get(n.output[0], [])):
            divisor = (1.0 / numpy_helper.to_array(const.attribute[0].t)).astype("float32")
            model.graph.initializer.append(numpy_helper.from_array(divisor, n.output[0] + "_divisor"))
            n = helper.make_node("Div", [n.input[0], n.output[0] + "_divisor"], list(n.output), name=n.name + "_div")
        kept.append(n)
    graph_outputs = {o.name for o in model.graph.output}
    kept += [helper.make_node("Identity", [rename[o]], [o]) for o in graph_outputs if o in rename]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return model


def optimize_transformer(src: str | Path, dst: str | Path, spec: ModelSpec) -> dict[str, int]:
    """Apply ORT's offline transformer fusions to a ViT-like graph; returns the fused-op counts.

    ``opt_level=0`` keeps only the fusions (no hardware-specific layout changes), so the graph stays
    portable between ORT CPU and CUDA sessions.
    """
    from onnxruntime.transformers.optimizer import optimize_model

    fam = family_of(spec)
    if fam.ort_model_type is None:
        raise ExportError(f"family {spec.family!r} has no transformer optimizer")
    heads = int(spec.arch.get("num_attention_heads", 0))
    hidden = int(spec.arch.get("hidden_size", 0))
    prepared = Path(src)
    if fam.ort_model_type == "vit":  # ORT's CLIP fusion matches the Mul form as exported
        prepared = Path(dst).with_suffix(".prepared.onnx")
        onnx.save(prepare_for_attention_fusion(onnx.load(str(src))), str(prepared))
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = optimize_model(str(prepared), model_type=fam.ort_model_type, num_heads=heads, hidden_size=hidden,
                                 opt_level=0, use_gpu=False, only_onnxruntime=False)
            opt.save_model_to_file(str(dst))
    except Exception as e:
        raise ExportError(f"ONNX Runtime transformer optimizer failed on {src}: {e}") from e
    return {k: v for k, v in opt.get_fused_operator_statistics().items() if v}


# Ops kept in FP32 inside FP16 graphs: normalisations and softmax overflow or lose precision in half.
FP16_KEEP_FP32 = ("LayerNormalization", "SkipLayerNormalization", "Softmax", "ReduceL2", "ReduceSumSquare",
                  "ReduceMean", "Pow", "Sqrt", "Erf")


def convert_fp16(src: str | Path, dst: str | Path) -> Path:
    """Convert an FP32 graph to FP16 weights and compute, keeping float32 inputs/outputs and the ops in
    :data:`FP16_KEEP_FP32` in float32 (ORT's converter inserts the Casts)."""
    from onnxruntime.transformers.onnx_model import OnnxModel

    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = OnnxModel(onnx.load(str(src)))
            model.convert_float_to_float16(keep_io_types=True, op_block_list=list(FP16_KEEP_FP32))
            model.topological_sort()
        onnx.save(model.model, str(dst))
    except Exception as e:
        raise ExportError(f"FP16 conversion of {src} failed: {type(e).__name__}: {e}") from e
    check_onnx(dst)
    return Path(dst)
