"""The baselines every multi-task paper reports: Single-Task (a bottom per task) and Shared-Bottom
(one bottom MLP shared by all tasks, then a tower per task). Both read the shared embedding front."""
from __future__ import annotations

import torch
from torch import nn

from pipeline.config import DatasetSpec, ModelConfig
from pipeline.layers import MLP, Experts, Tower
from pipeline.models.base import MultiTaskModel


class SharedBottom(MultiTaskModel):
    def __init__(self, spec: DatasetSpec, cfg: ModelConfig, table_device=None) -> None:
        super().__init__(spec, cfg, table_device)
        self.bottom = MLP(self.front.out_dim, cfg.expert_hidden, cfg.dropout)
        self.towers = nn.ModuleList(Tower(self.bottom.out_dim, self.tower_hidden(t), cfg.dropout)
                                    for t in spec.task_names)

    def task_logits(self, x: torch.Tensor) -> torch.Tensor:
        shared = self.bottom(x)
        return torch.stack([tower(shared) for tower in self.towers], dim=1)

    def shared_parameter(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.bottom[-2].weight if len(self.bottom) else out["features"]


class SingleTask(MultiTaskModel):
    """One bottom per task (run as one batched op: an 'expert' per task), no sharing above the embeddings."""

    def __init__(self, spec: DatasetSpec, cfg: ModelConfig, table_device=None) -> None:
        super().__init__(spec, cfg, table_device)
        self.bottoms = Experts(self.front.out_dim, cfg.expert_hidden, len(spec.tasks), cfg.dropout)
        self.towers = nn.ModuleList(Tower(self.bottoms.out_dim, self.tower_hidden(t), cfg.dropout)
                                    for t in spec.task_names)

    def task_logits(self, x: torch.Tensor) -> torch.Tensor:
        per_task = self.bottoms(x)  # [B, T, H]
        return torch.stack([tower(per_task[:, j]) for j, tower in enumerate(self.towers)], dim=1)
