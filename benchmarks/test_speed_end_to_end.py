"""End-to-end speed: JPEG/PNG files on disk -> decode -> preprocess -> runner, through Embedder.embed."""
from __future__ import annotations


def test_end_to_end(run_batches, bench_runner, sample_pixels, sample_files, model_name, variant_label, batch_size):
    from imgembed.bench.suite import batch_function

    model, variant, runner = bench_runner(model_name, variant_label)
    fn = batch_function(runner, model, variant, "e2e", batch_size, sample_pixels(model.spec), sample_files)
    assert run_batches(model, variant, "end-to-end", batch_size, fn) == batch_size
