"""`imgembed bench --mode pipeline`: the fast end-to-end case, with uint8 and float artifacts side by side."""
from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from imgembed.bench.suite import write_sample_files
from imgembed.cli import app


def test_bench_pipeline_mode_with_fast_decode(artifact_dir, tmp_path):
    out = tmp_path / "report"
    res = CliRunner().invoke(app, ["bench", str(artifact_dir("test-vit-tiny")), "--mode", "all", "--decode", "fast",
                                   "--workers", "2", "--e2e-megapixels", "0.5", "--batch-sizes", "4",
                                   "--max-seconds", "0.2", "--threads", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads((out / "bench.json").read_text())
    modes = {(r["mode"], r["variant"]) for r in data["results"]}
    assert modes == {(m, v) for m in ("model-only", "end-to-end", "end-to-end pipelined")
                     for v in ("torch-fp32", "torch-bf16", "onnxruntime-fp32")}
    assert (data["settings"]["decode"], data["settings"]["workers"], data["settings"]["e2e_megapixels"]) == \
        ("fast", 2, 0.5)
    assert data["results"] and all(r["throughput_ips"] > 0 and r["speedup_vs_original"] for r in data["results"])
    res = CliRunner().invoke(app, ["bench", "test-vit-tiny", "--mode", "pipeline", "--decode", "quick"])
    assert res.exit_code == 2 and "'quick'" in res.output


def test_sample_files_upscaled_to_camera_size(tmp_path):
    files = write_sample_files(tmp_path, megapixels=2.0)
    from PIL import Image

    sizes = [Image.open(f).size for f in files]
    photos = [(w, h) for w, h in sizes if min(w, h) > 50]
    assert len(files) == 26 and photos and all(abs(w * h / 2e6 - 1) < 0.05 for w, h in photos)
    assert np.mean([w * h for w, h in sizes]) > 1.5e6
