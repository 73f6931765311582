"""Scale-out on Ray Serve: ``imgembed serve ART --ray --replicas N`` and :func:`ray_app` for users' own Ray configs.

Two deployments make one application:

- ``imgembed-ingress``: the same FastAPI app as the single-process server (routes, limits, Prometheus metrics,
  API keys, OpenAI's body), answering through Ray's HTTP proxy. It reads and decodes uploads, batches them per
  model (the server's :class:`~imgembed.serve.batcher.Batcher`) and sends each batch to
- ``imgembed-model``: the engines. ``replicas`` of them (autoscaled between ``replicas`` and ``max_replicas``
  on ongoing requests), each grouping the batches of every ingress replica with ``@serve.batch``.

A model replica that dies mid-request (crash, node loss, ``ray.kill``) fails only the batch it held; the ingress
resends that batch to another replica (``retries`` times), and answers the typed 503 ``unavailable`` (with
Retry-After) only when none could take it -- a request is never lost silently. Ray Serve's controller starts
a replacement replica.

    from ray import serve
    from imgembed.serve import ServeConfig, ray_app
    serve.run(ray_app(["artifacts/clip-vit-b32-int8"], ServeConfig(max_batch=32), replicas=2, max_replicas=4))
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from typing import Callable, Sequence

import numpy as np

from imgembed.serve.config import ServeConfig
from imgembed.serve.errors import UnavailableError
from imgembed.serve.models import ServedModel

log = logging.getLogger("imgembed.serve")
APP_NAME = "imgembed"


def _remote_call(handle, model_id: str, tower: str, retries: int) -> Callable[[np.ndarray], np.ndarray]:
    """A batcher inference function that runs on the model deployment, resent on a replica's death."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    def infer(x: np.ndarray) -> np.ndarray:
        payload = list(x) if tower == "text" else x
        for attempt in range(retries + 1):
            try:
                return handle.infer.remote(model_id, tower, payload).result()
            except (ActorDiedError, ActorUnavailableError, RayActorError) as e:
                log.warning("model replica lost during a batch of %s (%s); attempt %d of %d", model_id,
                            type(e).__name__, attempt + 1, retries + 1)
        raise UnavailableError(f"model {model_id!r}: no model replica could run the batch ({retries + 1} attempts: "
                               "replicas are restarting); retry shortly")

    return infer


class RemoteServedModel(ServedModel):
    """A served model whose batches run on the Ray model deployment (its embedder provides preprocessing,
    tokenizer and metadata to the ingress)."""

    handle = None
    retries = 2

    def infer_fn(self, batch_invariant: bool) -> Callable[[np.ndarray], np.ndarray]:
        return _remote_call(self.handle, self.id, "image", self.retries)

    def text_infer_fn(self, batch_invariant: bool) -> Callable[[np.ndarray], np.ndarray]:
        return _remote_call(self.handle, self.id, "text", self.retries)

    def warm_up(self, max_batch: int) -> None:
        """Local warm-up (preprocessing paths); the model replicas warm themselves up."""


def _group_infer(models: dict[str, ServedModel], batch_invariant: bool,
                 items: list[tuple[str, str, object]]) -> list[np.ndarray]:
    """Run the batches of a ``@serve.batch`` call: one engine call per (model, tower), answers in order."""
    out: list[np.ndarray | None] = [None] * len(items)
    groups: dict[tuple[str, str], list[int]] = {}
    for i, (model_id, tower, _) in enumerate(items):
        groups.setdefault((model_id, tower), []).append(i)
    for (model_id, tower), indices in groups.items():
        m = models[model_id]
        if tower == "text":
            texts = [t for i in indices for t in items[i][2]]
            vectors = m.text_infer_fn(batch_invariant)(np.array(texts, dtype=object))
            sizes = [len(items[i][2]) for i in indices]
        else:
            vectors = m.infer_fn(batch_invariant)(np.concatenate([items[i][2] for i in indices]))
            sizes = [len(items[i][2]) for i in indices]
        offset = 0
        for i, n in zip(indices, sizes, strict=True):
            out[i] = vectors[offset:offset + n]
            offset += n
    return out


def ray_app(artifacts: Sequence[str], config: ServeConfig | None = None, *, replicas: int = 1,
            max_replicas: int | None = None, ingress_replicas: int = 1, retries: int = 2,
            model_actor_options: dict | None = None, ingress_actor_options: dict | None = None):
    """The Ray Serve application (pass it to ``serve.run``): an ingress with the server's HTTP API and limits,
    and ``replicas`` .. ``max_replicas`` model replicas batching with ``@serve.batch``."""
    from ray import serve

    from imgembed.serve.server import require_serve_extra

    require_serve_extra()
    config = config or ServeConfig()
    artifacts = [str(a) for a in artifacts]
    max_replicas = max(replicas, max_replicas or replicas)
    autoscaling = {"min_replicas": replicas, "initial_replicas": replicas, "max_replicas": max_replicas,
                   "target_ongoing_requests": 2}

    @serve.deployment(name="imgembed-model", autoscaling_config=autoscaling, max_ongoing_requests=64,
                      ray_actor_options=model_actor_options or {"num_cpus": 1})
    class ModelReplica:
        def __init__(self) -> None:
            from imgembed.serve.models import load_models

            self.models = {m.id: m for m in load_models(artifacts, config)}
            for m in self.models.values():
                m.warm_up(config.max_batch)

        @serve.batch(max_batch_size=max(2, config.max_batch // 2), batch_wait_timeout_s=config.max_delay_s)
        async def infer(self, model_ids: list[str], towers: list[str], payloads: list) -> list[np.ndarray]:
            import asyncio

            items = list(zip(model_ids, towers, payloads, strict=True))
            return await asyncio.get_running_loop().run_in_executor(
                None, _group_infer, self.models, config.batch_invariant, items)

    @serve.deployment(name="imgembed-ingress", num_replicas=ingress_replicas, max_ongoing_requests=
                      config.max_connections, ray_actor_options=ingress_actor_options or {"num_cpus": 0})
    @serve.ingress()
    class Ingress:
        def __init__(self, model_handle) -> None:
            from imgembed.serve.models import load_models

            self.models = []
            for m in load_models(artifacts, config):
                remote = RemoteServedModel(m.id, m.aliases, m.path, m.embedder)
                remote.handle, remote.retries = model_handle, retries
                self.models.append(remote)

        def __serve_build_asgi_app__(self):
            from imgembed.serve.app import create_app

            return create_app(self.models, config)

    return Ingress.bind(ModelReplica.bind())


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def run_ray(artifacts: Sequence[str], config: ServeConfig, *, replicas: int = 1,
            max_replicas: int | None = None) -> None:
    """``imgembed serve --ray``: start (or join, with RAY_ADDRESS) a Ray cluster, run the application behind
    Ray's HTTP proxy on ``config.host:config.port``, and serve until SIGTERM/SIGINT."""
    import ray
    from ray import serve

    if config.ssl_certfile:
        raise UnavailableError("--ray does not terminate TLS: put a TLS proxy in front of Ray's HTTP proxy, or "
                               "serve without --ray")
    port = config.port or _free_port(config.host)
    ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": config.host, "port": port})
    serve.run(ray_app(artifacts, config, replicas=replicas, max_replicas=max_replicas), name=APP_NAME,
              route_prefix="/")
    shown = f"[{config.host}]" if ":" in config.host else config.host
    print(f"imgembed serve: listening on http://{shown}:{port} (Ray Serve, {replicas} model replicas)", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()
