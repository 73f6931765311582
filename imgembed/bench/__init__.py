"""Benchmarks: exported artifacts against their PyTorch original, measured side by side.

``imgembed bench`` (:mod:`.cli`) and the pytest-benchmark suites in ``benchmarks/`` share these modules:

* :mod:`.targets`  registry names / artifact dirs -> models with artifacts (cached exports)
* :mod:`.backends` backend name -> Runner factory (torch original, ONNX Runtime); GPU backends register
                   themselves from :mod:`.backend_torch_compile` and :mod:`.backend_tensorrt`
* :mod:`.measure`  warm-up, interleaved windows, stability rule with a time cap
* :mod:`.stats`    percentiles, stability, speed-up ratios, achieved GFLOP/s
* :mod:`.suite`    model-only and end-to-end runs -> records with speed-ups
* :mod:`.host`     CPU model, cores, SIMD features, GPU, library versions
* :mod:`.report`   JSON, markdown table, throughput plot
"""
