"""Lightweight heads for cached features, and the one hyper-parameter each sweeps.

The reference head is scikit-learn's L2 logistic regression (L-BFGS); `torch-logreg` solves the same objective in
torch (`pipeline.evaluation.torch_head`); the others are scikit-learn estimators used directly. scikit-learn and
torch are imported only when a head is made, so that the registry (the CLI's and the config's choices) costs nothing
to import.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.config import DEFAULT_ALPHAS, DEFAULT_CS
from pipeline.errors import ConfigError

# L-BFGS stopping tolerance. scikit-learn's default (1e-4) stops short of the optimum at weak regularisation
# (large C, more dimensions than samples): on the digits, features differing by 1.5e-6 then gave 94.8% vs 93.9%;
# at 1e-6 both give the optimum's 95.0%, so results depend on the data, not on float noise.
PROBE_TOL = 1e-6


@dataclass(frozen=True)
class HeadSpec:
    """A head: its estimator for one value of its hyper-parameter, the default grid, and which end of the grid is
    the stronger regularisation (tried first, so that a tie on validation picks it)."""

    name: str
    description: str
    param: str  # the swept hyper-parameter
    grid: tuple[float, ...]
    make: Callable[..., Any]  # make(value, *, max_iter, seed, device)
    strong_first: Callable[[tuple[float, ...]], list[float]]


def _logreg(C: float, *, max_iter: int, seed: int, device: str) -> Any:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter, tol=PROBE_TOL, random_state=seed)


def _torch_logreg(C: float, *, max_iter: int, seed: int, device: str) -> Any:
    from pipeline.evaluation.torch_head import TorchLogisticRegression

    return TorchLogisticRegression(C=C, max_iter=max_iter, device=device)


def _svm(C: float, *, max_iter: int, seed: int, device: str) -> Any:
    from sklearn.svm import LinearSVC

    return LinearSVC(C=C, max_iter=max_iter, random_state=seed)


def _ridge(alpha: float, *, max_iter: int, seed: int, device: str) -> Any:
    from sklearn.linear_model import RidgeClassifier

    return RidgeClassifier(alpha=alpha)


def _mlp(alpha: float, *, max_iter: int, seed: int, device: str) -> Any:
    from sklearn.neural_network import MLPClassifier

    return MLPClassifier(hidden_layer_sizes=(256,), alpha=alpha, max_iter=min(max_iter, 500), early_stopping=False,
                         random_state=seed)


def _ascending(grid: tuple[float, ...]) -> list[float]:
    return sorted(grid)


def _descending(grid: tuple[float, ...]) -> list[float]:
    return sorted(grid, reverse=True)


HEADS: dict[str, HeadSpec] = {
    spec.name: spec for spec in (
        HeadSpec("logreg", "logistic regression (L2, L-BFGS, scikit-learn): the reference protocol", "C",
                 DEFAULT_CS, _logreg, _ascending),
        HeadSpec("torch-logreg", "logistic regression (L2, full-batch L-BFGS in torch; GPU when available)", "C",
                 DEFAULT_CS, _torch_logreg, _ascending),
        HeadSpec("svm", "linear SVM (squared hinge, L2; scikit-learn LinearSVC)", "C", DEFAULT_CS, _svm, _ascending),
        HeadSpec("ridge", "ridge classifier (least squares on +-1 targets)", "alpha", DEFAULT_ALPHAS, _ridge,
                 _descending),
        HeadSpec("mlp", "MLP head: one hidden layer of 256 ReLU units, Adam, L2 alpha", "alpha", DEFAULT_ALPHAS,
                 _mlp, _descending),
    )
}


def head_spec(name: str) -> HeadSpec:
    if name not in HEADS:
        raise ConfigError(f"unknown head {name!r}; choose one of: {', '.join(HEADS)}")
    return HEADS[name]


def fit_quietly(model: Any, x: np.ndarray, y: np.ndarray) -> bool:
    """Fit and report whether the solver converged (a non-converged fit is kept, and flagged in the results)."""
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(x, y)
    stalled = False
    for w in caught:
        if issubclass(w.category, ConvergenceWarning):
            stalled = True
        else:  # other warnings are not ours to swallow
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return bool(getattr(model, "converged_", True)) and not stalled


def class_scores(model: Any, x: np.ndarray) -> np.ndarray:
    """[n, n_classes] scores whose argmax is the prediction: probabilities when the head has them, else margins."""
    if hasattr(model, "predict_proba"):
        return model.predict_proba(x)
    scores = model.decision_function(x)
    if scores.ndim == 1:  # binary: one margin for classes_[1]
        scores = np.stack([-scores, scores], axis=1)
    return scores
