"""MAT-Coding data engine throughput: finished items per second (synthetic source, teacher fixes verified in
the sandbox), with one worker and with one worker per core, in one run.

    python bench/data_throughput.py [--items 600]

Prints a markdown table (paste into docs/benchmarks.md) and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from arft_core.config import DataConfig
from arft_core.data.mat_coding import generate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=600, help="items per run (train; a fifth more for test)")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    rows = []
    with tempfile.TemporaryDirectory(prefix="arft-bench-data-") as tmp:
        for workers in sorted({1, cores}):
            cfg = DataConfig(n_train=args.items, n_test=args.items // 5, workers=workers)
            report = generate(cfg, Path(tmp) / f"w{workers}", Path(tmp))
            n = sum(m["n"] for m in report["manifests"].values())
            rows.append({"workers": workers, "items": n, "seconds": report["seconds"],
                         "items_per_s": report["items_per_second"],
                         "items_per_s_per_core": round(report["items_per_second"] / min(workers, cores), 2),
                         "reject_rate": report["reject_rate"], "candidates": report["candidates"]})
    print(f"synthetic source, {DataConfig().synthetic_size[0]}x{DataConfig().synthetic_size[1]} scenes, "
          f"teacher verified in the sandbox; {cores} cores")
    print("| workers | items | seconds | items/s | items/s per core | reject rate |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r['items']} | {r['seconds']} | {r['items_per_s']} | {r['items_per_s_per_core']} | "
              f"{r['reject_rate']:.1%} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
