"""MoSE (Qin et al., KDD 2020): a mixture of sequential experts. MMoE whose experts are sequential: each
expert runs its own LSTM over every behaviour sequence, and its MLP reads the LSTMs' last states
concatenated with the shared bottom input (every other feature); per-task softmax gates over the shared
input mix the experts for each task's tower."""
from __future__ import annotations

import torch
from torch import nn

from pipeline.config import DatasetSpec, ModelConfig
from pipeline.layers import Experts, Gate, Tower
from pipeline.models.base import MultiTaskModel
from pipeline.sequence import RecurrentEncoder


class MoSE(MultiTaskModel):
    reads_sequences, splits_rows = True, False

    def __init__(self, spec: DatasetSpec, cfg: ModelConfig, table_device=None) -> None:
        super().__init__(spec, cfg, table_device)
        E, H = cfg.num_experts, cfg.sequence_hidden
        self.lstms = nn.ModuleList(nn.ModuleList(RecurrentEncoder(f.dim, H) for f in self.spec.sequences) for _ in range(E))
        self.experts = Experts(self.front.out_dim + H * len(self.spec.sequences), cfg.expert_hidden, E, cfg.dropout)
        self.gates = Gate(self.front.out_dim, E, num_gates=len(spec.tasks))
        self.towers = nn.ModuleList(Tower(self.experts.out_dim, self.tower_hidden(t), cfg.dropout) for t in spec.task_names)

    def task_logits(self, x: torch.Tensor, sequences: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        states = [torch.cat([x, *(lstm(seq, mask)[1] for lstm, (seq, mask) in zip(lstms, sequences))], dim=1)
                  for lstms in self.lstms]
        experts = self.experts(torch.stack(states, dim=1))  # [B, E, H]: each expert reads its own LSTMs' states
        gates = self.gates(x)  # [B, T, E]
        self.last_gates = {"experts": gates.detach()}
        mixed = gates @ experts
        return torch.stack([tower(mixed[:, j]) for j, tower in enumerate(self.towers)], dim=1)

    def shared_parameter(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.experts.weights[-1]
