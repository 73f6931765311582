"""``imgembed serve``: the HTTP embedding server as a sub-command (registered by imgembed.cli).

Only typer is imported here: fastapi/uvicorn are imported when the command runs, so the rest of the CLI
works without the ``serve`` extra, and ``serve`` itself fails with one line naming the install command.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def serve_cmd(
    artifacts: List[str] = typer.Argument(..., help="Artifact directories to serve, as PATH or ID=PATH. The id "
                                          "is the manifest name (NAME-PRECISION when two share a name)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (loopback by default)."),
    port: int = typer.Option(8080, "--port", "-p", min=0, max=65535, help="Port; 0 picks a free one "
                             "(printed on stdout)."),
    max_batch: int = typer.Option(16, "--max-batch", min=1, help="Images per inference call."),
    max_delay_ms: float = typer.Option(5.0, "--max-delay-ms", min=0, help="How long the oldest queued image "
                                       "waits for a fuller batch."),
    max_queue: int = typer.Option(256, "--max-queue", min=1, help="Images admitted per model before 429."),
    timeout: float = typer.Option(30.0, "--timeout", min=0.001, help="Per-request timeout in seconds (504)."),
    max_body_mb: float = typer.Option(32.0, "--max-body-mb", min=0.001, help="Request body limit in MiB (413)."),
    max_images: int = typer.Option(64, "--max-images", min=1, help="Images per request (413)."),
    max_pixels: int = typer.Option(40_000_000, "--max-pixels", min=1, help="Pixels per image (413 / per item)."),
    max_request_pixels: int = typer.Option(160_000_000, "--max-request-pixels", min=1, help="Declared pixels of "
                                           "all images of one request (413, from the headers)."),
    max_decode_pixels: int = typer.Option(48_000_000, "--max-decode-pixels", min=1, help="Declared pixels "
                                          "decoded at once by the whole server (more waits), weighted by format "
                                          "(WebP 8/3, alpha 4/3); bounds decode memory to ~6 bytes x this. An "
                                          "image needing more alone is refused."),
    draft_ratio: float = typer.Option(0.0, "--draft-ratio", min=0, help="Images whose short edge is at least this "
                                      "x the model's resize target decode at reduced scale, e.g. 4 (0: never; "
                                      "vectors then equal the offline runtime's)."),
    max_texts: int = typer.Option(256, "--max-texts", min=1, help="Texts per request, for models with a text "
                                  "tower (413)."),
    max_text_chars: int = typer.Option(2000, "--max-text-chars", min=1, help="Characters per text (413)."),
    max_text_queue: int = typer.Option(1024, "--max-text-queue", min=1, help="Texts admitted per model before "
                                       "429."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Inference threads per model."),
    backend: str = typer.Option("auto", "--backend", help="Engine of each artifact: auto (its best engine "
                                "usable here) or a backend name (see `imgembed backends`)."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda (fails at start without a usable GPU)."),
    decode_workers: int = typer.Option(2, "--decode-workers", min=1, help="Threads decoding uploads."),
    retry_after: int = typer.Option(1, "--retry-after", min=0, help="Retry-After seconds of 429/503 answers."),
    drain_timeout: float = typer.Option(30.0, "--drain-timeout", min=0, help="On SIGTERM: seconds in-flight "
                                        "requests may take before shutdown."),
    max_wait: Optional[float] = typer.Option(None, "--max-wait", min=0.001, help="429 when a model's pending "
                                             "images would take longer than this (s) to infer "
                                             "[default: 0.8 x --timeout]."),
    max_connections: int = typer.Option(1024, "--max-connections", min=1, help="Open connections; beyond, the "
                                        "oldest one still waiting for its request head is closed (else 503)."),
    header_timeout: float = typer.Option(10.0, "--header-timeout", min=0.001, help="Seconds a connection has to "
                                         "send a complete request head."),
    keep_alive: float = typer.Option(5.0, "--keep-alive", min=0.001, help="Idle keep-alive connections close "
                                     "after this many seconds."),
    api_key: List[str] = typer.Option([], "--api-key", help="Require this key (Authorization: Bearer KEY or "
                                      "X-API-Key); repeatable. Prefer --api-key-file or IMGEMBED_API_KEY: a "
                                      "command line is visible to other local users."),
    api_key_file: Optional[Path] = typer.Option(None, "--api-key-file", help="File of accepted keys, one per line."),
    auth_health: bool = typer.Option(False, "--auth-health", help="Also require a key for /healthz and /readyz."),
    ssl_certfile: Optional[Path] = typer.Option(None, "--ssl-certfile", help="TLS certificate (PEM): serve https."),
    ssl_keyfile: Optional[Path] = typer.Option(None, "--ssl-keyfile", help="TLS private key (PEM)."),
    ray: bool = typer.Option(False, "--ray", help="Serve on Ray Serve (local cluster, or RAY_ADDRESS) with "
                             "--replicas replicas behind Ray's HTTP proxy."),
    replicas: int = typer.Option(1, "--replicas", min=1, help="Ray Serve: replicas (the autoscaling minimum)."),
    max_replicas: Optional[int] = typer.Option(None, "--max-replicas", min=1, help="Ray Serve: autoscale up to "
                                               "this many replicas [default: --replicas, fixed]."),
    batch_invariant: bool = typer.Option(False, "--batch-invariant", help="For artifacts whose engine is not "
                                         "batch-invariant (dynamic INT8, opt-in at export): run each image "
                                         "alone, so a vector never depends on other requests. Costs throughput."),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level (debug, info, warning, error)."),
    access_log: bool = typer.Option(False, "--access-log", help="Log every request."),
) -> None:
    """Serve ARTIFACTS over HTTP: POST /v1/embeddings (images; texts for artifacts exported with --text),
    GET /v1/models, /healthz, /readyz, /metrics."""
    from imgembed.cli.common import errors
    from imgembed.serve.auth import read_keys
    from imgembed.serve.config import ServeConfig
    from imgembed.serve.server import run

    with errors():
        config = ServeConfig(host=host, port=port, max_batch=max_batch, max_delay_ms=max_delay_ms,
                             max_queue=max_queue, timeout_s=timeout, max_body_bytes=int(max_body_mb * 1024 * 1024),
                             max_images=max_images, max_pixels=max_pixels, threads=threads, backend=backend,
                             device=device,
                             decode_workers=decode_workers, retry_after_s=retry_after, drain_timeout_s=drain_timeout,
                             batch_invariant=batch_invariant, max_connections=max_connections,
                             max_wait_s=max_wait, max_texts=max_texts, max_text_chars=max_text_chars,
                             max_text_queue=max_text_queue, max_request_pixels=max_request_pixels,
                             max_decode_pixels=max_decode_pixels, draft_ratio=draft_ratio,
                             header_timeout_s=header_timeout, keep_alive_s=keep_alive,
                             api_keys=read_keys(api_key, api_key_file), auth_health=auth_health,
                             ssl_certfile=str(ssl_certfile) if ssl_certfile else None,
                             ssl_keyfile=str(ssl_keyfile) if ssl_keyfile else None)
        if ray:
            from imgembed.serve.ray import run_ray

            run_ray(artifacts, config, replicas=replicas, max_replicas=max_replicas)
            return
        run(artifacts, config, log_level=log_level, access_log=access_log)


def register(app: typer.Typer) -> None:
    """Add ``serve`` to the imgembed CLI."""
    app.command("serve")(serve_cmd)
