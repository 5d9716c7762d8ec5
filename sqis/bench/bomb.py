"""`sqis bench image-bomb --json`: what decompression bombs cost the fetch/decode path (RSS and time).

Real PNGs of N x N zero pixels (~140 KB at 12000 x 12000), whose FrameRefs claim 320 x 320, fetched
as one batch on ``--threads`` threads from a file:// store; prints one JSON object.
"""

from __future__ import annotations

import hashlib
import json
import struct
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Annotated, Any

import typer

from sqis.bench.pipeline import bench_app


def png_bomb(w: int, h: int) -> bytes:
    """A complete, valid greyscale PNG of w x h zero pixels, never held raw: one block of rows is deflated
    once (raw deflate, ended by a full flush, so it does not depend on what came before) and repeated;
    the zlib header and Adler-32 are added around it. 30000 x 30000 (875 KB) in about half a second."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row = b"\x00" * (w + 1)  # filter byte + w grey pixels
    per_block = max(1, min(h, (8 << 20) // len(row)))
    blocks, rest = divmod(h, per_block)

    def deflated(rows: int) -> bytes:
        c = zlib.compressobj(9, zlib.DEFLATED, -15)
        return c.compress(row * rows) + c.flush(zlib.Z_FULL_FLUSH)

    adler, block = 1, row * per_block
    for _ in range(blocks):
        adler = zlib.adler32(block, adler)
    if rest:
        adler = zlib.adler32(row * rest, adler)
    body = deflated(per_block) * blocks + (deflated(rest) if rest else b"")
    idat = b"\x78\xda" + body + b"\x03\x00" + struct.pack(">I", adler)  # final empty fixed block
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def measure(side: int = 12000, frames: int = 4, threads: int = 4) -> dict[str, Any]:
    import psutil

    from inference_workers.fetch import FrameFetcher
    from infra.objectstore import FileStore

    data = png_bomb(side, side)
    with tempfile.TemporaryDirectory() as d:
        store = FileStore(Path(d).as_uri())
        refs = [{"frame_id": f"00000000-0000-4000-8000-{i:012d}", "uri": store.put(f"b{i}.png", data),
                 "width": 320, "height": 320, "encoding": "png", "size_bytes": len(data),
                 "content_sha256": hashlib.sha256(data).hexdigest()} for i in range(frames)]
        proc = psutil.Process()
        base = proc.memory_info().rss
        peak = [base]
        stop = threading.Event()

        def poll() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], proc.memory_info().rss)
                time.sleep(0.005)

        t = threading.Thread(target=poll, daemon=True)
        t.start()
        f = FrameFetcher(store, threads=threads)
        t0 = time.perf_counter()
        out = f.fetch_all(refs)
        elapsed = time.perf_counter() - t0
        stop.set()
        t.join()
        f.close()
        return {"side_px": side, "file_kib": len(data) // 1024, "frames": frames, "threads": threads,
                "outcomes": [r.error.error_type if r.error else "decoded" for r in out],
                "peak_rss_growth_mb": round((peak[0] - base) / 2**20, 1),
                "rss_held_after_mb": round((proc.memory_info().rss - base) / 2**20, 1),
                "seconds": round(elapsed, 3)}


@bench_app.command("image-bomb")
def bench_image_bomb(
    side: Annotated[int, typer.Option("--side", min=64, max=60000, help="bomb width = height (pixels)")] = 12000,
    frames: Annotated[int, typer.Option("--frames", min=1, max=64, help="bombs in the batch")] = 4,
    threads: Annotated[int, typer.Option("--threads", min=1, max=64, help="fetch threads")] = 4,
) -> None:
    """Fetch a batch of lying PNG bombs through the worker's fetch/decode path; print one JSON object."""
    typer.echo(json.dumps(measure(side, frames, threads)))
