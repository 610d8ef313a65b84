"""PNG encoding on several cores, so that encoding the answer is a small part of a request's time.

Pillow deflates a PNG on one core, which at 1024 px takes a few percent of a fast compiled generation. Here the image is
cut into bands of rows, and each band is filtered with numpy (per row the PNG filter, of None, Sub and Up, whose bytes
sum smallest in absolute value, the heuristic the PNG specification suggests) and deflated in its own thread (numpy
and zlib release the GIL); the bands join into one zlib stream, as pigz does: each band but the last ends on a sync
flush, so the raw deflate streams concatenate, and the bands' Adler-32 checksums combine into the stream's. The
output is an ordinary PNG. Deflate is Intel's ISA-L (`isal`, in the `serve` extra) where it is installed: at level
1 several times faster than zlib for the same size (benchmarks/png_bench.py); zlib otherwise.
"""

from __future__ import annotations

import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np

try:
    from isal import isal_zlib as deflate  # the same API as zlib's
except ImportError:  # pragma: no cover - the serve extra installs it
    deflate = zlib

BAND_BYTES = 256 * 1024  # rows per band: enough data that compression loses almost nothing at band seams
# level 1: several times faster than zlib's default (6) on smooth images, for a slightly larger file (measured:
# benchmarks/results/serve-sdxl1024-h200/README.md); an answer's latency matters more than its size. ISA-L has
# levels 0-3, zlib 0-9: 1 is a fast level of both
LEVEL = 1
_pool: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=max(1, min(16, os.cpu_count() or 1)), thread_name_prefix="png")
    return _pool


def _filtered(pixels: np.ndarray, above: np.ndarray | None) -> np.ndarray:
    """(h, 1 + W*C) uint8: each row's filter type byte, then the row filtered by it (None, Sub or Up; Paeth and
    Average need wider arithmetic, several times the time, for little gain on generated images). `above`: the row
    before the first one (None for the image's first row), which Up reads."""
    h, w, c = pixels.shape
    x = pixels.reshape(h, w * c)
    sub = np.empty_like(x)
    sub[:, :c] = x[:, :c]
    np.subtract(x[:, c:], x[:, :-c], out=sub[:, c:])  # modulo 256, as PNG's filters are
    up = np.empty_like(x)
    if above is None:
        up[0] = x[0]
    else:
        np.subtract(x[0], above.reshape(w * c), out=up[0])
    np.subtract(x[1:], x[:-1], out=up[1:])
    candidates = (x, sub, up)
    # the size of each filtered byte as a signed number: min(v, 256 - v)
    cost = np.stack([np.minimum(f, np.negative(f)).sum(axis=1, dtype=np.uint32) for f in candidates])
    best = cost.argmin(axis=0)
    out = np.empty((h, 1 + w * c), np.uint8)
    out[:, 0] = best  # the filter types 0, 1, 2
    for kind, filtered in enumerate(candidates):
        rows = best == kind
        out[rows, 1:] = filtered[rows]
    return out


def _band(pixels: np.ndarray, start: int, stop: int, level: int) -> tuple[bytes, int, int]:
    """Rows [start, stop) filtered and deflated (ending on a sync flush unless they are the last), the Adler-32
    of the filtered bytes and their length: a band's whole work, so bands run in parallel (numpy and zlib release
    the GIL)."""
    data = _filtered(pixels[start:stop], pixels[start - 1] if start else None).tobytes()
    last = stop == pixels.shape[0]
    compressor = deflate.compressobj(level, deflate.DEFLATED, -15)
    deflated = compressor.compress(data) + compressor.flush(deflate.Z_FINISH if last else deflate.Z_SYNC_FLUSH)
    return deflated, deflate.adler32(data), len(data)


def _adler32_combine(a: int, b: int, length_b: int) -> int:
    """The Adler-32 of two byte strings joined, from theirs and the second's length (zlib's adler32_combine)."""
    base = 65521
    a1, a2 = a & 0xFFFF, (a >> 16) & 0xFFFF
    b1, b2 = b & 0xFFFF, (b >> 16) & 0xFFFF
    s1 = (a1 + b1 - 1) % base
    s2 = (a2 + b2 + (length_b % base) * (a1 - 1)) % base  # b's sums started from 1, not from a's
    return (s2 << 16) | s1


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(pixels: np.ndarray, level: int = LEVEL) -> bytes:
    """The PNG of a uint8 array (H, W) gray, (H, W, 3) RGB or (H, W, 4) RGBA; lossless."""
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    h, w, c = pixels.shape
    color_type = {1: 0, 3: 2, 4: 6}[c]
    bands = max(1, min(h, pixels.nbytes // BAND_BYTES))
    edges = np.linspace(0, h, bands + 1).astype(int).tolist()
    spans = list(zip(edges[:-1], edges[1:]))
    if len(spans) == 1:
        parts = [_band(pixels, 0, h, level)]
    else:
        parts = list(_executor().map(lambda span: _band(pixels, *span, level), spans))
    adler = parts[0][1]
    for _, part_adler, length in parts[1:]:
        adler = _adler32_combine(adler, part_adler, length)
    deflated = [part for part, _, _ in parts]
    stream = b"\x78\x9c" + b"".join(deflated) + struct.pack(">I", adler & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", stream) + _chunk(b"IEND", b"")


__all__ = ["encode_png"]
