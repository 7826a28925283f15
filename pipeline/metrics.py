"""Exact per-task metrics over a whole split, without gathering it anywhere.

Every worker predicts its shard and keeps its predictions. The metrics are collectives over all workers'
rows: sums (rows, logloss, positives) are all-reduced; every ROC AUC is exact and tie-aware over the whole
split (``exact_auc``: the rows are range-partitioned by score across the workers, each counts its range, and
three numbers per worker are combined). Nothing is averaged per batch or per worker, and no rank holds more
than about its own share of the rows.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist

from pipeline.config import DatasetSpec

PREDICTION_KEYS = ("prob", "cond_prob", "labels", "oracle")
SPLITTER_SAMPLES = 1024  # score quantiles per worker from which the range partition's splitters are chosen


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_to_rank0(local: dict, concat: bool = True) -> dict | None:
    """Every worker's values on rank 0 (None on other ranks): arrays concatenated, or (concat=False)
    a list with one value per worker. For small per-worker summaries (the gates' statistics)."""
    if _world() == 1:
        return local if concat else {k: [v] for k, v in local.items()}
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(local, parts, dst=0)
    if dist.get_rank() != 0:
        return None
    if not concat:
        return {k: [p[k] for p in parts] for k in local}
    return {k: np.concatenate([p[k] for p in parts if k in p]) for k in local}


def _reduced(values: list[float], op=dist.ReduceOp.SUM) -> np.ndarray:
    t = torch.tensor(values, dtype=torch.float64)
    if _world() > 1:
        dist.all_reduce(t, op=op)
    return t.numpy()


def _all_gathered(values: np.ndarray) -> np.ndarray:
    """[world, *values.shape]: every worker's values, in rank order."""
    t = torch.from_numpy(np.ascontiguousarray(values, np.float64))
    if _world() == 1:
        return t.numpy()[None]
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return torch.stack(parts).numpy()


def _mann_whitney(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float, float]:
    """Positives, negatives and the Mann-Whitney sum of these rows: for every positive, the negatives scored
    below it plus half of those scored the same."""
    order = np.argsort(scores, kind="stable")
    s, y = scores[order], (labels[order] > 0.5).astype(np.int64)
    if s.size == 0:
        return 0.0, 0.0, 0.0
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # runs of equal scores
    pos = np.add.reduceat(y, starts).astype(np.float64)
    neg = np.diff(np.r_[starts, s.size]) - pos
    below = np.cumsum(neg) - neg
    return float(pos.sum()), float(neg.sum()), float(np.dot(pos, below + 0.5 * neg))


def _range_partitioned(labels: np.ndarray, scores: np.ndarray, world: int) -> tuple[np.ndarray, np.ndarray]:
    """Every worker's rows moved so that rank r holds the r-th score range: splitters are quantiles of every
    worker's score quantiles, and a row's destination is a function of its score, so equal scores meet."""
    q = np.linspace(0, 1, SPLITTER_SAMPLES)
    sample = np.quantile(scores, q) if scores.size else np.full(SPLITTER_SAMPLES, np.nan)
    pooled = _all_gathered(sample).ravel()
    pooled = pooled[~np.isnan(pooled)]
    splitters = np.quantile(pooled, np.arange(1, world) / world) if pooled.size else np.zeros(world - 1)
    dest = np.searchsorted(splitters, scores, side="left")
    order = np.argsort(dest, kind="stable")
    send = torch.from_numpy(np.stack([scores[order], labels[order]], 1))
    counts = torch.from_numpy(np.bincount(dest, minlength=world).astype(np.int64))
    recv_counts = torch.empty_like(counts)
    dist.all_to_all_single(recv_counts, counts)
    recv = torch.empty(int(recv_counts.sum()), 2, dtype=torch.float64)
    dist.all_to_all_single(recv, send, recv_counts.tolist(), counts.tolist())
    return recv[:, 1].numpy(), recv[:, 0].numpy()


def exact_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC over every worker's rows, or NaN when they hold a single class (AUC is undefined there); ties
    count half, as in scikit-learn. A collective: every worker calls it with its own rows, and every worker
    gets the split's AUC. Rank r ends up with the rows of the r-th score range (about 1/world of them), counts
    its positives P_r, negatives N_r and Mann-Whitney sum U_r, and AUC = sum_r (U_r + P_r * sum_{q<r} N_q)
    / (P * N): exact, with no rank holding the split."""
    labels, scores = np.asarray(labels, np.float64).ravel(), np.asarray(scores, np.float64).ravel()
    world = _world()
    if world > 1:
        labels, scores = _range_partitioned(labels, scores, world)
    parts = _all_gathered(np.array(_mann_whitney(labels, scores)))  # [world, (P, N, U)]
    positives, negatives = parts[:, 0].sum(), parts[:, 1].sum()
    if positives == 0 or negatives == 0:
        return math.nan
    below = np.cumsum(parts[:, 1]) - parts[:, 1]
    return float((parts[:, 2].sum() + np.dot(parts[:, 0], below)) / (positives * negatives))


def split_metrics(pred: dict[str, np.ndarray], spec: DatasetSpec,
                  objective_weights: dict[str, float] | None = None) -> dict[str, float]:
    """Flat ``<task>/<metric>`` values for one split: a collective over every worker's own predictions
    (``predict_shard``); every worker gets the split's values.

    For every task: ``auc`` and ``logloss`` of P(label | exposure) over all rows, and ``oracle_auc`` when
    the data carries the true probability. For a task with ``depends_on`` (convert after click) the
    exposure-space AUC is the CTCVR AUC; ``cvr_auc`` is also reported over the parent-positive rows with
    the conditional prediction (and its oracle, P(task) / P(parent))."""
    names, labels = spec.task_names, pred["labels"]
    n, T = labels.shape[0], len(names)
    prob = np.clip(pred["prob"].astype(np.float64), 1e-7, 1 - 1e-7)
    row_loss = -(labels * np.log(prob) + (1 - labels) * np.log1p(-prob))
    sums = _reduced([n, float(pred["rows_read"].sum()) if "rows_read" in pred else 0.0,
                     *row_loss.sum(0), *labels.sum(0)])
    rows = sums[0]
    out: dict[str, float] = {"rows": float(rows)}
    if "rows_read" in pred:  # one count per worker
        out["rows_read"] = float(sums[1])
    # a task's oracle is used if every worker with rows has it, complete (an empty worker does not object)
    oracle = pred.get("oracle")
    complete = _reduced([1.0 if n == 0 else float(oracle is not None and not np.isnan(oracle[:, j]).any())
                         for j in range(T)], op=dist.ReduceOp.MIN)
    present = _reduced([float(oracle is not None)], op=dist.ReduceOp.MAX)[0]
    has_oracle = [bool(c and present) for c in complete]
    if oracle is None:
        oracle = np.full((n, T), np.nan)
    for j, task in enumerate(spec.tasks):
        y = labels[:, j]
        out[f"{task.name}/auc"] = exact_auc(y, pred["prob"][:, j])
        out[f"{task.name}/logloss"] = float(sums[2 + j] / rows) if rows else math.nan
        out[f"{task.name}/positive_rate"] = float(sums[2 + T + j] / rows) if rows else math.nan
        if has_oracle[j]:
            out[f"{task.name}/oracle_auc"] = exact_auc(y, oracle[:, j])
        if task.depends_on is not None:
            k = names.index(task.depends_on)
            parent = labels[:, k] == 1
            out[f"{task.name}/cvr_auc"] = exact_auc(y[parent], pred["cond_prob"][parent, j])
            out[f"{task.name}/ctcvr_auc"] = out[f"{task.name}/auc"]
            if has_oracle[j] and has_oracle[k]:
                cond = oracle[parent, j] / np.maximum(oracle[parent, k], 1e-12)
                out[f"{task.name}/oracle_cvr_auc"] = exact_auc(y[parent], cond)
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
