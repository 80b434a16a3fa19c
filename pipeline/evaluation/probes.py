"""Probes on cached features: the protocol, few-shot probes, saved heads and `predict`.

Protocol (the reference one for linear-probe benchmarks): L2-regularised multinomial logistic regression (L-BFGS);
C is chosen on a validation set only (the store's `val` split, or a fixed stratified slice of train), the head is refit
on train+val with that C, and the test split is evaluated exactly once. Test data never influences a choice. The
other heads (`pipeline.evaluation.heads`) follow the same protocol with their own hyper-parameter.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import ProbeConfig
from pipeline.errors import PipelineError
from pipeline.evaluation.head_file import (
    HEAD_SUFFIX,
    SavedHead,
    export_head,
    head_bytes,
    load_saved_head,
)
from pipeline.evaluation.heads import HeadSpec, class_scores, fit_quietly, head_spec
from pipeline.evaluation.intervals import (
    DEFAULT_RESAMPLES,
    mean_intervals,
    order_digest,
    pack_correct,
    scoring_order,
    unpack_correct,
)
from pipeline.evaluation.metrics import classification_metrics, predicted
from pipeline.outputs import check_output, owned_json, results_stem, sibling, store_stem, write_atomic
from pipeline.sources.hints import how_to
from pipeline.sources.views import view_mask, view_rows_of
from pipeline.splits import holdout_mask
from pipeline.store.read import FeatureSet, load_store


def stratified_holdout(labels: np.ndarray, keys: list[str], *, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of a fixed stratified slice: per class, `round(n * fraction)` rows picked by a seeded hash of
    their `keys` (content hashes), so the slice is the same whatever the order of the rows. Each class with two or
    more rows gives at least one and keeps at least one."""
    return holdout_mask(np.asarray(labels), keys, fraction=fraction, seed=seed)


def protocol_splits(fs: FeatureSet, *, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                                 str]:
    """(train, val, test) masks over labelled rows and where val came from: the store's `val` split, else a fixed
    stratified slice of train. Raises when the protocol cannot run (no test split, no training images, test classes
    never seen in training, fewer than two training classes)."""
    labelled = fs.labels >= 0
    kind = fs.made.source
    if not labelled.any():
        raise PipelineError(f"{fs.path} has no labelled rows, so there is nothing to probe; {how_to(kind, 'labels')}")
    train, val, test = (fs.mask(s) & labelled for s in ("train", "val", "test"))
    if not test.any():
        raise PipelineError(f"{fs.path} has no labelled test split; {how_to(kind, 'splits')}")
    if not train.any():
        raise PipelineError(f"{fs.path} has no labelled train split; the probe needs training images: "
                            f"{how_to(kind, 'splits')}")
    if val.any():
        val_source = "val split"
    else:
        holdout = np.zeros(len(fs), dtype=bool)
        rows = np.flatnonzero(train)
        keys = fs.row_keys()
        holdout[rows] = stratified_holdout(fs.labels[rows], [keys[i] for i in rows], fraction=val_fraction, seed=seed)
        val, train = holdout, train & ~holdout
        val_source = f"stratified {val_fraction:.0%} of train (seed {seed})"
        if not val.any():
            raise PipelineError("too few training images to hold out a validation slice; add images or a val split")
    unseen = sorted(set(np.unique(fs.labels[test])) - set(np.unique(fs.labels[train | val])))
    if unseen:
        names = [fs.class_names[i] for i in unseen[:5]]
        raise PipelineError(f"test classes {names} have no train/val images; the probe cannot predict them")
    if len(np.unique(fs.labels[train])) < 2:
        raise PipelineError("the training split has fewer than two classes; a classifier needs at least two")
    return train, val, test, val_source


def image_splits(fs: FeatureSet, *, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                             str]:
    """The probe protocol's (train, val, test) row numbers of `fs` (loaded with its views), in canonical order,
    decided on the images alone: an image and its views are one image."""
    originals = np.flatnonzero(~view_mask(fs.ids, fs.attrs))
    images = fs.subset(originals)
    *masks, val_source = protocol_splits(images, val_fraction=val_fraction, seed=seed)
    train, val, test = (originals[canonical_order(images, m)] for m in masks)
    return train, val, test, val_source


def train_rows(fs: FeatureSet, train: np.ndarray, *, views: bool) -> np.ndarray:
    """The training rows: train, plus (with `views`) the augmented views of train images (never of val images)."""
    if not views:
        return train
    extra = view_rows_of(fs, train)
    if not len(extra):
        raise PipelineError(f"{fs.path} holds no augmented views of its training images; extract it with --views K")
    return np.concatenate([train, extra])


def _sweep(spec: HeadSpec, grid: tuple[float, ...], x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray,
           y_val: np.ndarray, *, max_iter: int, seed: int, device: str) -> tuple[float, dict, dict]:
    """Fit one head per grid value on train, score on val; the best value (ties: the stronger regularisation)."""
    val_scores, converged = {}, {}
    best, best_acc = None, -1.0
    for value in spec.strong_first(grid):
        model = spec.make(value, max_iter=max_iter, seed=seed, device=device)
        converged[value] = fit_quietly(model, x_train, y_train)
        acc = float(np.mean(model.predict(x_val) == y_val))
        val_scores[value] = acc
        if acc > best_acc:
            best, best_acc = value, acc
    return best, val_scores, converged


def canonical_order(fs: FeatureSet, mask: np.ndarray) -> np.ndarray:
    """The rows of `mask` ordered by content hash: fits see the same rows in the same order whichever source kind
    (and listing order) the images came from."""
    rows = np.flatnonzero(mask)
    keys = fs.row_keys()
    return rows[np.argsort(np.array([keys[i] for i in rows], dtype=object), kind="stable")] if len(rows) else rows


def fit_probe(fs: FeatureSet, *, head: str = "logreg", grid: tuple[float, ...] | None = None,
              val_fraction: float = 0.2, seed: int = 0, max_iter: int = 5000, device: str = "auto",
              resamples: int = DEFAULT_RESAMPLES, val_seeds: tuple[int, ...] = (),
              views: bool = False) -> tuple[Any, dict[str, Any]]:
    """Run the probe protocol on a feature set; returns the refit head and a JSON-ready result dict.

    The grid value is chosen on validation only, the head refit on train+val with it, and the test split scored
    once: test rows are never passed to a fit or a choice. The test figures carry bootstrap intervals (`resamples`),
    and the result records which test images were right (`test_correct`) for paired comparisons. With `val_seeds`
    and no `val` split, the choice is also made on the slice drawn with each seed: the spread over seeds. With
    `views` (`fs` loaded with its views), the augmented views of the training images are trained on too.
    """
    spec = head_spec(head)
    grid = spec.grid if grid is None else tuple(grid)
    if not grid:
        raise PipelineError(f"the {spec.param} grid is empty; give at least one value")
    train, val, test, val_source = image_splits(fs, val_fraction=val_fraction, seed=seed)
    both = np.zeros(len(fs), dtype=bool)
    both[np.concatenate([train, val])] = True
    refit = canonical_order(fs, both)
    if views:  # the views of the training images join them (of train+val ones for the refit)
        train, refit = train_rows(fs, train, views=True), train_rows(fs, refit, views=True)
    x, y = fs.features, fs.labels
    start = time.perf_counter()
    best, val_scores, converged = _sweep(spec, grid, x[train], y[train], x[val], y[val], max_iter=max_iter,
                                         seed=seed, device=device)
    model = spec.make(best, max_iter=max_iter, seed=seed, device=device)
    refit_converged = fit_quietly(model, x[refit], y[refit])
    scores = class_scores(model, x[test])
    metrics = classification_metrics(y[test], scores, model.classes_, fs.class_names, resamples=resamples, seed=seed)
    fit_seconds = round(time.perf_counter() - start, 3)
    result = {
        "protocol": f"{spec.description}; {spec.param} chosen on validation, refit on train+val, tested once",
        "head": head,
        "param": spec.param,
        "chosen": best,
        "val_top1_by_value": {str(v): a for v, a in val_scores.items()},
        "converged_by_value": {str(v): c for v, c in converged.items()},
        "refit_converged": refit_converged,
        "val_source": val_source,
        "n_train": int(len(train)),
        "n_train_views": int(view_mask(fs.ids[train], fs.attrs).sum()),
        "n_val": int(len(val)),
        "n_test": int(len(test)),
        "seconds": fit_seconds,
        **{f"test_{k}" if k != "n" else "n_test_scored": v for k, v in metrics.items()},
        "test_correct": correctness(fs, test, predicted(scores, model.classes_)),
    }
    if val_seeds:
        result["val_seed_spread"] = seed_spread(fs, spec, grid, test, val_seeds=val_seeds, val_fraction=val_fraction,
                                                max_iter=max_iter, device=device, known={best: model},
                                                chose={seed: best})
    return model, result


def correctness(fs: FeatureSet, rows: np.ndarray, y_pred: np.ndarray) -> dict[str, Any]:
    """Which of `rows` were predicted right, packed for paired comparisons (`pipeline.evaluation.intervals`)."""
    keys = fs.row_keys()
    return pack_correct(y_pred == fs.labels[rows], [keys[i] for i in rows], [str(fs.ids[i]) for i in rows])


def correct_by_row(fs: FeatureSet, rows: np.ndarray, packed: dict[str, Any]) -> np.ndarray:
    """The correctness record `correctness` packed for `rows` (in any order), back as one bool per row of `rows`."""
    keys = fs.row_keys()
    row_keys = [keys[i] for i in rows]
    order = scoring_order(row_keys, [str(fs.ids[i]) for i in rows])
    bits = unpack_correct(packed)
    if len(bits) != len(rows) or packed.get("digest") != order_digest(row_keys):
        raise PipelineError(f"the results scored other images than these {len(rows)} rows of {fs.path}; "
                            "compute them again on this store")
    out = np.empty(len(rows), dtype=bool)
    out[order] = bits
    return out


def seed_spread(fs: FeatureSet, spec: HeadSpec, grid: tuple[float, ...], test: np.ndarray, *,
                val_seeds: tuple[int, ...], val_fraction: float, max_iter: int, device: str,
                known: dict[float, Any], chose: dict[int, float] | None = None) -> dict[str, Any]:
    """The protocol's randomness: the validation slice drawn with each seed, the value each one chooses and the
    test top-1 of the head refit with it (train+val is the same rows whatever the seed). `known` holds heads already
    refit (by value), `chose` the values already chosen (by seed: the protocol's own run). Nothing varies with the
    seed when the store has its own val split."""
    if fs.mask("val").any():
        return {"note": "the store's val split is fixed: the protocol has no random part", "seeds": []}
    x, y = fs.features, fs.labels
    runs = []
    refit = None
    for s in val_seeds:
        train_mask, val_mask, _, _ = protocol_splits(fs, val_fraction=val_fraction, seed=s)
        train, val = canonical_order(fs, train_mask), canonical_order(fs, val_mask)
        refit = canonical_order(fs, train_mask | val_mask) if refit is None else refit  # the same rows every seed
        chosen = (chose or {}).get(s)
        if chosen is None:
            chosen, _, _ = _sweep(spec, grid, x[train], y[train], x[val], y[val], max_iter=max_iter, seed=s,
                                  device=device)
        if chosen not in known:
            known[chosen] = spec.make(chosen, max_iter=max_iter, seed=s, device=device)
            fit_quietly(known[chosen], x[refit], y[refit])
        top1 = float(np.mean(known[chosen].predict(x[test]) == y[test]))
        runs.append({"seed": s, "chosen": chosen, "test_top1": top1})
    top1 = np.array([r["test_top1"] for r in runs])
    return {"seeds": runs, "top1_mean": float(top1.mean()), "top1_std": float(top1.std(ddof=0)),
            "top1_range": [float(top1.min()), float(top1.max())]}


def few_shot_rows(labels: np.ndarray, pool: np.ndarray, *, shots: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """From the rows in `pool`, draw `shots` per class for training and up to `shots` more (disjoint) for
    validation, with `seed`. Raises when a class has fewer than `shots` + 1 images to draw from."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for cls in np.unique(labels[pool]):
        rows = rng.permutation(pool[labels[pool] == cls])
        if len(rows) < shots + 1:
            raise PipelineError(f"class {cls} has {len(rows)} training image(s), too few for {shots}-shot "
                                f"(needs {shots} plus one for validation); use fewer shots")
        train.append(rows[:shots])
        val.append(rows[shots:2 * shots])
    return np.concatenate(train), np.concatenate(val)


def fit_few_shot(fs: FeatureSet, *, shots: tuple[int, ...], seeds: tuple[int, ...] = (0, 1, 2),
                 head: str = "logreg", grid: tuple[float, ...] | None = None, max_iter: int = 5000,
                 device: str = "auto", resamples: int = DEFAULT_RESAMPLES) -> dict[str, Any]:
    """Few-shot probes: for each k in `shots` and each seed, train on k images per class drawn from train+val,
    choose the grid value on a disjoint draw of up to k more per class, and score the full test split once.
    Returns per-seed results (each with its bootstrap interval), the mean and standard deviation over seeds (the
    draws' spread) and the bootstrap interval of the mean over the test images (the test set's sampling)."""
    spec = head_spec(head)
    grid = spec.grid if grid is None else tuple(grid)
    labelled = fs.labels >= 0
    pool = canonical_order(fs, (fs.mask("train") | fs.mask("val")) & labelled)
    test = canonical_order(fs, fs.mask("test") & labelled)
    if not len(test):
        raise PipelineError(f"{fs.path} has no labelled test split for the few-shot probes; "
                            f"{how_to(fs.made.source, 'splits')}")
    if len(np.unique(fs.labels[pool])) < 2:
        raise PipelineError(f"{fs.path} has fewer than two labelled classes in train+val; a few-shot probe needs at "
                            "least two classes")
    unseen = sorted(set(np.unique(fs.labels[test])) - set(np.unique(fs.labels[pool])))
    if unseen:
        raise PipelineError(f"test classes {[fs.class_names[i] for i in unseen[:5]]} have no train/val images to "
                            "draw shots from")
    x, y = fs.features, fs.labels
    start = time.perf_counter()
    by_shots: dict[str, Any] = {}
    for k in sorted(set(shots)):
        runs, right = [], []
        for seed in seeds:
            train, val = few_shot_rows(y, pool, shots=k, seed=seed)
            best, _, _ = _sweep(spec, grid, x[train], y[train], x[val], y[val], max_iter=max_iter, seed=seed,
                                device=device)
            model = spec.make(best, max_iter=max_iter, seed=seed, device=device)
            fit_quietly(model, x[train], y[train])
            scores = class_scores(model, x[test])
            m = classification_metrics(y[test], scores, model.classes_, fs.class_names, resamples=resamples,
                                       seed=seed)
            right.append(predicted(scores, model.classes_) == y[test])
            runs.append({"seed": seed, "chosen": best, "top1": m["top1"], "balanced_accuracy": m["balanced_accuracy"],
                         "macro_f1": m["macro_f1"], "intervals": m.get("intervals", {})})
        by_shots[str(k)] = _over_seeds(runs, np.mean(right, axis=0), resamples=resamples)
        by_shots[str(k)]["n_train"] = int(k * len(np.unique(y[pool])))
    return {
        "protocol": f"few-shot {spec.description}: k images per class from train+val, {spec.param} chosen on a "
                    "disjoint draw of up to k more per class, trained on the k, scored on the whole test split",
        "head": head,
        "param": spec.param,
        "seeds": list(seeds),
        "n_test": int(len(test)),
        "seconds": round(time.perf_counter() - start, 3),
        "by_shots": by_shots,
    }


def _over_seeds(runs: list[dict[str, Any]], right_share: np.ndarray, *, resamples: int) -> dict[str, Any]:
    """Few-shot runs of one k summed up: the mean and spread over seeds, and the interval of the mean from
    resampling the test images (each image's share of seeds that got it right)."""
    top1 = np.array([r["top1"] for r in runs])
    entry: dict[str, Any] = {"runs": runs, "top1_mean": float(top1.mean()), "top1_std": float(top1.std(ddof=0))}
    if resamples:
        entry["top1_mean_interval"] = mean_intervals({"top1": right_share}, resamples=resamples)["top1"]
    return entry


def default_results_path(store: Path, kind: str) -> Path:
    """Results beside the store: `NAME.h5` -> `NAME.KIND.json` (only the store's extension is dropped)."""
    store = Path(store)
    return store.with_name(f"{store_stem(store)}.{kind}.json")


def _check_device(head: str, device: str) -> None:
    """The torch head's device exists (checked before any fit, not found missing half way)."""
    if head == "torch-logreg":
        from pipeline.engine.devices import resolve_device

        resolve_device(device)


def probe_outputs(config: ProbeConfig) -> dict[str, Path]:
    """Every file `run_probe` will write, checked before any compute (see `pipeline.outputs.check_output`)."""
    from pipeline.report.render import check_report_outputs

    out = Path(config.out) if config.out else default_results_path(Path(config.store), "probe")
    stem = results_stem(out)
    targets = {"results": check_output(out, owned=owned_json("probe-results"), overwrite=config.overwrite,
                                       protect=[config.store])}
    if not config.shots:
        targets["head"] = check_output(sibling(stem, HEAD_SUFFIX), owned=_owned_head, overwrite=config.overwrite,
                                       protect=[config.store], what="the head file")
    if config.report:
        check_report_outputs(stem, overwrite=config.overwrite, protect=[config.store])
    return {**targets, "stem": stem, "out": out}


def _owned_head(path: Path) -> bool:
    try:
        load_saved_head(path)
    except PipelineError:
        return False
    return True


def run_probe(config: ProbeConfig) -> tuple[dict[str, Any], Path]:
    """Load a store, run the probe protocol (or the few-shot probes), save the results JSON, the fitted head and the
    report beside it. Every output is checked before the fit, and written only once everything is computed."""
    from pipeline.report.blocks import report_blocks, save_json, title_for
    from pipeline.report.render import write_report_blocks

    _check_device(config.head, config.device)
    from pipeline.evaluation.stream_probe import run_streamed_probe, streams

    if streams(config):
        return run_streamed_probe(config)
    fs = load_store(config.store, views=config.views)
    targets = probe_outputs(config)
    saved = None
    if config.shots:
        result = fit_few_shot(fs, shots=config.shots, seeds=config.seeds, head=config.head, grid=config.grid,
                              max_iter=config.max_iter, device=config.device, resamples=config.resamples)
        result.update(fs.provenance())
    else:
        model, result = fit_probe(fs, head=config.head, grid=config.grid, val_fraction=config.val_fraction,
                                  seed=config.seed, max_iter=config.max_iter, device=config.device,
                                  resamples=config.resamples, val_seeds=config.val_seeds, views=config.views)
        result.update(fs.provenance(), head_file=str(targets["head"].resolve()))
        saved = head_for(model, fs=fs, result=result)
    blocks = report_blocks(fs, title=title_for(fs), probe=result) if config.report else None
    if saved is not None:
        write_atomic(targets["head"], head_bytes(saved))
    if blocks is not None:
        result["report"] = [str(p.resolve()) for p in write_report_blocks(targets["stem"], blocks)]
    save_json(targets["results"], {**result, "featpipe": {"kind": "probe-results", "version": 1}})
    return result, targets["out"]


def head_for(model: Any, *, fs: FeatureSet, result: dict[str, Any]) -> SavedHead:
    """A fitted head as arrays, with what is needed to use it safely: the feature space it expects and its classes."""
    saved = export_head(model)
    saved.meta = {
        "head": result["head"], "param": result["param"], "chosen": float(result["chosen"]),
        "test_top1": float(result["test_top1"]), "class_names": list(fs.class_names),
        "store": str(Path(fs.path).resolve()), "cache_key": fs.made.cache_key, "random_init": bool(fs.made.random_init),
        **fs.made.feature_space(),
    }
    return saved
