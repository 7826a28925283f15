"""Split metrics as collectives: the distributed exact AUC equals scikit-learn's on all rows, ties included."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from sklearn.metrics import log_loss, roc_auc_score

sys.path.insert(0, str(Path(__file__).parent))
from test_sharding import _free_port, _spawn  # noqa: E402

from pipeline.config import DatasetSpec, from_dict  # noqa: E402
from pipeline.metrics import exact_auc, split_metrics  # noqa: E402

SPEC = from_dict(DatasetSpec, {"name": "funnel", "tasks": [{"name": "click"}, {"name": "convert", "depends_on": "click"}]})


def _predictions(n: int, seed: int, oracle: bool = True) -> dict[str, np.ndarray]:
    """Funnel labels and scores rounded to 2 decimals (many ties, as bf16 predictions have)."""
    g = np.random.default_rng(seed)
    click = (g.random(n) < 0.3).astype(np.float32)
    convert = click * (g.random(n) < 0.4)
    labels = np.stack([click, convert], 1).astype(np.float32)
    prob = np.round(np.clip(labels * 0.3 + g.random((n, 2)) * 0.7, 0.001, 0.999), 2).astype(np.float32)
    out = {"prob": prob, "cond_prob": np.round(g.random((n, 2)), 2).astype(np.float32), "labels": labels,
           "rows_read": np.array([n])}
    if oracle:
        out["oracle"] = np.round(np.clip(labels * 0.2 + g.random((n, 2)) * 0.8, 0.01, 1), 1).astype(np.float32)
    return out


def _sklearn(pred: dict[str, np.ndarray]) -> dict[str, float]:
    y, p, clicked = pred["labels"], pred["prob"], pred["labels"][:, 0] == 1
    return {"click/auc": roc_auc_score(y[:, 0], p[:, 0]), "convert/auc": roc_auc_score(y[:, 1], p[:, 1]),
            "click/logloss": log_loss(y[:, 0], p[:, 0]), "convert/logloss": log_loss(y[:, 1], p[:, 1]),
            "click/oracle_auc": roc_auc_score(y[:, 0], pred["oracle"][:, 0]),
            "convert/cvr_auc": roc_auc_score(y[clicked, 1], pred["cond_prob"][clicked, 1]),
            "convert/oracle_cvr_auc": roc_auc_score(
                y[clicked, 1], pred["oracle"][clicked, 1] / np.maximum(pred["oracle"][clicked, 0], 1e-12))}


def _metrics_on_workers(rank: int, world: int, port: int, sizes: list[int], out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    local = _predictions(sizes[rank], seed=rank)
    if sizes[rank] == 0:
        del local["oracle"]  # what predict_shard leaves of an empty shard
    metrics = split_metrics(local, SPEC)
    every = [None] * world
    dist.all_gather_object(every, metrics)  # every worker got the same values
    dist.destroy_process_group()
    if rank == 0:
        torch.save(every, out)


@pytest.mark.parametrize("sizes", [[20_011, 13_007], [0, 9_001], [5_000, 5_000, 1]], ids=["uneven", "empty", "three"])
def test_the_distributed_exact_auc_equals_sklearn_on_all_rows_with_ties(sizes):
    every = _spawn(_metrics_on_workers, len(sizes), _free_port(), sizes)
    parts = [_predictions(n, seed=r) for r, n in enumerate(sizes)]
    whole = {k: np.concatenate([p[k] for p in parts]) for k in ("prob", "cond_prob", "labels", "oracle")}
    assert all(m == every[0] for m in every)
    metrics = every[0]
    assert metrics["rows"] == metrics["rows_read"] == sum(sizes)
    for key, expected in _sklearn(whole).items():
        assert metrics[key] == pytest.approx(expected, abs=1e-6), key
    assert metrics["convert/ctcvr_auc"] == metrics["convert/auc"]
    assert metrics["click/positive_rate"] == pytest.approx(whole["labels"][:, 0].mean(), abs=1e-9)
    # the oracle of one worker is complete, the empty worker's absence does not withhold it
    assert "click/oracle_auc" in metrics


def test_exact_auc_on_one_process_handles_ties_and_a_single_class():
    g = np.random.default_rng(3)
    y = (g.random(50_000) < 0.1).astype(np.float32)
    s = np.round(g.random(50_000) + 0.2 * y, 1)  # 13 distinct scores
    assert exact_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert exact_auc(y, np.zeros_like(s)) == 0.5  # all tied
    assert math.isnan(exact_auc(np.ones(10), np.arange(10.0)))
    assert math.isnan(exact_auc(np.zeros(0), np.zeros(0)))
