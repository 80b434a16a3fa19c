"""`TorchLogisticRegression`: scikit-learn's L2 multinomial logistic regression objective solved by full-batch
L-BFGS in torch, on a GPU when there is one, for feature sets where scikit-learn is slow. After `fit` it holds numpy
`coef_`/`intercept_`, so a saved head predicts without torch or a GPU."""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin


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
