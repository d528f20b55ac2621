"""Sandbox latency and throughput: (a) a fresh isolated process per job vs (b) the warm pool, in one run.

A typical job: model-style OpenCV code that reads a 640x480 JPEG, rotates it back, brightens it and writes a JPEG.
(c) is the same OpenCV work done directly in this process, the floor no sandbox can beat.

    python bench/sandbox_latency.py [--jobs 200] [--fresh-jobs 20] [--image PATH]

Prints a markdown table (paste into docs/benchmarks.md) and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from arft_core.config import SandboxConfig
from arft_core.sandbox import SandboxPool

CODE = """import cv2
img = cv2.imread('path_to_input_image.jpg')
img = cv2.rotate(img, cv2.ROTATE_90_COUNTERCLOCKWISE)
img = cv2.convertScaleAbs(img, alpha=1.8, beta=10)
cv2.imwrite('path_to_output_image.jpg', img)
"""


def in_process(src: Path, dst: Path) -> None:
    img = cv2.imread(str(src))
    img = cv2.rotate(img, cv2.ROTATE_90_COUNTERCLOCKWISE)
    img = cv2.convertScaleAbs(img, alpha=1.8, beta=10)
    cv2.imwrite(str(dst), img)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def summary(name: str, latencies_ms: list[float], jobs_per_s: float) -> dict:
    return {"mode": name, "jobs": len(latencies_ms), "p50_ms": round(percentile(latencies_ms, 50), 2),
            "p99_ms": round(percentile(latencies_ms, 99), 2), "mean_ms": round(statistics.mean(latencies_ms), 2),
            "jobs_per_s": round(jobs_per_s, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=200, help="jobs for the warm pool and the in-process floor")
    ap.add_argument("--fresh-jobs", type=int, default=20, help="jobs for the fresh-process mode (slow)")
    ap.add_argument("--workers", type=int, default=2, help="warm workers (the CI machine has 2 cores)")
    ap.add_argument("--image", type=Path, help="input image (default: a 640x480 JPEG made here)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="arft-bench-"))
    src = args.image
    if src is None:
        rng = np.random.default_rng(0)
        base = (rng.random((48, 64, 3)) * 255).astype(np.uint8)
        src = tmp / "typical.jpg"
        Image.fromarray(base).resize((640, 480), Image.BICUBIC).save(src, quality=90)
    cfg = SandboxConfig(workers=args.workers)
    rows = []

    # (a) fresh isolated process per job: start a one-worker sandbox, run the job, tear it down.
    lat = []
    t0 = time.perf_counter()
    for _ in range(args.fresh_jobs):
        start = time.perf_counter()
        with SandboxPool(cfg.model_copy(update={"workers": 1})) as fresh:
            result = fresh.run(CODE, [src], tmp / "a")
        assert result.ok, result.error
        lat.append((time.perf_counter() - start) * 1000)
    rows.append(summary("fresh isolated process per job", lat, args.fresh_jobs / (time.perf_counter() - t0)))

    # (b) warm pool: latency of one job at a time, then throughput with every worker busy.
    with SandboxPool(cfg) as pool:
        missing = pool.missing_layers()
        for _ in range(5):
            pool.run(CODE, [src], tmp / "b")  # warm-up
        lat = []
        t0 = time.perf_counter()
        for _ in range(args.jobs):
            result = pool.run(CODE, [src], tmp / "b")
            assert result.ok, result.error
            lat.append(result.elapsed_ms)
        sequential = summary("warm pool, one job at a time", lat, args.jobs / (time.perf_counter() - t0))
        par_lat: list[float] = []

        def client(n: int) -> None:
            for _ in range(n):
                par_lat.append(pool.run(CODE, [src], Path(tempfile.mkdtemp(dir=tmp))).elapsed_ms)

        threads = [threading.Thread(target=client, args=(args.jobs // args.workers,)) for _ in range(args.workers)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        parallel = summary(f"warm pool, {args.workers} jobs at a time", par_lat,
                           len(par_lat) / (time.perf_counter() - t0))
    rows += [sequential, parallel]

    # (c) the same OpenCV work in this process (no isolation): the floor.
    lat = []
    t0 = time.perf_counter()
    for _ in range(args.jobs):
        start = time.perf_counter()
        in_process(src, tmp / "c.jpg")
        lat.append((time.perf_counter() - start) * 1000)
    rows.append(summary("same work in-process (no sandbox; floor)", lat, args.jobs / (time.perf_counter() - t0)))

    speedup = rows[0]["p50_ms"] / sequential["p50_ms"]
    print(f"input: {src.name} {Image.open(src).size[0]}x{Image.open(src).size[1]}; missing layers: {missing or 'none'}")
    print("| mode | jobs | p50 ms | p99 ms | mean ms | jobs/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['jobs']} | {r['p50_ms']} | {r['p99_ms']} | {r['mean_ms']} | {r['jobs_per_s']} |")
    print(f"warm-pool p50 speed-up over a fresh process: {speedup:.1f}x")
    print(json.dumps({"rows": rows, "speedup_p50": round(speedup, 2), "missing_layers": missing}))
    sys.exit(0)


if __name__ == "__main__":
    main()
