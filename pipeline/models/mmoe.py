"""MMoE (Ma et al., KDD 2018): experts shared by all tasks, one softmax gate per task mixing them."""
from __future__ import annotations

import torch
from torch import nn

from pipeline.config import DatasetSpec, ModelConfig
from pipeline.layers import Experts, Gate, Tower
from pipeline.models.base import MultiTaskModel


class MMoE(MultiTaskModel):
    def __init__(self, spec: DatasetSpec, cfg: ModelConfig) -> None:
        super().__init__(spec, cfg)
        num_tasks = len(spec.tasks)
        self.experts = Experts(self.front.out_dim, cfg.expert_hidden, cfg.num_experts, cfg.dropout)
        self.gates = Gate(self.front.out_dim, cfg.num_experts, num_gates=num_tasks)
        self.towers = nn.ModuleList(Tower(self.experts.out_dim, cfg.tower_hidden, cfg.dropout) for _ in spec.tasks)

    def task_logits(self, x: torch.Tensor) -> torch.Tensor:
        experts = self.experts(x)  # [B, E, H]
        gates = self.gates(x)  # [B, T, E]
        mixed = gates @ experts  # [B, T, H]: each task's own mixture of the shared experts
        self.last_gates = {"tasks": gates.detach()}
        return torch.stack([tower(mixed[:, j]) for j, tower in enumerate(self.towers)], dim=1)
