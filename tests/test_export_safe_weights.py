"""Weights are loaded safely: safetensors first, pickle checkpoints only through
``torch.load(weights_only=True)`` (code inside never runs), and no pickle, ``torch.save``, unsafe ``torch.load``,
``allow_pickle`` or ``trust_remote_code`` anywhere in the package."""
from __future__ import annotations

import ast
import os
import pickle
import shutil
from pathlib import Path

import pytest

from imgembed.errors import WeightsError

from .helpers import REPO

MODEL = "test-vit-tiny"

# ------------------------------------------------------------------------------------------- no pickle
DANGEROUS_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _dangerous_calls(tree: ast.AST) -> list[str]:
    """pickle-like imports, torch.save, torch.load without weights_only=True, allow_pickle=True,
    trust_remote_code=True."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            found += [f"import {n}" for n in names if n and n.split(".")[0] in DANGEROUS_MODULES]
        if isinstance(node, ast.Call):
            func = ast.unparse(node.func)
            kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
            if func.endswith("torch.save") or (func.endswith("torch.load") and kw.get("weights_only") != "True"):
                found.append(f"{func}(...) at line {node.lineno}")
            found += [f"{k}={v} at line {node.lineno}" for k, v in kw.items()
                      if k in ("allow_pickle", "trust_remote_code") and v == "True"]
    return found


def test_package_never_pickles_or_trusts_remote_code():
    """No pickle / torch.save / unsafe torch.load / allow_pickle / trust_remote_code anywhere in imgembed."""
    offenders = {}
    for path in sorted((REPO / "imgembed").rglob("*.py")):
        bad = _dangerous_calls(ast.parse(path.read_text(encoding="utf-8")))
        if bad:
            offenders[str(path.relative_to(REPO))] = bad
    assert offenders == {}
    assert _dangerous_calls(ast.parse("import pickle\ntorch.load(f)\nnp.load(f, allow_pickle=True)")) == [
        "import pickle", "torch.load(...) at line 2", "allow_pickle=True at line 3"]  # the scanner works


# ------------------------------------------------------------------------------------------ safe loading
class _Payload:
    """Pickles to a call of os.system: what a malicious pytorch_model.bin carries."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def tiny_model():
    """(spec, seeded random-init transformers model) of the tiny ViT."""
    from imgembed.models.families import _build
    from imgembed.models.registry import get_spec

    spec = get_spec(MODEL)
    return spec, _build(spec, None, True, 3, "eager")


def _same_weights(a, b) -> bool:
    """Identical state dicts (same keys, bitwise-equal tensors)."""
    import torch

    sa, sb = a.state_dict(), b.state_dict()
    return bool(sa) and sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_safetensors_weights_load(tiny_model, tmp_path):
    from imgembed.models.families import load_original

    spec, model = tiny_model
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    assert _same_weights(load_original(spec, weights=tmp_path).model, model)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_checkpoint_loads_only_through_weights_only(tiny_model, tmp_path):
    """A plain state-dict .bin loads (torch.load weights_only=True); one carrying code is refused with a
    typed error and the code never runs."""
    from imgembed.models.families import load_original

    spec, model = tiny_model
    model.save_pretrained(tmp_path / "plain", safe_serialization=False)
    assert _same_weights(load_original(spec, weights=tmp_path / "plain").model, model)
    evil, marker = tmp_path / "evil", tmp_path / "PWNED"
    evil.mkdir()
    shutil.copy(tmp_path / "plain" / "config.json", evil)
    (evil / "pytorch_model.bin").write_bytes(pickle.dumps({"w": _Payload(marker)}))
    with pytest.raises(WeightsError, match=r"evil: cannot load weights .*weights_only=True"):
        load_original(spec, weights=evil)
    assert not marker.exists()


def test_safetensors_wins_over_a_malicious_bin_beside_it(tiny_model, tmp_path):
    from imgembed.models.families import load_original

    spec, model = tiny_model
    model.save_pretrained(tmp_path)
    marker = tmp_path / "PWNED"
    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps({"w": _Payload(marker)}))
    assert _same_weights(load_original(spec, weights=tmp_path).model, model)
    assert not marker.exists()
