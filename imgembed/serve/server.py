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

from imgembed.errors import BackendUnavailableError
from imgembed.serve.config import ServeConfig

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


_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
         b"Content-Length: 79\r\n\r\n"
         b'{"error":"unavailable","message":"too many open connections; retry shortly."}\r\n')


EVICT_GRACE_S = 1.0  # connections younger than this in their phase are evicted only when no older one is


def guarded_protocol(max_connections: int, header_timeout_s: float):
    """uvicorn's h11 protocol with a request-head timeout and a cap on open connections.

    A connection must send a complete request head within ``header_timeout_s`` of opening (or of its
    previous response): otherwise it is closed, so slow-header clients cannot hold connections. At
    ``max_connections`` open connections, a new one evicts the oldest connection still waiting for a request
    head or, if there is none, the one sending its request body the slowest (fewest body bytes per second
    since its head), preferring those in that phase for at least ``EVICT_GRACE_S``; when every connection
    has its whole request in, the new one gets 503 and is closed. A flood of idle, slow-header or slow-body
    sockets therefore never locks out a client that sends its request at once (``/healthz`` included).
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        _head_timer = None
        _opened = 0.0
        _head_done = 0.0   # when the current request's head was complete
        _body_bytes = 0    # bytes received since then

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._opened = self.loop.time()
            if len(self.connections) > max_connections and not self._evict_one():
                transport.write(_BUSY)
                transport.close()
                return
            self._arm()

        def _waiting(self) -> bool:
            return self.conn.their_state is h11.IDLE and self.conn.our_state is h11.IDLE

        def _evict_one(self) -> bool:
            """Close one connection to make room; those past EVICT_GRACE_S in their phase go first, so a
            client that has just connected, or just started its body, is not closed by a flood of new sockets."""
            now = self.loop.time()
            others = [c for c in self.connections if c is not self and not c.transport.is_closing()]
            idle = [c for c in others if c._waiting()]
            sending = [c for c in others if c.conn.their_state is h11.SEND_BODY]
            for aged in (True, False):
                waiting = [c for c in idle if (now - c._opened >= EVICT_GRACE_S) == aged]
                if waiting:
                    min(waiting, key=lambda c: c._opened).transport.close()
                    return True
                body = [c for c in sending if (now - c._head_done >= EVICT_GRACE_S) == aged]
                if body:
                    min(body, key=lambda c: c._body_bytes / max(now - c._head_done, 1e-3)).transport.close()
                    return True
            return False

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(header_timeout_s, self._head_timeout)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            if self._waiting() and not self.transport.is_closing():
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            waiting = self._waiting()
            super().data_received(data)
            if waiting and not self._waiting():  # the request head is complete
                self._disarm()
                self._head_done, self._body_bytes = self.loop.time(), len(data)  # with any body bytes it held
            elif not waiting:
                self._body_bytes += len(data)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._opened = self.loop.time()
                self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return GuardedH11Protocol


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

    from imgembed.serve.app import create_app
    from imgembed.serve.models import load_models

    models = load_models(artifacts, config)
    app = create_app(models, config)
    sock = bind_socket(config.host, config.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    scheme = "https" if config.ssl_certfile else "http"
    print(f"imgembed serve: listening on {scheme}://{shown}:{port} "
          f"(models: {', '.join(m.id for m in models)})", flush=True)
    uv_config = uvicorn.Config(app, log_level=log_level, access_log=access_log, lifespan="on",
                               http=guarded_protocol(config.max_connections, config.header_timeout_s),
                               timeout_keep_alive=config.keep_alive_s, h11_max_incomplete_event_size=16 * 1024,
                               ssl_certfile=config.ssl_certfile, ssl_keyfile=config.ssl_keyfile,
                               timeout_graceful_shutdown=max(1, int(config.drain_timeout_s)))
    server = _draining_server_class()(uv_config, app.state.imgembed, config.drain_timeout_s)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if not server.started:  # lifespan startup failed; uvicorn logged why
        sys.exit(3)
