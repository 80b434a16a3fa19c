"""Interchange: exports and imports that stay flat in memory, and what the alpha policy does to real features.

    python benchmarks/interchange.py scale [--sizes 100000,1000000 --dim 256]
    python benchmarks/interchange.py alpha      # tango-icon-theme RGBA icons through EfficientNet-Lite0

`scale` writes a synthetic store (class means plus noise, unit rows, 0.2% test rows as ann-benchmarks queries) at
each size, then runs `export` in every format and `import` of the Parquet export as child processes of the real CLI,
and prints wall time, peak RSS, the store's size and the RSS ratio between the sizes (a streamed export should not
grow with the rows; an import holds the ids, labels and splits of every row, not the vectors).

`alpha` downloads Debian's tango-icon-theme (apt-get download, unpacked in a temporary folder), embeds its 32x32
RGBA icons with the packaged EfficientNet-Lite0 under each alpha policy, and prints the cosine between policies and
whether `drop` equals the timm loader's `convert("RGB")` path.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def synthetic(path: Path, rows: int, dim: int, classes: int = 100, test_share: float = 0.002, seed: int = 0) -> None:
    from pipeline.store.reuse import Listing
    from pipeline.store.writer import StoreWriter

    rng = np.random.default_rng(seed)
    means = rng.normal(size=(classes, dim)).astype(np.float32)
    labels = rng.integers(0, classes, rows)
    splits = np.where(rng.random(rows) < test_share, "test", "train")
    listing = Listing(ids=[f"img/{k:09d}.jpg" for k in range(rows)], labels=labels.astype(np.int64),
                      splits=splits.tolist(), stamps=np.zeros((rows, 2), dtype=np.int64))
    attrs = {"cache_key": "synthetic", "class_names": json.dumps([f"class_{c}" for c in range(classes)]),
             "backbone": "synthetic"}
    with StoreWriter(path, listing=listing, dim=dim, attrs=attrs, shard_rows=262_144) as writer:
        todo = writer.prepare()
        for start in range(0, rows, 65_536):
            pos = todo[start:start + 65_536]
            x = means[labels[pos]] + rng.normal(scale=1.5, size=(len(pos), dim)).astype(np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            writer.write(pos, x, [f"{k:032x}" for k in pos])
        writer.finish()


def peak_child(*args: str) -> dict:
    """A child of the real CLI with its peak RSS (from wait4)."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "--quiet", *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(args)} failed: {err[-1500:]}")
    return {"seconds": round(time.perf_counter() - start, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def scale(args: argparse.Namespace) -> list[dict]:
    work = Path(tempfile.mkdtemp(prefix="interchange-"))
    rows_out = []
    try:
        for rows in args.sizes:
            store = work / f"s{rows}.h5"
            # in a child: a parent that grew would inflate every later child's peak RSS (Linux keeps the peak of
            # the forked image across exec)
            subprocess.run([sys.executable, __file__, "store", str(store), str(rows), str(args.dim)], check=True)
            size = sum(f.stat().st_size for f in [store, *store.with_name(store.name + ".shards").glob("*.h5")])
            entry = {"rows": rows, "store_mib": round(size / 2**20, 1)}
            for fmt in ("clip-retrieval", "parquet", "ann-benchmarks"):
                entry[fmt] = peak_child("export", "--store", str(store), "--format", fmt, "--out",
                                        str(work / f"{fmt}-{rows}"), "--k", "10", "--part-rows", str(args.part_rows))
            entry["import"] = peak_child("import", "--from", str(work / f"parquet-{rows}"), "--out",
                                         str(work / f"imported-{rows}.h5"))
            for fmt in ("clip-retrieval", "parquet", "ann-benchmarks"):
                shutil.rmtree(work / f"{fmt}-{rows}")
            print(json.dumps(entry), flush=True)
            rows_out.append(entry)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows_out


def print_scale(results: list[dict]) -> None:
    steps = ("clip-retrieval", "parquet", "ann-benchmarks", "import")
    print(f"\n| rows | store MiB | {' | '.join(f'{s} s / peak MiB' for s in steps)} |")
    print("|---:|---:|" + "---:|" * len(steps))
    for r in results:
        cells = " | ".join(f"{r[s]['seconds']} / {r[s]['peak_rss_mib']:.0f}" for s in steps)
        print(f"| {r['rows']:,} | {r['store_mib']:,.0f} | {cells} |")
    if len(results) >= 2:
        a, b = results[0], results[-1]
        grow = b["rows"] / a["rows"]
        ratios = ", ".join(f"{s} x{b[s]['peak_rss_mib'] / a[s]['peak_rss_mib']:.2f}" for s in steps)
        print(f"\npeak RSS at {grow:g}x the rows: {ratios}")
        times = ", ".join(f"{s} x{(b[s]['seconds'] / b['rows']) / (a[s]['seconds'] / a['rows']):.2f}"
                          for s in steps if s != "ann-benchmarks")
        print(f"time per row at {grow:g}x the rows: {times} (ann-benchmarks' exact ground truth is queries x rows)")


def tango_icons(where: Path) -> list[Path]:
    from PIL import Image

    subprocess.run(["apt-get", "download", "tango-icon-theme"], cwd=where, check=True, capture_output=True)
    subprocess.run(["dpkg", "-x", str(next(where.glob("*.deb"))), str(where / "x")], check=True)
    icons = []
    for path in sorted((where / "x").rglob("32x32/**/*.png")):
        with Image.open(path) as image:
            if image.mode == "RGBA" and (np.asarray(image)[:, :, 3] < 255).any():
                icons.append(path)
    return icons


def alpha(args: argparse.Namespace) -> dict:
    import torch
    from PIL import Image

    from pipeline.backbones.factory import create_backbone
    from pipeline.engine.decode import Decoding, decode
    from pipeline.engine.forward import l2_normalize

    work = Path(tempfile.mkdtemp(prefix="alpha-"))
    try:
        icons = tango_icons(work)
        backbone = create_backbone("efficientnet_lite0")
        feats = {}
        with torch.inference_mode():
            for policy in ("white", "black", "drop", "timm-loader"):
                images = [Image.open(p).convert("RGB") if policy == "timm-loader" else
                          decode(p.read_bytes(), Decoding(alpha=policy))[0] for p in icons]
                batches = [torch.stack([backbone.transform(im) for im in images[i:i + 64]])
                           for i in range(0, len(images), 64)]
                feats[policy] = torch.cat([l2_normalize(backbone.features(b)) for b in batches]).numpy()
        out = {"icons": len(icons),
               "drop_equals_timm_loader_max_abs": float(np.abs(feats["drop"] - feats["timm-loader"]).max())}
        for a, b in (("white", "drop"), ("black", "drop"), ("white", "black")):
            cos = (feats[a] * feats[b]).sum(axis=1)
            out[f"cosine {a} vs {b}"] = {"min": round(float(cos.min()), 3), "median": round(float(np.median(cos)), 3),
                                         "share_below_0.95": round(float((cos < 0.95).mean()), 3)}
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    s = sub.add_parser("scale")
    s.add_argument("--sizes", type=lambda t: [int(v) for v in t.split(",")], default=[100_000, 1_000_000])
    s.add_argument("--dim", type=int, default=256)
    s.add_argument("--part-rows", type=int, default=25_000, help="rows per exported file (memory is one part)")
    sub.add_parser("alpha")
    m = sub.add_parser("store", help="write one synthetic store (used by scale)")
    m.add_argument("path", type=Path)
    m.add_argument("rows", type=int)
    m.add_argument("dim", type=int)
    args = parser.parse_args()
    if args.what == "store":
        synthetic(args.path, args.rows, args.dim)
    elif args.what == "scale":
        print_scale(scale(args))
    else:
        print(json.dumps(alpha(args), indent=2))


if __name__ == "__main__":
    main()
