"""Benchmarks: exported artifacts against their PyTorch original, measured side by side.

``imgembed bench`` (:mod:`.cli`) and the pytest-benchmark suites in ``benchmarks/`` share these modules:

* :mod:`.targets`  registry names / artifact dirs -> models with artifacts (cached exports)
* :mod:`.backends` variants (backend x precision x artifact engine) planned from the runtime's backend
                   table (:mod:`imgembed.runtime.backends`)
* :mod:`.measure`  warm-up, interleaved windows, stability rule with a time cap
* :mod:`.stats`    percentiles, stability, speed-up ratios, achieved GFLOP/s
* :mod:`.suite`    model-only and end-to-end runs -> records with speed-ups
* :mod:`.report`   JSON, markdown table, throughput plot
"""
