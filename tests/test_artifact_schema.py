"""The artifact format as a contract: the published JSON Schema is generated from the types and validates real
manifests, format-1 artifacts written by the previous release's own code load (migrated in memory) and give
the same vectors, a newer format names the release to install, and no module outside imgembed/artifact/
reads manifest keys."""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys

import jsonschema
import numpy as np
import pytest

import imgembed
from imgembed import artifact as A
from imgembed.errors import ArtifactError

from .helpers import REPO, cli_env, exported, minimal_manifest

SCHEMA_FILE = REPO / "docs" / "artifact-format-2.schema.json"
# The last release that wrote format 1 (the commit landed before format 2): its own code makes the fixture.
FORMAT_1_RELEASE = "b93837fcd642a1bb46aa049075ca1d3fc21bd209"


def test_published_schema_is_generated_from_the_types():
    published = json.loads(SCHEMA_FILE.read_text())
    assert published == json.loads(json.dumps(A.json_schema())), (
        "docs/artifact-format-2.schema.json is stale: regenerate it with "
        "python -c \"import json; from imgembed.artifact import json_schema; "
        "print(json.dumps(json_schema(), indent=2, sort_keys=True))\" > docs/artifact-format-2.schema.json")


def test_a_real_manifest_validates_against_the_published_schema_and_round_trips():
    path = exported("test-clip-tiny", "int8")
    raw = json.loads((path / A.MANIFEST).read_text())
    jsonschema.Draft202012Validator(json.loads(SCHEMA_FILE.read_text())).validate(raw)
    assert raw["format_version"] == 2
    typed = A.read_manifest(path)
    assert json.loads(typed.to_json()) == raw          # what export wrote is exactly what the types write
    assert typed.engine(typed.default_engine).files["model"] in typed.files


@pytest.mark.parametrize("change, where", [
    ({"engines": []}, "engines"),
    ({"output": {"dim": 0, "normalized": True}}, "output.dim"),
    ({"precision": "int4"}, "precision"),
    ({"source": {"kind": "pickle", "path": "x"}}, "source"),
    ({"towers": ["image", "text"]}, "'towers'"),
])
def test_the_published_schema_and_the_types_refuse_the_same_manifests(change, where):
    """A reader in another language that validates with the published schema refuses what imgembed refuses
    (the cross-field rules — default engine held, towers vs text — are the types' own, documented)."""
    bad = minimal_manifest(**change)
    with pytest.raises(ArtifactError, match=re.escape(where)):
        A.parse_manifest(bad)
    if where != "'towers'":  # a cross-field rule: docs/artifact-format.md states it, the schema cannot
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.Draft202012Validator(json.loads(SCHEMA_FILE.read_text())).validate(bad)


def test_no_module_outside_the_artifact_package_reads_manifest_keys():
    pattern = re.compile(r"""\bmanifest\s*(\[\s*["']|\.get\(\s*["'])""")
    hits = [f"{p.relative_to(REPO)}:{i}" for p in sorted((REPO / "imgembed").rglob("*.py"))
            if "artifact" not in p.relative_to(REPO / "imgembed").parts[:1]
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []


# ------------------------------------------------------------------------------------------- format 1
OLD_EXPORT = """
import sys, numpy as np
import imgembed, imgembed.artifact as A
from imgembed.bench.suite import write_sample_files
assert A.FORMAT_VERSION == 1 and imgembed.__file__.startswith(sys.argv[1]), imgembed.__file__
from imgembed.export.pipeline import ExportOptions, export_model
export_model("test-clip-tiny", sys.argv[2], ExportOptions(random_init=True, text=True, tokenizer=sys.argv[3],
                                                          precision="int8", speed_check=False))
paths = write_sample_files(sys.argv[4])
emb = imgembed.load(sys.argv[2])
np.save(sys.argv[5], emb.embed([str(p) for p in paths]))
np.save(sys.argv[6], emb.embed_text(["a photo of a cat", "a rocket"]))
print(emb.engine["id"])
print("\t".join(str(p) for p in paths))
"""


@pytest.fixture(scope="module")
def format_1(tmp_path_factory):
    """An artifact exported by the previous release's code (``git archive`` of FORMAT_1_RELEASE), with the
    vectors that release computed from it."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed: the format-1 fixture is made by the previous release's code")
    base = tmp_path_factory.mktemp("format1")
    archive = subprocess.run(["git", "-C", str(REPO), "archive", FORMAT_1_RELEASE, "imgembed", "models.yaml"],
                             capture_output=True)
    if archive.returncode != 0:
        pytest.skip(f"commit {FORMAT_1_RELEASE[:12]} is not in this clone's history (shallow clone?): "
                    f"{archive.stderr.decode()[:200]}")
    old = base / "release"
    old.mkdir()
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
    from imgembed.testing.text import write_clip_tokenizer

    tok = write_clip_tokenizer(base / "tok")
    tok = tok if tok.is_dir() else tok.parent
    env = cli_env(PYTHONPATH=str(old), OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", OLD_EXPORT, str(old), str(base / "art"), str(tok),
                          str(base / "samples"), str(base / "images.npy"), str(base / "texts.npy")],
                         capture_output=True, text=True, env=env, cwd=base, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    engine, paths = out.stdout.strip().splitlines()[-2:]
    return base, engine, paths.split("\t")


def test_a_format_1_artifact_of_the_previous_release_loads_with_the_same_vectors(format_1):
    base, old_engine, paths = format_1
    raw = json.loads((base / "art" / A.MANIFEST).read_text())
    assert raw["format_version"] == 1 and "text" in raw     # a real format-1 manifest, with a text tower
    m = A.read_manifest(base / "art")
    assert m.format_version == 2 and m.default_engine == old_engine and m.text is not None
    emb = imgembed.load(base / "art")
    assert emb.engine.id == old_engine and emb.towers == ["image", "text"]
    np.testing.assert_allclose(emb.embed(paths), np.load(base / "images.npy"), atol=1e-5)   # same images, same order
    np.testing.assert_allclose(emb.embed_text(["a photo of a cat", "a rocket"]), np.load(base / "texts.npy"),
                               atol=1e-5)
    assert json.loads((base / "art" / A.MANIFEST).read_text()) == raw   # migrated in memory, never rewritten


def test_a_format_1_tensorrt_plan_becomes_an_engine_of_the_one_list(format_1, tmp_path):
    """Format 1 kept TensorRT plans in a side store (``tensorrt.engines``); format 2 lists them with every
    other engine, with the GPU and TensorRT version they were built for."""
    base, _, _ = format_1
    art = tmp_path / "art"
    shutil.copytree(base / "art", art)
    raw = json.loads((art / A.MANIFEST).read_text())
    key = "nvidia-h200-sm90-trt10.13.0-fp32-b1-32-256"
    (art / f"engine-{key}.plan").write_bytes(b"plan bytes")
    raw["tensorrt"] = {"engines": [{"file": f"engine-{key}.plan", "key": key, "precision": "int8",
                                    "gpu": {"name": "NVIDIA H200", "compute_capability": "9.0"},
                                    "tensorrt": "10.13.0", "profile": {"min": 1, "opt": 32, "max": 256},
                                    "build": {"seconds": 12.0}, "parity": {"metrics": {"min_cosine": 0.9991}},
                                    "created": "2026-11-01T00:00:00Z"}]}
    raw["files"][f"engine-{key}.plan"] = hashlib.sha256(b"plan bytes").hexdigest()
    (art / A.MANIFEST).write_text(json.dumps(raw))
    m = A.verify(art)
    trt = m.engine(f"tensorrt-{key}")
    assert (trt.backend, trt.device, trt.precision) == ("tensorrt", "cuda", "int8")
    assert trt.files == {"plan": f"engine-{key}.plan"} and trt.parity == {"min_cosine": 0.9991}
    assert trt.target.gpu["name"] == "NVIDIA H200" and trt.target.profile["max"] == 256
    assert [e.backend for e in m.engines].count("tensorrt") == 1
    # the CPU load still picks the CPU engine and names the plan it passed over only when asked for it
    assert imgembed.load(art).engine.backend == "onnxruntime"


def test_a_newer_format_names_the_release_to_install(tmp_path):
    (tmp_path / A.MANIFEST).write_text(json.dumps(minimal_manifest(format_version=3, versions={"imgembed": "0.9.0"})))
    with pytest.raises(ArtifactError, match=r"artifact format 3 is newer than this imgembed reads \(formats up to 2\); "
                                            r"install the imgembed release that wrote it \(imgembed 0\.9\.0\)"):
        imgembed.load(tmp_path)


@pytest.mark.timeout(120)
def test_a_manifest_listing_many_engines_is_judged_in_linear_time(tmp_path):
    """A crafted manifest near the size cap (200,000 engine records, ~20 MB) is validated in seconds, and a
    duplicate id among them is named (a quadratic duplicate check took hours on such a file)."""
    engines = [{"id": f"e{i}", "backend": "onnxruntime", "precision": "fp32", "files": {"model": "model.onnx"}}
               for i in range(200_000)]
    (tmp_path / A.MANIFEST).write_text(json.dumps(minimal_manifest(engines=engines, default_engine="e0")))
    assert len(A.read_manifest(tmp_path).engines) == 200_000
    engines.append({**engines[123_456]})
    (tmp_path / A.MANIFEST).write_text(json.dumps(minimal_manifest(engines=engines, default_engine="e0")))
    with pytest.raises(ArtifactError, match=r"engines: duplicate engine ids \['e123456'\]"):
        A.read_manifest(tmp_path)
