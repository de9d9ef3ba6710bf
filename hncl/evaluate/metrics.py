"""Classification metrics from a confusion matrix (rows = true class, columns = predicted)."""

from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> np.ndarray:
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return cm


def classification_report(cm: np.ndarray, class_names: List[str]) -> Dict[str, object]:
    """accuracy, mean per-class accuracy (= mean recall over classes present), macro-F1 (over
    classes present in truth or prediction), per-class precision/recall/F1/support, the matrix."""
    cm = np.asarray(cm, dtype=np.float64)
    support, predicted, correct = cm.sum(1), cm.sum(0), np.diag(cm)
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(support > 0, correct / support, 0.0)
        precision = np.where(predicted > 0, correct / predicted, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    present = support > 0
    seen = present | (predicted > 0)
    total = cm.sum()
    return {
        "accuracy": float(correct.sum() / total) if total else 0.0,
        "mean_class_accuracy": float(recall[present].mean()) if present.any() else 0.0,
        "macro_f1": float(f1[seen].mean()) if seen.any() else 0.0,
        "num_samples": int(total),
        "classes": list(class_names),
        "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                             "support": int(support[i])} for i, name in enumerate(class_names)},
        "confusion_matrix": cm.astype(np.int64).tolist(),
    }
