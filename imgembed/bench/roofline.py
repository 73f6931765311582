"""The achievable peak of this host per engine and precision, and a model's place under it.

:func:`measure_peaks` times one large GEMM (and one 3x3 convolution) through each engine the benchmarks run,
opened with the same options and thread count as a model's engine (:class:`OrtRunner`, :class:`OpenVinoRunner`,
``torch.set_num_threads``): ONNX Runtime FP32 and INT8 (a static QDQ graph of our ``static-qdq-matmul`` /
``static-qdq`` presets: uint8 activations x int8 per-channel weights, which ONNX Runtime fuses into integer
kernels), OpenVINO FP32, BF16 (CPUs with AVX512_BF16 or AMX-BF16) and INT8 (the same QDQ graph, checked to run
in int8 from the compiled model's runtime precisions), PyTorch FP32. A peak row's ``gops_per_s`` is
``2*M*N*K / time`` (GEMM) or ``2*N*Cout*H*W*Cin*9 / time`` (conv) at the median of interleaved repeats.

:func:`add_peaks` gives each benchmark record the peak of its backend and precision (:func:`peak_key`: the
highest of that engine's kernels) and ``percent_of_peak`` = achieved GOP/s / peak x 100: how far a model is
from what the engine can do with this CPU at all. Nothing is cached on disk.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from imgembed.errors import ImgembedError
from imgembed.runtime.host import ONEDNN_ISA_ENV, missing_bf16_instructions

# (backend, precision) pairs in report order.
PAIRS = (("onnxruntime", "fp32"), ("onnxruntime", "int8"), ("openvino", "fp32"), ("openvino", "bf16"),
         ("openvino", "int8"), ("torch", "fp32"))
# GEMM (M, K, N). Chosen by measuring GOP/s over sizes on a 2-core Xeon with AMX (2 threads, nice 19, a shared
# machine): M x K x N = 512x1024x1024 / 1024^3 / 1024x2048x2048 / 2048^3 gave ONNX Runtime FP32 77 / 107 / 114 /
# 121, ONNX Runtime INT8 533 / 481 / 515 / 681, PyTorch FP32 75 / 75 / 114 / 132 GOP/s (OpenVINO flat from the
# smallest). Below 2048^3 the FP32 and ORT INT8 kernels are not yet at their plateau; one FP32 call of 2048^3
# (17 GOP) takes ~0.14 s here, so the whole measurement stays under ~20 s on 2 cores.
GEMM = (2048, 2048, 2048)
# 3x3 convolution (batch, channels in, H, W, channels out), padding 1: a ResNet stage-1 layer at batch 8.
CONV = (8, 64, 56, 56, 64)
KERNELS = ("gemm", "conv")
REPEATS = 5             # interleaved rounds; the median round counts
TARGET_SECONDS = 0.08   # one round of one kernel lasts about this long
WARMUP = 2


class Skip(Exception):
    """A (backend, precision) that cannot be measured here; the message says why."""


def _gemm_graph(path: Path, m: int, k: int, n: int) -> tuple[Path, np.ndarray]:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "gemm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
                              [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path, rng.standard_normal((m, k)).astype(np.float32)


def _conv_graph(path: Path, b: int, cin: int, h: int, w_: int, cout: int) -> tuple[Path, np.ndarray]:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((cout, cin, 3, 3)) / np.sqrt(cin * 9)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [b, cin, h, w_])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [b, cout, h, w_])],
                              [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path, rng.standard_normal((b, cin, h, w_)).astype(np.float32)


def kernel_ops(kernel: str, shape: tuple[int, ...]) -> tuple[str, float]:
    """The shape text and the operation count (2 x multiply-adds) of one call of ``kernel`` at ``shape``
    (:data:`GEMM` or :data:`CONV` order)."""
    if kernel == "gemm":
        m, k, n = shape
        return f"M{m} K{k} N{n}", 2.0 * m * k * n
    b, cin, h, w, cout = shape
    return f"{b}x{cin}x{h}x{w} -> {cout}, 3x3", 2.0 * b * cout * h * w * cin * 9


class _Graphs:
    """The FP32 and INT8 (static QDQ) ONNX graphs of each kernel, written once into a temporary directory."""

    def __init__(self, tmp: Path, shapes: dict[str, tuple[int, ...]]):
        self.tmp, self.shapes = tmp, shapes
        self._made: dict = {}

    def get(self, kernel: str, precision: str) -> tuple[Path, np.ndarray]:
        key = (kernel, precision)
        if key not in self._made:
            if precision == "int8":
                from imgembed.export.quantize import PRESETS, quantize

                src, x = self.get(kernel, "fp32")
                preset = PRESETS["static-qdq-matmul" if kernel == "gemm" else "static-qdq"]
                self._made[key] = quantize(src, self.tmp / f"{kernel}-int8.onnx", preset, [x], "x"), x
            else:
                make = _gemm_graph if kernel == "gemm" else _conv_graph
                self._made[key] = make(self.tmp / f"{kernel}-fp32.onnx", *self.shapes[kernel])
        return self._made[key]


def _ort(graphs: _Graphs, kernel: str, precision: str, threads: int) -> tuple[Callable, dict]:
    from imgembed.runtime.runners.onnxruntime import OrtRunner

    path, x = graphs.get(kernel, precision)
    session = OrtRunner(path, 1, threads=threads).activate().session
    extra = {"isa_cap": _cap("MLAS")}
    return (lambda: session.run(None, {"x": x})), extra


def runtime_layers(compiled) -> list[tuple[str, str, str]]:
    """OpenVINO: (layer type, runtime precision, primitive) of each layer of a compiled model's runtime graph,
    e.g. ``("FullyConnected", "u8", "brgemm_avx512_amx_I8")``."""
    out = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if "layerType" in info and "runtimePrecision" in info:
            primitive = info["primitiveType"].astype(str) if "primitiveType" in info else "?"
            out.append((info["layerType"].astype(str), info["runtimePrecision"].astype(str), primitive))
    return out


def _openvino(graphs: _Graphs, kernel: str, precision: str, threads: int) -> tuple[Callable, dict]:
    from imgembed.export.openvino import convert_onnx
    from imgembed.runtime.runners.openvino import OpenVinoRunner

    if precision == "bf16" and missing_bf16_instructions():
        raise Skip(missing_bf16_instructions())
    src, x = graphs.get(kernel, "int8" if precision == "int8" else "fp32")
    xml = src.with_suffix(".xml")
    if not xml.is_file():
        convert_onnx(src, xml)
    runner = OpenVinoRunner(xml, 1, threads=threads, inference_precision="bf16" if precision == "bf16" else "fp32")
    compiled = runner.activate()._compiled
    types = ("FullyConnected", "MatMul") if kernel == "gemm" else ("Convolution",)
    main = [(p, prim) for t, p, prim in runtime_layers(compiled) if t in types] or [("?", "?")]
    want = {"fp32": ("f32",), "bf16": ("bf16",), "int8": ("u8", "i8")}[precision]
    if not all(p in want for p, _ in main):
        raise Skip(f"OpenVINO runs the {kernel} in {'/'.join(p for p, _ in main)}, not {precision}")
    request = compiled.create_infer_request()
    extra = {"isa_cap": _cap("mlas" in main[0][1].lower() and "MLAS"), "runtime_precision": main[0][0],
             "primitive": main[0][1]}
    return (lambda: request.infer({0: x}, share_inputs=True, share_outputs=True)), extra


def _torch(graphs: _Graphs, kernel: str, precision: str, threads: int) -> tuple[Callable, dict]:
    try:
        import torch
    except ImportError:
        raise Skip("PyTorch is not installed") from None
    torch.set_num_threads(int(threads))  # what TorchRunner.activate does
    rng = np.random.default_rng(0)
    if kernel == "gemm":
        m, k, n = graphs.shapes["gemm"]
        a, b = (torch.from_numpy(rng.standard_normal(s).astype(np.float32)) for s in ((m, k), (k, n)))
        fn = torch.matmul
    else:
        bs, cin, h, w, cout = graphs.shapes["conv"]
        a, b = (torch.from_numpy(rng.standard_normal(s).astype(np.float32)) for s in ((bs, cin, h, w),
                                                                                       (cout, cin, 3, 3)))
        fn = lambda x, y: torch.nn.functional.conv2d(x, y, padding=1)  # noqa: E731

    def call():
        with torch.inference_mode():
            return fn(a, b)

    return call, {"isa_cap": _cap(kernel == "gemm" and _torch_blas())}


def _cap(bypass: str | bool | None = None) -> str | None:
    """The row's ISA cap: ``ONEDNN_MAX_CPU_ISA``, or "uncapped (LIBRARY)" where the kernel is not oneDNN's and
    ignores it (ONNX Runtime's MLAS, OpenVINO's FP32 FullyConnected on MLAS, PyTorch's FP32 GEMM on MKL:
    measured as fast under ONEDNN_MAX_CPU_ISA=AVX2 as uncapped); None without a cap."""
    isa = os.environ.get(ONEDNN_ISA_ENV) or None
    return f"uncapped ({bypass})" if isa and bypass else isa


def _torch_blas() -> str | None:
    """The BLAS behind PyTorch's FP32 matmul on the CPU ("MKL"), or None when it is not known to bypass oneDNN."""
    import torch

    return "MKL" if torch.backends.mkl.is_available() else None


_OPENERS = {"onnxruntime": _ort, "openvino": _openvino, "torch": _torch}


def _available(backend: str) -> str | None:
    """Why ``backend`` cannot run here, or None."""
    from imgembed.runtime.backends import get_backend

    return get_backend(backend).unavailable("cpu")


def _time_interleaved(fns: dict, repeats: int = REPEATS, target: float = TARGET_SECONDS) -> dict:
    """Seconds per call of each function: warm-up, a call count per round from one timed call, then
    ``repeats`` rounds in which every function runs its count in turn; the median round of each."""
    counts = {}
    for key, fn in fns.items():
        for _ in range(WARMUP):
            fn()
        start = time.perf_counter()
        fn()
        counts[key] = max(1, round(target / max(time.perf_counter() - start, 1e-6)))
    rounds: dict = {key: [] for key in fns}
    for r in range(repeats):
        for key in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            fn, n = fns[key], counts[key]
            start = time.perf_counter()
            for _ in range(n):
                fn()
            rounds[key].append((time.perf_counter() - start) / n)
    return {key: statistics.median(v) for key, v in rounds.items()}


def measure_peaks(threads: int, backends: Sequence[str] | None = None, precisions: Sequence[str] | None = None,
                  kernels: Sequence[str] = KERNELS, gemm: tuple[int, int, int] = GEMM,
                  conv: tuple[int, int, int, int, int] = CONV) -> list[dict]:
    """One row per (backend, precision, kernel) usable here (:data:`PAIRS`, restricted to ``backends`` and
    ``precisions``): backend, precision, kernel, shape, gop (per call), gops_per_s, seconds (median per call),
    threads, isa_cap (``ONEDNN_MAX_CPU_ISA`` for oneDNN engines; "uncapped" for ONNX Runtime, which ignores
    it), and for OpenVINO the runtime precision and primitive it ran; a pair that cannot run gets rows with
    ``gops_per_s`` None and ``skipped`` saying why. ``gemm``/``conv``: smaller shapes for quick tests."""
    rows: list[dict] = []
    fns: dict = {}
    torch_threads = _torch_threads()
    with tempfile.TemporaryDirectory(prefix="imgembed-roofline-") as tmp:
        graphs = _Graphs(Path(tmp), {"gemm": gemm, "conv": conv})
        for backend, precision in PAIRS:
            if (backends is not None and backend not in backends) or (precisions is not None
                                                                       and precision not in precisions):
                continue
            reason = _available(backend)
            for kernel in kernels:
                shape, ops = kernel_ops(kernel, graphs.shapes[kernel])
                row = {"backend": backend, "precision": precision, "kernel": kernel, "shape": shape,
                       "gop": round(ops / 1e9, 3), "gops_per_s": None, "seconds": None, "threads": threads,
                       "isa_cap": None}
                try:
                    if reason:
                        raise Skip(reason)
                    fn, extra = _OPENERS[backend](graphs, kernel, precision, threads)
                    row.update(extra)
                    fns[len(rows)] = fn
                except Skip as e:
                    row["skipped"] = str(e)
                except ImgembedError as e:
                    row["skipped"] = f"{type(e).__name__}: {e}"
                rows.append(row)
        try:
            seconds = _time_interleaved(fns)
        finally:
            _restore_torch_threads(torch_threads)
    for i, s in seconds.items():
        rows[i]["seconds"] = round(s, 6)
        rows[i]["gops_per_s"] = round(rows[i]["gop"] / s, 1)
    return rows


def _torch_threads() -> int | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.get_num_threads()


def _restore_torch_threads(n: int | None) -> None:
    if n is not None:
        import torch

        torch.set_num_threads(n)


# Backends whose kernels are another backend's: torch.compile runs PyTorch's GEMMs and convolutions.
PEAK_BACKENDS = {"torch-compile": "torch"}


def peak_backend(backend: str) -> str:
    """The backend whose peak ``backend`` is measured against."""
    return PEAK_BACKENDS.get(backend, backend)


def peak_key(record: dict) -> tuple[str, str]:
    """The (backend, precision) peak a benchmark record is measured against: INT8 engines against the engine's
    INT8 peak (whatever their float remainder runs in), engines computing in BF16 (a BF16 artifact, or an FP32
    one with a bf16 inference precision) against its BF16 peak, everything else against FP32."""
    backend, precision = peak_backend(record["backend"]), record.get("precision")
    if precision in ("int8", "fp16", "bf16"):
        return backend, precision
    if record.get("inference_precision") in ("bf16", "fp16"):
        return backend, record["inference_precision"]
    return backend, "fp32"


def peaks_by_pair(rows: Sequence[dict]) -> dict[tuple[str, str], dict]:
    """The highest measured row of each (backend, precision): the roofline's ceiling for that engine."""
    best: dict[tuple[str, str], dict] = {}
    for row in rows:
        if row.get("gops_per_s"):
            key = (row["backend"], row["precision"])
            if key not in best or row["gops_per_s"] > best[key]["gops_per_s"]:
                best[key] = row
    return best


def add_peaks(records: list[dict], rows: Sequence[dict] | None) -> list[dict]:
    """Set ``peak_gops`` (GOP/s), ``peak_kernel`` and ``percent_of_peak`` (achieved GFLOP/s as a percentage of
    the peak) of each record; None where no peak or no GFLOP count is known. Records are changed in place."""
    best = peaks_by_pair(rows or ())
    for r in records:
        peak = best.get(peak_key(r)) if r.get("device", "cpu") == "cpu" else None
        r["peak_gops"] = None if peak is None else peak["gops_per_s"]
        r["peak_kernel"] = None if peak is None else peak["kernel"]
        achieved = r.get("achieved_gflops")
        known = peak is not None and achieved is not None
        r["percent_of_peak"] = round(100 * achieved / peak["gops_per_s"], 1) if known else None
    return records
