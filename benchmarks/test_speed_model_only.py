"""Model-only speed: preprocessed float32 tensors straight into each runner (the original and its artifacts)."""
from __future__ import annotations


def test_model_only(run_batches, bench_runner, sample_pixels, model_name, variant_label, batch_size):
    from imgembed.bench.suite import batch_function

    model, variant, runner = bench_runner(model_name, variant_label)
    fn = batch_function(runner, model, variant, "model", batch_size, sample_pixels(model.spec), [])
    assert run_batches(model, variant, "model-only", batch_size, fn) == batch_size
