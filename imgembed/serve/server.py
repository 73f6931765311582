"""Running the app under uvicorn, with a draining shutdown.

The first SIGTERM/SIGINT starts draining: ``/readyz`` and new embedding requests answer 503 (with
``Connection: close``) while the requests in flight finish, for at most ``drain_timeout_s``; then uvicorn
shuts down (lifespan: batchers finish their queues and stop) and the process exits 0. A second signal
exits at once.
"""
from __future__ import annotations

import importlib.util
import logging
import socket
import sys
import threading
from typing import Sequence

from ..errors import BackendUnavailableError
from .config import ServeConfig

log = logging.getLogger("imgembed.serve")
SERVE_EXTRA = {"fastapi": "fastapi", "uvicorn": "uvicorn", "multipart": "python-multipart",
               "prometheus_client": "prometheus-client"}


def require_serve_extra() -> None:
    """BackendUnavailableError naming the missing packages unless the ``serve`` extra is installed."""
    missing = [pkg for module, pkg in SERVE_EXTRA.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise BackendUnavailableError(f"`imgembed serve` needs {', '.join(missing)}, which "
                                      f"{'is' if len(missing) == 1 else 'are'} not installed: "
                                      "pip install 'imgembed[serve]'")


def bind_socket(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A listening TCP socket on (host, port); port 0 picks a free one (read it with getsockname())."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise BackendUnavailableError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


def _draining_server_class():
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn.Server whose first exit signal drains the app before shutting down."""

        def __init__(self, config: "uvicorn.Config", state, drain_timeout_s: float):
            super().__init__(config)
            self._state = state
            self._drain_timeout_s = drain_timeout_s
            self._draining = False

        def handle_exit(self, sig: int, frame) -> None:
            if self._draining:  # second signal: stop now
                self.should_exit = self.force_exit = True
                return
            self._draining = True
            log.info("imgembed serve: draining (%d in flight)", self._state.inflight)
            self._state.begin_drain()
            threading.Thread(target=self._exit_when_idle, name="imgembed-drain", daemon=True).start()

        def _exit_when_idle(self) -> None:
            if not self._state.wait_idle(self._drain_timeout_s):
                log.warning("imgembed serve: %d requests still in flight after %.1f s; shutting down",
                            self._state.inflight, self._drain_timeout_s)
            self.should_exit = True

    return DrainingServer


def run(artifacts: Sequence[str], config: ServeConfig, *, log_level: str = "info", access_log: bool = False) -> None:
    """Load ``artifacts``, bind ``config.host:config.port`` and serve until drained by a signal."""
    require_serve_extra()
    import uvicorn

    from .app import create_app
    from .models import load_models

    models = load_models(artifacts, config)
    app = create_app(models, config)
    sock = bind_socket(config.host, config.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"imgembed serve: listening on http://{shown}:{port} "
          f"(models: {', '.join(m.id for m in models)})", flush=True)
    uv_config = uvicorn.Config(app, log_level=log_level, access_log=access_log, lifespan="on",
                               limit_concurrency=config.max_connections,
                               timeout_graceful_shutdown=max(1, int(config.drain_timeout_s)))
    server = _draining_server_class()(uv_config, app.state.imgembed, config.drain_timeout_s)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if not server.started:  # lifespan startup failed; uvicorn logged why
        sys.exit(3)
