"""The reports' figures as PNG bytes (matplotlib, headless): confusion matrix, per-class accuracy, nearest-neighbour
image grid, 2-D projection of the features."""

from __future__ import annotations

import functools
import io
from collections.abc import Callable

import matplotlib

matplotlib.use("Agg")  # no display: figures are only ever written to files

import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

MAX_LABELLED_CLASSES = 30  # beyond this, tick labels and cell counts are unreadable


def plain_text(draw: Callable[..., bytes]) -> Callable[..., bytes]:
    """Draw with every label as plain text: class names come from the data, and `$...$` in one would otherwise be
    parsed as mathtext (and crash the figure when it is not valid TeX)."""

    @functools.wraps(draw)
    def wrapped(*args, **kwargs) -> bytes:
        with matplotlib.rc_context({"text.parse_math": False, "text.usetex": False}):
            return draw(*args, **kwargs)

    return wrapped


def _png(fig: plt.Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


@plain_text
def confusion_png(matrix: list[list[int]], class_names: list[str], *, title: str) -> bytes:
    """Row-normalised confusion matrix (true class per row), with counts in the cells when there are few classes."""
    cm = np.asarray(matrix, dtype=np.float64)
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    n = len(class_names)
    size = min(3 + 0.45 * n, 14)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the true class")
    if n <= MAX_LABELLED_CLASSES:
        ax.set_xticks(range(n), class_names, rotation=90 if max(map(len, class_names)) > 3 else 0)
        ax.set_yticks(range(n), class_names)
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if share[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return _png(fig)


@plain_text
def per_class_png(per_class: dict[str, float], *, title: str) -> bytes:
    """Horizontal bars of per-class accuracy, worst at the top (the 20 worst and 20 best when there are many)."""
    items = sorted(per_class.items(), key=lambda kv: (kv[1], kv[0]))
    if len(items) > 40:
        items = items[:20] + [("...", float("nan"))] + items[-20:]
    names, values = [k for k, _ in items][::-1], [v for _, v in items][::-1]
    fig, ax = plt.subplots(figsize=(7, 1 + 0.28 * len(items)))
    colours = plt.cm.RdYlGn(np.nan_to_num(values, nan=0.5))
    ax.barh(range(len(items)), np.nan_to_num(values), color=colours)
    ax.set_yticks(range(len(items)), names)
    ax.set_xlim(0, 1)
    ax.set_xlabel("accuracy")
    mean = np.nanmean(values)
    ax.axvline(mean, color="black", linestyle="--", linewidth=1, label=f"mean {mean:.3f}")
    ax.legend(loc="lower right")
    ax.set_title(title)
    return _png(fig)


@plain_text
def projection_png(features: np.ndarray, labels: np.ndarray, class_names: list[str], *, title: str,
                   max_points: int = 5000, seed: int = 0) -> bytes:
    """The features projected on their first two principal components, one colour per class."""
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(seed)
    rows = np.arange(len(features))
    if len(rows) > max_points:
        rows = np.sort(rng.choice(rows, size=max_points, replace=False))
    points = PCA(n_components=2, random_state=seed).fit_transform(features[rows])
    fig, ax = plt.subplots(figsize=(7, 6))
    cmap = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
    for cls in np.unique(labels[rows]):
        pick = labels[rows] == cls
        name = class_names[cls] if cls >= 0 else "unlabelled"
        ax.scatter(points[pick, 0], points[pick, 1], s=6, alpha=0.7, color=cmap(int(cls) % cmap.N) if cls >= 0
                   else "grey", label=name)
    if len(class_names) <= 20:
        ax.legend(markerscale=3, fontsize=8, loc="best", ncols=2)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(title + (f" ({len(rows)} of {len(features)} rows)" if len(rows) < len(features) else ""))
    return _png(fig)


@plain_text
def neighbours_png(examples: list[dict], images: dict[str, Image.Image], class_names: list[str], *,
                   title: str) -> bytes:
    """One row per query: the query image, then its nearest neighbours framed green (same class) or red."""
    hits = max(len(e["hits"]) for e in examples)
    fig, axes = plt.subplots(len(examples), hits + 1, figsize=(1.3 * (hits + 1), 1.45 * len(examples)),
                             squeeze=False)
    for r, example in enumerate(examples):
        cells = [(example, None)] + [(h, h["label"] == example["label"]) for h in example["hits"]]
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(cells):
                ax.axis("off")
                continue
            item, correct = cells[c]
            image = images.get(item["id"])
            if image is None:
                ax.text(0.5, 0.5, "image\nunavailable", ha="center", va="center", fontsize=7)
            else:
                colour = "black" if correct is None else ("green" if correct else "red")
                ax.imshow(ImageOps.expand(image, border=max(2, image.width // 24), fill=colour))
            name = class_names[item["label"]] if item["label"] >= 0 else "?"
            caption = f"query: {name}" if correct is None else f"{name} {item['score']:.2f}"
            ax.set_title(caption, fontsize=7)
            for spine in ax.spines.values():
                spine.set_visible(False)
    fig.suptitle(title, fontsize=10)
    return _png(fig)

