"""Downstream metrics as pure functions on numpy arrays (missing labels, NaN, are left out per target)."""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def regression_metrics(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """MAE, RMSE, R² (1 - SSE/SST) and n of one target."""
    ok = np.isfinite(true)
    p, t = np.asarray(pred, np.float64)[ok], np.asarray(true, np.float64)[ok]
    if t.size == 0:
        return {"mae": float("nan"), "rmse": float("nan"), "r2": float("nan"), "n": 0}
    err = p - t
    sst = float(((t - t.mean()) ** 2).sum())
    return {"mae": float(np.abs(err).mean()), "rmse": float(np.sqrt((err**2).mean())),
            "r2": 1.0 - float((err**2).sum()) / sst if sst > 0 else float("nan"), "n": int(t.size)}


def roc_auc(score: np.ndarray, label: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with mid-ranks for ties); NaN when one class is absent."""
    label = np.asarray(label).astype(bool)
    n_pos, n_neg = int(label.sum()), int((~label).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(np.asarray(score, np.float64))
    return float((ranks[label].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classification_metrics(logit: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """Accuracy (threshold logit 0 = probability 0.5), ROC-AUC, positive share and n of one binary target."""
    ok = np.isfinite(true)
    s, t = np.asarray(logit, np.float64)[ok], np.asarray(true)[ok] > 0.5
    if t.size == 0:
        return {"accuracy": float("nan"), "roc_auc": float("nan"), "positive_fraction": float("nan"), "n": 0}
    return {"accuracy": float(((s > 0) == t).mean()), "roc_auc": roc_auc(s, t),
            "positive_fraction": float(t.mean()), "n": int(t.size)}


def mean_predictor_mae(train_true: np.ndarray, true: np.ndarray) -> float:
    """MAE of always predicting the training mean (the baseline a model must beat)."""
    tr = np.asarray(train_true, np.float64)
    t = np.asarray(true, np.float64)
    tr, t = tr[np.isfinite(tr)], t[np.isfinite(t)]
    return float(np.abs(t - tr.mean()).mean()) if t.size and tr.size else float("nan")
