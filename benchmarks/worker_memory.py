"""What each decode worker holds of a large listing: the locators the DataLoader pickles into every worker.

A manifest of N rows (naming `--files` one-byte files, each row under its own id, as `plan_scale.py` makes them)
is listed; then, in a child process per way, the real DataLoader of the decode stage (`make_loader`: forkserver
workers) is started over an `ImageDataset` of every row and a few batches are read:

- `list`: the locators as a list of path strings (what the dataset held before);
- `column`: the listing's path column as it is (`Source.locators`: one text buffer and offsets);
- `shared`: that column shared through one mapped file (`share_locators`, what an extraction with workers uses):
  each worker maps it instead of unpickling a copy.

Reports the pickled dataset's size and each worker's private memory (`Private_Dirty` of /proc/PID/smaps_rollup,
what the worker holds alone: its unpickled copy of the dataset and its own working memory; the forkserver's imports
and a mapped file's pages are shared), and their ratios between the ways and sizes.

    python benchmarks/worker_memory.py                        # 1M and 3M rows, 2 workers
    python benchmarks/worker_memory.py --sizes 100000 --workers 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plan_scale import make_source  # noqa: E402
from scale import run  # noqa: E402, I001 - one way to run a measured child

CHILD = """
import json, pickle, sys
from pipeline.engine.decode import ImageDataset
from pipeline.engine.shared import share_locators
from pipeline.engine.loader import make_loader, shutdown, worker_processes
from pipeline.sources import open_source
from torchvision.transforms import ToTensor

source = open_source(sys.argv[1])
way, workers = sys.argv[2], int(sys.argv[3])
locators = {"list": lambda c: list(c), "column": lambda c: c, "shared": share_locators}[way](source.locators())
dataset = ImageDataset(locators, ToTensor())
pickled = len(pickle.dumps(dataset, protocol=pickle.HIGHEST_PROTOCOL))
iterator = iter(make_loader(dataset, batch_size=8, workers=workers, pin_memory=False, prefetch_factor=1))
for _ in range(2 * workers):
    batch = next(iterator)

def private_mib(pid):
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        kib = next(int(line.split()[1]) for line in fh if line.startswith("Private_Dirty:"))
    return round(kib / 1024, 1)

private = [private_mib(p.pid) for p in worker_processes(iterator)]
shutdown(iterator)
print("RESULT", json.dumps({"rows": len(dataset), "type": type(dataset.locators).__name__,
                            "pickled_mib": round(pickled / 2**20, 1), "worker_private_mib": private}), flush=True)
"""


def _child(manifest: Path, way: str, workers: int, work: Path) -> dict:
    run(["-c", CHILD, str(manifest), way, str(workers)], work)
    return json.loads(next(line for line in (work / "last.log").read_text().splitlines()
                           if line.startswith("RESULT "))[7:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000000,3000000")
    parser.add_argument("--files", type=int, default=10_000, help="distinct files the rows name (default 10k)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("data/benchmarks/workers"))
    parser.add_argument("--out", type=Path, default=Path("data/benchmarks/worker_memory.json"))
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for rows in (int(s) for s in args.sizes.split(",")):
        manifest = make_source(work, rows, args.files)
        ways = {way: _child(manifest, way, args.workers, work) for way in ("list", "column", "shared")}
        mean = {way: _mean(r) for way, r in ways.items()}
        ratio = {way: round(mean[way] / mean["list"], 3) for way in ("column", "shared")}
        results.append({"rows": rows, **ways, "worker_private_ratio": ratio["column"],
                        "shared_private_ratio": ratio["shared"],
                        "pickled_ratio": round(ways["column"]["pickled_mib"] / ways["list"]["pickled_mib"], 3)})
        print(f"{rows:>10,} rows: pickled dataset {ways['list']['pickled_mib']:.0f} MiB as a list, "
              f"{ways['column']['pickled_mib']:.0f} MiB as a column, {ways['shared']['pickled_mib']:.2f} MiB "
              f"shared; private memory per worker {mean['list']:.0f} -> {mean['column']:.0f} "
              f"({ratio['column']:.2f}x) -> {mean['shared']:.0f} MiB shared ({ratio['shared']:.2f}x)", flush=True)
        shutil.rmtree(manifest.parent)
    growth = {way: round(_mean(results[-1][way]) / _mean(results[0][way]), 3) for way in ("list", "column", "shared")}
    if len(results) > 1:
        print(f"{results[-1]['rows'] / results[0]['rows']:g}x the rows: private memory per worker "
              + ", ".join(f"{way} {g:.2f}x" for way, g in growth.items()), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"workers": args.workers, "results": results, "growth": growth}, indent=2) + "\n")


def _mean(way: dict) -> float:
    return sum(way["worker_private_mib"]) / len(way["worker_private_mib"])


if __name__ == "__main__":
    main()
