"""Planning at scale: what the up-to-date check of a manifest source costs as it grows.

Writes N one-byte files (in folders of 10,000) and a CSV manifest `path,label,split` for them, then, in a child
process per size and way, computes the data fingerprint the store's is compared with:

- `listing`: what `extract` does when the source must be listed (a new or changed source): list the manifest
  (every path checked and stat'ed), build the store listing and hash it;
- `check`: what `extract` does first when a complete store of the manifest exists (`pipeline.engine.current`):
  the same fingerprint streamed over the file a block at a time, nothing held per row.

The two fingerprints must be equal. The backbone is not built (a fixed cost) and no image is read (a manifest with
splits needs no content). `--source stratified` lists a manifest without a split column instead (distinct file
contents): every file is read and hashed to split it by content; `--source folder` an image folder; `--source
tar` WebDataset tar shards, whose `check` is what the up-to-date check computes of them: each shard's stats
hashed (`shards_stamp`), which must equal the stamp the listing gave (the store's attributes and the backbone are
a fixed cost beside it); `--source torchvision` a `torchvision.datasets` class defined in the child (integer
targets in train and test splits, what a dataset holds). Reports wall
time per phase, each child's own peak RSS (its getrusage when the work is done; the stat processes' largest in
`children_peak_mib`; wait4's figure, which also counts the interpreter's teardown, in `peak_rss_mib`) and the growth
between sizes.

    python benchmarks/plan_scale.py                          # 100k and 1M rows
    python benchmarks/plan_scale.py --sizes 10000,100000     # a quick look
    python benchmarks/plan_scale.py --sizes 1000000,10000000 # 10M rows naming 1M files 10 times each
    python benchmarks/plan_scale.py --source stratified      # split by content: 100k and 1M files read
    python benchmarks/plan_scale.py --source tar             # WebDataset shards: 100k and 1M keys
    python benchmarks/plan_scale.py --source tar --tar-format pax  # a pax header before every member
    python benchmarks/plan_scale.py --source tar --tar-split content  # split by content: every image hashed
    python benchmarks/plan_scale.py --source torchvision      # a torchvision dataset class of as many items
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import run  # noqa: E402, I001 - one way to run a measured child

_PRELUDE = """
import json, os, resource, sys, time
peak = lambda: {"self_peak_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "children_peak_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)}
start = time.perf_counter()
from pipeline.engine.resolve import data_fingerprint, decoding_policy, source_listing
from pipeline.sources.base import ListOptions
"""
_RESULT = """
print("RESULT", json.dumps({"rows": rows, "fingerprint": fingerprint, **peak(),
                            **{k: round(v, 6) if isinstance(v, float) else v for k, v in t.items()}}), flush=True)
os._exit(0)  # no interpreter teardown: it can raise the process's peak RSS by 100 MiB or more (torch's)
"""
_LISTED = """
t["list_s"] = time.perf_counter() - start
start = time.perf_counter()
listing = source_listing(source)
t["listing_s"] = time.perf_counter() - start
start = time.perf_counter()
fingerprint, rows = data_fingerprint(source, listing, decoding_policy({})), len(source)
t["fingerprint_s"] = time.perf_counter() - start
t["test"] = source.split_counts().get("test", 0)
t["stamp"] = getattr(source, "stamp", "")  # tar shards: their stats, which the store records (older code: none)
""" + _RESULT  # what is measured once the source is listed (t, start and source set)

CHECK = _PRELUDE + """
from pipeline.sources import open_source
t = {"import_s": time.perf_counter() - start}
start = time.perf_counter()
source = open_source(sys.argv[1], ListOptions())
""" + _LISTED

STREAMED = _PRELUDE + """
from pipeline.engine.current import manifest_fingerprint
from pipeline.sources.stamps import PARALLEL_STAT_ROWS, stat_workers
t = {"import_s": time.perf_counter() - start}
start = time.perf_counter()
many = int(sys.argv[2]) >= PARALLEL_STAT_ROWS
fingerprint, rows = manifest_fingerprint(sys.argv[1], ListOptions(), decoding_policy({}),
                                         workers=stat_workers() if many else 1)
t["check_s"] = time.perf_counter() - start
""" + _RESULT


SHARDS = _PRELUDE + """
from pipeline.sources.tar import shards_stamp, tar_shards
t = {"import_s": time.perf_counter() - start}
start = time.perf_counter()
fingerprint, rows = shards_stamp(tar_shards(sys.argv[1])), int(sys.argv[2])
t["check_s"] = time.perf_counter() - start
""" + _RESULT

TORCHVISION = _PRELUDE + """
import numpy as np
from torchvision.datasets import VisionDataset
from pipeline.sources.torchvision import scan_torchvision


class Synthetic(VisionDataset):  # what a torchvision dataset holds: its targets (and classes), images read by index
    classes = [f"class {k}" for k in range(100)]

    def __init__(self, root, train=True):
        super().__init__(root)
        n = int(sys.argv[2]) * 4 // 5 if train else int(sys.argv[2]) - int(sys.argv[2]) * 4 // 5
        self.targets = np.random.default_rng(int(train)).integers(0, 100, n)

    def __len__(self):
        return len(self.targets)


t = {"import_s": time.perf_counter() - start}
start = time.perf_counter()
source = scan_torchvision(Synthetic, ListOptions(root=sys.argv[1]))
""" + _LISTED


def _child(script: str, args: list[str], work: Path) -> tuple[dict, dict]:
    measured = run(["-c", script, *args], work)
    return measured, json.loads(next(line for line in (work / "last.log").read_text().splitlines()
                                     if line.startswith("RESULT "))[7:])


def _growth(results: list[dict], way: str) -> dict:
    def ratio(a: dict, b: dict) -> dict:
        rss = b[way]["self_peak_mib"] / a[way]["self_peak_mib"]
        return {"time_per_row_ratio": round((b[way]["seconds"] / b["rows"]) / (a[way]["seconds"] / a["rows"]), 3),
                "rss_ratio": round(rss, 3), "rss_exponent": round(math.log(rss) / math.log(b["rows"] / a["rows"]), 3)}

    return {f"{a['rows']}->{b['rows']}": ratio(a, b) for a, b in zip(results, results[1:], strict=False)}


def make_source(work: Path, rows: int, files: int | None = None, *, splits: bool = True) -> Path:
    """N one-byte files and their manifest (100 labels, 80/20 train/test by position). With `files` < N, only that
    many files are written and row i names file i mod `files` under its own id (an id column): a 10M-row manifest
    without 10M inodes (40 GB of blocks); the repeated stats are then served from the kernel's cache, so the run
    with as many files as rows is what measures the cost of stat'ing distinct files. Without `splits`, the manifest
    has no split column and each file holds its own number (distinct contents, for the split by content)."""
    files = min(rows, files or rows)
    folder = work / f"src{rows}"
    shutil.rmtree(folder, ignore_errors=True)
    names = []
    for i in range(files):
        sub = folder / f"{i // 10000:05d}"
        if i % 10000 == 0:
            sub.mkdir(parents=True)
        name = f"{i:08d}.jpg"
        (sub / name).write_bytes(b"x" if splits else str(i).encode())
        names.append(f"{sub.name}/{name}")
    manifest = folder / "manifest.csv"
    with open(manifest, "w") as fh:
        fh.write(("path,label" if files == rows else "path,id,label") + (",split\n" if splits else "\n"))
        for start in range(0, rows, 100_000):
            fh.write("".join(f"{names[i % files]},{'' if files == rows else f'r{i:09d},'}c{i % 100}"
                             + (f",{'test' if (i // 100) % 5 == 0 else 'train'}\n" if splits else "\n")
                             for i in range(start, min(rows, start + 100_000))))
    return manifest


def make_folder(work: Path, rows: int) -> Path:
    """N one-byte files as an image folder with split folders, `ROOT/{train,test}/c<k>/<n>.jpg` (100 classes,
    80/20 by position, as the manifest's), in folders of at most 10,000."""
    root = work / f"folder{rows}"
    shutil.rmtree(root, ignore_errors=True)
    made = set()
    for i in range(rows):
        sub = root / ("test" if (i // 100) % 5 == 0 else "train") / f"c{i % 100}" / f"{i // 1_000_000:03d}"
        if sub not in made:
            sub.mkdir(parents=True)
            made.add(sub)
        (sub / f"{i:08d}.jpg").write_bytes(b"x")
    return root


TAR_FORMATS = {"ustar": (tarfile.USTAR_FORMAT, "{:08d}"),  # plain headers
               "pax": (tarfile.PAX_FORMAT, "caf\u00e9-{:08d}"),  # a non-ASCII name: a pax header a member
               "gnu-long": (tarfile.GNU_FORMAT, "k" * 100 + "{:08d}")}  # a 108-byte name: a GNU long-name header


def make_shards(work: Path, rows: int, fmt: str = "ustar", by_content: bool = False) -> Path:
    """N samples as WebDataset tar shards of 10,000 keys, `KEY.jpg` (one byte) + `KEY.cls` (100 classes), split
    by shard name (`train-NNNNN.tar` / `test-NNNNN.tar`, every fifth shard a test shard): listing them reads every
    member header and label, and no image. `fmt` (`TAR_FORMATS`): how the headers are written. `by_content`:
    shards named `shard-NNNNN.tar` and each image its key's digits (distinct), so listing splits them by content:
    every image member read and hashed."""
    import io
    import os

    form, key = TAR_FORMATS[fmt]
    folder = work / f"tar{rows}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for shard in range(0, math.ceil(rows / 10_000)):
        name = f"shard-{shard:05d}.tar" if by_content else f"{'test' if shard % 5 == 0 else 'train'}-{shard:05d}.tar"
        with tarfile.open(folder / name, "w", format=form) as tar:
            for i in range(shard * 10_000, min(rows, shard * 10_000 + 10_000)):
                for ext, data in (("jpg", str(i).encode() if by_content else b"x"), ("cls", str(i % 100).encode())):
                    info = tarfile.TarInfo(f"{key.format(i)}.{ext}")
                    info.size, info.mtime = len(data), 1_700_000_000
                    tar.addfile(info, io.BytesIO(data))
        os.utime(folder / name, ns=(1_700_000_000 * 10**9,) * 2)  # the same stamps, so the same fingerprint, each run
    return folder


def _listed(work: Path, data: Path, rows: int, what: str) -> tuple[dict, dict]:
    """The CHECK child's run of `data`: its wall time and peaks, and its figures; it must list `rows` rows."""
    listed, figures = _child(CHECK, [str(data)], work)
    if figures["rows"] != rows:
        raise SystemExit(f"the {rows} {what} listed {figures['rows']} rows")
    listed.update(self_peak_mib=figures.pop("self_peak_mib"), children_peak_mib=figures.pop("children_peak_mib"))
    return listed, figures


def _tar_size(work: Path, rows: int, args: argparse.Namespace) -> dict:
    folder = make_shards(work, rows, args.tar_format, args.tar_split == "content")
    listed, figures = _listed(work, folder, rows, "keys of the shards")
    checked, stamped = _child(SHARDS, [str(folder), str(rows)], work)
    if stamped["fingerprint"] != figures["stamp"]:
        raise SystemExit(f"at {rows} keys the check's stamp of the shards {stamped['fingerprint']} is not the "
                         f"listing's {figures['stamp']!r}")
    checked.update(self_peak_mib=stamped["self_peak_mib"], children_peak_mib=stamped["children_peak_mib"],
                   check_s=stamped["check_s"])
    print(f"{rows:>10,} tar keys: listing {listed['seconds']:.1f} s ({figures['list_s']:.1f} read the shards, "
          f"{figures['listing_s']:.1f} listing, {figures['fingerprint_s']:.1f} fingerprint), peak RSS "
          f"{listed['self_peak_mib']:.0f} MiB; {figures['test']:,} test rows; check of the shards' stats "
          f"{checked['check_s'] * 1000:.1f} ms after the imports, peak RSS {checked['self_peak_mib']:.0f} MiB",
          flush=True)
    shutil.rmtree(folder)
    return {"rows": rows, "listing": listed, "check": checked, **figures}


def _manifest_size(work: Path, rows: int, args: argparse.Namespace) -> dict:
    manifest = make_source(work, rows, args.files)
    listed, figures = _child(CHECK, [str(manifest)], work)
    checked, streamed = _child(STREAMED, [str(manifest), str(rows)], work)
    if streamed["fingerprint"] != figures["fingerprint"] or streamed["rows"] != figures["rows"]:
        raise SystemExit(f"at {rows} rows the streamed check's fingerprint {streamed['fingerprint']} is not the "
                         f"listing's {figures['fingerprint']}")
    listed.update(self_peak_mib=figures.pop("self_peak_mib"), children_peak_mib=figures.pop("children_peak_mib"))
    checked.update(self_peak_mib=streamed["self_peak_mib"], children_peak_mib=streamed["children_peak_mib"],
                   check_s=streamed["check_s"])
    print(f"{rows:>10,} rows: listing {listed['seconds']:.1f} s ({figures['list_s']:.1f} list, "
          f"{figures['listing_s']:.1f} listing, {figures['fingerprint_s']:.1f} fingerprint), peak RSS "
          f"{listed['self_peak_mib']:.0f} MiB; streamed check {checked['seconds']:.1f} s "
          f"({checked['check_s']:.1f} s after the imports), peak RSS {checked['self_peak_mib']:.0f} MiB", flush=True)
    shutil.rmtree(manifest.parent)
    return {"rows": rows, "listing": listed, "check": checked, **figures}


def _stratified_size(work: Path, rows: int, args: argparse.Namespace) -> dict:
    """A manifest without a split column: listing it reads and hashes every file to split it by content."""
    manifest = make_source(work, rows, args.files, splits=False)
    listed, figures = _listed(work, manifest, rows, "rows of the manifest")
    print(f"{rows:>10,} rows split by content: listing {listed['seconds']:.1f} s ({figures['list_s']:.1f} list, "
          f"hash and split, {figures['listing_s']:.1f} listing, {figures['fingerprint_s']:.1f} fingerprint), "
          f"peak RSS {listed['self_peak_mib']:.0f} MiB; {figures['test']:,} test rows", flush=True)
    shutil.rmtree(manifest.parent)
    return {"rows": rows, "listing": listed, **figures}


def _folder_size(work: Path, rows: int, args: argparse.Namespace) -> dict:
    root = make_folder(work, rows)
    listed, figures = _listed(work, root, rows, "files of the folder")
    print(f"{rows:>10,} files: listing {listed['seconds']:.1f} s ({figures['list_s']:.1f} walk and stat, "
          f"{figures['listing_s']:.1f} listing, {figures['fingerprint_s']:.1f} fingerprint), peak RSS "
          f"{listed['self_peak_mib']:.0f} MiB", flush=True)
    shutil.rmtree(root)
    return {"rows": rows, "listing": listed, **figures}


def _torchvision_size(work: Path, rows: int, args: argparse.Namespace) -> dict:
    """A torchvision dataset class with train/test splits and integer targets over 100 classes (no image read)."""
    root = work / "torchvision"
    root.mkdir(exist_ok=True)
    listed, figures = _child(TORCHVISION, [str(root), str(rows)], work)
    if figures["rows"] != rows:
        raise SystemExit(f"the {rows} items of the dataset listed {figures['rows']} rows")
    listed.update(self_peak_mib=figures.pop("self_peak_mib"), children_peak_mib=figures.pop("children_peak_mib"))
    print(f"{rows:>10,} dataset items: listing {listed['seconds']:.1f} s ({figures['list_s']:.1f} list, "
          f"{figures['listing_s']:.1f} listing, {figures['fingerprint_s']:.1f} fingerprint), peak RSS "
          f"{listed['self_peak_mib']:.0f} MiB; {figures['test']:,} test rows", flush=True)
    return {"rows": rows, "listing": listed, **figures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--files", type=int, default=1_000_000,
                        help="at most this many distinct files; larger sizes name them repeatedly (default 1M)")
    parser.add_argument("--source", choices=("manifest", "folder", "stratified", "tar", "torchvision"),
                        default="manifest",
                        help="folder: list an image folder of as many files (no streamed check: a folder is walked); "
                             "stratified: a manifest without splits, split by content (every file read); "
                             "tar: WebDataset shards of 10,000 keys, split by shard name; torchvision: a dataset "
                             "class of as many items (train/test, integer targets)")
    parser.add_argument("--tar-format", choices=sorted(TAR_FORMATS), default="ustar",
                        help="tar: plain ustar headers, or a pax header (non-ASCII keys) or a GNU long-name header "
                             "(long keys) before every member")
    parser.add_argument("--tar-split", choices=("names", "content"), default="names",
                        help="tar: split by the shards' names (train-/test-), or by content (every image read)")
    parser.add_argument("--work", type=Path, default=Path("data/benchmarks/plan"))
    parser.add_argument("--out", type=Path, default=Path("data/benchmarks/plan_scale.json"))
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    size = {"manifest": _manifest_size, "folder": _folder_size, "stratified": _stratified_size,
            "tar": _tar_size, "torchvision": _torchvision_size}[args.source]
    results = [size(work, int(rows), args) for rows in args.sizes.split(",")]
    growth = {way: _growth(results, way) for way in ("listing", "check") if way in results[0]}
    print(json.dumps(growth, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"results": results, "growth": growth}, indent=2) + "\n")

if __name__ == "__main__":
    main()
