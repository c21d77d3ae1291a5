"""Exact evaluation metrics for classification and regression, computed on the host.

Every function takes the predictions of a whole split (not per-batch averages) and computes in
numpy float64, matching `sklearn.metrics` to 1e-6 without importing it. Conventions:

- argmax ties go to the lowest class index (as `np.argmax`); top-k uses the same rule, so an
  example is a top-k hit when fewer than k classes score strictly higher than its label or
  equal with a lower index (sklearn's `top_k_accuracy_score` breaks ties towards the higher
  index instead; the two agree whenever scores are distinct).
- Macro averages run over all C classes, as sklearn with `labels=range(C)`: a class absent
  from both labels and predictions contributes 0 (zero_division=0).
- roc_auc averages one-vs-rest AUC over the classes present in the labels (sklearn has no
  value when a class is absent); NaN when fewer than two classes are present.

`save_confusion_matrix` writes the matrix as JSON and as a PNG heatmap drawn with Pillow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from jtrain import atomic


def _class_indices(values: np.ndarray, num_classes: int, what: str) -> np.ndarray:
    """Returns `values` as int64 class indices, checking they lie in [0, num_classes)."""
    values = np.asarray(values)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"{what} must be a non-empty 1-D array, got shape {values.shape}.")
    if not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"{what} must hold integer class indices, got dtype {values.dtype}.")
    if values.min() < 0 or values.max() >= num_classes:
        raise ValueError(
            f"{what} must lie in [0, {num_classes}), got {values.min()}..{values.max()}."
        )
    return values.astype(np.int64)


def confusion_matrix(predicted_N: np.ndarray, labels_N: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts [C, C] int64: rows are true classes, columns predicted ones (sklearn's layout)."""
    predicted_N = _class_indices(predicted_N, num_classes, "predicted")
    labels_N = _class_indices(labels_N, num_classes, "labels")
    if predicted_N.shape != labels_N.shape:
        raise ValueError(f"predicted {predicted_N.shape} and labels {labels_N.shape} differ.")
    counts = np.bincount(labels_N * num_classes + predicted_N, minlength=num_classes**2)
    return counts.reshape(num_classes, num_classes).astype(np.int64)


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, with 0 where the denominator is 0 (zero_division=0)."""
    out = np.zeros_like(numerator, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def _precision_recall_f1(matrix_CxC: np.ndarray) -> dict[str, float]:
    """Macro and support-weighted precision, recall and F1 from a confusion matrix."""
    tp = np.diag(matrix_CxC).astype(np.float64)
    support = matrix_CxC.sum(axis=1).astype(np.float64)
    predicted = matrix_CxC.sum(axis=0).astype(np.float64)
    per_class = {
        "precision": _safe_divide(tp, predicted),
        "recall": _safe_divide(tp, support),
        "f1": _safe_divide(2 * tp, support + predicted),
    }
    weights = support / support.sum()
    out = {}
    for name, values in per_class.items():
        out[f"{name}_macro"] = float(values.mean())
        out[f"{name}_weighted"] = float((values * weights).sum())
    return out


def _average_ranks(values_N: np.ndarray) -> np.ndarray:
    """1-based ranks of `values_N`, ties sharing the average of the ranks they span."""
    _, inverse, counts = np.unique(values_N, return_inverse=True, return_counts=True)
    last_rank = np.cumsum(counts)
    return (last_rank - (counts - 1) / 2.0)[inverse]


def _binary_auc(positive_N: np.ndarray, scores_N: np.ndarray) -> float:
    """ROC AUC as Mann-Whitney U with average ranks: sklearn's trapezoids over thresholds."""
    num_pos = int(positive_N.sum())
    num_neg = positive_N.size - num_pos
    if num_pos == 0 or num_neg == 0:
        return math.nan
    rank_sum = _average_ranks(scores_N)[positive_N].sum()
    return float((rank_sum - num_pos * (num_pos + 1) / 2.0) / (num_pos * num_neg))


def _roc_auc(probs_NxC: np.ndarray, labels_N: np.ndarray) -> float:
    """Binary AUC of class 1 for C == 2; otherwise one-vs-rest macro over present classes."""
    num_classes = probs_NxC.shape[1]
    if num_classes == 2:
        return _binary_auc(labels_N == 1, probs_NxC[:, 1])
    present = np.unique(labels_N)
    if present.size < 2:
        return math.nan
    return float(np.mean([_binary_auc(labels_N == c, probs_NxC[:, c]) for c in present]))


def _top_k_accuracy(probs_NxC: np.ndarray, labels_N: np.ndarray, k: int) -> float:
    """Share of examples whose label ranks in the top k, ties going to the lower index."""
    label_score = probs_NxC[np.arange(labels_N.size), labels_N][:, None]
    higher = (probs_NxC > label_score).sum(axis=1)
    lower_index = np.arange(probs_NxC.shape[1])[None, :] < labels_N[:, None]
    tied_before = ((probs_NxC == label_score) & lower_index).sum(axis=1)
    return float(np.mean(higher + tied_before < k))


def classification(
    probs_NxC: np.ndarray, labels_N: np.ndarray, *, top_k: int = 5
) -> dict[str, float]:
    """Accuracy, top-k, macro/weighted P/R/F1, ROC AUC and log loss of a whole split."""
    probs_NxC = np.asarray(probs_NxC, dtype=np.float64)
    if probs_NxC.ndim != 2 or probs_NxC.shape[1] < 2:
        raise ValueError(f"probs must be [N, C] with C >= 2, got shape {probs_NxC.shape}.")
    num_classes = probs_NxC.shape[1]
    labels_N = _class_indices(labels_N, num_classes, "labels")
    if labels_N.size != probs_NxC.shape[0]:
        raise ValueError(f"probs has {probs_NxC.shape[0]} rows but labels has {labels_N.size}.")
    if not np.allclose(probs_NxC.sum(axis=1), 1.0, rtol=0.0, atol=1e-4):
        raise ValueError("probs rows must sum to 1: pass softmax probabilities, not logits.")
    predicted_N = np.argmax(probs_NxC, axis=1)
    out = {"accuracy": float(np.mean(predicted_N == labels_N))}
    if 1 < top_k < num_classes:
        out[f"top{top_k}_accuracy"] = _top_k_accuracy(probs_NxC, labels_N, top_k)
    out.update(_precision_recall_f1(confusion_matrix(predicted_N, labels_N, num_classes)))
    out["roc_auc"] = _roc_auc(probs_NxC, labels_N)
    eps = np.finfo(np.float64).eps  # sklearn's clipping, so p = 0 or 1 stays finite.
    label_probs = np.clip(probs_NxC[np.arange(labels_N.size), labels_N], eps, 1 - eps)
    out["log_loss"] = float(-np.mean(np.log(label_probs)))
    return out


def regression(predictions_N: np.ndarray, targets_N: np.ndarray) -> dict[str, float]:
    """MSE, RMSE, MAE and R² (sklearn's r2_score with force_finite) of a whole split."""
    predictions_N = np.asarray(predictions_N, dtype=np.float64).reshape(-1)
    targets_N = np.asarray(targets_N, dtype=np.float64).reshape(-1)
    if predictions_N.shape != targets_N.shape or targets_N.size == 0:
        raise ValueError(
            f"predictions {predictions_N.shape} and targets {targets_N.shape} must be the "
            "same non-empty size."
        )
    errors = predictions_N - targets_N
    mse = float(np.mean(errors**2))
    ss_res = float(np.sum(errors**2))
    ss_tot = float(np.sum((targets_N - np.mean(targets_N)) ** 2))
    if ss_tot != 0:
        r2 = 1.0 - ss_res / ss_tot
    else:  # A constant target: perfect predictions score 1, any error 0 (force_finite).
        r2 = 1.0 if ss_res == 0 else 0.0
    return {"mse": mse, "rmse": math.sqrt(mse), "mae": float(np.mean(np.abs(errors))), "r2": r2}


def _text_size(font: ImageFont.ImageFont, text: str) -> tuple[int, int]:
    """Width and height in pixels of `text` drawn in `font`."""
    left, top, right, bottom = font.getbbox(text)
    return int(right - left), int(bottom - top)


def _draw_text(draw: ImageDraw.ImageDraw, xy, text: str, font, fill, fx=0.5, fy=0.5) -> None:
    """Draws `text` with the point (fx, fy) of its box (0 = left/top, 1 = right/bottom) at xy.

    Placed by bounding box rather than `anchor=`, which Pillow's bitmap fallback font lacks.
    """
    left, top, right, bottom = font.getbbox(text)
    origin = (xy[0] - left - (right - left) * fx, xy[1] - top - (bottom - top) * fy)
    draw.text(origin, text, fill=fill, font=font)


def _rotated_text(text: str, font: ImageFont.ImageFont) -> Image.Image:
    """An 'L' mask of `text` rotated to read bottom to top."""
    width, height = _text_size(font, text)
    mask = Image.new("L", (width + 2, height + 2), 0)
    _draw_text(ImageDraw.Draw(mask), (1, 1), text, font, 255, fx=0.0, fy=0.0)
    return mask.rotate(90, expand=True)


def _render_heatmap(matrix: np.ndarray, names: list[str]) -> Image.Image:
    """Heatmap of the row-normalised matrix with counts, class names and axis titles."""
    num_classes = matrix.shape[0]
    font = ImageFont.load_default()
    cell = max(6, min(60, 1000 // num_classes))
    line = max(_text_size(font, "Ag0")[1], 1) + 2
    label_step = max(1, math.ceil(line / cell))  # Label every row only where rows fit text.
    label_width = max(_text_size(font, name)[0] for name in names) + 6
    left, top = line + label_width + 4, line + label_width + 4
    image = Image.new("RGB", (left + num_classes * cell + 8, top + num_classes * cell + 8), "white")
    draw = ImageDraw.Draw(image)
    totals = matrix.sum(axis=1, keepdims=True)
    shares = _safe_divide(matrix.astype(np.float64), np.broadcast_to(totals, matrix.shape))
    grid = (220, 220, 220) if cell >= 12 else None  # Lines would swamp tiny cells.
    show_counts = _text_size(font, str(matrix.max()))[0] + 4 <= cell and line <= cell
    for row in range(num_classes):
        for col in range(num_classes):
            x, y, share = left + col * cell, top + row * cell, shares[row, col]
            fill = (int(255 - 215 * share), int(255 - 145 * share), int(255 - 60 * share))
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=fill, outline=grid)
            if show_counts:
                ink = "white" if share > 0.55 else "black"
                center = (x + cell // 2, y + cell // 2)
                _draw_text(draw, center, str(matrix[row, col]), font, ink)
    for index in range(0, num_classes, label_step):
        middle = index * cell + cell // 2
        _draw_text(draw, (left - 4, top + middle), names[index], font, "black", fx=1.0)
        column_label = _rotated_text(names[index], font)
        position = (left + middle - column_label.width // 2, top - 4 - column_label.height)
        image.paste("black", position, column_label)
    _draw_text(draw, (left + num_classes * cell // 2, 2), "predicted", font, "black", fy=0.0)
    title = _rotated_text("true", font)
    image.paste("black", (2, top + num_classes * cell // 2 - title.height // 2), title)
    return image


def save_confusion_matrix(matrix: np.ndarray, class_names: Sequence[str], path_stem: str) -> None:
    """Writes path_stem.json (classes, matrix: rows true, columns predicted) and a .png heatmap."""
    matrix = np.asarray(matrix)
    if len(class_names) == 0 or matrix.shape != (len(class_names), len(class_names)):
        raise ValueError(
            f"matrix must be [C, C] with C = len(class_names) = {len(class_names)}, "
            f"got shape {matrix.shape}."
        )
    payload = {"classes": [str(name) for name in class_names], "matrix": matrix.tolist()}
    atomic.write_json(path_stem + ".json", payload, indent=None)
    image = _render_heatmap(
        matrix, [n if len(n) <= 14 else n[:12] + ".." for n in payload["classes"]]
    )
    atomic.write(path_stem + ".png", lambda temporary: image.save(temporary, format="PNG"))
