"""Start-up times of the commands users type most, each in a fresh process from another working directory.

    python benchmarks/startup.py [--repeat 5] [--baseline REV]

Measures `--help`, `store info`, `backbones` (with its catalogue built) and a no-op `extract` (the store is up to
date: it must say so in a few seconds) on the demo digits with EfficientNet-Lite0. With `--baseline REV` the same
commands also run from a git worktree of that revision, in the same run, and the ratios are printed (timings on
these machines are noisy: compare within one run). Writes data/benchmarks/startup.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _time(cmd: list[str], *, cwd: Path, env: dict, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        times.append(time.perf_counter() - start)
        if proc.returncode not in (0, 1):
            raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr[-500:]}")
    return statistics.median(times)


def _commands(work: Path) -> dict[str, list[str]]:
    digits, store = work / "digits", work / "s.h5"
    return {"--help": ["--help"], "store info": ["store", "info", str(store)], "backbones": ["backbones"],
            "no-op extract": ["extract", "--data", str(digits), "--out", str(store), "--workers", "0"]}


def _measure(checkout: Path, work: Path, repeat: int) -> dict[str, float]:
    """Each command run from `work` with the package of `checkout` first on the path."""
    env = {**os.environ, "PYTHONPATH": str(checkout), "FEATPIPE_CACHE": str(work / "cache")}
    runner = [sys.executable, "-m", "pipeline", "--quiet"]
    for argv in _commands(work).values():  # warm: catalogue built, store up to date, files in the page cache
        subprocess.run(runner + argv, cwd=work, env=env, capture_output=True, timeout=900)
    return {name: _time(runner + argv, cwd=work, env=env, repeat=repeat) for name, argv in _commands(work).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--baseline", default=None, help="a git revision to compare with (e.g. HEAD~5)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from pipeline.demo import write_digits_folder

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkouts = {"now": REPO}
        if args.baseline:
            subprocess.run(["git", "worktree", "add", "--detach", str(tmp / "baseline"), args.baseline], cwd=REPO,
                           check=True, capture_output=True)
            checkouts["baseline"] = tmp / "baseline"
        try:
            results = {}
            for label, checkout in checkouts.items():
                work = tmp / f"work-{label}"
                write_digits_folder(work / "digits")
                results[label] = _measure(checkout, work, args.repeat)
        finally:
            if args.baseline:
                subprocess.run(["git", "worktree", "remove", "--force", str(tmp / "baseline")], cwd=REPO,
                               capture_output=True)
    print(f"{'command':16s} " + " ".join(f"{label:>10s}" for label in results) +
          ("      ratio" if args.baseline else ""))
    for name in results["now"]:
        row = f"{name:16s} " + " ".join(f"{results[label][name]:9.2f}s" for label in results)
        if args.baseline:
            row += f" {results['baseline'][name] / results['now'][name]:9.1f}x"
        print(row)
    out = REPO / "data" / "benchmarks" / "startup.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"repeat": args.repeat, "baseline": args.baseline, "seconds": results}, indent=2))
    print(f"written {out}")


if __name__ == "__main__":
    main()
