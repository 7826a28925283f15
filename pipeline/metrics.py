"""Exact per-task metrics over a whole split.

Every worker predicts its shard; the predictions and labels are gathered once on rank 0, which computes
AUC and logloss with scikit-learn over all rows of the split. Nothing is averaged per batch or per worker.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
from sklearn.metrics import log_loss, roc_auc_score

from pipeline.config import DatasetSpec

PREDICTION_KEYS = ("prob", "cond_prob", "labels", "oracle")


def gather_to_rank0(local: dict, concat: bool = True) -> dict | None:
    """Every worker's values on rank 0 (None on other ranks): arrays concatenated, or (concat=False)
    a list with one value per worker."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local if concat else {k: [v] for k, v in local.items()}
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(local, parts, dst=0)
    if dist.get_rank() != 0:
        return None
    if not concat:
        return {k: [p[k] for p in parts] for k in local}
    return {k: np.concatenate([p[k] for p in parts if k in p]) for k in local}


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC, or NaN when the rows hold a single class (AUC is undefined there)."""
    if labels.size == 0 or labels.min() == labels.max():
        return math.nan
    return float(roc_auc_score(labels, scores))


def split_metrics(pred: dict[str, np.ndarray], spec: DatasetSpec,
                  objective_weights: dict[str, float] | None = None) -> dict[str, float]:
    """Flat ``<task>/<metric>`` values for one split.

    For every task: ``auc`` and ``logloss`` of P(label | exposure) over all rows, and ``oracle_auc`` when
    the data carries the true probability. For a task with ``depends_on`` (convert after click) the
    exposure-space AUC is the CTCVR AUC; ``cvr_auc`` is also reported over the parent-positive rows with
    the conditional prediction (and its oracle, P(task) / P(parent))."""
    out: dict[str, float] = {"rows": float(pred["labels"].shape[0])}
    if "rows_read" in pred:  # one count per worker
        out["rows_read"] = float(pred["rows_read"].sum())
    names = spec.task_names
    for j, task in enumerate(spec.tasks):
        y, p = pred["labels"][:, j], pred["prob"][:, j]
        out[f"{task.name}/auc"] = auc(y, p)
        out[f"{task.name}/logloss"] = float(log_loss(y, np.clip(p, 1e-7, 1 - 1e-7), labels=[0, 1]))
        out[f"{task.name}/positive_rate"] = float(y.mean())
        has_oracle = "oracle" in pred and not np.isnan(pred["oracle"][:, j]).any()
        if has_oracle:
            out[f"{task.name}/oracle_auc"] = auc(y, pred["oracle"][:, j])
        if task.depends_on is not None:
            k = names.index(task.depends_on)
            clicked = pred["labels"][:, k] == 1
            out[f"{task.name}/cvr_auc"] = auc(y[clicked], pred["cond_prob"][clicked, j])
            out[f"{task.name}/ctcvr_auc"] = out[f"{task.name}/auc"]
            if has_oracle and not np.isnan(pred["oracle"][:, k]).any():
                cond = pred["oracle"][clicked, j] / np.maximum(pred["oracle"][clicked, k], 1e-12)
                out[f"{task.name}/oracle_cvr_auc"] = auc(y[clicked], cond)
    aucs = [out[f"{t}/auc"] for t in names]
    out["mean_auc"] = float(np.mean(aucs))
    out["min_auc"] = float(np.min(aucs))
    w = np.array([(objective_weights or {}).get(t, 1.0) for t in names])
    out["weighted_auc"] = float(np.dot(w, aucs) / w.sum())
    return out


@torch.no_grad()
def predict_shard(model: torch.nn.Module, batches, num_tasks: int, gates=None) -> dict[str, np.ndarray]:
    """Run the model over one worker's shard of an evaluation split, keeping everything on the host. A
    batch's padding rows (``Collate``; an empty batch of a worker whose shard ran out) are left out."""
    model.eval()
    chunks: dict[str, list[np.ndarray]] = {k: [] for k in PREDICTION_KEYS}
    rows_read = 0
    for batch in batches:
        rows_read += batch["rows_read"]
        n = batch["rows"]
        out = model(batch)
        if gates is not None and n:
            gates.update({k: g[:n] for k, g in model.last_gates.items()})
        chunks["prob"].append(out["prob"][:n].float().cpu().numpy())
        chunks["cond_prob"].append(out["cond_prob"][:n].float().cpu().numpy())
        chunks["labels"].append(batch["labels"][:n].cpu().numpy())
        if "oracle" in batch:
            chunks["oracle"].append(batch["oracle"][:n].cpu().numpy())
    model.train()
    # a worker whose shard came up empty still sends correctly shaped (0, T) arrays
    out = {k: np.concatenate(v) if v else np.zeros((0, num_tasks), np.float32)
           for k, v in chunks.items() if v or k != "oracle"}
    return out | {"rows_read": np.array([rows_read])}
