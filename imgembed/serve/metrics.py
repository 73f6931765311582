"""Prometheus metrics of one app, in its own CollectorRegistry (two apps in one process never collide).

Names (all prefixed ``imgembed_``):

- ``requests_total{model,code}``            embedding requests answered, by HTTP status
- ``errors_total{model,kind}``              failed requests by error kind (decode, queue_full, timeout, ...)
- ``images_total{model,outcome}``           images embedded (``ok``) or rejected per item (``error``)
- ``queue_depth{model}``                    images admitted and not yet answered (the bounded quantity)
- ``batch_size{model}``                     images per inference call (histogram)
- ``request_latency_seconds{model}``        request wall time, body parsed -> response ready (histogram)
- ``queue_wait_seconds{model}``             submission -> start of its batch (histogram)
- ``inference_seconds{model}``              one inference call (histogram)
- ``texts_total{model}``                    texts embedded (text towers)
- ``text_queue_depth{model}``               texts admitted and not yet answered
- ``text_batch_size{model}``                texts per text-tower inference call (histogram)
- ``text_queue_wait_seconds{model}``        text submission -> start of its batch (histogram)
- ``text_inference_seconds{model}``         one text-tower inference call (histogram)
- ``ready``                                 1 once every model is loaded and warmed up
"""
from __future__ import annotations

from typing import Callable

from imgembed.serve.batcher import BatchStats

NO_MODEL = "_none"  # label for requests that never resolved to a served model (keeps cardinality bounded)
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The app's collectors plus small helpers that the routes and batchers call."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("imgembed_requests", "Embedding requests answered, by HTTP status.",
                                ("model", "code"), registry=r)
        self.errors = Counter("imgembed_errors", "Failed requests by error kind.", ("model", "kind"), registry=r)
        self.images = Counter("imgembed_images", "Images embedded (ok) or rejected per item (error).",
                              ("model", "outcome"), registry=r)
        self.queue_depth = Gauge("imgembed_queue_depth", "Images admitted and not yet answered.", ("model",),
                                 registry=r)
        self.batch_size = Histogram("imgembed_batch_size", "Images per inference call.", ("model",),
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.latency = Histogram("imgembed_request_latency_seconds", "Embedding request wall time.", ("model",),
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("imgembed_queue_wait_seconds", "Submission to start of its batch.",
                                    ("model",), buckets=_LATENCY_BUCKETS, registry=r)
        self.inference = Histogram("imgembed_inference_seconds", "One inference call.", ("model",),
                                   buckets=_LATENCY_BUCKETS, registry=r)
        self.texts = Counter("imgembed_texts", "Texts embedded by text towers.", ("model",), registry=r)
        self.text_queue_depth = Gauge("imgembed_text_queue_depth", "Texts admitted and not yet answered.",
                                      ("model",), registry=r)
        self.text_batch_size = Histogram("imgembed_text_batch_size", "Texts per text-tower inference call.",
                                         ("model",), buckets=_BATCH_BUCKETS, registry=r)
        self.text_queue_wait = Histogram("imgembed_text_queue_wait_seconds", "Text submission to start of its "
                                         "batch.", ("model",), buckets=_LATENCY_BUCKETS, registry=r)
        self.text_inference = Histogram("imgembed_text_inference_seconds", "One text-tower inference call.",
                                        ("model",), buckets=_LATENCY_BUCKETS, registry=r)
        self.ready = Gauge("imgembed_ready", "1 once every model is loaded and warmed up.", registry=r)

    def track_queue(self, model: str, depth: Callable[[], float], tower: str = "image") -> None:
        """Report ``depth()`` as the queue depth of ``model``'s ``tower`` ("image" or "text") at every scrape."""
        (self.text_queue_depth if tower == "text" else self.queue_depth).labels(model).set_function(depth)

    def batch_observer(self, model: str, tower: str = "image") -> Callable[[BatchStats], None]:
        """A ``Batcher(on_batch=...)`` callback recording the batch statistics of one model's ``tower``."""
        if tower == "text":
            size, wait, infer = (self.text_batch_size.labels(model), self.text_queue_wait.labels(model),
                                 self.text_inference.labels(model))
        else:
            size, wait, infer = (self.batch_size.labels(model), self.queue_wait.labels(model),
                                 self.inference.labels(model))

        def observe(stats: BatchStats) -> None:
            size.observe(stats.size)
            infer.observe(stats.infer_s)
            for w in stats.queue_wait_s:
                wait.observe(w)

        return observe

    def record(self, model: str | None, code: int, seconds: float, kind: str | None = None) -> None:
        """Count one answered embedding request (and its error kind, if it failed)."""
        label = model or NO_MODEL
        self.requests.labels(label, str(code)).inc()
        if kind is not None:
            self.errors.labels(label, kind).inc()
        self.latency.labels(label).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """(body, content type) of the Prometheus text exposition."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
