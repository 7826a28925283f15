"""MMoE (Ma et al., KDD 2018): experts shared by all tasks, one softmax gate per task mixing them.
OMoE is the same with one gate shared by all tasks."""
from __future__ import annotations

import torch
from torch import nn

from pipeline.config import DatasetSpec, ModelConfig
from pipeline.layers import Experts, Gate, Tower
from pipeline.models.base import MultiTaskModel


class MMoE(MultiTaskModel):
    one_gate = False

    def __init__(self, spec: DatasetSpec, cfg: ModelConfig, table_device=None) -> None:
        super().__init__(spec, cfg, table_device)
        self.experts = Experts(self.front.out_dim, cfg.expert_hidden, cfg.num_experts, cfg.dropout)
        self.gates = Gate(self.front.out_dim, cfg.num_experts, num_gates=1 if self.one_gate else len(spec.tasks))
        self.towers = nn.ModuleList(Tower(self.experts.out_dim, self.tower_hidden(t), cfg.dropout)
                                    for t in spec.task_names)

    def task_logits(self, x: torch.Tensor) -> torch.Tensor:
        experts = self.experts(x)  # [B, E, H]
        gates = self.gates(x).expand(-1, len(self.towers), -1)  # [B, T, E]
        mixed = gates @ experts  # [B, T, H]: each task's mixture of the shared experts
        self.last_gates = {"experts": gates.detach()}
        return torch.stack([tower(mixed[:, j]) for j, tower in enumerate(self.towers)], dim=1)

    def shared_parameter(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.experts.weights[-1]


class OMoE(MMoE):
    """One-gate mixture of experts: the MMoE paper's baseline."""

    one_gate = True
