"""Scale: probe, kNN (exact and approximate) and index build on synthetic stores of growing size, in bounded memory.

Builds synthetic float16 stores (`pipeline.store.synthetic`: learnable, not separable; sharded from 5M rows) at each
size, then runs each step as the user would, `python -m pipeline ...` in its own process with the same fixed
`--max-memory` (and index `--memory-budget`), and reports its wall time, peak RSS (the child's own, measured from this
small parent with wait4) and the growth exponents between sizes: time ~ rows^a, RSS ~ rows^b.

    python benchmarks/scale.py                                # 100k, 1M, 10M rows x 128-d (about an hour on 2 cores)
    python benchmarks/scale.py --sizes 20000,200000 --dim 64  # a quick look
    python benchmarks/scale.py --compare 200000               # loaded vs streamed at 200k: the figures agree

Steps: `probe --head torch-logreg` (streamed beyond --max-memory), exact `knn` on a fixed seeded sample of test
queries (the cost per query is linear in the bank, so time per row stays flat), approximate `knn --approx` on a fixed
seeded sample of 20,000 queries (its gap to exact measured on 2,000), and `index build`; on request (`--steps audit
--copies 0.01`) the audit's all-pairs search (`audit --no-fit`, quadratic in time like exact kNN over every row). Only
the standard library is imported here, so the children's peak RSS is theirs alone.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str], cwd: Path) -> dict:
    """Run one command; its wall time, peak RSS and exit status."""
    start = time.perf_counter()
    with open(cwd / "last.log", "w") as log:
        proc = subprocess.Popen([sys.executable, *args], cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{' '.join(args)} failed ({code}):\n{(cwd / 'last.log').read_text()[-3000:]}")
    return {"seconds": round(wall, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def steps(store: str, args: argparse.Namespace) -> dict[str, list[str]]:
    mem = ["--max-memory", args.max_memory]
    quiet = ["--no-report", "--resamples", "0", "--overwrite"]
    return {
        "probe": ["-m", "pipeline", "probe", "--store", store, "--head", "torch-logreg", "--grid", args.grid,
                  "--device", args.device, "--out", f"{store}.probe.json", *mem, *quiet],
        "knn_exact": ["-m", "pipeline", "knn", "--store", store, "--k", "20", "--queries", str(args.exact_queries),
                      "--out", f"{store}.knn.json", *mem, *quiet],
        "knn_approx": ["-m", "pipeline", "knn", "--store", store, "--k", "20", "--approx", "--memory-budget",
                       args.memory_budget, "--queries", str(args.approx_queries), "--out", f"{store}.approx.json",
                       *mem, *quiet],
        "index_build": ["-m", "pipeline", "index", "build", "--store", store, "--out", f"{store}.index",
                        "--memory-budget", args.memory_budget, "--overwrite", *mem],
        "audit": ["-m", "pipeline", "audit", "--store", store, "--no-fit", "--out", f"{store}.audit.json", *mem,
                  *quiet],
    }


def build(work: Path, rows: int, args: argparse.Namespace) -> tuple[str, dict]:
    name = f"s{rows}.h5"
    for old in (work / name, work / f"{name}.shards"):
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    shard = ["--shard-rows", "1000000"] if rows >= 5_000_000 else []
    made = run(["-m", "pipeline.store.synthetic", "--rows", str(rows), "--dim", str(args.dim), "--out", name,
                "--copies", str(args.copies), *shard], work)
    return name, made


def figures(work: Path, store: str, ran: set[str]) -> dict:
    out = {}
    if "probe" in ran:
        probe = json.loads((work / f"{store}.probe.json").read_text())
        out["probe_top1"] = probe["test_top1"]
        out["probe_streamed"] = "streamed" in probe
    if "knn_exact" in ran:
        knn = json.loads((work / f"{store}.knn.json").read_text())
        out["knn_exact_top1"] = knn["by_k"]["20"]["weighted"]["top1"]
    if "knn_approx" in ran:
        approx = json.loads((work / f"{store}.approx.json").read_text())
        out["knn_approx_top1"] = approx["by_k"]["20"]["weighted"]["top1"]
        out["knn_approx_gap_points"] = approx["approximate"]["gap"]["20/weighted"]["gap_points"]
        out["knn_approx_index"] = (f"{approx['approximate']['factory']} {approx['approximate']['search_param']} "
                                   f"{approx['approximate']['search_value']} recall@10 "
                                   f"{approx['approximate']['recall_at_10']:.3f}")
    if "audit" in ran:
        audit = json.loads((work / f"{store}.audit.json").read_text())
        out["audit"] = (f"{audit['exact_pairs']} exact + {audit['near_pairs']} near pairs, {audit['leaked_test_rows']} "
                        f"leaked test rows, {'streamed' if 'streamed' in audit else 'loaded'}, search "
                        f"{audit['seconds']['search']} s")
    if "index_build" in ran:
        infos = json.loads((work / f"{store}.index" / "index_infos.json").read_text())
        out["index"] = (f"{infos['factory']} {infos['search_param']} {infos['search_value']} recall@10 "
                        f"{infos['recall_at_10']:.3f}, {infos['ms_per_query']:.3f} ms/query, seconds "
                        f"{json.dumps(infos['seconds'])}")
    return out


def exponents(results: list[dict]) -> dict:
    """Between consecutive sizes: time and RSS growth exponents per step (log ratio / log rows ratio)."""
    out = {}
    for a, b in zip(results, results[1:], strict=False):
        scale = math.log(b["rows"] / a["rows"])
        out[f"{a['rows']}->{b['rows']}"] = {
            step: {"time_exponent": round(math.log(b["steps"][step]["seconds"] / a["steps"][step]["seconds"]) / scale,
                                          3),
                   "rss_ratio": round(b["steps"][step]["peak_rss_mib"] / a["steps"][step]["peak_rss_mib"], 3),
                   "time_per_row_ratio": round((b["steps"][step]["seconds"] / b["rows"])
                                               / (a["steps"][step]["seconds"] / a["rows"]), 3)}
            for step in a["steps"]}
    return out


def table(results: list[dict]) -> str:
    lines = ["| rows | step | wall s | peak RSS MiB | us/row |", "|---|---|---|---|---|"]
    for r in results:
        for step, m in r["steps"].items():
            per = m["seconds"] / r["rows"] * 1e6
            lines.append(f"| {r['rows']:,} | {step} | {m['seconds']:.1f} | {m['peak_rss_mib']:.0f} | {per:.2f} |")
    return "\n".join(lines)


def compare(work: Path, rows: int, args: argparse.Namespace) -> dict:
    """At one size: probe and kNN loaded whole vs streamed (a small --max-memory), the figures side by side."""
    store, _ = build(work, rows, args)
    out = {}
    for mode, mem in (("loaded", "20GiB"), ("streamed", "64MiB")):
        common = ["--max-memory", mem, "--no-report", "--resamples", "0", "--overwrite"]
        probe = run(["-m", "pipeline", "probe", "--store", store, "--head", "torch-logreg", "--grid", args.grid,
                     "--device", args.device, "--out", f"{mode}.probe.json", *common], work)
        knn = run(["-m", "pipeline", "knn", "--store", store, "--k", "20", "--out", f"{mode}.knn.json", *common],
                  work)
        p = json.loads((work / f"{mode}.probe.json").read_text())
        k = json.loads((work / f"{mode}.knn.json").read_text())
        out[mode] = {"probe": probe, "knn": knn, "probe_top1": p["test_top1"], "probe_chosen": p["chosen"],
                     "knn_by_k": {v: k["by_k"]["20"][v]["top1"] for v in ("majority", "weighted")}}
        print(f"{mode:9s} probe top-1 {100 * p['test_top1']:.2f}% (C={p['chosen']:g}) {probe['seconds']:.0f} s "
              f"{probe['peak_rss_mib']:.0f} MiB; kNN k=20 weighted {100 * out[mode]['knn_by_k']['weighted']:.2f}% "
              f"{knn['seconds']:.0f} s {knn['peak_rss_mib']:.0f} MiB", flush=True)
    out["probe_gap_points"] = round(100 * (out["loaded"]["probe_top1"] - out["streamed"]["probe_top1"]), 3)
    out["knn_identical"] = out["loaded"]["knn_by_k"] == out["streamed"]["knn_by_k"]
    print(f"probe: streamed {out['probe_gap_points']:+.2f} points below loaded; kNN identical: {out['knn_identical']}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000,10000000")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--max-memory", default="1GiB")
    parser.add_argument("--memory-budget", default="512MiB", help="index size (index build and knn --approx)")
    parser.add_argument("--grid", default="1,10")
    parser.add_argument("--exact-queries", type=int, default=5000)
    parser.add_argument("--approx-queries", type=int, default=20000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", default="probe,knn_exact,knn_approx,index_build",
                        help="which steps to run (also: audit, all pairs: quadratic, so not by default)")
    parser.add_argument("--copies", type=float, default=0.0, help="share of rows planted as exact or near copies")
    parser.add_argument("--compare", type=int, default=0, help="only compare loaded vs streamed at this size")
    parser.add_argument("--work", type=Path, default=Path("data/benchmarks/scale"))
    parser.add_argument("--keep", action="store_true", help="keep the stores")
    parser.add_argument("--out", type=Path, default=Path("data/benchmarks/scale.json"))
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    config = {k: str(v) for k, v in vars(args).items()}
    if args.compare:
        result = {"config": config, "compare": compare(work, args.compare, args)}
    else:
        results = []
        for rows in (int(s) for s in args.sizes.split(",")):
            store, made = build(work, rows, args)
            entry = {"rows": rows, "store": made, "steps": {}}
            for step, command in steps(store, args).items():
                if step not in args.steps.split(","):
                    continue
                entry["steps"][step] = run(command, work)
                print(f"{rows:>10,} {step:12s} {entry['steps'][step]['seconds']:8.1f} s "
                      f"{entry['steps'][step]['peak_rss_mib']:8.0f} MiB", flush=True)
            entry["figures"] = figures(work, store, set(entry["steps"]))
            print(f"{rows:>10,} {json.dumps(entry['figures'])}", flush=True)
            results.append(entry)
            if not args.keep:
                for p in work.glob(f"{store}*"):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        result = {"config": config, "results": results, "growth": exponents(results)}
        print(table(results))
        print(json.dumps(result["growth"], indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
