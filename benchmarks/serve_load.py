"""Load benchmark of ``imgembed serve`` on loopback, against the offline runtime, in one run.

    python benchmarks/serve_load.py                                  # test-clip-tiny int8 (seconds)
    python benchmarks/serve_load.py --model dinov2-small --int8      # exported once, random init, offline
    python benchmarks/serve_load.py --artifact artifacts/clip-vit-b32-int8 --batch 8 --json out.json

Three phases, all on the same artifact and batch size:

1+2. offline vs sustained, interleaved in ``--rounds`` rounds (so CPU drift hits both alike):
   offline ``imgembed.load(artifact).embed(jpeg_bytes, batch_size=B)`` (decode + preprocess + inference,
   one thread) -> images/s, then a server with ``--max-batch B`` and ``2 B`` closed-loop clients each
   sending one-image requests -> images/s, p50/p99 latency; the ratio is the median of the round ratios;
3. overload: an open-loop generator at ``--overload`` x the sustained request rate against a server with
   a timeout (so an admission wait limit of 0.8 x timeout) -> every request must get exactly one answer
   (200 or 429; no 5xx, no connection error), accepted p99 (from sending) <= timeout, accepted vectors =
   their own image's offline vector, and the server's request counter = requests sent. The generator has
   ``--workers`` threads: when a tiny model makes the HTTP layer the bottleneck, requests also wait in the
   generator (reported as its backlog).

Also measured: the artifact's model-only images/s (inference on ready pixels, ``embed_pixels``, same
threads, interleaved with the other rounds) and the server's sustained rate against it (target >= 0.85x; a
server also decodes on the same cores, so a model whose decoding costs more than its inference cannot reach
it: read the ratio with the model's decode share); the 429 rate under overload; and the cost of the two
OpenAI response encodings at 512-d x 64 vectors (``encoding_format`` float vs base64, target >= 2x cheaper),
timed on the server's own response builder.

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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import imgembed
from imgembed.gate.samples import parity_images
from imgembed.serve.client import EmbeddingClient
from imgembed.serve.testing import ServerProcess


def jpeg_images(megapixels: tuple[float, ...] = ()) -> list[bytes]:
    """The 26 sample photos as JPEG bytes (q90, what a client would upload); with ``megapixels``, each photo
    upscaled (bicubic) to those sizes in turn (e.g. 0.5, 0.75, 1.0: phone photos resized for upload)."""
    from PIL import Image

    out = []
    for i, (_, img) in enumerate(parity_images()):
        img = img.convert("RGB")
        if megapixels:
            s = (megapixels[i % len(megapixels)] * 1e6 / (img.width * img.height)) ** 0.5
            img = img.resize((round(img.width * s), round(img.height * s)), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


# ------------------------------------------------------------------------------- offline vs sustained
def offline_round(emb, images: list[bytes], batch: int, n: int) -> float:
    """images/s of the offline runtime over ``n`` images (decode + preprocess + inference, one thread)."""
    work = [images[i % len(images)] for i in range(n)]
    t0 = time.perf_counter()
    emb.embed(work, batch_size=batch)
    return n / (time.perf_counter() - t0)


def model_only_round(emb, pixels: np.ndarray, batch: int, n: int) -> float:
    """images/s of the engine alone over ``n`` images already preprocessed (``embed_pixels``)."""
    reps = -(-n // len(pixels))
    work = np.concatenate([pixels] * reps)[:n]
    t0 = time.perf_counter()
    emb.embed_pixels(work, batch_size=batch)
    return n / (time.perf_counter() - t0)


def decode_only_round(emb, images: list[bytes], n: int, workers: int) -> float:
    """images/s of decoding + preprocessing alone (``load_crop`` + ``model_input`` per upload, as the server's
    decode pool does it) on ``workers`` threads, no inference: with model-only it bounds any server that decodes
    and infers on the same cores at 1 / (1 / decode-only + 1 / model-only)."""
    from imgembed.preprocess.fast import load_crop
    from imgembed.runtime.pipeline import ordered_map

    work = [images[i % len(images)] for i in range(n)]
    t0 = time.perf_counter()
    for _ in ordered_map(lambda data: emb.model_input(load_crop(data, emb.preprocess, emb.decode)[None]), work,
                         workers=workers, prefetch=4 * workers):
        pass
    return n / (time.perf_counter() - t0)


def serialisation_cost(dim: int = 512, batch: int = 64, repeats: int = 30) -> dict:
    """Seconds to build the OpenAI answer for ``batch`` x ``dim`` vectors, float lists vs base64 (median)."""
    from types import SimpleNamespace

    from imgembed.serve.app import _openai_response
    from imgembed.serve.uploads import Incoming

    vectors = np.random.default_rng(0).standard_normal((batch, dim)).astype(np.float32)
    served = SimpleNamespace(id="bench")
    out = {}
    for fmt in ("float", "base64"):
        incoming = Incoming(texts=["x"], openai=True, encoding_format=fmt)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            body = _openai_response(served, incoming, vectors, tokens=0).body
            times.append(time.perf_counter() - t0)
        out[f"{fmt}_ms"] = statistics.median(times) * 1e3
        out[f"{fmt}_bytes"] = len(body)
    out["ratio"] = out["float_ms"] / out["base64_ms"]
    return out


def server_round(url: str, images: list[bytes], clients: int, n: int) -> tuple[float, list[float], list[int]]:
    """``clients`` closed-loop clients, one image per request, ``n`` requests: (images/s, latencies, statuses)."""
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

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return statuses.count(200) / (time.perf_counter() - t0), latencies, statuses


def interleaved(emb, url: str, images: list[bytes], batch: int, clients: int, n: int, rounds: int,
                decode_workers: int = 2) -> dict:
    """Alternate offline and server rounds (the CPU may be shared: drift hits both alike); medians."""
    emb.embed(images[:batch], batch_size=batch)  # warm-up, both sides
    server_round(url, images, clients, 2 * clients)
    pixels = emb.embed(images, batch_size=batch) is not None and _pixels(emb, images)
    offline, served, model, decode, latencies, statuses = [], [], [], [], [], []
    for _ in range(rounds):
        offline.append(offline_round(emb, images, batch, n))
        model.append(model_only_round(emb, pixels, batch, n))
        decode.append(decode_only_round(emb, images, n, decode_workers))
        rate, lat, st = server_round(url, images, clients, n)
        served.append(rate)
        latencies += lat
        statuses += st
    ratios = [s / o for s, o in zip(served, offline, strict=True)]
    model_ratios = [s / m for s, m in zip(served, model, strict=True)]
    bounds = [1 / (1 / d + 1 / m) for d, m in zip(decode, model, strict=True)]  # decode and inference add up
    bound_ratios = [s / b for s, b in zip(served, bounds, strict=True)]
    return {"offline_images_per_s": statistics.median(offline), "server_images_per_s": statistics.median(served),
            "model_only_images_per_s": statistics.median(model), "model_ratio": statistics.median(model_ratios),
            "model_round_ratios": model_ratios, "decode_only_images_per_s": statistics.median(decode),
            "decode_only_rounds": decode, "bound_images_per_s": statistics.median(bounds),
            "bound_ratio": statistics.median(bound_ratios), "bound_round_ratios": bound_ratios,
            "bound_over_model_only": statistics.median(b / m for b, m in zip(bounds, model, strict=True)),
            "ratio": statistics.median(ratios), "round_ratios": ratios, "offline_rounds": offline,
            "server_rounds": served, "p50_ms": percentile(latencies, 50) * 1e3,
            "p99_ms": percentile(latencies, 99) * 1e3, "requests": len(statuses), "ok": statuses.count(200)}


def _pixels(emb, images: list[bytes]) -> np.ndarray:
    """The runner inputs of ``images`` (decoded and preprocessed once, outside any timing)."""
    from imgembed.preprocess.fast import load_crop

    crops = np.stack([load_crop(data, emb.preprocess) for data in images])
    return emb.model_input(crops)


# ------------------------------------------------------------------------------------------ overload
@dataclass
class Outcome:
    index: int
    image: int
    status: int | None = None
    latency_s: float = 0.0          # from the scheduled time (includes any backlog of this generator)
    service_s: float = 0.0          # from the moment the request was sent
    backlog_s: float = 0.0          # how late the generator sent it
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
        sent = time.perf_counter()
        o.backlog_s = sent - scheduled
        try:
            status, _, body = local.client.post_images([images[o.image]])
            o.status = status
            if status == 200:
                o.vector = json.loads(body)["data"][0]["embedding"]
        except Exception as e:  # a lost answer: recorded, and fails the run
            o.error = f"{type(e).__name__}: {e}"
        o.latency_s = time.perf_counter() - scheduled
        o.service_s = o.latency_s - o.backlog_s

    t0 = time.perf_counter() + 0.2
    with ThreadPoolExecutor(workers) as pool:
        for o in outcomes:
            scheduled = t0 + o.index / rate
            time.sleep(max(0.0, scheduled - time.perf_counter()))
            pool.submit(send, o, scheduled)
    return outcomes


def judge_overload(outcomes: list[Outcome], reference: np.ndarray, timeout_s: float, server_count: float,
                   min_cosine: float | None) -> dict:
    """Counts, accepted latency percentiles and the checks of the overload phase."""
    accepted = [o for o in outcomes if o.status == 200]
    lat = [o.service_s for o in accepted]
    wrong, cosines = 0, []
    for o in accepted:  # the vector of its own image (no mix-ups between requests)
        v, want = np.asarray(o.vector, np.float32), reference[o.image]
        cosines.append(float(v @ want / (np.linalg.norm(v) * np.linalg.norm(want))))
        # Dynamic INT8 quantizes per batch: compare by cosine at the artifact's own INT8 parity threshold.
        ok = cosines[-1] >= min_cosine if min_cosine else np.allclose(v, want, rtol=1e-5, atol=1e-5)
        wrong += int(not ok)
    statuses = {str(s): sum(o.status == s for o in outcomes) for s in sorted({o.status for o in outcomes}, key=str)}
    checks = {
        "every_request_answered_once": all(o.status is not None for o in outcomes) and server_count == len(outcomes),
        "only_200_or_429": set(statuses) <= {"200", "429"},
        "accepted_p99_within_timeout": percentile(lat, 99) <= timeout_s,
        "vectors_match_offline": wrong == 0,
    }
    return {"sent": len(outcomes), "server_counted": server_count, "statuses": statuses, "wrong_vectors": wrong,
            "min_cosine_vs_offline": min(cosines, default=float("nan")),
            "errors": [o.error for o in outcomes if o.error][:5], "accepted_p50_ms": percentile(lat, 50) * 1e3,
            "accepted_p99_ms": percentile(lat, 99) * 1e3, "checks": checks,
            "accepted_p99_from_schedule_ms": percentile([o.latency_s for o in accepted], 99) * 1e3,
            "rejected_p99_ms": percentile([o.service_s for o in outcomes if o.status == 429], 99) * 1e3,
            "generator_backlog_max_ms": max((o.backlog_s for o in outcomes), default=0.0) * 1e3}


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
            "--max-images", "1", "--timeout", str(timeout), "--log-level", "warning",
            "--decode-workers", str(args.decode_workers), "--draft-ratio", str(args.draft_ratio)]
    return opts + (["--threads", str(args.threads)] if args.threads else [])


def run(args) -> dict:
    artifact = resolve_artifact(args)
    manifest = json.loads((artifact / "manifest.json").read_text())
    dynamic = (manifest.get("export", {}).get("quantization") or {}).get("preset", {}).get("mode") == "dynamic"
    min_cosine = manifest["model"]["parity"]["int8"]["min_cosine"] if dynamic else None
    images = jpeg_images(tuple(float(x) for x in args.megapixels.split(",") if x))
    clients = args.clients or 2 * args.batch
    # --draft-ratio: the server decodes large uploads at reduced scale (fastdecode); the offline side does
    # the same (decode="fast"), which matches the server for every upload at or above the ratio
    emb = imgembed.load(artifact, batch_size=args.batch, threads=args.threads,
                        decode="fast" if args.draft_ratio > 0 else "exact")
    reference = emb.embed(images, batch_size=1)  # one image per call: no batch-composition effects
    with ServerProcess([artifact], *server_options(args, 4 * clients, 120)) as server:
        steady = interleaved(emb, server.url, images, args.batch, clients, args.requests, args.rounds,
                             args.decode_workers)
    emb.close()
    rate = args.overload * steady["server_images_per_s"]
    with ServerProcess([artifact], *server_options(args, args.overload_queue, args.timeout)) as server:
        outcomes = open_loop(server.url, images, rate, args.overload_seconds, args.workers)
        counted = server_request_count(server.url)
    overload = judge_overload(outcomes, reference, args.timeout, counted, min_cosine)
    overload.update(offered_rps=rate, multiple=args.overload, seconds=args.overload_seconds)
    rejected = sum(n for status, n in overload["statuses"].items() if str(status) == "429")
    overload["rate_429"] = rejected / max(1, overload["sent"])
    sizes = [_size(b) for b in images]
    from imgembed.runtime.host import host_info

    return {"serialisation": serialisation_cost(), "artifact": str(artifact), "model": manifest["name"],
            "host": host_info(), "threads": args.threads,
            "uploads": {"count": len(images), "megapixels_min": min(sizes), "megapixels_max": max(sizes),
                        "kb_mean": sum(map(len, images)) / len(images) / 1e3},
            "precision": manifest["precision"],
            "batch": args.batch, "clients": clients, "decode_workers": args.decode_workers,
            "draft_ratio": args.draft_ratio,
            "delay_ms": args.delay_ms, "sustained": steady,
            "overload": overload}


def _size(data: bytes) -> float:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return round(img.width * img.height / 1e6, 3)


def report(r: dict) -> str:
    s, ov = r["sustained"], r["overload"]
    lines = [
        f"artifact {r['artifact']} ({r['model']}, {r['precision']}), batch {r['batch']}, {r['clients']} clients, "
        f"max delay {r['delay_ms']} ms, {len(s['round_ratios'])} interleaved rounds, uploads "
        f"{r['uploads']['megapixels_min']:g}-{r['uploads']['megapixels_max']:g} MP, draft ratio {r['draft_ratio']:g}",
        f"offline runtime : {s['offline_images_per_s']:8.1f} images/s (rounds "
        + ", ".join(f"{x:.1f}" for x in s["offline_rounds"]) + ")",
        f"server sustained: {s['server_images_per_s']:8.1f} images/s (rounds "
        + ", ".join(f"{x:.1f}" for x in s["server_rounds"]) + f"); p50 {s['p50_ms']:.1f} ms, p99 {s['p99_ms']:.1f} ms "
        f"({s['ok']}/{s['requests']} ok)",
        f"ratio server/offline: median {s['ratio']:.0%} (rounds " + ", ".join(f"{x:.0%}" for x in s["round_ratios"])
        + ")",
        f"model only      : {s['model_only_images_per_s']:8.1f} images/s; server/model-only median "
        f"{s['model_ratio']:.0%} (rounds " + ", ".join(f"{x:.0%}" for x in s["model_round_ratios"]) + ")",
        f"decode only     : {s['decode_only_images_per_s']:8.1f} images/s ({r['decode_workers']} threads); "
        f"decode+infer bound {s['bound_images_per_s']:.1f} images/s = {s['bound_over_model_only']:.0%} of model-only; "
        f"server/bound median {s['bound_ratio']:.0%} (rounds "
        + ", ".join(f"{x:.0%}" for x in s["bound_round_ratios"]) + ")",
        f"OpenAI answer 64 x 512-d: float {r['serialisation']['float_ms']:.2f} ms "
        f"({r['serialisation']['float_bytes']} B), base64 {r['serialisation']['base64_ms']:.2f} ms "
        f"({r['serialisation']['base64_bytes']} B): base64 {r['serialisation']['ratio']:.1f}x cheaper",
        f"overload x{ov['multiple']:g}  : {ov['offered_rps']:.1f} req/s for {ov['seconds']:g} s -> {ov['sent']} sent, "
        f"statuses {ov['statuses']} (429 rate {ov['rate_429']:.0%}), server counted {ov['server_counted']:.0f}",
        f"                  accepted p50 {ov['accepted_p50_ms']:.1f} ms, p99 {ov['accepted_p99_ms']:.1f} ms "
        f"(from schedule {ov['accepted_p99_from_schedule_ms']:.1f} ms; generator backlog max "
        f"{ov['generator_backlog_max_ms']:.0f} ms), 429 p99 {ov['rejected_p99_ms']:.1f} ms, "
        f"wrong vectors {ov['wrong_vectors']} (min cosine to offline {ov['min_cosine_vs_offline']:.6f}), "
        f"errors {ov['errors']}",
        "checks: " + ", ".join(f"{k}={'PASS' if v else 'FAIL'}" for k, v in ov["checks"].items())
        + f", throughput_ratio>=0.75={'PASS' if s['ratio'] >= 0.75 else 'FAIL'}"
        + f", model_only_ratio>=0.85={'PASS' if s['model_ratio'] >= 0.85 else 'FAIL'}"
        + f", base64>=2x={'PASS' if r['serialisation']['ratio'] >= 2 else 'FAIL'}",
    ]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--artifact", help="artifact directory (default: export --model)")
    p.add_argument("--model", default="test-clip-tiny", help="registry model to export with random weights")
    p.add_argument("--int8", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "imgembed-serve-bench"))
    p.add_argument("--megapixels", default="", help="upload sizes, e.g. 0.5,0.75,1 (default: the sample photos "
                   "as they are, 0.1-0.5 MP)")
    p.add_argument("--batch", type=int, default=8, help="offline batch size = server --max-batch")
    p.add_argument("--delay-ms", type=float, default=5.0, help="server --max-delay-ms")
    p.add_argument("--clients", type=int, default=0, help="closed-loop clients (default 2 x batch)")
    p.add_argument("--requests", type=int, default=200, help="images per offline / server round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved offline / server rounds")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (offline and server)")
    p.add_argument("--decode-workers", type=int, default=2, help="server --decode-workers (and the decode-only "
                   "round's threads)")
    p.add_argument("--draft-ratio", type=float, default=0.0, help="server --draft-ratio (default 0: exact "
                   "decoding); > 0 also makes the offline, decode-only and reference sides decode fast, which "
                   "matches the server for uploads whose short edge is >= the ratio x the resize target")
    p.add_argument("--overload", type=float, default=4.0, help="offered load as a multiple of sustained")
    p.add_argument("--overload-seconds", type=float, default=10.0)
    p.add_argument("--timeout", type=float, default=2.0, help="server per-request timeout in the overload phase")
    p.add_argument("--overload-queue", type=int, default=256, help="server --max-queue in the overload phase "
                   "(latency is bounded by the estimated-wait admission, 0.8 x timeout)")
    p.add_argument("--workers", type=int, default=64, help="client threads of the open-loop generator")
    p.add_argument("--json", help="also write the results to this file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    print(report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=float))
    ok = all(result["overload"]["checks"].values()) and result["sustained"]["ratio"] >= 0.75
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
