"""PLE (Tang et al., RecSys 2020): stacked CGC levels of shared and task-specific experts.

At every level each task's gate mixes that task's own experts with the shared experts; below the last
level a shared gate mixes all experts into the next level's shared input. One level is CGC. All experts
of a level run as one batched op, each reading its own input (the shared or its task's stream)."""
from __future__ import annotations

import torch
from torch import nn

from pipeline.config import DatasetSpec, ModelConfig
from pipeline.layers import Experts, Gate, Tower
from pipeline.models.base import MultiTaskModel


class PLE(MultiTaskModel):
    def __init__(self, spec: DatasetSpec, cfg: ModelConfig, table_device=None) -> None:
        super().__init__(spec, cfg, table_device)
        T, S, K = len(spec.tasks), cfg.num_shared_experts, cfg.num_task_experts
        # experts are laid out [shared 0..S-1 | task 0's K | task 1's K | ...]; task t's gate covers its own K
        # experts then the S shared ones. Routing is a fixed 0/1 matrix (gate slot -> expert) rather than
        # advanced indexing, whose backward (an accumulating index_put) cost a fifth of a CPU step.
        route = torch.zeros(T, K + S, S + T * K)
        for t in range(T):
            for slot, e in enumerate([*range(S + t * K, S + (t + 1) * K), *range(S)]):
                route[t, slot, e] = 1.0
        self.register_buffer("route", route, persistent=False)  # [T, K+S, E]
        self.num_shared, self.num_task_experts = S, K
        in_dim = self.front.out_dim
        self.experts, self.task_gates, self.shared_gates = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for level in range(cfg.num_levels):
            self.experts.append(Experts(in_dim, cfg.expert_hidden, S + T * K, cfg.dropout))
            self.task_gates.append(Gate(in_dim, K + S, num_gates=T))
            if level < cfg.num_levels - 1:
                self.shared_gates.append(Gate(in_dim, S + T * K))
            in_dim = self.experts[-1].out_dim
        self.towers = nn.ModuleList(Tower(in_dim, self.tower_hidden(t), cfg.dropout) for t in spec.task_names)

    def task_logits(self, x: torch.Tensor) -> torch.Tensor:
        shared, tasks = x, None  # level 0: every stream is the embedding front's output
        for level, experts in enumerate(self.experts):
            if tasks is None:
                out = experts(x)  # [B, E, H]
            else:  # each expert reads its stream: the shared experts the shared one, task t's experts task t's
                B, T, H = tasks.shape
                out = experts(torch.cat([shared[:, None].expand(B, self.num_shared, H),
                                         tasks[:, :, None].expand(B, T, self.num_task_experts, H).reshape(B, -1, H)],
                                        dim=1))
            gates = self.task_gates[level](x if tasks is None else tasks)  # [B, T, K+S]
            expert_weights = torch.einsum("btk,tke->bte", gates, self.route)  # [B, T, E], 0 off a task's experts
            tasks = (expert_weights.unsqueeze(-1) * out.unsqueeze(1)).sum(dim=2)  # [B, T, H]
            self.last_gates[f"level{level}"] = gates.detach()
            if level < len(self.shared_gates):
                shared = torch.einsum("be,beh->bh", self.shared_gates[level](shared), out)  # [B, H]
        return torch.stack([tower(tasks[:, j]) for j, tower in enumerate(self.towers)], dim=1)
