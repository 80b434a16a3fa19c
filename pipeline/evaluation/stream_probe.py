"""The linear probe for stores beyond the memory budget: mini-batch multinomial logistic regression in torch, the
rows streamed from the store, on CPU or CUDA, under the probe protocol.

Objective: scikit-learn's L2 multinomial logistic regression (mean cross-entropy + ||W||^2 / (2 C n), intercept not
penalised), minimised by Adam on shuffled mini-batches, the learning rate halved whenever an epoch fails to lower the
objective, stopped when an epoch improves it by less than `TOL` (relative) or after `epochs` passes.
Protocol, as `pipeline.evaluation.probes`: C chosen on validation only (the store's val split, else a fixed stratified
slice of train picked by content hash), refit on train+val, test scored once. The sweep runs from the strongest
regularisation up, each fit warm-started from the previous one, and stops once validation accuracy falls.

Rows reach the optimiser either from memory (when the training rows fit the budget) or streamed: each epoch reads the
store in a fresh random order of chunks, a few chunks at a time, shuffled together (so a store sorted by class still
gives mixed batches).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.errors import PipelineError
from pipeline.evaluation.intervals import pack_correct_arrays
from pipeline.evaluation.metrics import prediction_metrics, ranked_top5_hits
from pipeline.sources.hints import how_to
from pipeline.splits import held_out_count
from pipeline.store.budget import block_rows as budget_rows
from pipeline.store.columns import StreamedSet

BATCH = 4096  # the most rows per mini-batch; small sets take smaller ones, so an epoch is at least ~64 steps
MIN_BATCH = 128
CHUNK_ROWS = 16384  # store rows read at a time when streaming (chunk-aligned reads are fast)
LR = 0.01
TOL = 2e-3  # relative improvement of the epoch objective below which a fit stops
_MIX = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))


def _ranks(keys: np.ndarray, seed: int) -> np.ndarray:
    """A seeded 64-bit mix (splitmix64) of each key: the order the hash-based holdout picks in."""
    with np.errstate(over="ignore"):
        z = keys ^ (np.uint64(seed) * _MIX[0])
        z = (z ^ (z >> np.uint64(30))) * _MIX[1]
        z = (z ^ (z >> np.uint64(27))) * _MIX[2]
        return z ^ (z >> np.uint64(31))


def hash_holdout(labels: np.ndarray, keys: np.ndarray, *, fraction: float, seed: int) -> np.ndarray:
    """Per class, `held_out_count(n, fraction)` rows with the smallest seeded rank of their content key (equal keys
    together): a fixed stratified slice, independent of row order, computed on compact arrays."""
    ranks = _ranks(keys, seed)
    mask = np.zeros(len(labels), dtype=bool)
    for cls in np.unique(labels):  # one class at a time: memory follows the largest class, not the store
        group = np.flatnonzero(labels == cls)
        take = held_out_count(len(group), fraction)
        if take:
            cut = np.partition(ranks[group], take - 1)[take - 1]
            mask[group[ranks[group] <= cut]] = True
    return mask


def streamed_splits(ss: StreamedSet, *, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray,
                                                                                  np.ndarray, str]:
    """(train, val, test) masks of the probe protocol over a streamed store's labelled images."""
    labelled = ss.labels >= 0
    kind = ss.made.source
    train, val, test = (ss.mask(s) & labelled for s in ("train", "val", "test"))
    if not test.any():
        raise PipelineError(f"{ss.path} has no labelled test split; {how_to(kind, 'splits')}")
    if not train.any():
        raise PipelineError(f"{ss.path} has no labelled train split; {how_to(kind, 'splits')}")
    if val.any():
        source = "val split"
    else:
        rows = np.flatnonzero(train)
        val = np.zeros(len(ss), dtype=bool)
        val[rows] = hash_holdout(ss.labels[rows], ss.keys[rows], fraction=val_fraction, seed=seed)
        train = train & ~val
        source = f"stratified {val_fraction:.0%} of train by content hash (seed {seed})"
    if len(np.unique(ss.labels[train])) < 2:
        raise PipelineError("the training split has fewer than two classes; a classifier needs at least two")
    unseen = sorted(set(np.unique(ss.labels[test])) - set(np.unique(ss.labels[train | val])))
    if unseen:
        raise PipelineError(f"test classes {[ss.class_names[i] for i in unseen[:5]]} have no train/val images; "
                            "the probe cannot predict them")
    return train, val, test, source


class Rows:
    """The rows of one mask as shuffled mini-batches, one epoch at a time: from memory when they fit `budget`
    bytes, else streamed from the store in random chunk order."""

    def __init__(self, ss: StreamedSet, mask: np.ndarray, *, budget: int, device: Any, seed: int) -> None:
        import torch

        self.ss, self.mask, self.device = ss, mask, device
        self.n = int(mask.sum())
        self.batch = int(min(BATCH, max(MIN_BATCH, self.n // 64)))
        self.rng = np.random.default_rng(seed)
        self.labels = torch.as_tensor(ss.labels, device=device)  # int32; each batch's targets widened on use
        self.group = max(1, budget // (4 * CHUNK_ROWS * ss.dim * 4))  # chunks shuffled together
        self.held = None
        if self.n * ss.dim * 4 * 2 <= budget:
            positions = np.flatnonzero(mask)
            feats = np.empty((len(positions), ss.dim), dtype=np.float32)
            at = 0
            for _, block in ss.blocks(mask, block_rows=budget_rows(budget, ss.dim)):
                feats[at:at + len(block)] = block
                at += len(block)
            self.held = (torch.as_tensor(feats, device=device), self.labels[torch.as_tensor(positions,
                                                                                          device=device)])

    @property
    def streamed(self) -> bool:
        return self.held is None

    def batches(self) -> Iterator[tuple[Any, Any]]:
        import torch

        if self.held is not None:
            x, y = self.held
            order = torch.as_tensor(self.rng.permutation(self.n), device=self.device)
            for start in range(0, self.n, self.batch):
                pick = order[start:start + self.batch]
                yield x[pick], y[pick]
            return
        n_store = int(self.ss.attrs["committed_rows"])
        chunks = self.rng.permutation((n_store + CHUNK_ROWS - 1) // CHUNK_ROWS)
        with h5py.File(self.ss.path, "r") as f:
            features = f["features"]
            for g in range(0, len(chunks), self.group):
                parts = [self.ss.chunk_reader(features, int(c) * CHUNK_ROWS, (int(c) + 1) * CHUNK_ROWS, self.mask)
                         for c in chunks[g:g + self.group]]
                positions = np.concatenate([p for p, _ in parts])
                if not len(positions):
                    continue
                x = torch.as_tensor(np.concatenate([b for _, b in parts]), device=self.device)
                y = self.labels[torch.as_tensor(positions, device=self.device)]
                order = torch.as_tensor(self.rng.permutation(len(positions)), device=self.device)
                for start in range(0, len(positions), self.batch):
                    pick = order[start:start + self.batch]
                    yield x[pick], y[pick]


class StreamedLogisticRegression:
    """The fitted head: numpy `coef_` [C, D], `intercept_` [C] and `classes_` (all the store's classes), as
    `TorchLogisticRegression` leaves them, so saved heads and `predict` treat both alike."""

    def __init__(self, n_classes: int, dim: int, device: Any) -> None:
        import torch

        self.device = device
        self.weight = torch.zeros(dim, n_classes, device=device, requires_grad=True)
        self.bias = torch.zeros(n_classes, device=device, requires_grad=True)
        self.classes_ = np.arange(n_classes)

    def fit(self, rows: Rows, *, C: float, epochs: int) -> dict[str, Any]:
        """Minimise the objective for this C from the current weights (a warm start); returns how it went."""
        import torch

        optimizer = torch.optim.Adam([self.weight, self.bias], lr=LR)
        penalty = 1.0 / (2.0 * C * rows.n)
        history: list[float] = []
        for _ in range(epochs):
            total, seen = torch.zeros((), device=self.device), 0
            for x, y in rows.batches():
                optimizer.zero_grad()
                loss = torch.nn.functional.cross_entropy(x @ self.weight + self.bias, y.long()) \
                    + penalty * self.weight.square().sum()
                loss.backward()
                optimizer.step()
                total, seen = total + loss.detach() * len(y), seen + len(y)  # no sync per step on a GPU
            history.append(float(total) / max(seen, 1))
            if len(history) > 1 and history[-1] > history[-2]:
                for group in optimizer.param_groups:
                    group["lr"] /= 2
            if len(history) > 1 and abs(history[-2] - history[-1]) < TOL * abs(history[-2]):
                break
        return {"epochs": len(history), "objective": round(history[-1], 6),
                "converged": len(history) < epochs}

    @property
    def coef_(self) -> np.ndarray:
        return self.weight.detach().T.contiguous().cpu().numpy()

    @property
    def intercept_(self) -> np.ndarray:
        return self.bias.detach().cpu().numpy()

    def state(self) -> tuple[Any, Any]:
        return self.weight.detach().clone(), self.bias.detach().clone()

    def load(self, state: tuple[Any, Any]) -> None:
        import torch

        with torch.no_grad():
            self.weight.copy_(state[0])
            self.bias.copy_(state[1])

    def scores(self, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            return (torch.as_tensor(x, device=self.device) @ self.weight + self.bias).cpu().numpy()


def _accuracy(model: StreamedLogisticRegression, ss: StreamedSet, mask: np.ndarray, rows: int) -> float:
    right = seen = 0
    for positions, x in ss.blocks(mask, block_rows=rows):
        right += int((np.argmax(model.scores(x), axis=1) == ss.labels[positions]).sum())
        seen += len(positions)
    return right / max(seen, 1)


def sweep(model: StreamedLogisticRegression, ss: StreamedSet, train: Rows, val: np.ndarray, grid: list[float], *,
          epochs: int, block: int) -> tuple[float, dict[str, Any]]:
    """Warm-started fits from the strongest regularisation up, stopped once validation accuracy falls; the best
    value (ties: the stronger regularisation) and every fit's figures. The model is left at the best fit."""
    best, best_acc, best_state, runs = None, -1.0, None, {}
    for value in sorted(grid):
        fit = model.fit(train, C=value, epochs=epochs)
        acc = _accuracy(model, ss, val, block)
        runs[value] = {**fit, "val_top1": acc}
        if acc > best_acc:
            best, best_acc, best_state = value, acc, model.state()
        elif acc < best_acc:
            break
    model.load(best_state)
    return best, runs


def fit_streamed_probe(ss: StreamedSet, *, grid: tuple[float, ...], val_fraction: float = 0.2, seed: int = 0,
                       device: str = "auto", max_memory: int, epochs: int = 30,
                       resamples: int = 1000) -> tuple[StreamedLogisticRegression, dict[str, Any]]:
    """The probe protocol on a streamed store with the mini-batch torch head; returns the refit head and a result
    dict with the keys of `fit_probe`'s."""
    import torch

    from pipeline.engine.devices import resolve_device

    torch.manual_seed(seed)
    dev = resolve_device(device)
    train, val, test, val_source = streamed_splits(ss, val_fraction=val_fraction, seed=seed)
    block = budget_rows(max_memory, ss.dim, parts=4)
    start = time.perf_counter()
    model = StreamedLogisticRegression(len(ss.class_names), ss.dim, dev)
    train_rows = Rows(ss, train, budget=max_memory // 2, device=dev, seed=seed)
    best, runs = sweep(model, ss, train_rows, val, list(grid), epochs=epochs, block=block)
    del train_rows
    refit = model.fit(Rows(ss, train | val, budget=max_memory // 2, device=dev, seed=seed + 1), C=best, epochs=epochs)
    tested = _test(model, ss, test, block, resamples=resamples, seed=seed)
    result = {
        "protocol": "logistic regression (L2, mini-batch Adam in torch, streamed from the store); C chosen on "
                    "validation (warm-started sweep, stopped when validation accuracy falls), refit on train+val, "
                    "tested once",
        "head": "torch-logreg", "param": "C", "chosen": best, "solver": "streamed mini-batch",
        "val_top1_by_value": {str(v): r["val_top1"] for v, r in runs.items()},
        "converged_by_value": {str(v): r["converged"] for v, r in runs.items()},
        "fits": {str(v): r for v, r in runs.items()}, "refit": refit, "refit_converged": refit["converged"],
        "val_source": val_source, "n_train": int(train.sum()), "n_train_views": 0, "n_val": int(val.sum()),
        "n_test": int(test.sum()), "seconds": round(time.perf_counter() - start, 3),
        "streamed": {"max_memory": int(max_memory), "batch": BATCH, "block_rows": block}, **tested}
    return model, result


def _test(model: StreamedLogisticRegression, ss: StreamedSet, test: np.ndarray, block: int, *, resamples: int,
          seed: int) -> dict[str, Any]:
    """Score the test rows once, a block at a time, in content order; the figures of `fit_probe`."""
    positions, pred, hit5, ranked = [], [], [], []
    for p, x in ss.blocks(test, block_rows=block):
        scores = model.scores(x)
        truth = scores[np.arange(len(p)), ss.labels[p]]
        positions.append(p)
        pred.append(np.argmax(scores, axis=1))
        hit5.append((scores > truth[:, None]).sum(axis=1) < 5)
        ranked.append(ranked_top5_hits(ss.labels[p], scores))
    positions = np.concatenate(positions)
    canonical = ss.ordered(test)
    rank = np.empty(int(positions.max()) + 1, dtype=np.int64)
    rank[canonical] = np.arange(len(canonical))
    order = np.argsort(rank[positions], kind="stable")
    y_pred, hits = np.concatenate(pred)[order].astype(np.int64), np.concatenate(hit5)[order]
    y = ss.labels[canonical].astype(np.int64)
    classes = np.arange(len(ss.class_names))
    top5 = float(np.mean(np.concatenate(ranked))) if len(classes) > 5 else None
    metrics = prediction_metrics(y, y_pred, classes, ss.class_names, top5=top5,
                                 hits5=hits if top5 is not None else None, resamples=resamples, seed=seed)
    keys, ids = ss.row_keys_of(canonical)
    return {**{f"test_{k}" if k != "n" else "n_test_scored": v for k, v in metrics.items()},
            "test_correct": pack_correct_arrays(y_pred == y, keys, ids)}


def streams(config: Any) -> bool:
    """Whether the store's features exceed `max_memory`: then the probe streams (the torch head only), or refuses."""
    from pipeline.store.budget import store_budget

    held = store_budget(config.store, config.max_memory)
    if held.fits:
        return False
    need = held.need
    if config.head != "torch-logreg":
        raise PipelineError(f"{need}; use --head torch-logreg (it streams the store in bounded memory) or raise "
                            "--max-memory")
    if config.shots or config.val_seeds or config.views:
        raise PipelineError(f"{need}; the streamed probe runs the standard protocol only (no --shots, --val-seeds "
                            "or --views): drop them or raise --max-memory")
    return True


def run_streamed_probe(config: Any) -> tuple[dict[str, Any], Path]:
    """`run_probe` for a store beyond the budget: `pipeline.evaluation.stream_probe` on its compact columns."""
    from pipeline.evaluation.head_file import head_bytes
    from pipeline.evaluation.heads import DEFAULT_CS
    from pipeline.evaluation.probes import head_for, probe_outputs
    from pipeline.outputs import write_atomic
    from pipeline.report.blocks import report_blocks, save_json, title_for
    from pipeline.report.render import write_report_blocks
    from pipeline.store.budget import resolve_max_memory
    from pipeline.store.columns import scan_store

    targets = probe_outputs(config)
    ss = scan_store(config.store)
    model, result = fit_streamed_probe(ss, grid=tuple(config.grid or DEFAULT_CS), val_fraction=config.val_fraction,
                                       seed=config.seed, device=config.device,
                                       max_memory=resolve_max_memory(config.max_memory), epochs=config.epochs,
                                       resamples=config.resamples)
    result.update(ss.provenance(), head_file=str(targets["head"].resolve()))
    saved = head_for(model, fs=ss, result=result)
    blocks = report_blocks(ss, title=title_for(ss), probe=result) if config.report else None
    write_atomic(targets["head"], head_bytes(saved))
    if blocks is not None:
        result["report"] = [str(p.resolve()) for p in write_report_blocks(targets["stem"], blocks)]
    save_json(targets["results"], {**result, "featpipe": {"kind": "probe-results", "version": 1}})
    return result, targets["out"]
