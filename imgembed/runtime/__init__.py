"""The unified runtime: one Runner interface over every backend, and the Embedder on top of it."""
from imgembed.runtime.base import InputSpec, Runner

__all__ = ["InputSpec", "Runner", "load"]


def load(name_or_path, **kwargs):
    from imgembed.runtime.embedder import load as _load

    return _load(name_or_path, **kwargs)
