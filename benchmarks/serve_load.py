"""Load benchmark of ``imgembed serve`` on loopback, against the offline runtime, in one run.

    python benchmarks/serve_load.py                                  # test-clip-tiny int8 (seconds)
    python benchmarks/serve_load.py --model dinov2-small --int8      # exported once, random init, offline
    python benchmarks/serve_load.py --artifact artifacts/clip-vit-b32-int8 --batch 8 --json out.json

Three phases, all on the same artifact and batch size:

1. offline: ``imgembed.load(artifact).embed(jpeg_bytes, batch_size=B)`` (decode + preprocess + inference,
   one thread) -> images/s;
2. sustained: a server with ``--max-batch B`` and ``2 B`` closed-loop clients each sending one-image
   requests -> images/s (ratio to offline), p50/p99 latency;
3. overload: an open-loop generator at ``--overload`` x the sustained request rate against a server with
   a small queue and a timeout -> every request must get exactly one answer (200 or 429; no 5xx, no
   connection error), accepted p99 <= timeout, accepted vectors = their own image's offline vector, and
   the server's request counter = requests sent.

Client and server share this machine's cores: the ratio is a lower bound of what a separate client sees.
"""
from __future__ import annotations

import argparse
import io
import json
import re
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

import imgembed
from imgembed.samples import parity_images
from imgembed.serve.client import EmbeddingClient
from imgembed.serve.testing import ServerProcess


def jpeg_images() -> list[bytes]:
    """The 26 sample photos as JPEG bytes (what a client would upload)."""
    out = []
    for _, img in parity_images():
        buf = io.BytesIO()
        img.convert("RGB").save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


# ------------------------------------------------------------------------------------------- offline
def offline_throughput(artifact: Path, images: list[bytes], batch: int, n: int, threads: int | None) -> dict:
    """Median images/s of 3 runs of the offline runtime over ``n`` images (plus the reference vectors)."""
    emb = imgembed.load(artifact, batch_size=batch, threads=threads)
    work = [images[i % len(images)] for i in range(n)]
    emb.embed(work[:batch])  # warm-up
    rates = []
    for _ in range(3):
        t0 = time.perf_counter()
        emb.embed(work, batch_size=batch)
        rates.append(n / (time.perf_counter() - t0))
    reference = emb.embed(images, batch_size=1)  # one image per call: no batch-composition effects
    emb.close()
    return {"images_per_s": statistics.median(rates), "runs": rates, "reference": reference}


# ----------------------------------------------------------------------------------------- sustained
def sustained(url: str, images: list[bytes], clients: int, n: int) -> dict:
    """``clients`` closed-loop clients, one image per request, ``n`` requests in all."""
    latencies: list[float] = []
    statuses: list[int] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        with EmbeddingClient(url, timeout=120) as cl:
            for k in range(c, n, clients):
                t0 = time.perf_counter()
                status = cl.post_images([images[k % len(images)]])[0]
                with lock:
                    latencies.append(time.perf_counter() - t0)
                    statuses.append(status)

    warm = EmbeddingClient(url)
    for i in range(4):
        warm.post_images([images[i]])
    warm.close()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - t0
    ok = statuses.count(200)
    return {"requests": n, "ok": ok, "wall_s": wall, "images_per_s": ok / wall, "p50_ms": percentile(latencies, 50)
            * 1e3, "p99_ms": percentile(latencies, 99) * 1e3, "statuses": sorted(set(statuses))}


# ------------------------------------------------------------------------------------------ overload
@dataclass
class Outcome:
    index: int
    image: int
    status: int | None = None
    latency_s: float = 0.0
    error: str | None = None
    vector: list[float] | None = field(default=None, repr=False)


def open_loop(url: str, images: list[bytes], rate: float, seconds: float, workers: int) -> list[Outcome]:
    """Send ``rate`` requests/s for ``seconds`` on a fixed schedule; latency counts from the scheduled time."""
    local = threading.local()
    total = int(rate * seconds)
    outcomes = [Outcome(i, i % len(images)) for i in range(total)]

    def send(o: Outcome, scheduled: float) -> None:
        if not hasattr(local, "client"):
            local.client = EmbeddingClient(url, timeout=120)
        try:
            status, _, body = local.client.post_images([images[o.image]])
            o.status = status
            if status == 200:
                o.vector = json.loads(body)["data"][0]["embedding"]
        except Exception as e:  # a lost answer: recorded, and fails the run
            o.error = f"{type(e).__name__}: {e}"
        o.latency_s = time.perf_counter() - scheduled

    t0 = time.perf_counter() + 0.2
    with ThreadPoolExecutor(workers) as pool:
        for o in outcomes:
            scheduled = t0 + o.index / rate
            time.sleep(max(0.0, scheduled - time.perf_counter()))
            pool.submit(send, o, scheduled)
    return outcomes


def judge_overload(outcomes: list[Outcome], reference: np.ndarray, timeout_s: float, server_count: float,
                   int8: bool) -> dict:
    """Counts, accepted latency percentiles and the checks of the overload phase."""
    accepted = [o for o in outcomes if o.status == 200]
    lat = [o.latency_s for o in accepted]
    wrong = 0
    for o in accepted:  # its own image must be the nearest offline vector (no mix-ups between requests)
        v = np.asarray(o.vector, np.float32)
        dist = np.linalg.norm(reference - v, axis=1)
        close = np.allclose(v, reference[o.image], rtol=1e-5, atol=1e-5)
        wrong += int(dist.argmin() != o.image or not (int8 or close))
    statuses = {str(s): sum(o.status == s for o in outcomes) for s in sorted({o.status for o in outcomes}, key=str)}
    checks = {
        "every_request_answered_once": all(o.status is not None for o in outcomes) and server_count == len(outcomes),
        "only_200_or_429": set(statuses) <= {"200", "429"},
        "accepted_p99_within_timeout": percentile(lat, 99) <= timeout_s,
        "vectors_match_offline": wrong == 0,
    }
    return {"sent": len(outcomes), "server_counted": server_count, "statuses": statuses, "wrong_vectors": wrong,
            "errors": [o.error for o in outcomes if o.error][:5], "accepted_p50_ms": percentile(lat, 50) * 1e3,
            "accepted_p99_ms": percentile(lat, 99) * 1e3, "checks": checks}


def server_request_count(url: str) -> float:
    with EmbeddingClient(url) as c:
        text = c.request("GET", "/metrics")[2].decode()
    return sum(float(m) for m in re.findall(r"^imgembed_requests_total\{[^}]*\} (\S+)$", text, re.M))


# ---------------------------------------------------------------------------------------------- main
def resolve_artifact(args) -> Path:
    """--artifact as given, or --model exported once (random init) into --work-dir."""
    if args.artifact:
        return Path(args.artifact)
    precision = "int8" if args.int8 else "fp32"
    path = Path(args.work_dir) / f"{args.model}-{precision}"
    if not (path / "manifest.json").is_file():
        from imgembed.export.pipeline import ExportOptions, export_model

        print(f"exporting {args.model} ({precision}, random init) to {path} ...", file=sys.stderr)
        export_model(args.model, path, ExportOptions(precision=precision, random_init=True, speed_check=False))
    return path


def server_options(args, queue: int, timeout: float) -> list[str]:
    opts = ["--max-batch", str(args.batch), "--max-delay-ms", str(args.delay_ms), "--max-queue", str(queue),
            "--max-images", "1", "--timeout", str(timeout), "--log-level", "warning"]
    return opts + (["--threads", str(args.threads)] if args.threads else [])


def run(args) -> dict:
    artifact = resolve_artifact(args)
    manifest = json.loads((artifact / "manifest.json").read_text())
    int8 = manifest["precision"] == "int8"
    images = jpeg_images()
    clients = args.clients or 2 * args.batch
    offline = offline_throughput(artifact, images, args.batch, args.requests, args.threads)
    with ServerProcess([artifact], *server_options(args, 4 * clients, 120)) as server:
        steady = sustained(server.url, images, clients, args.requests)
    rate = args.overload * steady["images_per_s"]
    with ServerProcess([artifact], *server_options(args, 2 * args.batch, args.timeout)) as server:
        outcomes = open_loop(server.url, images, rate, args.overload_seconds, args.workers)
        counted = server_request_count(server.url)
    overload = judge_overload(outcomes, offline.pop("reference"), args.timeout, counted, int8)
    overload.update(offered_rps=rate, multiple=args.overload, seconds=args.overload_seconds)
    return {"artifact": str(artifact), "model": manifest["name"], "precision": manifest["precision"],
            "batch": args.batch, "clients": clients, "delay_ms": args.delay_ms, "offline": offline,
            "sustained": steady, "ratio": steady["images_per_s"] / offline["images_per_s"], "overload": overload}


def report(r: dict) -> str:
    o, s, ov = r["offline"], r["sustained"], r["overload"]
    lines = [
        f"artifact {r['artifact']} ({r['model']}, {r['precision']}), batch {r['batch']}, {r['clients']} clients, "
        f"max delay {r['delay_ms']} ms",
        f"offline runtime : {o['images_per_s']:8.1f} images/s",
        f"server sustained: {s['images_per_s']:8.1f} images/s = {r['ratio']:.0%} of offline; "
        f"p50 {s['p50_ms']:.1f} ms, p99 {s['p99_ms']:.1f} ms ({s['ok']}/{s['requests']} ok)",
        f"overload x{ov['multiple']:g}  : {ov['offered_rps']:.1f} req/s for {ov['seconds']:g} s -> {ov['sent']} sent, "
        f"statuses {ov['statuses']}, server counted {ov['server_counted']:.0f}",
        f"                  accepted p50 {ov['accepted_p50_ms']:.1f} ms, p99 {ov['accepted_p99_ms']:.1f} ms, "
        f"wrong vectors {ov['wrong_vectors']}, errors {ov['errors']}",
        "checks: " + ", ".join(f"{k}={'PASS' if v else 'FAIL'}" for k, v in ov["checks"].items())
        + f", throughput_ratio>=0.75={'PASS' if r['ratio'] >= 0.75 else 'FAIL'}",
    ]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--artifact", help="artifact directory (default: export --model)")
    p.add_argument("--model", default="test-clip-tiny", help="registry model to export with random weights")
    p.add_argument("--int8", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "imgembed-serve-bench"))
    p.add_argument("--batch", type=int, default=8, help="offline batch size = server --max-batch")
    p.add_argument("--delay-ms", type=float, default=5.0, help="server --max-delay-ms")
    p.add_argument("--clients", type=int, default=0, help="closed-loop clients (default 2 x batch)")
    p.add_argument("--requests", type=int, default=400, help="images in the offline and sustained phases")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (offline and server)")
    p.add_argument("--overload", type=float, default=4.0, help="offered load as a multiple of sustained")
    p.add_argument("--overload-seconds", type=float, default=10.0)
    p.add_argument("--timeout", type=float, default=2.0, help="server per-request timeout in the overload phase")
    p.add_argument("--workers", type=int, default=64, help="client threads of the open-loop generator")
    p.add_argument("--json", help="also write the results to this file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    print(report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=float))
    return 0 if all(result["overload"]["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
