"""What an export costs: the quantizations of one export share their calibration, and the export records and
prints its own time per stage (the race's order is tested in tests/test_race_order.py)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from imgembed.artifact import read_manifest
from imgembed.export import quantize as Q

from .helpers import run_cli


def _two_matmuls(path):
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(size=(16, 32)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(size=(32, 8)).astype(np.float32), "w2")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])], [w1, w2])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _run(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def test_presets_of_one_export_calibrate_once_and_quantize_as_without_the_cache(tmp_path, monkeypatch):
    src = _two_matmuls(tmp_path / "plain.onnx")
    rng = np.random.default_rng(1)
    batches = [rng.normal(size=(8, 16)).astype(np.float32) for _ in range(4)]
    reads = []
    real_next = Q.ArrayCalibrationReader.get_next
    monkeypatch.setattr(Q.ArrayCalibrationReader, "get_next", lambda self: reads.append(1) or real_next(self))
    cache = tmp_path / "cache"
    eight = Q.quantize(src, tmp_path / "a.onnx", Q.PRESETS["static-qdq-matmul"], batches, input_name="x", cache=cache)
    first = len(reads)
    seven = Q.quantize(src, tmp_path / "b.onnx", Q.PRESETS["static-qdq-matmul-7bit"], batches, input_name="x",
                       cache=cache)
    assert first > len(batches) - 1 and len(reads) == first      # the 7-bit twin read no calibration batch
    assert len(list(cache.glob("*.ranges.json"))) == 1 and len(list(cache.glob("*.prep.onnx"))) == 1
    x = rng.normal(size=(5, 16)).astype(np.float32)
    uncached = Q.quantize(src, tmp_path / "c.onnx", Q.PRESETS["static-qdq-matmul-7bit"], batches, input_name="x")
    np.testing.assert_array_equal(_run(seven, x), _run(uncached, x))   # same ranges, same graph
    assert not np.array_equal(_run(eight, x), _run(seven, x))          # the twins still differ (7- vs 8-bit)
    # other calibration images are another key: calibrated again
    Q.quantize(src, tmp_path / "d.onnx", Q.PRESETS["static-qdq-matmul"], [b * 2 for b in batches], input_name="x",
               cache=cache)
    assert len(reads) > first and len(list(cache.glob("*.ranges.json"))) == 2


def test_the_export_records_and_prints_its_time_per_stage(tmp_path):
    out = tmp_path / "a"
    res = run_cli("export", "test-resnet-tiny", "--int8", "--random-init", "--threads", "2", "-o", str(out))
    assert res.returncode == 0, res.stderr
    m = read_manifest(out)
    names = [s.name for s in m.export.stages]
    assert names[0].startswith("preprocessing") and any(n.startswith("loading test-resnet-tiny") for n in names)
    assert f"checking parity of {m.default_engine}" in names and "exporting to ONNX" in names
    assert any(n.startswith("timing") and "briefly" in n for n in names)
    assert all(s.seconds >= 0 for s in m.export.stages)
    total = sum(s.seconds for s in m.export.stages)
    assert 0.8 * m.export.seconds <= total <= m.export.seconds + 0.5   # the stages cover the export's time
    assert "export time per stage" in res.stdout and f"checking parity of {m.default_engine}" in res.stdout


def test_a_stage_run_inside_another_hands_the_time_back_to_it(monkeypatch):
    from imgembed.export import stages

    now = iter([0.0, 1.0, 1.5, 4.0, 5.0, 5.0])
    monkeypatch.setattr(stages.time, "perf_counter", lambda: next(now))
    shown = []
    clock = stages.StageClock(shown.append)
    clock("building a")            # t=0
    clock("calibrating")           # t=1: building a took 1 s so far
    clock.back()                   # t=1.5: calibration took 0.5 s; building a goes on, not announced again
    clock("gating a")              # t=4: building a took 2.5 s more
    assert shown == ["building a", "calibrating", "gating a"]
    assert clock.record() == [{"name": "building a", "seconds": 1.0}, {"name": "calibrating", "seconds": 0.5},
                              {"name": "building a", "seconds": 2.5}, {"name": "gating a", "seconds": 1.0}]
