"""Lightweight heads for cached features, and the one hyper-parameter each sweeps.

The reference head is scikit-learn's L2 logistic regression (L-BFGS). `TorchLogisticRegression` solves the same
objective with full-batch L-BFGS in torch, on a GPU when there is one, for feature sets where scikit-learn is slow;
after `fit` it holds numpy `coef_`/`intercept_`, so a saved head predicts without torch or a GPU. The others are
scikit-learn estimators used directly.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, RidgeClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.svm import LinearSVC

from pipeline.config import DEFAULT_ALPHAS, DEFAULT_CS
from pipeline.errors import ConfigError

# L-BFGS stopping tolerance. scikit-learn's default (1e-4) stops short of the optimum at weak regularisation
# (large C, more dimensions than samples): on the digits, features differing by 1.5e-6 then gave 94.8% vs 93.9%;
# at 1e-6 both give the optimum's 95.0%, so results depend on the data, not on float noise.
PROBE_TOL = 1e-6


class TorchLogisticRegression(ClassifierMixin, BaseEstimator):
    """Multinomial logistic regression with L2 penalty, scikit-learn's objective, solved by full-batch L-BFGS.

    Minimises mean cross-entropy + ||W||^2 / (2 C n) (the intercept is not penalised), which has the same minimiser
    as scikit-learn's `C * sum(loss) + ||W||^2 / 2`. Runs on `device` ("auto": CUDA when available) in float32.
    """

    def __init__(self, C: float = 1.0, *, max_iter: int = 1000, tol: float = 1e-6, device: str = "auto") -> None:
        self.C = C
        self.max_iter = max_iter
        self.tol = tol
        self.device = device

    def fit(self, X: np.ndarray, y: np.ndarray) -> TorchLogisticRegression:
        import torch

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" \
            else torch.device(self.device)
        self.classes_, y_index = np.unique(y, return_inverse=True)
        n, d = X.shape
        x = torch.as_tensor(np.ascontiguousarray(X, dtype=np.float32), device=device)
        target = torch.as_tensor(y_index, device=device)
        weight = torch.zeros(d, len(self.classes_), device=device, requires_grad=True)
        bias = torch.zeros(len(self.classes_), device=device, requires_grad=True)
        penalty = 1.0 / (2.0 * self.C * n)
        optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=self.max_iter, history_size=20,
                                      tolerance_grad=self.tol, tolerance_change=1e-10,
                                      line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(x @ weight + bias, target) + penalty * weight.square().sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        self.n_iter_ = int(optimizer.state[weight].get("n_iter", 0))  # L-BFGS keeps its state on the first param
        self.converged_ = self.n_iter_ < self.max_iter
        self.coef_ = weight.detach().T.contiguous().cpu().numpy()
        self.intercept_ = bias.detach().cpu().numpy()
        self.n_features_in_ = d
        return self

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(X, dtype=np.float32) @ self.coef_.T + self.intercept_

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        z = self.decision_function(X)
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[np.argmax(self.decision_function(X), axis=1)]


@dataclass(frozen=True)
class HeadSpec:
    """A head: its estimator for one value of its hyper-parameter, the default grid, and which end of the grid is
    the stronger regularisation (tried first, so that a tie on validation picks it)."""

    name: str
    description: str
    param: str  # the swept hyper-parameter
    grid: tuple[float, ...]
    make: Callable[..., BaseEstimator]  # make(value, *, max_iter, seed, device)
    strong_first: Callable[[tuple[float, ...]], list[float]]


def _logreg(C: float, *, max_iter: int, seed: int, device: str) -> LogisticRegression:
    return LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter, tol=PROBE_TOL, random_state=seed)


def _torch_logreg(C: float, *, max_iter: int, seed: int, device: str) -> TorchLogisticRegression:
    return TorchLogisticRegression(C=C, max_iter=max_iter, device=device)


def _svm(C: float, *, max_iter: int, seed: int, device: str) -> LinearSVC:
    return LinearSVC(C=C, max_iter=max_iter, random_state=seed)


def _ridge(alpha: float, *, max_iter: int, seed: int, device: str) -> RidgeClassifier:
    return RidgeClassifier(alpha=alpha)


def _mlp(alpha: float, *, max_iter: int, seed: int, device: str) -> MLPClassifier:
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


def fit_quietly(model: BaseEstimator, x: np.ndarray, y: np.ndarray) -> bool:
    """Fit and report whether the solver converged (a non-converged fit is kept, and flagged in the results)."""
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


def class_scores(model: BaseEstimator, x: np.ndarray) -> np.ndarray:
    """[n, n_classes] scores whose argmax is the prediction: probabilities when the head has them, else margins."""
    if hasattr(model, "predict_proba"):
        return model.predict_proba(x)
    scores = model.decision_function(x)
    if scores.ndim == 1:  # binary: one margin for classes_[1]
        scores = np.stack([-scores, scores], axis=1)
    return scores
