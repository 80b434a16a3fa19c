"""What each decode worker holds of a large listing: the locators the DataLoader pickles into every worker.

A manifest of N rows (naming `--files` one-byte files, each row under its own id, as `plan_scale.py` makes them)
is listed; then, in a child process per way, the real DataLoader of the decode stage (`make_loader`: forkserver
workers) is started over an `ImageDataset` of every row and a few batches are read:

- `list`: the locators as a list of path strings (what the dataset held before);
- `column`: the listing's path column as it is (`Source.locators`: one text buffer and offsets).

Reports the pickled dataset's size and each worker's private memory (`Private_Dirty` of /proc/PID/smaps_rollup,
what the worker holds alone: its unpickled copy of the dataset and its own working memory; the forkserver's imports
are shared), and their ratios between the ways and sizes.

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
from pipeline.engine.loader import make_loader, shutdown, worker_processes
from pipeline.sources import open_source
from torchvision.transforms import ToTensor

source = open_source(sys.argv[1])
way, workers = sys.argv[2], int(sys.argv[3])
locators = list(source.locators()) if way == "list" else source.locators()
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
        ways = {way: _child(manifest, way, args.workers, work) for way in ("list", "column")}
        mean = {way: sum(r["worker_private_mib"]) / len(r["worker_private_mib"]) for way, r in ways.items()}
        results.append({"rows": rows, **ways, "worker_private_ratio": round(mean["column"] / mean["list"], 3),
                        "pickled_ratio": round(ways["column"]["pickled_mib"] / ways["list"]["pickled_mib"], 3)})
        print(f"{rows:>10,} rows: pickled dataset {ways['list']['pickled_mib']:.0f} MiB as a list, "
              f"{ways['column']['pickled_mib']:.0f} MiB as a column; private memory per worker "
              f"{mean['list']:.0f} MiB -> {mean['column']:.0f} MiB ({results[-1]['worker_private_ratio']:.2f}x)",
              flush=True)
        shutil.rmtree(manifest.parent)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"workers": args.workers, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
