"""Torch full-batch L-BFGS logistic head vs scikit-learn's, on a large synthetic feature set.

Synthetic "features": one unit-norm mean per class plus Gaussian noise, L2-normalised like the store's rows, split
80/20. Both heads fit the same objective at the same C on the same rows; the script prints each one's fit time,
iterations and test top-1, and the ratios. The torch head runs on CUDA when there is a GPU (`--device`).

    python benchmarks/heads.py                      # 100,000 x 384-d, 100 classes
    python benchmarks/heads.py --rows 20000 --dim 256 --classes 50
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from pipeline.evaluation.heads import PROBE_TOL, fit_quietly
from pipeline.evaluation.torch_head import TorchLogisticRegression


def synthetic(rows: int, dim: int, classes: int, *, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(classes, dim)).astype(np.float32)
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    y = rng.integers(0, classes, size=rows)
    x = means[y] + rng.normal(scale=noise / np.sqrt(dim), size=(rows, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--noise", type=float, default=6.0, help="noise norm relative to the class means")
    parser.add_argument("--C", type=float, default=10.0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("data/benchmarks/heads.json"))
    args = parser.parse_args()

    x, y = synthetic(args.rows, args.dim, args.classes, noise=args.noise, seed=args.seed)
    cut = int(0.8 * len(x))
    x_train, y_train, x_test, y_test = x[:cut], y[:cut], x[cut:], y[cut:]
    print(f"{args.rows:,} rows x {args.dim}-d, {args.classes} classes; train {cut:,}, test {len(x) - cut:,}; "
          f"C={args.C}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"cuda={'yes: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no'}")

    results = {}
    heads = {
        "sklearn": LogisticRegression(C=args.C, solver="lbfgs", max_iter=5000, tol=PROBE_TOL),
        "torch": TorchLogisticRegression(C=args.C, max_iter=5000, device=args.device),
    }
    for name, model in heads.items():
        if name == "torch" and torch.cuda.is_available():  # warm the CUDA context outside the timing
            TorchLogisticRegression(C=args.C, max_iter=2, device=args.device).fit(x_train[:1000], y_train[:1000])
        start = time.perf_counter()
        converged = fit_quietly(model, x_train, y_train)
        seconds = time.perf_counter() - start
        top1 = float(np.mean(model.predict(x_test) == y_test))
        iterations = int(np.max(model.n_iter_))
        results[name] = {"seconds": round(seconds, 2), "test_top1": top1, "iterations": iterations,
                         "converged": converged}
        print(f"{name:8s} fit {seconds:8.2f} s  {iterations:5d} iterations  test top-1 {100 * top1:6.2f}%  "
              f"converged={converged}")
    speedup = results["sklearn"]["seconds"] / results["torch"]["seconds"]
    gap = 100 * (results["torch"]["test_top1"] - results["sklearn"]["test_top1"])
    agreement = float(np.mean(heads["sklearn"].predict(x_test) == heads["torch"].predict(x_test)))
    print(f"torch / sklearn: {speedup:.2f}x faster; top-1 difference {gap:+.2f} points; "
          f"{100 * agreement:.2f}% of test predictions identical")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"config": vars(args) | {"out": str(args.out)}, "results": results,
                                    "speedup": speedup, "top1_gap_points": gap, "agreement": agreement},
                                   indent=2) + "\n")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
