"""What every multi-task model shares: the embedding front, the funnel composition of task
probabilities, and the multi-task loss. A model only defines ``task_logits``."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import DatasetSpec, ModelConfig
from pipeline.layers import EmbeddingFront


def task_parents(spec: DatasetSpec) -> list[int]:
    """Index of each task's parent task (-1 for a root). Parents must come before their children."""
    names = spec.task_names
    parents = [names.index(t.depends_on) if t.depends_on else -1 for t in spec.tasks]
    for j, p in enumerate(parents):
        if p >= j:
            raise ValueError(f"task {names[j]!r} is listed before the task it depends on ({names[p]!r})")
    return parents


class MultiTaskModel(nn.Module):
    """forward(batch) -> {"logits", "cond_prob", "prob", "log_prob"}, each [B, T] in spec.tasks order.

    ``cond_prob`` is each head's own probability: P(task | parent positive) for a dependent task.
    ``prob`` is over the full exposure space, chained down the funnel (ESMM): P(convert) =
    P(click) * P(convert | click); chains of any depth work (click -> cart -> purchase)."""

    def __init__(self, spec: DatasetSpec, cfg: ModelConfig) -> None:
        super().__init__()
        self.spec, self.cfg = spec, cfg
        self.parents = task_parents(spec)
        self.front = EmbeddingFront(spec)
        self.last_gates: dict[str, torch.Tensor] = {}  # gate weights of the last batch, for diagnostics

    def task_logits(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = self.front(batch["sparse"], batch.get("seq"), batch.get("dense"))
        logits = self.task_logits(x)
        log_cond = F.logsigmoid(logits)
        log_prob = []
        for j, p in enumerate(self.parents):  # a handful of tasks: chain in log space for stability
            log_prob.append(log_cond[:, j] if p < 0 else log_prob[p] + log_cond[:, j])
        log_prob = torch.stack(log_prob, dim=1)
        return {"logits": logits, "cond_prob": log_cond.exp(), "prob": log_prob.exp(), "log_prob": log_prob}


def multitask_loss(out: dict[str, torch.Tensor], labels: torch.Tensor, parents: list[int], cfg: ModelConfig,
                   weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted sum of per-task binary cross-entropies; returns (total, per-task [T]).

    A root task: BCE of its head. A dependent task with ``dependent_loss: esmm``: BCE of the chained
    probability P(task) against its exposure-space label over all rows (ESMM's CTCVR loss: no sample
    selection bias). With ``masked``: BCE of its own head on the rows whose parent label is 1 only."""
    losses = []
    for j, p in enumerate(parents):
        y = labels[:, j]
        if p < 0:
            losses.append(F.binary_cross_entropy_with_logits(out["logits"][:, j], y))
        elif cfg.dependent_loss == "esmm":
            log_p = out["log_prob"][:, j].clamp(max=-1e-7)
            log_not_p = torch.log(-torch.expm1(log_p))  # log(1 - p), exact for p near 0 and near 1
            losses.append(-(y * log_p + (1 - y) * log_not_p).mean())
        elif cfg.dependent_loss == "masked":
            mask = labels[:, p]
            bce = F.binary_cross_entropy_with_logits(out["logits"][:, j], y, reduction="none")
            losses.append((bce * mask).sum() / mask.sum().clamp(min=1))
        else:
            raise ValueError(f"dependent_loss must be esmm or masked, got {cfg.dependent_loss!r}")
    per_task = torch.stack(losses)
    return (weights * per_task).sum(), per_task
