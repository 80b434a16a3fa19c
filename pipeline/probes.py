"""Probes on cached features: the protocol, few-shot probes, saved heads and `predict`.

Protocol (the reference one for linear-probe benchmarks): L2-regularised multinomial logistic regression (L-BFGS);
C is chosen on a validation set only (the store's `val` split, or a fixed stratified slice of train), the head is refit
on train+val with that C, and the test split is evaluated exactly once. Test data never influences a choice. The
other heads (`pipeline.heads`) follow the same protocol with their own hyper-parameter.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import joblib
import numpy as np
from sklearn.base import BaseEstimator

from pipeline.config import ProbeConfig
from pipeline.errors import PipelineError
from pipeline.heads import HeadSpec, class_scores, fit_quietly, head_spec
from pipeline.metrics import classification_metrics
from pipeline.store import FeatureSet, load_store


def stratified_holdout(labels: np.ndarray, *, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of a fixed stratified slice: per class, `round(n * fraction)` rows drawn with `seed`.

    Each class with two or more rows gives at least one and keeps at least one.
    """
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), dtype=bool)
    for cls in np.unique(labels):
        rows = np.flatnonzero(labels == cls)
        n_hold = min(max(round(len(rows) * fraction), 1 if len(rows) >= 2 else 0), len(rows) - 1)
        mask[rng.permutation(rows)[:n_hold]] = True
    return mask


def protocol_splits(fs: FeatureSet, *, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                                 str]:
    """(train, val, test) masks over labelled rows and where val came from: the store's `val` split, else a fixed
    stratified slice of train. Raises when the protocol cannot run (no test split, no training images, test classes
    never seen in training, fewer than two training classes)."""
    labelled = fs.labels >= 0
    train, val, test = (fs.mask(s) & labelled for s in ("train", "val", "test"))
    if not test.any():
        raise PipelineError(f"{fs.path} has no labelled test split; extract with ROOT/test/<class>/... folders or "
                            "without split folders (a stratified test split is then assigned)")
    if not train.any():
        raise PipelineError(f"{fs.path} has no labelled train split; the probe needs training images")
    if val.any():
        val_source = "val split"
    else:
        holdout = np.zeros(len(fs), dtype=bool)
        holdout[np.flatnonzero(train)] = stratified_holdout(fs.labels[train], fraction=val_fraction, seed=seed)
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


def fit_probe(fs: FeatureSet, *, head: str = "logreg", grid: tuple[float, ...] | None = None,
              val_fraction: float = 0.2, seed: int = 0, max_iter: int = 5000,
              device: str = "auto") -> tuple[BaseEstimator, dict[str, Any]]:
    """Run the probe protocol on a feature set; returns the refit head and a JSON-ready result dict.

    The grid value is chosen on validation only, the head refit on train+val with it, and the test split scored
    once: test rows are never passed to a fit or a choice.
    """
    spec = head_spec(head)
    grid = spec.grid if grid is None else tuple(grid)
    if not grid:
        raise PipelineError(f"the {spec.param} grid is empty; give at least one value")
    train, val, test, val_source = protocol_splits(fs, val_fraction=val_fraction, seed=seed)
    x, y = fs.features, fs.labels
    start = time.perf_counter()
    best, val_scores, converged = _sweep(spec, grid, x[train], y[train], x[val], y[val], max_iter=max_iter,
                                         seed=seed, device=device)
    model = spec.make(best, max_iter=max_iter, seed=seed, device=device)
    refit = train | val
    refit_converged = fit_quietly(model, x[refit], y[refit])
    metrics = classification_metrics(y[test], class_scores(model, x[test]), model.classes_, fs.class_names)
    result = {
        "protocol": f"{spec.description}; {spec.param} chosen on validation, refit on train+val, tested once",
        "head": head,
        "param": spec.param,
        "chosen": best,
        "val_top1_by_value": {str(v): a for v, a in val_scores.items()},
        "converged_by_value": {str(v): c for v, c in converged.items()},
        "refit_converged": refit_converged,
        "val_source": val_source,
        "n_train": int(train.sum()),
        "n_val": int(val.sum()),
        "n_test": int(test.sum()),
        "seconds": round(time.perf_counter() - start, 3),
        **{f"test_{k}" if k != "n" else "n_test_scored": v for k, v in metrics.items()},
    }
    return model, result


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
                 device: str = "auto") -> dict[str, Any]:
    """Few-shot probes: for each k in `shots` and each seed, train on k images per class drawn from train+val,
    choose the grid value on a disjoint draw of up to k more per class, and score the full test split once.
    Returns per-seed results and the mean and standard deviation over seeds."""
    spec = head_spec(head)
    grid = spec.grid if grid is None else tuple(grid)
    labelled = fs.labels >= 0
    pool = np.flatnonzero((fs.mask("train") | fs.mask("val")) & labelled)
    test = fs.mask("test") & labelled
    if not test.any():
        raise PipelineError(f"{fs.path} has no labelled test split for the few-shot probes")
    unseen = sorted(set(np.unique(fs.labels[test])) - set(np.unique(fs.labels[pool])))
    if unseen:
        raise PipelineError(f"test classes {[fs.class_names[i] for i in unseen[:5]]} have no train/val images to "
                            "draw shots from")
    x, y = fs.features, fs.labels
    start = time.perf_counter()
    by_shots: dict[str, Any] = {}
    for k in sorted(set(shots)):
        runs = []
        for seed in seeds:
            train, val = few_shot_rows(y, pool, shots=k, seed=seed)
            best, _, _ = _sweep(spec, grid, x[train], y[train], x[val], y[val], max_iter=max_iter, seed=seed,
                                device=device)
            model = spec.make(best, max_iter=max_iter, seed=seed, device=device)
            fit_quietly(model, x[train], y[train])
            m = classification_metrics(y[test], class_scores(model, x[test]), model.classes_, fs.class_names)
            runs.append({"seed": seed, "chosen": best, "top1": m["top1"], "balanced_accuracy": m["balanced_accuracy"],
                         "macro_f1": m["macro_f1"]})
        top1 = np.array([r["top1"] for r in runs])
        by_shots[str(k)] = {"runs": runs, "top1_mean": float(top1.mean()), "top1_std": float(top1.std(ddof=0)),
                            "n_train": int(k * len(np.unique(y[pool])))}
    return {
        "protocol": f"few-shot {spec.description}: k images per class from train+val, {spec.param} chosen on a "
                    "disjoint draw of up to k more per class, trained on the k, scored on the whole test split",
        "head": head,
        "param": spec.param,
        "seeds": list(seeds),
        "n_test": int(test.sum()),
        "seconds": round(time.perf_counter() - start, 3),
        "by_shots": by_shots,
    }


def default_results_path(store: Path, kind: str) -> Path:
    return store.with_name(f"{store.stem}.{kind}.json")


def run_probe(config: ProbeConfig) -> tuple[dict[str, Any], Path]:
    """Load a store, run the probe protocol (or the few-shot probes), save the results JSON, the fitted head and the
    report beside it."""
    from pipeline.report import save_json, write_report

    fs = load_store(config.store)
    out = Path(config.out) if config.out else default_results_path(Path(config.store), "probe")
    if config.shots:
        result = fit_few_shot(fs, shots=config.shots, seeds=config.seeds, head=config.head, grid=config.grid,
                              max_iter=config.max_iter, device=config.device)
        result.update(fs.provenance())
    else:
        model, result = fit_probe(fs, head=config.head, grid=config.grid, val_fraction=config.val_fraction,
                                  seed=config.seed, max_iter=config.max_iter, device=config.device)
        head_path = out.with_name(f"{out.stem}.head.joblib")
        result.update(fs.provenance(), head_file=str(head_path))
        save_head(head_path, model, fs=fs, result=result)
    if config.report:
        result["report"] = [str(p) for p in write_report(out.with_suffix(""), fs=fs, probe=result)]
    save_json(out, result)
    return result, out


HEAD_FORMAT = 1
# What a head's features must share with the features it is applied to.
_FEATURE_SPACE = ("backbone", "weights", "layer", "preprocessing", "feature_dim")


def save_head(path: Path, model: BaseEstimator, *, fs: FeatureSet, result: dict[str, Any]) -> Path:
    """Save a fitted head with what is needed to use it safely: the feature space it expects and its classes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": HEAD_FORMAT,
        "estimator": model,
        "head": result["head"],
        "param": result["param"],
        "chosen": result["chosen"],
        "test_top1": result["test_top1"],
        "class_names": fs.class_names,
        "store": str(fs.path),
        "cache_key": fs.attrs["cache_key"],
        "random_init": bool(fs.attrs.get("random_init", False)),
        **{k: fs.attrs[k] for k in _FEATURE_SPACE},
    }
    tmp = path.with_name(path.name + ".tmp")
    joblib.dump(payload, tmp)
    tmp.replace(path)
    return path


def load_head(path: str | Path) -> dict[str, Any]:
    """Load a head saved by `save_head`."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"no probe head at {path}; fit one with: python -m pipeline probe --store STORE.h5")
    try:
        payload = joblib.load(path)
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
        raise PipelineError(f"{path} is not a readable probe head ({type(exc).__name__}: {exc}); fit it again") \
            from None
    if not isinstance(payload, dict) or payload.get("format") != HEAD_FORMAT:
        raise PipelineError(f"{path} is not a probe head of this version; fit it again with python -m pipeline probe")
    return payload


def check_feature_space(head: dict[str, Any], attrs: dict[str, Any], *, what: str) -> None:
    """Refuse to apply a head to features from another backbone, weights, layer or preprocessing."""
    for key in _FEATURE_SPACE:
        if str(head[key]) != str(attrs[key]):
            raise PipelineError(f"the head was fitted on {key} {head[key]!r} but {what} has {attrs[key]!r}; "
                                "apply it to features from the same backbone, or fit a head on this store")


def predict_features(head: dict[str, Any], features: np.ndarray, *, top: int = 1) -> list[list[tuple[str, float]]]:
    """For each row, the `top` (class name, score) pairs, best first."""
    scores = class_scores(head["estimator"], features)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :top]
    classes = head["estimator"].classes_
    return [[(head["class_names"][classes[j]], float(scores[i, j])) for j in row] for i, row in enumerate(order)]


def predict_store(head: dict[str, Any], store: str | Path, *, top: int = 1) -> list[dict[str, Any]]:
    """Apply a saved head to every row of a store (checked to be in the head's feature space)."""
    fs = load_store(store)
    check_feature_space(head, fs.attrs, what=f"the store {store}")
    predictions = predict_features(head, fs.features, top=top)
    return [{"id": i, "label": fs.class_names[y] if y >= 0 else None, "split": s, "predictions": p}
            for i, y, s, p in zip(fs.ids, fs.labels, fs.splits, predictions, strict=True)]


def predict_images(head: dict[str, Any], paths: list[str | Path], *, top: int = 1, device: str = "auto",
                   weights_path: str | Path | None = None) -> list[dict[str, Any]]:
    """Apply a saved head to image files, embedded by the backbone the head's features came from."""
    from pipeline.embed import backbone_for, embed_files

    backbone = backbone_for(head, device=device, weights_path=weights_path)
    predictions = predict_features(head, embed_files(paths, backbone), top=top)
    return [{"id": str(p), "predictions": pred} for p, pred in zip(paths, predictions, strict=True)]
