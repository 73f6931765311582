"""pytest-benchmark suites: the same runners and artifact cache as ``imgembed bench``.

Not part of the default test run (pytest's testpaths is ``tests``). Run them with::

    pytest benchmarks/ --benchmark-only

Environment variables choose what runs (defaults in brackets):

    IMGEMBED_BENCH_MODELS       registry names                        [clip-vit-b32,resnet50]
    IMGEMBED_BENCH_BATCH_SIZES  batch sizes                           [1,8]
    IMGEMBED_BENCH_VARIANTS     variant labels                        [torch-fp32,onnxruntime-fp32,onnxruntime-int8]
    IMGEMBED_BENCH_THREADS      threads for torch and ONNX Runtime    [all cores]
    IMGEMBED_BENCH_ROUNDS       measured rounds per benchmark         [10]
    IMGEMBED_BENCH_WARMUP       warm-up rounds per benchmark          [2]
    IMGEMBED_BENCH_CACHE        artifact cache                        [~/.cache/imgembed/bench]

Artifacts are exported once (random init, seeded, parity-gated) into the cache and reused while their
manifest still matches. Each benchmark's group is "MODEL MODE batch=N", so pytest-benchmark's table puts
the original and its artifacts side by side; ``--benchmark-group-by=param:model_name,param:variant_label``
groups by model/backend/precision instead.
"""
from __future__ import annotations

import os
import warnings

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _env_list(name: str, default: str) -> list[str]:
    return [p.strip() for p in os.environ.get(name, default).split(",") if p.strip()]


MODELS = _env_list("IMGEMBED_BENCH_MODELS", "clip-vit-b32,resnet50")
BATCH_SIZES = [int(b) for b in _env_list("IMGEMBED_BENCH_BATCH_SIZES", "1,8")]
VARIANTS = _env_list("IMGEMBED_BENCH_VARIANTS", "torch-fp32,onnxruntime-fp32,onnxruntime-int8")
ROUNDS = int(os.environ.get("IMGEMBED_BENCH_ROUNDS", "10"))
WARMUP = int(os.environ.get("IMGEMBED_BENCH_WARMUP", "2"))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize over the model, variant and batch-size sets chosen by the environment."""
    for fixture, values in (("model_name", MODELS), ("variant_label", VARIANTS), ("batch_size", BATCH_SIZES)):
        if fixture in metafunc.fixturenames:
            metafunc.parametrize(fixture, values)


@pytest.fixture(scope="session")
def bench_threads() -> int:
    from imgembed.runtime.host import default_threads

    return int(os.environ.get("IMGEMBED_BENCH_THREADS", default_threads()))


@pytest.fixture(scope="session")
def bench_runner(bench_threads):
    """``bench_runner(model_name, variant_label)`` -> (BenchModel, Variant, active Runner), built once.

    Registry models are exported (FP32 and INT8, random init) into the cache on first use.
    """
    from imgembed.bench.backends import OriginalCache, build_runner, plan_variants
    from imgembed.bench.targets import model_from_registry

    models, originals, runners, notes = {}, {}, {}, {}

    def get(model_name: str, label: str):
        if model_name not in models:
            notes[model_name] = []  # exports that failed their parity gate are left out, with a note
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Int8SlowerWarning is a finding, not a failure, here
                models[model_name] = model_from_registry(model_name, precisions=("fp32", "int8"), random_init=True,
                                                         weights=None, threads=bench_threads, notes=notes[model_name])
            originals[model_name] = OriginalCache(models[model_name])
        model = models[model_name]
        variants = {v.label: v for v in plan_variants(model, "cpu", notes=notes[model_name])}
        if label not in variants:
            pytest.skip(f"{model_name}: no variant {label!r} here (have {sorted(variants)}); {notes[model_name]}")
        if (model_name, label) not in runners:
            runner = build_runner(model, variants[label], "cpu", bench_threads, originals[model_name])
            runners[model_name, label] = runner.activate()
        return model, variants[label], runners[model_name, label]

    yield get
    for runner in runners.values():
        runner.deactivate()


@pytest.fixture(scope="session")
def sample_files(tmp_path_factory):
    """The parity photos as JPEG/PNG files, for the end-to-end suite."""
    from imgembed.bench.suite import write_sample_files

    return write_sample_files(tmp_path_factory.mktemp("bench-images"))


@pytest.fixture(scope="session")
def sample_pixels():
    """``sample_pixels(spec)`` -> the parity photos preprocessed for ``spec`` (cached per model)."""
    from imgembed.gate.samples import parity_images
    from imgembed.preprocess import preprocess_batch

    cache = {}

    def get(spec):
        if spec.name not in cache:
            cache[spec.name] = preprocess_batch([img for _, img in parity_images()], spec.preprocess)
        return cache[spec.name]

    return get


@pytest.fixture
def run_batches(benchmark, bench_threads):
    """``run_batches(model, variant, mode, batch_size, fn)``: benchmark ``fn`` (one batch -> image count) with
    the group and extra info every suite records; returns the image count of the last call."""
    def run(model, variant, mode: str, batch_size: int, fn) -> int:
        benchmark.group = f"{model.spec.name} {mode} batch={batch_size}"
        benchmark.extra_info.update(model=model.spec.name, backend=variant.backend, precision=variant.precision,
                                    original=variant.is_original, mode=mode, batch_size=batch_size,
                                    threads=bench_threads, gflops_per_image=model.spec.gflops)
        images = benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
        stats = getattr(benchmark, "stats", None)
        if stats is not None and stats.stats.mean > 0:  # no stats with --benchmark-disable
            benchmark.extra_info["images_per_second"] = batch_size / stats.stats.mean
        return images

    return run
