"""Older manifest formats, migrated in memory to format 2 before validation.

Format 1 (imgembed 0.1) differs from format 2 in three places:

* TensorRT plans lived in a side store, ``tensorrt.engines`` (records with ``file``, ``key``, ``gpu``,
  ``tensorrt``, ``profile``, ``parity``); format 2 lists each as an :class:`~.schema.Engine` with
  ``backend: "tensorrt"``, ``device: "cuda"``, ``files: {"plan": ...}`` and a ``target`` record.
* ``selection.forced_engine`` is ``selection.forced_backend``.
* A manifest without ``engines`` (the first releases) holds one ONNX Runtime engine, ``model.onnx``.

Keys that format 1 writers added and format 2 does not know are dropped here (format 2 itself forbids them).
Nothing is written back: an artifact keeps its bytes, so its checksums and signature stay valid.
"""
from __future__ import annotations

import copy
from pathlib import PurePosixPath
from typing import Any

from imgembed.artifact.schema import FORMAT_VERSION, Engine, Manifest, Selection, TextTower


def migrate(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` (a parsed manifest.json of any known format) as a format-2 mapping (a copy; ``raw`` is kept)."""
    version = raw.get("format_version", 0)
    if version == FORMAT_VERSION:
        return raw
    m = copy.deepcopy(raw)
    m["format_version"] = FORMAT_VERSION
    engines = m.get("engines")
    if not engines:
        engines = [{"id": "onnxruntime", "backend": "onnxruntime", "precision": m.get("precision", "fp32"),
                    "files": {"model": "model.onnx"}, "batch_invariant": bool(m.get("batch_invariant"))}]
        m.setdefault("default_engine", "onnxruntime")
    trt = m.pop("tensorrt", None)
    if isinstance(trt, dict) and isinstance(trt.get("engines"), list):
        engines = [*engines, *(_trt_engine(r) for r in trt["engines"])]
    m["engines"] = [_known(e, Engine) for e in engines]
    if isinstance(m.get("selection"), dict):
        m["selection"] = _selection(m["selection"])
    if isinstance(m.get("text"), dict):
        text = m["text"]
        if isinstance(text.get("selection"), dict):
            text["selection"] = _selection(text["selection"])
        if isinstance(text.get("engines"), list):
            text["engines"] = [_known(e, Engine) for e in text["engines"]]
        m["text"] = _known(text, TextTower)
        m.setdefault("towers", ["image", "text"])
    return _known(m, Manifest)


def _selection(sel: dict) -> dict:
    sel = dict(sel)
    if "forced_engine" in sel:
        sel["forced_backend"] = sel.pop("forced_engine")
    return _known(sel, Selection)


def _trt_engine(record: Any) -> Any:
    """A format-1 ``tensorrt.engines`` record as a format-2 engine."""
    if not isinstance(record, dict):
        return record  # left for validation to refuse
    file = record.get("file")
    stem = PurePosixPath(file).stem if isinstance(file, str) else "plan"
    parity = record.get("parity")
    return {"id": f"tensorrt-{stem.removeprefix('engine-')}", "backend": "tensorrt",
            "precision": record.get("precision"), "device": "cuda", "files": {"plan": file},
            "parity": parity.get("metrics") if isinstance(parity, dict) else None,
            "target": {k: record.get(k) for k in ("key", "gpu", "tensorrt", "profile", "build", "created")}}


def _known(d: Any, model: type) -> Any:
    """``d`` without the keys ``model`` does not define (aliases count)."""
    if not isinstance(d, dict):
        return d
    names = set()
    for name, f in model.model_fields.items():
        names.add(f.alias or name)
    return {k: v for k, v in d.items() if k in names}
