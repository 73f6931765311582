"""``imgembed serve``: an HTTP embedding server with dynamic batching and bounded queues.

    from imgembed.serve import ServeConfig, create_app, load_models
    app = create_app(load_models(["artifacts/clip-vit-b32-int8"], ServeConfig()), ServeConfig())

Needs the ``serve`` extra (fastapi, uvicorn, python-multipart, prometheus-client); importing this package
does not import them -- :func:`create_app` does.
"""
from __future__ import annotations

from imgembed.serve.config import ServeConfig, ServeConfigError


def create_app(models, config=None):
    """The FastAPI app over loaded models; see :func:`imgembed.serve.app.create_app`."""
    from imgembed.serve.server import require_serve_extra

    require_serve_extra()
    from imgembed.serve.app import create_app as _create

    return _create(models, config)


def load_models(artifacts, config):
    """Verify and load artifact directories (``PATH`` or ``ID=PATH``) into served models."""
    from imgembed.serve.models import load_models as _load

    return _load(artifacts, config)


__all__ = ["ServeConfig", "ServeConfigError", "create_app", "load_models"]
