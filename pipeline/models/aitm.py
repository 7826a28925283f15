"""AITM (Xi et al., KDD 2021): a tower per funnel step; each step's representation attends over its
own tower output and the information transferred from the previous step (Adaptive Information Transfer),
and a label-constraint loss keeps P(step) <= P(previous step) (a purchase needs a click).

Every head predicts its exposure-space probability directly (no chaining); the constraint is
``aitm_constraint_weight * mean(max(P(task) - P(parent), 0))`` summed over dependent tasks."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import DatasetSpec, ModelConfig
from pipeline.layers import MLP, Logit
from pipeline.models.base import MultiTaskModel


class AIT(nn.Module):
    """Self-attention over the two candidates {transferred info from the parent, own representation}."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, transferred: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        inputs = torch.stack([transferred, own], dim=1)  # [B, 2, D]
        scores = (self.query(inputs) * self.key(inputs)).sum(-1) / math.sqrt(inputs.shape[-1])  # [B, 2]
        return (scores.softmax(dim=1).unsqueeze(-1) * self.value(inputs)).sum(dim=1)


class AITM(MultiTaskModel):
    needs_funnel = True
    chains_probabilities = False

    def __init__(self, spec: DatasetSpec, cfg: ModelConfig, table_device=None) -> None:
        super().__init__(spec, cfg, table_device)
        self.bottoms = nn.ModuleList(MLP(self.front.out_dim, self.tower_hidden(t), cfg.dropout) for t in spec.task_names)
        dims = [b.out_dim for b in self.bottoms]
        # only parents transfer and only children attend: no parameter without a gradient (DDP needs that).
        # A transfer maps the parent's representation to its child's width (towers may differ in size).
        self.transfer = nn.ModuleDict({f"{p}-{j}": nn.Linear(dims[p], dims[j]) for j, p in enumerate(self.parents) if p >= 0})
        self.ait = nn.ModuleDict({str(j): AIT(dims[j]) for j, p in enumerate(self.parents) if p >= 0})
        self.heads = nn.ModuleList(Logit(d) for d in dims)

    def tower_hidden(self, task: str) -> list[int]:
        # each task's network on the embeddings (the paper's tower): expert_hidden unless model.towers sizes it
        return self.cfg.towers.get(task, self.cfg.expert_hidden)

    def task_logits(self, x: torch.Tensor) -> torch.Tensor:
        z: list[torch.Tensor] = []
        for j, parent in enumerate(self.parents):  # parents come first, so z[parent] exists
            own = self.bottoms[j](x)
            z.append(own if parent < 0 else self.ait[str(j)](F.relu(self.transfer[f"{parent}-{j}"](z[parent])), own))
        return torch.stack([head(zj) for head, zj in zip(self.heads, z)], dim=1)

    def regularizer(self, out: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        prob = out["prob"]
        gaps = [F.relu(prob[:, j] - prob[:, p]).mean() for j, p in enumerate(self.parents) if p >= 0]
        return self.cfg.aitm_constraint_weight * torch.stack(gaps).sum() if gaps else prob.new_zeros(())
