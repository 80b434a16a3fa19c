"""Feature-store benchmark: write speed, flat memory at two sizes, and the time that resume and incremental runs save.

    python benchmarks/store_bench.py            # ~4 min on 2 cores
    python benchmarks/store_bench.py --quick    # smaller sizes, ~1.5 min

Every measurement runs in a fresh child process so that its peak RSS (from wait4) is its own. Prints a table and
writes JSON (default data/benchmarks/store.json). Parts:
1. writer: synthetic unit-norm rows (dim 1280, batches of 256) written through StoreWriter at two sizes (10x apart);
   MB/s and peak RSS, for float32, float16, lzf and shards.
2. extract: `python -m pipeline extract` on N and 10N images; peak RSS ratio (target <= 1.3).
3. resume: a full run; a run SIGKILLed half way then rerun (time of the rerun vs the full run); an incremental run
   after adding 10% new images; and a rerun with nothing changed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from images import write_digit_images  # benchmarks/images.py

REPO = Path(__file__).resolve().parents[1]
WRITE_CHILD = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    from pipeline.store.reuse import Listing
    from pipeline.store.writer import StoreWriter
    out, n, dim, dtype, compression, shard_rows = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], \\
        sys.argv[5], (int(sys.argv[6]) or None)
    listing = Listing(ids=[f"img/{k:09d}.jpg" for k in range(n)], labels=np.zeros(n, dtype=np.int64),
                      splits=["train"] * n, stamps=np.zeros((n, 2), dtype=np.int64))
    rng = np.random.default_rng(0)
    block = rng.normal(size=(256, dim)).astype(np.float32)
    block /= np.linalg.norm(block, axis=1, keepdims=True)
    start = time.perf_counter()
    with StoreWriter(out, listing=listing, dim=dim, attrs={"cache_key": "bench", "class_names": '["a"]'},
                     feature_dtype=dtype, compression=compression, shard_rows=shard_rows) as w:
        todo = w.prepare()
        for s in range(0, n, 256):
            pos = todo[s:s + 256]
            w.write(pos, block[:len(pos)], ["0" * 32] * len(pos))
        w.finish()
    print(json.dumps({"seconds": time.perf_counter() - start}))
""")


def run_child(argv: list[str], *, kill_at: int | None = None) -> dict:
    """Run a child; return its wall time, peak RSS (MiB) and stdout. With `kill_at`, SIGKILL it once it has
    committed that many rows (read from its -v log)."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    err = []
    for line in proc.stderr:  # drain as it comes: a full pipe would block the child
        err.append(line)
        found = re.search(r"committed (\d+) of", line)
        if kill_at is not None and found and int(found.group(1)) >= kill_at:
            proc.send_signal(signal.SIGKILL)
            break
    out = proc.stdout.read()
    err = "".join(err) + proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if kill_at is None and proc.returncode != 0:
        raise SystemExit(f"child failed ({proc.returncode}): {' '.join(argv)}\n{err[-2000:]}")
    return {"seconds": seconds, "peak_rss_mib": usage.ru_maxrss / 1024, "stdout": out, "returncode": proc.returncode}


def bench_writer(tmp: Path, sizes: tuple[int, int], dim: int) -> list[dict]:
    rows = []
    variants = [("float32", "none", 0, sizes[0]), ("float32", "none", 0, sizes[1]), ("float16", "none", 0, sizes[1]),
                ("float32", "lzf", 0, sizes[1]), ("float32", "none", sizes[1] // 8, sizes[1])]
    for dtype, compression, shard_rows, n in variants:
        out = tmp / f"w_{dtype}_{compression}_{shard_rows}_{n}.h5"
        r = run_child([sys.executable, "-c", WRITE_CHILD, str(out), str(n), str(dim), dtype, compression,
                       str(shard_rows)])
        seconds = json.loads(r["stdout"])["seconds"]
        size = out.stat().st_size + sum(p.stat().st_size for p in (tmp / (out.name + ".shards")).glob("*.h5"))
        raw_mb = n * dim * 4 / 1e6
        rows.append({"rows": n, "dim": dim, "dtype": dtype, "compression": compression, "shard_rows": shard_rows,
                     "seconds": round(seconds, 3), "raw_MB_per_s": round(raw_mb / seconds, 1),
                     "file_MB": round(size / 1e6, 1), "peak_rss_mib": round(r["peak_rss_mib"], 1)})
        shutil.rmtree(tmp / (out.name + ".shards"), ignore_errors=True)
        out.unlink()
    return rows


def extract_argv(data: Path, out: Path, backbone: str, workers: int) -> list[str]:
    argv = [sys.executable, "-m", "pipeline", "-v", "extract", "--data", str(data), "--out", str(out),
            "--backbone", backbone, "--workers", str(workers), "--batch-size", "32"]
    return argv + (["--random-init"] if backbone.startswith("timm:test_") else [])


def bench_extract_memory(tmp: Path, sizes: tuple[int, int], backbone: str, workers: int) -> list[dict]:
    rows = []
    for n in sizes:
        data = tmp / f"imgs_{n}"
        write_digit_images(data, n)
        r = run_child(extract_argv(data, tmp / f"mem_{n}.h5", backbone, workers))
        rows.append({"images": n, "seconds": round(r["seconds"], 1), "peak_rss_mib": round(r["peak_rss_mib"], 1),
                     "images_per_s": round(n / r["seconds"], 1)})
    return rows


def bench_resume(tmp: Path, n: int, backbone: str, workers: int) -> dict:
    data = tmp / "imgs_resume"
    write_digit_images(data, n)
    full = run_child(extract_argv(data, tmp / "full.h5", backbone, workers))
    out = tmp / "resumed.h5"
    killed = run_child(extract_argv(data, out, backbone, workers), kill_at=n // 2)
    resumed = run_child(extract_argv(data, out, backbone, workers))
    noop = run_child(extract_argv(data, out, backbone, workers))
    write_digit_images(data, n // 10, start=n)
    incremental = run_child(extract_argv(data, out, backbone, workers))
    return {
        "images": n, "full_s": round(full["seconds"], 1), "killed_after_s": round(killed["seconds"], 1),
        "killed_returncode": killed["returncode"], "resume_s": round(resumed["seconds"], 1),
        "resume_saved_s": round(full["seconds"] - resumed["seconds"], 1),
        "resume_over_full": round(resumed["seconds"] / full["seconds"], 3),
        "resume_summary": resumed["stdout"].strip(), "noop_s": round(noop["seconds"], 1),
        "noop_summary": noop["stdout"].strip(), "incremental_new_images": n // 10,
        "incremental_s": round(incremental["seconds"], 1),
        "incremental_over_full": round(incremental["seconds"] / full["seconds"], 3),
        "incremental_summary": incremental["stdout"].strip(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--workers", type=int, default=max(0, (os.cpu_count() or 1) - 1))
    parser.add_argument("--out", type=Path, default=REPO / "data" / "benchmarks" / "store.json")
    args = parser.parse_args()
    write_sizes = (10_000, 100_000) if args.quick else (20_000, 200_000)
    image_sizes = (100, 1_000) if args.quick else (200, 2_000)
    resume_images = 300 if args.quick else 600
    with tempfile.TemporaryDirectory(prefix="store_bench_") as name:
        tmp = Path(name)
        writer = bench_writer(tmp, write_sizes, 1280)
        memory = bench_extract_memory(tmp, image_sizes, args.backbone, args.workers)
        resume = bench_resume(tmp, resume_images, args.backbone, args.workers)
    results = {"cores": os.cpu_count(), "backbone": args.backbone, "workers": args.workers, "writer": writer,
               "extract_memory": memory,
               "extract_rss_ratio_10x": round(memory[1]["peak_rss_mib"] / memory[0]["peak_rss_mib"], 3),
               "writer_rss_ratio_10x": round(writer[1]["peak_rss_mib"] / writer[0]["peak_rss_mib"], 3),
               "resume": resume}
    print("writer (StoreWriter, synthetic unit rows, batches of 256):")
    print(f"  {'rows':>8} {'dtype':>8} {'comp':>5} {'shards':>7} {'s':>7} {'MB/s':>8} {'file MB':>8} {'RSS MiB':>8}")
    for r in writer:
        print(f"  {r['rows']:>8} {r['dtype']:>8} {r['compression']:>5} {r['shard_rows'] or '-':>7} {r['seconds']:>7} "
              f"{r['raw_MB_per_s']:>8} {r['file_MB']:>8} {r['peak_rss_mib']:>8}")
    print(f"  peak RSS at 10x rows: x{results['writer_rss_ratio_10x']}")
    print(f"extract ({args.backbone}, {args.workers} workers), peak RSS of the whole process:")
    for r in memory:
        print(f"  {r['images']:>6} images: {r['peak_rss_mib']:>7} MiB, {r['seconds']} s ({r['images_per_s']} img/s)")
    print(f"  peak RSS at 10x images: x{results['extract_rss_ratio_10x']} (target <= 1.3)")
    print(f"resume and incremental ({resume['images']} images):")
    print(f"  full run {resume['full_s']} s; killed at half ({resume['killed_after_s']} s, rc "
          f"{resume['killed_returncode']}); rerun {resume['resume_s']} s = x{resume['resume_over_full']} of a full "
          f"run, {resume['resume_saved_s']} s saved")
    print(f"    {resume['resume_summary']}")
    print(f"  +{resume['incremental_new_images']} new images: {resume['incremental_s']} s = "
          f"x{resume['incremental_over_full']} of a full run")
    print(f"    {resume['incremental_summary']}")
    print(f"  nothing changed: {resume['noop_s']} s  ({resume['noop_summary']})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
