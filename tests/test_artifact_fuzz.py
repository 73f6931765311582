"""Hypothesis fuzzing of the manifest: a valid tiny artifact's manifest.json, mutated (wrong types, missing keys,
huge numbers, path tricks in every path field, unicode, nested garbage), either loads and embeds or raises one
of imgembed's typed errors; never another exception type."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import imgembed
from imgembed import artifact as A
from imgembed.errors import ImgembedError

MODEL = "test-vit-tiny"
EXAMPLES = int(os.environ.get("IMGEMBED_FUZZ_EXAMPLES", "200"))
CROP = np.random.default_rng(0).integers(0, 256, (1, 24, 24, 3), dtype=np.uint8)

PATH_TRICKS = ["../evil.onnx", "/etc/passwd", "/dev/zero", "sub/../../x", "./model.onnx", "model.onnx/",
               "a//b", "", ".", "..", "model.onnx\x00", "C:\\model.onnx", "\u202emodel.onnx", "\ud800",
               "x" * 5000, "model.onnx"]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.sampled_from([0, -1, 1, 2**63, 10**30]),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), st.sampled_from(PATH_TRICKS))
GARBAGE = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                       max_leaves=8)


def _paths(node, prefix=()):
    """Every (key path) of a JSON tree, containers and leaves."""
    yield prefix
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        yield from _paths(child, (*prefix, key))


def _mutate(manifest: dict, data) -> dict:
    """One to three edits: replace a node by garbage or a path trick, delete it, or add a garbage key."""
    m = json.loads(json.dumps(manifest))
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        paths = [p for p in _paths(m) if p]
        path = data.draw(st.sampled_from(paths), label="path")
        parent = m
        for key in path[:-1]:
            parent = parent[key]
        action = data.draw(st.sampled_from(["replace", "trick", "delete", "add"]), label="action")
        if action == "delete":
            del parent[path[-1]]
        elif action == "add" and isinstance(parent, dict):
            parent[data.draw(st.text(max_size=8), label="key")] = data.draw(GARBAGE, label="value")
        else:
            parent[path[-1]] = data.draw(GARBAGE if action == "replace" else st.sampled_from(PATH_TRICKS),
                                         label="value")
    return m


@pytest.fixture(scope="module")
def fuzz_art(artifact_dir, tmp_path_factory) -> tuple[Path, dict]:
    dest = tmp_path_factory.mktemp("fuzz") / "art"
    shutil.copytree(artifact_dir(MODEL), dest)
    (dest.parent / "evil.onnx").write_bytes((dest / A.MODEL_FILE).read_bytes())
    return dest, json.loads((dest / A.MANIFEST).read_text())


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_manifest_loads_or_raises_a_typed_error(fuzz_art, data):
    art, clean = fuzz_art
    manifest = _mutate(clean, data)
    (art / A.MANIFEST).write_text(json.dumps(manifest))
    try:
        emb = imgembed.load(art, workers=0, threads=1)
        vectors = emb.embed(CROP)
        assert vectors.shape == (1, emb.dim) and np.isfinite(vectors).all()
    except ImgembedError as e:
        assert str(e) and "Traceback" not in str(e)


def test_the_mutator_reaches_the_clean_artifact(fuzz_art):
    """Positive control: the unmutated manifest loads and embeds (so the fuzz exercises real loads)."""
    art, clean = fuzz_art
    (art / A.MANIFEST).write_text(json.dumps(clean))
    assert imgembed.load(art, workers=0, threads=1).embed(CROP).shape[0] == 1
