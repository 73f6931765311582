"""Your own encoder as an original: any ``torch.nn.Module`` that maps ``(N, 3, H, W)`` float pixels to ``(N, D)``.

A module comes from a *factory* ``"pkg.module:factory"`` (a callable taking no arguments and returning the
module; imported as ``python -m`` would, the current directory first), from such a callable, or as an
instance. A weights file is loaded by imgembed, never by the factory: safetensors, or
``torch.load(weights_only=True)`` (tensors and plain containers only, no code runs), then
``load_state_dict`` with every key matching. The factory runs under a fixed torch seed, so a factory
without weights builds the same module again.

The artifact holds no pickle and no user code. The manifest's ``source`` (:func:`source_record`) records the
factory path, the module's class, the seed, the weights file's path and sha256, and a digest of the module's
state. :func:`original_from_record` (``imgembed parity ARTIFACT``, ``imgembed bench``) rebuilds the same
original from a factory the *caller* names (``--module pkg.mod:fn``, ``module=``), or from the recorded one
only on the explicit opt-in ``--trust-manifest-factory`` (``trust_manifest_factory=True``), which prints the
module before importing it. A manifest alone never makes imgembed import anything: without either, the
re-check is an :class:`~imgembed.errors.ArtifactError` saying what to pass. A caller's factory that differs
from the recorded path is used with a :class:`FactoryMismatchWarning`; the state digest and the parity gate
then judge the module it builds.

Importing a factory runs its code: factories are trusted like the Python environment (see SECURITY.md).
torch is imported inside the functions, so the core imports without it.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import re
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

from imgembed.errors import ArtifactError, ExportError, WeightsError

if TYPE_CHECKING:
    from imgembed.models.heads import ModuleHead
    from imgembed.models.registry import ModelSpec

SOURCE_KIND = "module"
FACTORY_FORM = "'pkg.module:factory' (a callable taking no arguments that returns a torch.nn.Module)"
_FACTORY_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_SHOWN_KEYS = 5
TRUST_FLAG = "--trust-manifest-factory"


class FactoryMismatchWarning(UserWarning):
    """The factory named for a re-check is not the one the artifact records."""


# ------------------------------------------------------------------------------------------ factories
@contextlib.contextmanager
def _cwd_importable() -> Iterator[None]:
    """The current directory on ``sys.path`` while a factory is imported and called, as with ``python -m``."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(cwd)


def import_factory(path: str) -> Callable[[], Any]:
    """The callable named by ``path`` (``"pkg.module:factory"``); every failure is an ExportError naming it."""
    if not isinstance(path, str) or not _FACTORY_RE.match(path):
        raise ExportError(f"module factory {path!r} is not of the form {FACTORY_FORM}")
    module_name, attr = path.split(":")
    with _cwd_importable():
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            raise ExportError(f"module factory {path!r}: cannot import {module_name!r} ({e}); expected a module "
                              "importable from the current directory or PYTHONPATH") from None
        except Exception as e:  # the user's module failed while importing: one line, no traceback
            raise ExportError(f"module factory {path!r}: importing {module_name!r} raised "
                              f"{type(e).__name__}: {e}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ExportError(f"module factory {path!r}: {module_name!r} has no attribute {attr!r}; expected "
                              f"{FACTORY_FORM}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ExportError(f"module factory {path!r} is a {type(obj).__name__}, not callable; expected {FACTORY_FORM}")
    return obj


def factory_path(fn: Callable) -> str | None:
    """``"pkg.module:factory"`` of a callable when importing that path gives the same callable back, else None
    (functions defined in ``__main__`` or inside other functions cannot be imported again)."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if not module or not qualname or module == "__main__" or "<" in qualname:
        return None
    path = f"{module}:{qualname}"
    try:
        return path if import_factory(path) is fn else None
    except ExportError:
        return None


def call_factory(factory: Callable[[], Any], label: str, seed: int):
    """``factory()`` under torch seed ``seed`` (the caller's random state is left as it was); the result
    must be a torch.nn.Module."""
    import torch

    with torch.random.fork_rng(devices=[]), _cwd_importable():
        torch.manual_seed(seed)
        try:
            module = factory()
        except Exception as e:  # user code: one typed line, no traceback
            raise ExportError(f"module factory {label!r} raised {type(e).__name__}: {e}") from None
    if not isinstance(module, torch.nn.Module):
        raise ExportError(f"module factory {label!r} returned {type(module).__name__}; expected a torch.nn.Module")
    return module


# ------------------------------------------------------------------------------------------ weights
def read_state_dict(path: str | Path) -> dict:
    """The tensors of a weights file: ``*.safetensors`` through safetensors, anything else through
    ``torch.load(weights_only=True)`` (a state dict, or a mapping holding one under ``state_dict``)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:
            raise WeightsError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for code-carrying pickles, zip/EOF errors for broken files
        raise WeightsError(f"{path}: refused by torch.load(weights_only=True) ({_load_failure(e)}); expected a "
                           "state dict of tensors (torch.save(module.state_dict())) or a .safetensors file") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj or \
            not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise WeightsError(f"{path}: holds {type(obj).__name__}{_preview(obj)}, not a state dict; expected a "
                           "mapping of parameter names to tensors")
    return dict(obj)


def _load_failure(e: Exception) -> str:
    """The reason of a torch.load failure in one line (the global a pickle tried to import, when it did)."""
    m = re.search(r"GLOBAL ([\w.]+)", str(e))
    if m:
        return f"it would import {m.group(1)}"
    if type(e).__name__ == "UnpicklingError":  # torch's text advises weights_only=False: not repeated here
        return "it holds objects other than tensors and plain containers"
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _preview(obj: Any) -> str:
    return f" with keys {sorted(map(str, obj))[:_SHOWN_KEYS]}" if isinstance(obj, Mapping) else ""


def load_weights(module, path: str | Path) -> None:
    """Load a weights file into ``module`` (in place); every key must match, names and shapes."""
    state = read_state_dict(path)
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        reason = str(e).splitlines()[-1].strip()
        raise WeightsError(f"{path}: does not fit {type(module).__name__} ({reason})") from None
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected:
        raise WeightsError(f"{path}: does not fit {type(module).__name__}: {len(missing)} missing key(s) "
                           f"{missing[:_SHOWN_KEYS]}, {len(unexpected)} unexpected key(s) "
                           f"{unexpected[:_SHOWN_KEYS]}")


def state_digest(module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of ``module``'s state dict."""
    import torch

    h = hashlib.sha256()
    for key, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ the original
def looks_like_transformer(module) -> bool:
    """True when ``module`` holds attention (nn.MultiheadAttention or a class named ``*Attention*``)."""
    import torch

    return any(isinstance(m, torch.nn.MultiheadAttention) or "attention" in type(m).__name__.lower()
               for m in module.modules())


def check_output(module, input_hw: tuple[int, int], label: str) -> int:
    """Run a (2, 3, H, W) batch through ``module`` (in eval mode); returns D, or raises an ExportError naming
    what came out when it is not a 2-D float tensor of 2 rows."""
    import torch

    h, w = input_hw
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            y = module(x)
    except Exception as e:  # user code
        raise ExportError(f"{label}: the module raised {type(e).__name__} on a (2, 3, {h}, {w}) float32 batch: "
                          f"{e}; expected it to map (N, 3, H, W) pixels to (N, D) vectors") from None
    if not isinstance(y, torch.Tensor):
        raise ExportError(f"{label}: the module returned {type(y).__name__} for a (2, 3, {h}, {w}) batch; expected "
                          "a 2-D float tensor (N, D)")
    if y.ndim != 2 or y.shape[0] != 2 or y.shape[1] < 1 or not y.is_floating_point():
        dtype = str(y.dtype).removeprefix("torch.")
        raise ExportError(f"{label}: the module maps a (2, 3, {h}, {w}) batch to a {dtype} tensor of shape "
                          f"{tuple(y.shape)}; expected a 2-D float tensor (2, D) (pool and flatten inside the module)")
    return int(y.shape[1])


def source_record(factory: str | None, module, weights: str | Path | None, seed: int) -> dict[str, Any]:
    """The manifest ``source`` of a module original (see the module docstring)."""
    cls = type(module)
    return {"kind": SOURCE_KIND, "factory": factory, "class": f"{cls.__module__}.{cls.__qualname__}", "seed": seed,
            "weights": None if weights is None else {"path": str(Path(weights).resolve()),
                                                     "sha256": sha256_file(Path(weights))},
            "state_sha256": state_digest(module)}


def original_from_record(spec: "ModelSpec", source: Mapping[str, Any],
                         weights_override: str | Path | None = None, module: str | Callable | None = None,
                         trust_manifest_factory: bool = False) -> "ModuleHead":
    """Rebuild the original of a module artifact: the caller's factory ``module`` (a path or a callable), or the
    recorded one when ``trust_manifest_factory``; call it under the recorded seed, load the recorded weights file
    (or ``weights_override``, which must have the same sha256), check the state digest."""
    from imgembed.models.heads import ModuleHead

    what = f"module artifact {spec.name!r}"
    factory, label = _chosen_factory(what, source, module, trust_manifest_factory)
    path = _recorded_weights(what, source.get("weights"), weights_override)
    try:
        built = call_factory(factory, label, _recorded_seed(what, source))
        if path is not None:
            load_weights(built, path)
    except (ExportError, WeightsError) as e:
        raise ArtifactError(f"{what}: re-checking it needs the factory {label!r} importable here and building "
                            f"the exported module ({e})") from None
    built.eval()
    if state_digest(built) != source.get("state_sha256"):
        raise ArtifactError(f"{what}: factory {label!r} builds a module whose state differs from the exported "
                            "one (state sha256 mismatch); pass the factory it was exported from, or re-export")
    return ModuleHead(built, spec.embedding.normalize).eval()


def _chosen_factory(what: str, source: Mapping[str, Any], module: str | Callable | None,
                    trust_manifest_factory: bool) -> tuple[Callable[[], Any], str]:
    """The factory callable of a re-check and its label; imports only what the caller named or opted into."""
    recorded = require_factory_choice(what, source, module, trust_manifest_factory)
    if module is not None:
        label = module if isinstance(module, str) else (factory_path(module) or getattr(module, "__qualname__", "?"))
        if recorded and label != recorded:
            warnings.warn(f"{what} records the factory {recorded!r}; rebuilding it with {label!r} as given",
                          FactoryMismatchWarning, stacklevel=3)
        try:
            return (import_factory(module) if isinstance(module, str) else module), label
        except ExportError as e:
            raise ArtifactError(f"{what}: {e}") from None
    print(f"imgembed: {TRUST_FLAG}: importing module {recorded.split(':')[0]!r} (factory {recorded!r}) named by "
          f"the manifest of {what}", file=sys.stderr, flush=True)
    try:
        return import_factory(recorded), recorded
    except ExportError as e:
        raise ArtifactError(f"{what}: re-checking it needs its factory {recorded!r} importable here ({e})") from None


def require_factory_choice(what: str, source: Mapping[str, Any], module: str | Callable | None,
                           trust_manifest_factory: bool) -> str:
    """The recorded factory path, once the caller has named a factory or opted into the recorded one; an
    ArtifactError saying what to pass otherwise. Imports nothing."""
    recorded = source.get("factory")
    if module is not None:
        return recorded
    if not isinstance(recorded, str) or not recorded:
        raise ArtifactError(f"{what} was exported from a module instance ({source.get('class')!r}), not a factory; "
                            f"name the factory that builds it: --module {FACTORY_FORM} (Python: module=...)")
    if not trust_manifest_factory:
        raise ArtifactError(f"{what}: its manifest names the factory {recorded!r}, and imgembed does not import "
                            f"code named by an artifact; pass --module {recorded!r} (Python: module=...) if you "
                            f"trust that code, or {TRUST_FLAG} to import the recorded factory")
    if not _FACTORY_RE.match(recorded):
        raise ArtifactError(f"{what}: its manifest names the factory {recorded!r}, not of the form {FACTORY_FORM}")
    return recorded


def _recorded_seed(what: str, source: Mapping[str, Any]) -> int:
    seed = source.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ArtifactError(f"{what}: its manifest records the seed {seed!r}; expected an integer")
    return seed


def _recorded_weights(what: str, recorded: Mapping | None, override: str | Path | None) -> Path | None:
    """The weights file to rebuild with, checked against the recorded sha256."""
    if recorded is None:
        if override is not None:
            raise ArtifactError(f"{what} was exported without a weights file; drop --weights")
        return None
    path = Path(override or recorded["path"])
    if not path.is_file():
        raise ArtifactError(f"{what}: its weights file {path} is missing; pass the file with --weights FILE "
                            f"(sha256 {recorded['sha256']})")
    digest = sha256_file(path)
    if digest != recorded["sha256"]:
        raise ArtifactError(f"{what}: weights file {path} has sha256 {digest}, the artifact was exported from "
                            f"{recorded['sha256']}; pass the original file with --weights FILE")
    return path


def sha256_file(path: Path) -> str:
    """sha256 hex digest of a weights file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()
