"""The transfer comparison in one table: on one data set, a linear probe, a linear probe on augmented views, partial
fine-tuning of the last 1 and 2 blocks from cached activations, and (for small sets) the full fine-tune loop from
images, each with its test accuracy, wall time and peak memory.

Every method runs as its own `python -m pipeline` process, started from this one (which imports no torch), and its
wall time and peak resident memory are those of that process alone (`os.wait4`). The cached methods share one
extraction (`--layer BLOCK --keep-spatial --views K`), shown as its own row: its cost is paid once, whatever is
trained on it after.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, PipelineError


@dataclass(frozen=True)
class TransferConfig:
    data: str
    out_dir: Path
    backbone: str = "efficientnet_lite0"
    layer: str = "blocks.4"  # the block whose output is cached: finetune trains the blocks after it
    views: int = 2
    blocks: tuple[int, ...] = (1, 2)
    epochs: int = 30
    full: bool = True  # also the full fine-tune loop from images (small sets)
    full_epochs: int = 15
    full_max_images: int = 5000
    extract_args: tuple[str, ...] = ()  # passed on to extract (e.g. --workers 0, --random-init)
    finetune_args: tuple[str, ...] = ()  # passed on to finetune and finetune-images (e.g. --device cuda)
    resamples: int = 1000

    def __post_init__(self) -> None:
        if self.views < 0 or any(b < 0 for b in self.blocks) or self.epochs < 1 or self.full_epochs < 1:
            raise ConfigError("views and blocks must be >= 0, epochs >= 1")


@dataclass
class Measured:
    """One method's process: exit code, wall seconds, peak resident memory (MiB) and its last error line."""

    returncode: int
    seconds: float
    peak_mib: float
    error: str


def measured(argv: list[str]) -> Measured:
    """Run `python -m pipeline ARGV` and measure that process alone (wait4's rusage of the child)."""
    with tempfile.TemporaryFile(mode="w+") as err:
        began = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", "--quiet", *argv],
                                stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - began
        err.seek(0)
        lines = [line for line in err.read().splitlines() if line.strip()]
    return Measured(proc.returncode, seconds, usage.ru_maxrss / 1024, lines[-1] if lines else "")


def _steps(config: TransferConfig, store: Path) -> list[tuple[str, str, list[str], Path | None]]:
    """(key, method, argv, results JSON) of every method, in the table's order."""
    out = config.out_dir
    common = ["--resamples", str(config.resamples), "--no-report", "--overwrite"]
    tune = ["--epochs", str(config.epochs), *common, *config.finetune_args]
    steps = [("extract", f"extract {config.backbone} (pre-logits + {config.layer} activations"
                         f"{f' + {config.views} views per train image' if config.views else ''})",
              ["extract", "--data", str(config.data), "--out", str(store), "--backbone", config.backbone,
               "--layer", config.layer, "--keep-spatial", "--views", str(config.views), *config.extract_args], None),
             ("probe", "linear probe (logreg)", ["probe", "--store", str(store), "--out", str(out / "probe.json"),
                                                 *common], out / "probe.json")]
    if config.views:
        steps.append(("probe_views", f"linear probe + {config.views} augmented views",
                      ["probe", "--store", str(store), "--views", "--out", str(out / "probe_views.json"), *common],
                      out / "probe_views.json"))
    for b in config.blocks:
        steps.append((f"finetune_{b}", f"finetune {b} block(s) from cache",
                      ["finetune", "--store", str(store), "--blocks", str(b), "--out",
                       str(out / f"finetune_{b}.json"), *tune], out / f"finetune_{b}.json"))
    if config.views and config.blocks:
        b = config.blocks[0]
        steps.append((f"finetune_{b}_views", f"finetune {b} block(s) from cache + views",
                      ["finetune", "--store", str(store), "--blocks", str(b), "--views", "--out",
                       str(out / f"finetune_{b}_views.json"), *tune], out / f"finetune_{b}_views.json"))
    if config.full:
        steps.append(("full", "full fine-tune from images (reference)",
                      ["finetune-images", "--store", str(store), "--out", str(out / "full.json"), "--epochs",
                       str(config.full_epochs), "--max-images", str(config.full_max_images), "--resamples",
                       str(config.resamples), *config.finetune_args],
                      out / "full.json"))
    return steps


def run_transfer(config: TransferConfig) -> dict[str, Any]:
    """Run every method, then write `transfer.json` and `transfer.md` in the output folder; the results."""
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "store.h5"
    rows: list[dict[str, Any]] = []
    for key, method, argv, results in _steps(config, store):
        run = measured(argv)
        if run.returncode != 0:
            raise PipelineError(f"transfer: {method} failed (exit {run.returncode}): {run.error}")
        row = {"key": key, "method": method, "seconds": round(run.seconds, 2), "peak_rss_mib": round(run.peak_mib, 1),
               "command": "python -m pipeline " + " ".join(argv)}
        if results is not None:
            r = json.loads(results.read_text())
            row.update(test_top1=r["test_top1"], interval=(r.get("test_intervals") or {}).get("top1"),
                       n_train=r["n_train"], epochs=r.get("epochs_run"), chosen=r.get("chosen"))
        rows.append(row)
    table = transfer_table(rows)
    (out / "transfer.md").write_text(table + "\n")
    payload = {"data": str(config.data), "backbone": config.backbone, "layer": config.layer, "rows": rows}
    (out / "transfer.json").write_text(json.dumps(payload, indent=2) + "\n")
    return {**payload, "table": table}


def transfer_table(rows: list[dict[str, Any]]) -> str:
    """The markdown table: method, test top-1 with its interval, wall time, peak memory."""
    lines = ["| method | test top-1 % [95% CI] | train rows | wall s | peak RSS MiB |", "|---|---|---|---|---|"]
    for r in rows:
        if "test_top1" in r:
            ci = r.get("interval")
            acc = f"{100 * r['test_top1']:.2f}" + (f" [{100 * ci[0]:.2f}, {100 * ci[1]:.2f}]" if ci else "")
            n = str(r["n_train"])
        else:
            acc, n = "-", "-"
        lines.append(f"| {r['method']} | {acc} | {n} | {r['seconds']:.1f} | {r['peak_rss_mib']:.0f} |")
    return "\n".join(lines)
