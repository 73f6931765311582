"""Unit tests of the serving pieces that need no server: config, model ids, upload decoding, the client."""
from __future__ import annotations

import base64
import io
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from imgembed.errors import BackendUnavailableError, ImageDecodeError, UnknownModelError
from imgembed.models.registry import get_spec
from imgembed.preprocess import load_image, preprocess_batch
from imgembed.preprocess.fast import crops_to_pixels
from imgembed.serve.auth import key_matches, read_keys
from imgembed.serve.client import EmbeddingClient, encode_multipart
from imgembed.serve.config import ServeConfig, ServeConfigError
from imgembed.serve.errors import DuplicateModelError, ModelNotFoundError, PayloadTooLargeError, PixelLimitError
from imgembed.serve.models import ArtifactArg, assign_ids
from imgembed.serve.uploads import (
    DecodeCancelled,
    DecodeLimits,
    PixelBudget,
    Upload,
    count_json_values,
    declared,
    decode_image,
    parse_json_body,
    prepare,
)

from .helpers import minimal_manifest, run_cli

SPEC = get_spec("test-clip-tiny").preprocess


def limits(max_pixels: int, max_request_pixels: int | None = None, **kw) -> DecodeLimits:
    return DecodeLimits(max_pixels, max_request_pixels or 100 * max_pixels, PixelBudget(max_pixels), **kw)


def png(w: int, h: int, color=(200, 30, 90)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "PNG")
    return buf.getvalue()


# -------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("kwargs, message", [
    (dict(max_batch=0), r"max_batch=0: expected an integer >= 1"),
    (dict(port=70000), r"port=70000: expected an integer in \[0, 65535\]"),
    (dict(max_delay_ms=-1), r"max_delay_ms=-1: expected a number >= 0"),
    (dict(timeout_s=0), r"timeout_s=0: expected a number >= 0.001"),
    (dict(threads=0), r"threads=0: expected an integer >= 1"),
    (dict(max_queue=8, max_images=16), r"max_queue=8 is smaller than max_images=16"),
    (dict(max_batch=True), r"max_batch=True: expected an integer"),
])
def test_config_rejects_bad_values_naming_them(kwargs, message):
    with pytest.raises(ServeConfigError, match=message):
        ServeConfig(**kwargs)


def test_config_defaults_bind_loopback_and_are_bounded():
    cfg = ServeConfig()
    assert cfg.host == "127.0.0.1"
    assert (cfg.max_queue, cfg.max_images, cfg.max_batch, cfg.max_delay_s) == (256, 64, 16, 0.005)


# ------------------------------------------------------------------------------------------ model ids
def arg(name, precision, explicit=None):
    return ArtifactArg(Path(f"/a/{name}-{precision}"), name, precision, explicit)


def test_unique_names_are_ids_and_name_precision_is_an_alias():
    assert assign_ids([arg("clip", "int8"), arg("dino", "fp32")]) == [("clip", ("clip-int8",)),
                                                                       ("dino", ("dino-fp32",))]


def test_shared_names_are_disambiguated_by_precision():
    assert assign_ids([arg("clip", "int8"), arg("clip", "fp32")]) == [("clip-int8", ()), ("clip-fp32", ())]


def test_explicit_ids_win_and_true_duplicates_are_refused():
    assert assign_ids([arg("clip", "int8", "fast"), arg("clip", "int8", "other")]) == [("fast", ()),
                                                                                     ("other", ())]
    with pytest.raises(DuplicateModelError, match=r"/a/clip-int8 and /a/clip-int8 both resolve to model id "
                                                  r"'clip-int8'; name them explicitly with ID=PATH"):
        assign_ids([arg("clip", "int8"), arg("clip", "int8")])


def test_model_not_found_is_an_unknown_model_error():
    err = ModelNotFoundError("model 'x' is not served; served models: ['a']")
    assert isinstance(err, UnknownModelError) and err.status == 404
    assert str(err) == "model 'x' is not served; served models: ['a']"


# -------------------------------------------------------------------------------------------- uploads
def test_prepare_keeps_good_images_and_reports_bad_ones_in_order():
    good = png(40, 30)
    uploads = [Upload("image 0", good), Upload("image 1 ('x.jpg')", b"not an image"),
               Upload("image 2", base64.b64encode(good).decode(), base64=True),
               Upload("image 3", "data:image/png;base64," + base64.b64encode(png(8, 9)).decode(), base64=True),
               Upload("image 4", "%%%", base64=True), Upload("image 5", png(200, 100))]
    out = prepare(uploads, SPEC, limits(10_000))
    assert out.ok == [0, 2, 3]
    with pytest.raises(ImageDecodeError) as offline:
        load_image(b"not an image", name="image 1 ('x.jpg')")
    assert out.failures[1] == ("decode", str(offline.value))  # the offline decoder's message, verbatim
    assert out.failures[4][0] == "decode" and out.failures[4][1].startswith("image 4: invalid base64")
    assert out.failures[5] == ("too_large", "image 5: 200x100 = 20000 pixels is over the server limit "
                                            "max_pixels=10000")
    expected = preprocess_batch([load_image(good), load_image(good), load_image(png(8, 9))], SPEC)
    np.testing.assert_array_equal(out.pixels, expected)  # same pixels as the offline runtime


def test_prepare_with_no_good_image_has_no_pixels():
    out = prepare([Upload("image 0", b"")], SPEC, limits(100))
    assert out.pixels is None and out.ok == []
    assert out.failures == {0: ("decode", "image 0: empty input (0 bytes), not an image")}


def test_pixel_limit_uses_the_declared_size_before_decoding():
    # A 5000x5000 PNG header with a truncated body: rejected for its size, never decoded.
    data = png(5000, 5000)[:200]
    with pytest.raises(PixelLimitError, match=r"5000x5000 = 25000000 pixels is over the server limit "
                                              r"max_pixels=1000000"):
        decode_image(data, "big.png", 1_000_000)
    with pytest.raises(ImageDecodeError, match="truncated or corrupt"):
        decode_image(data, "big.png", 30_000_000)


def encoded(mode: str, fmt: str, side: int = 30) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (side, side)).save(buf, fmt)
    return buf.getvalue()


def test_the_decode_budget_weighs_each_format_by_its_memory_and_refuses_what_it_cannot_hold():
    heads = {name: declared(encoded(mode, fmt)) for name, mode, fmt in [
        ("jpeg", "RGB", "JPEG"), ("png", "RGB", "PNG"), ("gray", "L", "PNG"), ("rgba", "RGBA", "PNG"),
        ("webp", "RGB", "WEBP"), ("cmyk", "CMYK", "JPEG")]}
    assert {k: (h.pixels, h.budget_pixels) for k, h in heads.items()} == {
        "jpeg": (900, 900), "png": (900, 900), "gray": (900, 900), "rgba": (900, 1200), "webp": (900, 2400),
        "cmyk": (900, 1200)}
    budget = DecodeLimits(2000, 100_000, PixelBudget(2000))
    out = prepare([Upload(f"image {i}", encoded(m, f)) for i, (m, f) in enumerate(
        [("RGB", "JPEG"), ("RGB", "WEBP"), ("RGBA", "PNG")])], SPEC, budget)
    assert out.ok == [0, 2] and out.pixels.shape[0] == 2
    assert out.failures == {1: ("too_large", "image 1: 30x30 = 900 pixels of WEBP (RGB) takes about 0 MiB to "
                                             "decode (16 bytes a pixel), over the server's decode budget "
                                             "max_decode_pixels=2000 (0 MiB at 6 bytes a pixel); send it smaller "
                                             "or raise --max-decode-pixels")}


def tiled_tiff(w: int, h: int, tile: int) -> bytes:
    """A TIFF header declaring a w x h RGB image in tile x tile tiles (the tile data itself is a few bytes)."""
    import struct

    entries = [(256, 4, 1, w), (257, 4, 1, h), (258, 3, 3, 0), (259, 3, 1, 1), (262, 3, 1, 2), (277, 3, 1, 3),
               (284, 3, 1, 1), (322, 4, 1, tile), (323, 4, 1, tile), (324, 4, 1, 0), (325, 4, 1, 16)]
    ext = 8 + 2 + len(entries) * 12 + 4
    out = [b"II*\0", struct.pack("<I", 8), struct.pack("<H", len(entries))]
    for tag, typ, count, value in entries:
        value = {258: ext, 324: ext + 6}.get(tag, value)
        out.append(struct.pack("<HHIHH", tag, typ, count, value, 0) if typ == 3 and count == 1
                   else struct.pack("<HHII", tag, typ, count, value))
    return b"".join(out + [struct.pack("<I", 0), struct.pack("<HHH", 8, 8, 8), bytes(16)])


def test_a_tiff_declaring_huge_tiles_is_refused_before_the_decoder_allocates_one():
    data = tiled_tiff(64, 64, 16384)  # a 64 x 64 image whose one tile is 268 Mpx
    with pytest.raises(ImageDecodeError, match=r"too many pixels in one tile: 16384x16384 = 268435456 > "
                                               r"max_pixels=40000000"):
        load_image(data, max_pixels=40_000_000)
    head = declared(data)
    assert (head.pixels, head.decoded_pixels) == (4096, 268_435_456)
    out = prepare([Upload("image 0", data)], SPEC, limits(40_000_000))
    assert out.failures == {0: ("too_large", "image 0: 64x64 = 4096 pixels in 16384x16384 tiles is over the server "
                                             "limit max_pixels=40000000")}
    assert declared(tiled_tiff(64, 64, 256)).decoded_pixels == 65_536  # ordinary tiles count as the tile


def test_sixteen_and_thirty_two_bit_images_weigh_16_bytes_a_pixel():
    for mode, fmt in (("I;16", "PNG"), ("I", "TIFF"), ("F", "TIFF")):
        head = declared(encoded(mode, fmt))
        assert (head.mode, head.bytes_per_pixel, head.budget_pixels) == (mode, 16, 2400), mode


def test_at_the_connection_cap_old_slow_connections_go_before_new_ones():
    """The eviction order of the guarded HTTP protocol, on stand-in connections at a fixed clock: waiting
    for a head past the grace period, then the slowest body past it, then the young ones."""
    import types

    import h11

    from imgembed.serve.server import EVICT_GRACE_S, guarded_protocol

    protocol = guarded_protocol(max_connections=4, header_timeout_s=10)
    now = 100.0

    def conn(name, state, opened=0.0, head_done=0.0, body=0):
        c = types.SimpleNamespace(name=name, _opened=opened, _head_done=head_done, _body_bytes=body, closed=False)
        c.conn = types.SimpleNamespace(their_state=state)
        c.transport = types.SimpleNamespace(is_closing=lambda: c.closed, close=lambda: setattr(c, "closed", True))
        c._waiting = lambda: state is h11.IDLE
        return c

    young = now - EVICT_GRACE_S / 2
    pool = [conn("new client", h11.IDLE, opened=young), conn("new upload", h11.SEND_BODY, head_done=young, body=0),
            conn("old slow body", h11.SEND_BODY, head_done=now - 5, body=10),
            conn("old fast body", h11.SEND_BODY, head_done=now - 5, body=10_000_000),
            conn("old idle", h11.IDLE, opened=now - 3), conn("busy", h11.DONE)]
    me = types.SimpleNamespace(connections=pool, loop=types.SimpleNamespace(time=lambda: now))
    order = []
    while protocol._evict_one(me):
        order.append(next(c.name for c in pool if c.closed and c.name not in order))
    assert order == ["old idle", "old slow body", "old fast body", "new client", "new upload"]  # never "busy"


def test_a_header_over_pillows_own_cap_is_refused_with_its_declared_pixels():
    data = png(5000, 5000)[:200]
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 1_000_000  # Pillow refuses above 2x this: a decompression bomb to it
    try:
        head = declared(data)
        out = prepare([Upload("image 0", data)], SPEC, limits(1_000_000))
    finally:
        Image.MAX_IMAGE_PIXELS = old
    assert (head.width, head.pixels) == (None, 25_000_000)
    assert out.failures == {0: ("too_large", "image 0: 25000000 pixels is over the server limit max_pixels=1000000")}


# --------------------------------------------------------------------------------------------- client
def test_multipart_encoding_round_trips_through_the_server_parser():
    import asyncio

    from starlette.datastructures import Headers
    from starlette.formparsers import MultiPartParser

    body, ctype = encode_multipart([("a.png", b"\x00\x01\r\n--x"), ('we"ird.jpg', b"zz")], {"model": "m"})

    async def parse():
        async def stream():
            yield body
        return await MultiPartParser(Headers({"content-type": ctype}), stream()).parse()

    form = asyncio.run(parse())
    parts = form.getlist("image")
    assert form["model"] == "m"
    assert [(p.filename, asyncio.run(p.read())) for p in parts] == [("a.png", b"\x00\x01\r\n--x"),
                                                                   ("we_ird.jpg", b"zz")]


def test_client_rejects_non_http_urls():
    with pytest.raises(ValueError, match=r"'ftp://x': expected http://HOST:PORT"):
        EmbeddingClient("ftp://x")


def test_missing_serve_extra_names_the_install_command(monkeypatch):
    import importlib.util

    from imgembed.serve import server

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "fastapi" else real(n, *a))
    with pytest.raises(BackendUnavailableError, match=r"needs fastapi, which is not installed: "
                                                      r"pip install 'imgembed\[serve\]'"):
        server.require_serve_extra()


# ------------------------------------------------------------------------------------------------ CLI
def fake_artifact(path: Path, name: str, precision: str) -> Path:
    """A directory with just a manifest (ids are assigned before any model is loaded)."""
    import json

    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps(minimal_manifest(name=name, precision=precision)))
    return path


def test_cli_refuses_duplicate_model_ids_before_loading(tmp_path):
    a, b = fake_artifact(tmp_path / "a", "clip", "int8"), fake_artifact(tmp_path / "b", "clip", "int8")
    result = run_cli("serve", str(a), str(b), "--port", "0", timeout=60)
    assert result.returncode == 1
    assert (f"error (DuplicateModelError): artifacts {a} and {b} both resolve to model id 'clip-int8'; name them "
            "explicitly with ID=PATH") in " ".join(result.stderr.split())


def test_cli_reports_a_missing_artifact_and_a_bad_option(tmp_path):
    result = run_cli("serve", str(tmp_path / "nope"), timeout=60)
    assert result.returncode == 1
    assert f"error (ArtifactError): artifact directory {tmp_path / 'nope'} does not exist" in " ".join(
        result.stderr.split())
    result = run_cli("serve", str(tmp_path), "--max-queue", "4", "--max-images", "8", timeout=60)
    assert result.returncode == 1 and "max_queue=4 is smaller than max_images=8" in result.stderr


def test_importing_the_cli_does_not_import_the_serve_extra():
    import subprocess
    import sys

    code = ("import sys, imgembed, imgembed.cli, imgembed.serve; "
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'starlette', 'prometheus_client') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr


# ------------------------------------------------------------------------------------ bounded decoding
def jpeg(w: int, h: int) -> bytes:
    """A smooth photo-like JPEG (gradients and a few waves)."""
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    rgb = np.stack([x, y, 0.5 + 0.5 * np.sin(12 * x) * np.cos(9 * y)], axis=-1)
    buf = io.BytesIO()
    Image.fromarray((rgb * 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_prepare_refuses_a_request_over_its_pixel_budget_before_decoding():
    uploads = [Upload(f"image {i}", png(300, 200)[:100]) for i in range(3)]  # headers only: never decodable
    with pytest.raises(PayloadTooLargeError, match=r"declare 180000 pixels in all, over the limit of "
                                                   r"max_request_pixels=150000"):
        prepare(uploads, SPEC, limits(100_000, 150_000))


def test_prepare_decodes_much_larger_images_at_reduced_scale_close_to_exact():
    data = jpeg(2400, 1800)  # short edge 1800 >= 4 x the 32-pixel resize target
    exact = prepare([Upload("image 0", data)], SPEC, limits(10_000_000))
    reduced = prepare([Upload("image 0", data)], SPEC, limits(10_000_000, draft_ratio=4))
    from imgembed.preprocess.fast import load_crop

    crop = load_crop(data, SPEC, "fast")
    np.testing.assert_array_equal(reduced.pixels, crops_to_pixels(crop[None], SPEC))
    grey_level = 1 / 255 / min(SPEC.image_std)
    assert np.abs(reduced.pixels - exact.pixels).mean() < 2 * grey_level  # within about one grey level


def test_prepare_stops_once_its_request_is_cancelled():
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(DecodeCancelled):
        prepare([Upload("image 0", png(40, 30))], SPEC, limits(10_000, cancel=cancel))
    with pytest.raises(DecodeCancelled):
        prepare([Upload("image 0", png(40, 30))], SPEC, limits(10_000, deadline=time.monotonic() - 1))


def test_pixel_budget_holds_decodes_beyond_its_capacity_until_others_finish():
    budget, cancel = PixelBudget(100), threading.Event()
    order = []

    def second():
        with budget.hold(60, cancel, time.monotonic() + 10):
            order.append(("second", budget.held))

    with budget.hold(60, cancel, time.monotonic() + 10):
        t = threading.Thread(target=second)
        t.start()
        time.sleep(0.2)
        order.append(("first", budget.held))
    t.join(5)
    assert order == [("first", 60), ("second", 60)] and budget.held == 0
    with budget.hold(1000, cancel, time.monotonic() + 10):  # over the capacity: decodes alone
        assert budget.held == 100
        cancel.set()
        with pytest.raises(DecodeCancelled):
            with budget.hold(1, cancel, time.monotonic() + 10):
                pass


# ----------------------------------------------------------------------------------- JSON pre-check
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet=st.sampled_from(list('ab,"\\\\[]{}: é\n'))),
    lambda kids: st.lists(kids, max_size=5) | st.dictionaries(st.text(alphabet='k,"\\\\', max_size=4), kids,
                                                              max_size=4),
    max_leaves=30)


def values_in(value) -> int:
    """Commas outside strings + 1, computed from the parsed structure."""
    if isinstance(value, list):
        return max(len(value) - 1, 0) + sum(values_in(v) - 1 for v in value) + 1
    if isinstance(value, dict):
        return max(len(value) - 1, 0) + sum(values_in(v) - 1 for v in value.values()) + 1
    return 1


@settings(max_examples=300, deadline=None)
@given(json_values, st.booleans())
def test_count_json_values_counts_the_commas_outside_strings(value, ascii_only):
    body = json.dumps(value, ensure_ascii=ascii_only).encode()
    assert count_json_values(body) == values_in(value)
    assert (count_json_values(body, 3) > 3) == (values_in(value) > 3)  # early stop: the same verdict


def test_parse_json_body_refuses_too_many_values_before_parsing():
    body = b'{"images":[' + b'"a",' * 999 + b'"a"]}'
    with pytest.raises(PayloadTooLargeError, match=r"JSON body holds more than the 80 values a request may have"):
        parse_json_body(body, 80)
    assert len(parse_json_body(body, 1000).images) == 1000


# ----------------------------------------------------------------------------------------- API keys
def test_read_keys_joins_options_file_and_environment(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# team keys\nkey-from-file-0123456789\n\n")
    assert read_keys(["key-from-cli-0123456789"], path, {"IMGEMBED_API_KEY": "key-from-env-0123456789"}) == (
        "key-from-cli-0123456789", "key-from-file-0123456789", "key-from-env-0123456789")
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(ServeConfigError, match=r"api key file .*empty' holds no key"):
        read_keys([], tmp_path / "empty", {})
    with pytest.raises(ServeConfigError, match=r"api key file .*missing': cannot read it"):
        read_keys([], tmp_path / "missing", {})


def test_key_matches_only_an_exact_key():
    keys = [b"k" * 20, b"other-key-0123456789"]
    assert key_matches(b"k" * 20, keys) and key_matches(b"other-key-0123456789", keys)
    assert not key_matches(b"k" * 19, keys) and not key_matches(b"", keys) and not key_matches(None, keys)


@pytest.mark.parametrize("kwargs, message", [
    (dict(api_keys=("short",)), r"every key must be a string of at least 16 characters"),
    (dict(ssl_certfile="c.pem"), r"ssl_certfile and ssl_keyfile go together"),
    (dict(max_decode_pixels=1000, max_pixels=2000), r"max_decode_pixels=1000 is smaller than max_pixels=2000"),
    (dict(max_request_pixels=1000, max_pixels=2000), r"max_request_pixels=1000 is smaller than max_pixels=2000"),
    (dict(header_timeout_s=0), r"header_timeout_s=0: expected a number >= 0.001"),
])
def test_security_options_are_checked(kwargs, message):
    with pytest.raises(ServeConfigError, match=message):
        ServeConfig(**kwargs)


def test_config_never_shows_its_api_keys():
    config = ServeConfig(api_keys=("secret-key-0123456789",))
    assert "secret-key" not in repr(config) and "secret-key" not in json.dumps(config.to_dict())
