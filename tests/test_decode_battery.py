"""Input battery: hostile and broken inputs through decode -> preprocess -> an exported tiny artifact.

Every input is generated here (no binary fixtures). Each input class either embeds correctly -- checked
against the equivalent clean image: pixels exactly where the format is lossless, within JPEG tolerance
where it is not, and the artifact's embeddings by cosine -- or raises one ImageDecodeError that names
the input and the reason. No other exception, no hang (each input is timed), bounded memory (the
whole battery runs in a subprocess whose peak RSS is checked, which also turns a native crash into a
counted crash instead of a dead test run).

Counts as a report:  python tests/test_decode_battery.py [--artifact DIR] [--json]
"""
from __future__ import annotations

import io
import json
import os
import re
import resource
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also when run as a script
from imgembed.errors import ImageDecodeError  # noqa: E402
from imgembed.preprocess import load_image  # noqa: E402
from tests.helpers import REPO, cli_env, cosine, exported  # noqa: E402

MODEL = "test-clip-tiny"  # shortest-edge resize + center crop: the path extreme aspect ratios stress
PER_INPUT_SECONDS = 10.0
MIN_COSINE = 0.999


# ------------------------------------------------------------------------------------------ encoders
def _enc(arr_or_img: Any, fmt: str, **kw) -> bytes:
    """Encode a uint8 array or PIL image with PIL."""
    img = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _chunk(ctype: bytes, data: bytes) -> bytes:
    """One PNG chunk with a correct CRC."""
    return struct.pack(">I", len(data)) + ctype + data + struct.pack(">I", zlib.crc32(ctype + data))


def _png(width: int, height: int, raw: bytes = b"", depth: int = 8, color: int = 2) -> bytes:
    """A hand-built PNG: any declared size, ``raw`` (filtered scanlines) as the only IDAT payload."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw))
            + _chunk(b"IEND", b""))


def _photo() -> np.ndarray:
    """A smooth natural 128x128 photo (scikit-image astronaut), the clean reference of lossy cases."""
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[::4, ::4])


def _noise(h: int, w: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    """Seeded uint8 noise, HxWxC (or HxW for channels=0)."""
    shape = (h, w, channels) if channels else (h, w)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _palette_frames(n: int, h: int = 30, w: int = 40) -> list[np.ndarray]:
    """RGB frames drawn from a 16-colour palette, so GIF / palette encoders store them losslessly."""
    rng = np.random.default_rng(7)
    pal = rng.integers(0, 256, (16, 3), dtype=np.uint8)
    return [pal[rng.integers(0, 16, (h, w))] for _ in range(n)]


# EXIF orientation -> the displayed image, computed with numpy (independently of PIL's exif_transpose).
ORIENT = {
    2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2), 8: lambda a: np.rot90(a, 1),
}


def _exif(orientation: int) -> bytes:
    """An EXIF block holding only the Orientation tag."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


# --------------------------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    """One input class. ``make(tmp)`` returns (input, reference): for "exact" / "close" the reference is
    the clean HxWx3 uint8 image the input must decode to; for "error" a regex of the reason."""

    name: str
    expect: str                      # "exact" | "close" | "error"
    make: Callable[[Path], tuple[Any, Any]]
    mean_tol: float = 0.0            # "close": mean |pixel difference| allowed (JPEG tolerance)
    load_kw: dict = field(default_factory=dict)


def _file(tmp: Path, fname: str, data: bytes) -> Path:
    """Write ``data`` to ``tmp/fname`` and return the path (path inputs are named in errors by file name)."""
    path = tmp / fname
    path.write_bytes(data)
    return path


def _lossless_cases() -> list[Case]:
    """Inputs that must decode to exactly the reference pixels."""
    def gif(tmp):
        f = _palette_frames(3)
        data = _enc(f[0], "GIF", save_all=True, append_images=[Image.fromarray(x) for x in f[1:]], duration=40)
        return _file(tmp, "anim.gif", data), np.asarray(load_image(_enc(f[0], "PNG")))  # frame 0 as PNG

    def webp(tmp):
        f = _palette_frames(3)
        data = _enc(f[0], "WEBP", save_all=True, append_images=[Image.fromarray(x) for x in f[1:]], lossless=True)
        return _file(tmp, "anim.webp", data), f[0]

    def palette(tmp):
        idx, pal = _noise(24, 20, 3, channels=0) % 4, [255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9]
        img = Image.fromarray(idx.astype(np.uint8), mode="P")
        img.putpalette(pal)
        data = _enc(img, "PNG", transparency=3)
        return _file(tmp, "palette-trns.png", data), np.array(pal, np.uint8).reshape(4, 3)[idx]

    def sixteen(tmp):
        vals = (_noise(16, 24, 4, channels=0).astype(np.uint16) * 256 + np.arange(24, dtype=np.uint16))
        expected = np.repeat((vals >> 8).astype(np.uint8)[..., None], 3, 2)  # scaled >> 8, not clipped
        return _file(tmp, "gray16.png", _enc(Image.fromarray(vals), "PNG")), expected

    rgb, gray = _noise(40, 50, 1), _noise(40, 50, 2, channels=0)
    rgba = _noise(40, 50, 3, channels=4)
    cases = [
        Case("png_rgb", "exact", lambda t: (_file(t, "rgb.png", _enc(rgb, "PNG")), rgb)),
        Case("png_grayscale_L", "exact", lambda t: (_file(t, "gray.png", _enc(gray, "PNG")),
                                                   np.repeat(gray[..., None], 3, 2))),
        Case("png_gray_alpha_LA", "exact", lambda t: (_enc(Image.fromarray(gray).convert("LA"), "PNG"),
                                                     np.repeat(gray[..., None], 3, 2))),
        Case("png_rgba_alpha_dropped", "exact", lambda t: (_file(t, "rgba.png", _enc(rgba, "PNG")), rgba[..., :3])),
        Case("png_palette_transparency", "exact", palette),
        Case("png_16bit_gray", "exact", sixteen),
        Case("png_1x1", "exact", lambda t: (_enc(rgb[:1, :1], "PNG"), rgb[:1, :1])),
        Case("png_wide_20000x20", "exact", lambda t: (_file(t, "wide.png", _enc(_noise(20, 20000, 5), "PNG")),
                                                     _noise(20, 20000, 5))),
        Case("png_tall_20x20000", "exact", lambda t: (_file(t, "tall.png", _enc(_noise(20000, 20, 6), "PNG")),
                                                     _noise(20000, 20, 6))),
        Case("png_line_100000x1", "exact", lambda t: (_file(t, "line.png", _enc(_noise(1, 100000, 8), "PNG")),
                                                     _noise(1, 100000, 8))),
        Case("gif_animated_first_frame", "exact", gif),
        Case("gif_200_frames_first_frame", "exact", lambda t: (_enc(
            _palette_frames(1)[0], "GIF", save_all=True,
            append_images=[Image.fromarray(f) for f in _palette_frames(199)]), _palette_frames(1)[0])),
        Case("webp_animated_lossless_first_frame", "exact", webp),
        Case("webp_lossless", "exact", lambda t: (_enc(rgb, "WEBP", lossless=True), rgb)),
        Case("bmp_rgb", "exact", lambda t: (_file(t, "x.bmp", _enc(rgb, "BMP")), rgb)),
        Case("tiff_lzw_multipage_first_page", "exact", lambda t: (_file(t, "x.tif", _enc(
            rgb, "TIFF", compression="tiff_lzw", save_all=True, append_images=[Image.fromarray(rgb[::-1])])), rgb)),
    ]
    for o, f in ORIENT.items():  # lossless EXIF rotation: PNG eXIf chunk, reference rotated with numpy
        cases.append(Case(f"png_exif_orientation_{o}", "exact",
                          lambda t, o=o, f=f: (_enc(rgb, "PNG", exif=_exif(o)), np.ascontiguousarray(f(rgb)))))
    return cases


def _lossy_cases() -> list[Case]:
    """JPEG inputs: compared with the clean equivalent within JPEG tolerance (mean |diff| in levels)."""
    photo = _photo()

    def progressive(tmp):  # against the baseline JPEG of the same pixels
        return (_file(tmp, "progressive.jpg", _enc(photo, "JPEG", quality=90, progressive=True)),
                np.asarray(Image.open(io.BytesIO(_enc(photo, "JPEG", quality=90))).convert("RGB")))

    def exif_rotated(tmp):  # against the JPEG of the pre-rotated pixels
        upright = np.ascontiguousarray(np.rot90(photo, -1))
        return (_file(tmp, "rotated.jpg", _enc(photo, "JPEG", quality=95, exif=_exif(6))),
                np.asarray(Image.open(io.BytesIO(_enc(upright, "JPEG", quality=95))).convert("RGB")))

    def cmyk(tmp):  # PIL's RGB->CMYK is exact (k=0), so the decoded CMYK JPEG must come back to the photo
        return _file(tmp, "cmyk.jpg", _enc(Image.fromarray(photo).convert("CMYK"), "JPEG", quality=95)), photo

    gray = np.asarray(Image.fromarray(photo).convert("L"))
    return [
        Case("jpeg_baseline", "close", lambda t: (_file(t, "base.jpg", _enc(photo, "JPEG", quality=95)), photo), 4),
        Case("jpeg_progressive_vs_baseline", "close", progressive, 0.5),
        Case("jpeg_exif_rotated_vs_prerotated", "close", exif_rotated, 3),
        Case("jpeg_cmyk", "close", cmyk, 4),
        Case("jpeg_grayscale", "close", lambda t: (_enc(gray, "JPEG", quality=95),
                                                   np.repeat(gray[..., None], 3, 2)), 3),
        Case("jpeg_420_subsampled", "close", lambda t: (_enc(photo, "JPEG", quality=90, subsampling=2), photo), 5),
    ]


def _patched(data: bytes, at: int, new: bytes) -> bytes:
    """``data`` with ``new`` written over it at offset ``at``."""
    return data[:at] + new + data[at + len(new):]


def _bomb_cases() -> list[Case]:
    """Small files declaring huge sizes: refused from the header, before any pixel is decoded."""
    jpeg, gif = _enc(_photo(), "JPEG"), _enc(_palette_frames(1)[0], "GIF")
    sof = jpeg.find(b"\xff\xc0")
    webp = _enc(_noise(8, 8, 9), "WEBP", lossless=True)
    vp8l = webp.find(b"VP8L") + 9
    bits = (struct.unpack("<I", webp[vp8l:vp8l + 4])[0] & ~((1 << 28) - 1)) | 16383 | (16383 << 14)
    pix = r"too many pixels"
    return [
        Case("bomb_png_100000x100000", "error", lambda t: (_file(t, "bomb.png", _png(100000, 100000)), pix)),
        Case("bomb_png_9000x9000_over_max_pixels", "error", lambda t: (
            _file(t, "bomb9k.png", _png(9000, 9000)), r"too many pixels: 9000x9000 = 81000000 > max_pixels=64000000")),
        Case("bomb_jpeg_65000x65000", "error", lambda t: (_patched(jpeg, sof + 5, struct.pack(">HH", 65000, 65000)),
                                                          pix)),
        Case("bomb_gif_65535x65535", "error", lambda t: (_patched(gif, 6, struct.pack("<HH", 65535, 65535)), pix)),
        Case("bomb_bmp_100000x100000", "error", lambda t: (
            _patched(_enc(_noise(4, 4, 9), "BMP"), 18, struct.pack("<ii", 100000, 100000)), pix)),
        Case("bomb_webp_16384x16384", "error", lambda t: (_patched(webp, vp8l, struct.pack("<I", bits)), pix)),
    ]


def _corrupt_cases() -> list[Case]:
    """Empty, truncated, corrupt and unsupported inputs."""
    photo = _photo()
    jpeg, png = _enc(photo, "JPEG", quality=90), _enc(photo, "PNG")
    good = _png(4, 4, b"".join(b"\x00" + bytes(12) for _ in range(4)))
    k = good.find(b"IDAT")
    n = struct.unpack(">I", good[k - 4:k])[0]
    bad_idat = bytes(x ^ 0x55 for x in good[k + 4:k + 4 + n])
    corrupt_idat = good[:k + 4] + bad_idat + struct.pack(">I", zlib.crc32(b"IDAT" + bad_idat)) + good[k + 8 + n:]
    trunc, unsupported = r"truncated or corrupt image data", r"unsupported format \({}\); imgembed decodes only"
    return [
        Case("zero_byte_file", "error", lambda t: (_file(t, "empty.jpg", b""), r"empty file \(0 bytes\)")),
        Case("random_bytes", "error", lambda t: (_file(t, "noise.png", _noise(1, 999, 10, 0).tobytes()),
                                                 r"not an image or unidentified format")),
        Case("text_named_jpg", "error", lambda t: (_file(t, "notes.jpg", b"hello\n" * 50),
                                                   r"not an image or unidentified format")),
        Case("svg_text", "error", lambda t: (_file(t, "logo.svg", b'<svg xmlns="http://www.w3.org/2000/svg"/>'),
                                             unsupported.format("SVG image"))),
        Case("pdf_header", "error", lambda t: (_file(t, "doc.pdf", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n"),
                                               unsupported.format("PDF document"))),
        Case("html_page", "error", lambda t: (b"<!DOCTYPE html><html><body>hi</body></html>",
                                              unsupported.format("HTML page"))),
        Case("heic_header", "error", lambda t: (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic",
                                                unsupported.format("HEIC image"))),
        Case("ico_pil_readable_refused", "error", lambda t: (_file(t, "x.ico", _enc(photo, "ICO")),
                                                             unsupported.format("ICO image"))),
        Case("eps_ghostscript_refused", "error", lambda t: (
            _file(t, "x.eps", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"),
            unsupported.format("EPS image"))),
        Case("psd_header_refused", "error", lambda t: (b"8BPS\x00\x01" + bytes(6) + b"\x00\x03" + bytes(30),
                                                       unsupported.format("PSD image"))),
        Case("ppm_refused", "error", lambda t: (_enc(photo, "PPM"), unsupported.format("PPM image"))),
        Case("tga_unidentified", "error", lambda t: (_enc(photo, "TGA"), r"not an image or unidentified format")),
        Case("truncated_jpeg", "error", lambda t: (_file(t, "cut.jpg", jpeg[:len(jpeg) // 2]), trunc)),
        Case("truncated_png", "error", lambda t: (_file(t, "cut.png", png[:len(png) // 2]), trunc)),
        Case("truncated_gif", "error", lambda t: (_enc(photo, "GIF")[:3000], trunc)),
        Case("jpeg_header_only", "error", lambda t: (jpeg[:200], r"cannot read image|truncated")),
        Case("jpeg_sof_zero_components", "error", lambda t: (_patched(jpeg, jpeg.find(b"\xff\xc0") + 9, b"\x00"),
                                                             r"corrupt or invalid JPEG header")),
        Case("png_bad_ihdr_crc", "error", lambda t: (_patched(png, 29, bytes([png[29] ^ 0xFF])),
                                                     r"corrupt or invalid PNG header \(SyntaxError: broken PNG")),
        Case("png_zero_width", "error", lambda t: (_png(0, 10), r"corrupt or invalid PNG header")),
        Case("png_corrupt_idat_zlib", "error", lambda t: (corrupt_idat, trunc)),
        Case("path_dev_zero", "error", lambda t: ("/dev/zero", r"not a regular file")),
        Case("path_fifo_no_hang", "error", lambda t: (_fifo(t), r"not a regular file")),
        Case("decode_deadline_exceeded", "error", lambda t: (  # 4 MB of PNG cannot decode in 0.1 ms
            _file(t, "slow.png", _enc(_noise(1200, 1200, 11), "PNG", compress_level=1)),
            r"decoding took longer than max_seconds=0.0001"), load_kw={"max_seconds": 1e-4}),
    ]


def _fifo(tmp: Path) -> Path:
    """A named pipe with an image suffix: opening it for reading would block forever."""
    path = tmp / "pipe.jpg"
    os.mkfifo(path)
    return path


CASES = _lossless_cases() + _lossy_cases() + _bomb_cases() + _corrupt_cases()


# ---------------------------------------------------------------------------------------------- runner
def _input_name(item: Any) -> str:
    """What an error message must contain to name ``item``."""
    return os.path.basename(os.fspath(item)) if isinstance(item, (str, os.PathLike)) else \
        f"bytes input ({len(item)} bytes)"


def run_case(case: Case, tmp: Path, embedder) -> dict:
    """Run one input class; returns {"outcome": ok|error|crash|hang, "matched": bool, "detail": str}."""
    tmp.mkdir(parents=True, exist_ok=True)
    item, ref = case.make(tmp)
    t0 = time.perf_counter()
    try:
        img = load_image(item, **case.load_kw)
        vec = embedder.embed([item])[0]
        outcome, detail = "ok", _compare(case, np.asarray(img), ref, vec, embedder)
    except ImageDecodeError as e:
        outcome, detail = "error", _check_error(case, item, ref, str(e))
    except Exception as e:  # noqa: BLE001 - anything else is a crash, which the battery counts
        outcome, detail = "crash", f"{type(e).__name__}: {e}"
    seconds = time.perf_counter() - t0
    if seconds > PER_INPUT_SECONDS:
        outcome, detail = "hang", f"took {seconds:.1f} s"
    expected = "error" if case.expect == "error" else "ok"
    return {"name": case.name, "expect": case.expect, "outcome": outcome, "seconds": round(seconds, 3),
            "matched": outcome == expected and not detail, "detail": detail}


def _check_error(case: Case, item: Any, ref: Any, message: str) -> str:
    """'' if the error was expected and its message names the input and matches the reason."""
    if case.expect != "error":
        return f"expected an image, got ImageDecodeError: {message}"
    if _input_name(item) not in message:
        return f"message {message!r} does not name the input {_input_name(item)!r}"
    return "" if re.search(ref, message) else f"message {message!r} does not match {ref!r}"


def _compare(case: Case, got: np.ndarray, ref: Any, vec: np.ndarray | None, embedder) -> str:
    """'' if ``got`` matches the clean reference (pixels, then embeddings); else what differs."""
    if case.expect == "error":
        return f"decoded to {got.shape} but an ImageDecodeError was expected"
    if got.shape != ref.shape:
        return f"shape {got.shape} != reference {ref.shape}"
    diff = np.abs(got.astype(np.int16) - ref.astype(np.int16))
    if case.expect == "exact" and diff.max() != 0:
        return f"pixels differ from the clean image (max |diff| {diff.max()})"
    if case.expect == "close" and diff.mean() > case.mean_tol:
        return f"mean |diff| {diff.mean():.2f} > {case.mean_tol} levels"
    cos = cosine(vec, embedder.embed([np.ascontiguousarray(ref)])[0])
    return "" if cos >= MIN_COSINE else f"embedding cosine {cos:.5f} < {MIN_COSINE} vs the clean image"


def run_battery(artifact: Path, tmp: Path) -> dict:
    """Every case; the summary the lead quotes (inputs tried, crashes, outcome per class) plus peak RSS."""
    import imgembed

    emb = imgembed.load(artifact)
    results = [run_case(c, tmp / c.name, emb) for c in CASES]
    count = lambda key, val: sum(r[key] == val for r in results)  # noqa: E731
    return {"inputs": len(results), "crashes": count("outcome", "crash"), "hangs": count("outcome", "hang"),
            "embedded_ok": count("outcome", "ok"), "typed_errors": count("outcome", "error"),
            "unexpected": sum(not r["matched"] for r in results),
            "max_rss_mb": _peak_rss_mb(),
            "results": results}


def _peak_rss_mb() -> int:
    """This process's peak resident memory. Linux: VmHWM, which execve resets (ru_maxrss would include
    the memory of the parent that forked us, e.g. a pytest process holding torch)."""
    try:
        status = Path("/proc/self/status").read_text()
        return round(int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024)
    except (OSError, AttributeError):
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


# ----------------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def embedder(artifact_dir):
    """The tiny CLIP artifact on ONNX Runtime."""
    import imgembed

    return imgembed.load(artifact_dir(MODEL))


@pytest.mark.timeout(120)  # a regression that blocks (e.g. opening the FIFO) fails instead of hanging the run
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_battery_case(case, embedder, tmp_path):
    """Each input class meets its expected outcome (clean-image match, or one named typed error)."""
    result = run_case(case, tmp_path, embedder)
    assert result["outcome"] != "crash", result["detail"]
    assert result["matched"], f"{case.name}: expected {case.expect}, got {result['outcome']}: {result['detail']}"


def test_battery_subprocess_counts_no_crash_bounded_memory(artifact_dir):
    """The whole battery in a fresh process: 0 crashes (native ones included), 0 hangs, all as expected,
    peak RSS under 1 GB. Prints the counts table."""
    artifact = artifact_dir(MODEL)
    proc = subprocess.run([sys.executable, __file__, "--artifact", str(artifact), "--json"], cwd=REPO,
                          env=cli_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode in (0, 1), f"battery process died (rc {proc.returncode}): {proc.stderr[-2000:]}"
    summary = json.loads(proc.stdout)
    print("\n" + format_summary(summary))
    assert summary["inputs"] == len(CASES) >= 50
    assert (summary["crashes"], summary["hangs"], summary["unexpected"]) == (0, 0, 0), format_summary(summary)
    assert summary["embedded_ok"] == sum(c.expect != "error" for c in CASES)
    assert summary["max_rss_mb"] < 1024, f"peak RSS {summary['max_rss_mb']} MB"


def test_decode_deadline_is_checked_between_chunks(monkeypatch):
    """A decode that keeps reading is stopped at the first read after the deadline (fake clock: +1 s per
    call), long before it could finish; the same bytes decode fine on the real clock."""
    import types

    import imgembed.preprocess.guard as guard

    data = _enc(_noise(600, 600, 12), "PNG", compress_level=1)  # ~1 MB: ~17 reads of 64 KiB
    clock = {"t": 0.0}

    def tick() -> float:
        clock["t"] += 1.0
        return clock["t"]

    monkeypatch.setattr(guard, "time", types.SimpleNamespace(monotonic=tick))
    with pytest.raises(ImageDecodeError, match=r"bytes input .*decoding took longer than max_seconds=5") as ei:
        load_image(data, max_seconds=5)
    assert ei.value.__cause__ is None
    assert clock["t"] == 7  # deadline = 1 + 5 set at t=1; reads at t=2..6 pass, the one at t=7 fails
    monkeypatch.undo()
    assert load_image(data, max_seconds=5).size == (600, 600)


def test_extreme_aspect_ratio_matches_full_resize_within_2_levels():
    """The bounded path for extreme aspect ratios (only the crop region is resampled) agrees with HF's
    full resize + crop on natural images, for every filter that is not nearest, including zero padding."""
    import imgembed.preprocess.transforms as P

    photo = Image.fromarray(_photo())
    worst = 0
    for w, h in [(20000, 20), (20, 20000), (2000, 3), (3, 2000), (64, 5000), (640, 50)]:
        img = photo.resize((w, h), resample=2)
        for se, crop in [(64, (64, 64)), (50, (80, 60))] + ([(224, (224, 224))] if max(w, h) < 1000 else []):
            rh, rw = P.shortest_edge_hw(h, w, se)
            for resample in (1, 2, 3):
                full = P.center_crop(np.asarray(img.resize((rw, rh), resample=resample)), *crop)
                bounded = P.crop_of_resized(img, (rh, rw), crop, resample)
                worst = max(worst, int(np.abs(full.astype(int) - bounded).max()))
    assert worst <= 2


def test_extreme_aspect_ratio_memory_is_bounded():
    """1 x 1,000,000 px: HF's resize would need 64 x 64,000,000 px (12 GB); ours stays small and exact in
    shape, and the line's content shows in the crop. (Its time bound: benchmarks/speed_bounds.py.)"""
    import imgembed.preprocess as P
    from imgembed.models.registry import get_spec

    line = np.zeros((1, 1_000_000, 3), np.uint8)
    line[:, 500_000 - 8:500_000 + 8] = 255  # a white segment in the middle, inside the center crop
    out = P.preprocess(load_image(line), get_spec(MODEL).preprocess)
    assert out.shape == (3, 64, 64) and np.isfinite(out).all()
    spec = get_spec(MODEL).preprocess
    white = (1.0 - spec.image_mean[0]) / spec.image_std[0]
    assert np.isclose(out[0].max(), white, atol=0.05)


# ------------------------------------------------------------------------------------------------ script
def format_summary(summary: dict) -> str:
    """The counts table: one line per input class, then the totals."""
    lines = [f"{'input class':44} {'expected':8} {'outcome':8} {'s':>6}  detail"]
    for r in summary["results"]:
        lines.append(f"{r['name']:44} {r['expect']:8} {r['outcome']:8} {r['seconds']:6.2f}  "
                     f"{'ok' if r['matched'] else 'UNEXPECTED: ' + r['detail']}")
    lines.append(f"inputs tried {summary['inputs']}, embedded correctly {summary['embedded_ok']}, typed "
                 f"ImageDecodeError {summary['typed_errors']}, crashes {summary['crashes']}, hangs "
                 f"{summary['hangs']}, unexpected {summary['unexpected']}, peak RSS {summary['max_rss_mb']} MB")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """Run the battery; print the table (or JSON with --json). Exits 1 if anything was unexpected."""
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", type=Path, help=f"artifact dir [default: export {MODEL} now]")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        summary = run_battery(args.artifact or exported(MODEL), Path(tmp))
    print(json.dumps(summary, indent=1) if args.json else format_summary(summary))
    return 0 if summary["unexpected"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
