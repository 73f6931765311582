"""``imgembed serve`` under hostile clients: oversized images, JSON bombs, slow headers, abandoned requests.

Every server is a child process on 127.0.0.1 (:class:`~imgembed.serve.testing.ServerProcess`); memory is the
server's peak resident size (``VmHWM`` in /proc), CPU its user + system time. Socket counts and loops are
bounded, and every socket has a timeout.
"""
from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import socket
import threading
import time
from typing import Iterator

import pytest
from PIL import Image

from imgembed.serve.client import EmbeddingClient
from imgembed.serve.testing import ServerProcess

from .helpers import post_json

pytestmark = pytest.mark.timeout(180)
MIB = 1024 * 1024


def big_png(side: int = 6320) -> bytes:
    """A PNG declaring side x side pixels that compresses to ~100 KB (a decompression bomb of the mild kind)."""
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (120, 40, 200)).save(buf, "PNG", optimize=False, compress_level=9)
    return buf.getvalue()


def peak_rss(pid: int) -> int:
    """Peak resident memory of ``pid`` in bytes."""
    with open(f"/proc/{pid}/status") as f:
        line = next(x for x in f if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def host_port(url: str) -> tuple[str, int]:
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    return host, int(port)


class HealthProbe(threading.Thread):
    """Polls /healthz every 50 ms on a fresh connection; records the slowest answer and any non-200."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.stop_event = url, threading.Event()
        self.worst, self.statuses = 0.0, []

    def run(self) -> None:
        while not self.stop_event.is_set():
            started = time.perf_counter()
            try:
                with EmbeddingClient(self.url, timeout=5) as c:
                    status = c.request("GET", "/healthz")[0]
            except OSError:
                status = 0
            self.worst = max(self.worst, time.perf_counter() - started)
            self.statuses.append(status)
            time.sleep(0.05)

    def __enter__(self) -> "HealthProbe":
        self.start()
        time.sleep(0.2)
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        self.join(10)


@pytest.fixture(scope="module")
def artifact(artifact_dir):
    return artifact_dir("test-clip-tiny")


@pytest.fixture(scope="module")
def bomb():
    return "data:image/png;base64," + base64.b64encode(big_png()).decode()


# -------------------------------------------------------------------------------------------- memory
def test_sixteen_declared_40mpx_images_are_refused_from_their_headers(artifact, bomb):
    with ServerProcess([artifact]) as server, EmbeddingClient(server.url, timeout=30) as client:
        before = peak_rss(server.proc.pid)
        started = time.perf_counter()
        status, _, body = post_json(client, "/v1/embeddings", {"images": [bomb] * 16})
        elapsed = time.perf_counter() - started
        assert status == 413 and body["error"] == "too_large", body
        assert "declare 639078400 pixels in all, over the limit of max_request_pixels=160000000" in body["message"]
        assert elapsed < 3.0
        assert peak_rss(server.proc.pid) - before < 100 * MIB  # nothing was decoded


def test_admitted_large_images_decode_one_at_a_time_within_the_server_budget(artifact, bomb):
    with ServerProcess([artifact], "--max-request-pixels", "700000000", "--timeout", "120") as server, \
            EmbeddingClient(server.url, timeout=150) as client:
        status, _, body = post_json(client, "/v1/embeddings", {"images": [bomb] * 6})
        assert status == 200, body
        assert body["embedded"] == 6 and len({tuple(d["embedding"]) for d in body["data"]}) == 1
        # 6 x 40 Mpx decoded at full size together would be >= 720 MiB of RGB alone; one at a time, within
        # max_decode_pixels, the whole server stays well under that.
        assert peak_rss(server.proc.pid) < 700 * MIB, peak_rss(server.proc.pid) / MIB


def webp(side: int) -> str:
    """A lossless WebP declaring side x side pixels (tens of bytes), as a data URL."""
    buf = io.BytesIO()
    Image.new("RGBA", (side, side), (10, 200, 30, 255)).save(buf, "WEBP", lossless=True)
    return "data:image/webp;base64," + base64.b64encode(buf.getvalue()).decode()


def test_webp_decodes_are_weighted_by_their_memory_and_stay_within_the_budget(artifact):
    """Decoding WebP takes about 16 bytes a pixel (RGB JPEG or PNG: 4): the budget counts it so, so the whole
    server still decodes within about 6 bytes x max_decode_pixels (48 Mpx: 275 MiB)."""
    with ServerProcess([artifact]) as server, EmbeddingClient(server.url, timeout=60) as client:
        before = peak_rss(server.proc.pid)
        status, _, body = post_json(client, "/v1/embeddings", {"images": [webp(6320)]})  # 40 Mpx: 610 MiB
        assert status == 413 and body["error"] == "too_large", body
        assert "6320x6320 = 39942400 pixels of WEBP (RGB) takes about 609 MiB to decode (16 bytes a pixel), " \
               "over the server's decode budget max_decode_pixels=48000000 (275 MiB" in body["message"]
        assert peak_rss(server.proc.pid) - before < 50 * MIB
        images, answers = [webp(3000)] * 4, []  # 9 Mpx each: two decode at once (290 MiB), not five

        def send() -> None:
            with EmbeddingClient(server.url, timeout=120) as c:
                answers.append(post_json(c, "/v1/embeddings", {"images": images})[0])
        threads = [threading.Thread(target=send) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(150)
        assert answers == [200] * 6
        assert peak_rss(server.proc.pid) - before < 400 * MIB, (peak_rss(server.proc.pid) - before) / MIB


def test_a_timed_out_request_stops_decoding_and_frees_its_queue_slots(artifact, bomb):
    with ServerProcess([artifact], "--max-request-pixels", "700000000", "--timeout", "1.5") as server, \
            EmbeddingClient(server.url, timeout=30) as client:
        pid = server.proc.pid
        status, _, body = post_json(client, "/v1/embeddings", {"images": [bomb] * 16})
        assert status == 504 and body["error"] == "timeout", body
        time.sleep(1.0)  # the image being decoded when the deadline passed finishes its input chunk
        cpu = cpu_seconds(pid)
        time.sleep(2.0)
        assert cpu_seconds(pid) - cpu < 0.5  # 16 x 40 Mpx would take many more CPU seconds had it gone on
        queue = client.request("GET", "/metrics")[2].decode()
        assert 'imgembed_queue_depth{model="test-clip-tiny"' in queue
        line = next(x for x in queue.splitlines() if x.startswith('imgembed_queue_depth{model="test-clip-tiny"'))
        assert float(line.rsplit(" ", 1)[1]) == 0.0


# ---------------------------------------------------------------------------------------- JSON bombs
def test_a_32_mib_json_body_of_tiny_items_is_refused_at_once_and_the_loop_stays_free(artifact):
    items = 8_000_000  # "a", x 8M = 32 MB, just under the 32 MiB body limit
    body = b'{"images":[' + b'"a",' * (items - 1) + b'"a"]}'
    assert len(body) <= 32 * MIB
    with ServerProcess([artifact]) as server, HealthProbe(server.url) as probe:
        with EmbeddingClient(server.url, timeout=30) as client:
            started = time.perf_counter()
            status, _, answer = client.request("POST", "/v1/embeddings", body, {"Content-Type": "application/json"})
            elapsed = time.perf_counter() - started
        time.sleep(0.3)
    assert status == 413, answer
    message = json.loads(answer)["message"]
    assert message.startswith("JSON body holds more than the 272 values a request may have")
    assert elapsed < 1.0, elapsed
    assert set(probe.statuses) == {200} and probe.worst < 0.5, (probe.worst, set(probe.statuses))


# -------------------------------------------------------------------------------------- slow clients
@contextlib.contextmanager
def slow_sockets(url: str, n: int, sent: bytes) -> Iterator[list[socket.socket]]:
    """``n`` connections to the server that each send ``sent`` and then nothing more; closed on exit."""
    host, port = host_port(url)
    sockets: list[socket.socket] = []
    try:
        for _ in range(n):
            sockets.append(socket.create_connection((host, port), timeout=5))
            sockets[-1].sendall(sent)
        yield sockets
    finally:
        for s in sockets:
            s.close()


def test_slow_body_sockets_do_not_take_healthz_down(artifact):
    """Sockets that send a whole request head and then trickle its body hold no slot a new client needs: at
    the connection cap the slowest body sender is closed to make room."""
    with ServerProcess([artifact], "--max-connections", "64", "--timeout", "60") as server:
        with slow_sockets(server.url, 128, b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: "
                          b"application/json\r\nContent-Length: 1000\r\n\r\n{"):
            time.sleep(0.5)
            with HealthProbe(server.url) as probe:
                time.sleep(3)
            assert probe.statuses and set(probe.statuses) == {200}, probe.statuses
            assert probe.worst < 1.0, probe.worst
        time.sleep(0.5)
        assert "Traceback" not in server.log()  # an evicted body sender is a client gone (499), not an error


def test_slow_header_sockets_do_not_take_healthz_down_and_are_closed(artifact):
    with ServerProcess([artifact], "--header-timeout", "2", "--max-connections", "256") as server:
        with slow_sockets(server.url, 512, b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\n") as sockets:
            with EmbeddingClient(server.url, timeout=5) as client:
                for _ in range(5):
                    started = time.perf_counter()
                    assert client.request("GET", "/healthz")[0] == 200
                    assert time.perf_counter() - started < 1.0
            deadline = time.monotonic() + 8
            open_ = list(sockets)
            while open_ and time.monotonic() < deadline:  # every slow socket is closed by the server
                still = []
                for s in open_:
                    s.settimeout(0.01)
                    try:
                        if s.recv(4096) == b"":
                            continue
                    except BlockingIOError:
                        pass
                    except socket.timeout:
                        pass
                    except OSError:  # reset by the server: closed too
                        continue
                    still.append(s)
                open_ = still
                time.sleep(0.1)
            assert not open_, f"{len(open_)} slow sockets still open"
