"""ESMM (Ma et al., SIGIR 2018): a CTR tower and a CVR tower on the shared embeddings, each with its
own tower config (``model.towers``); pCTCVR = pCTR x pCVR and the loss is CTR loss + CTCVR loss over all
exposures (the base class's esmm chaining), so the CVR tower learns from the whole exposure space.
Funnels of any depth chain the same way (impression -> click -> cart -> purchase)."""
from __future__ import annotations

import torch
from torch import nn

from pipeline.config import DatasetSpec, ModelConfig
from pipeline.layers import Tower
from pipeline.models.base import MultiTaskModel


class ESMM(MultiTaskModel):
    needs_funnel = True
    def __init__(self, spec: DatasetSpec, cfg: ModelConfig, table_device=None) -> None:
        if cfg.dependent_loss != "esmm":
            raise ValueError("ESMM trains dependent tasks over the exposure space: dependent_loss must be 'esmm'")
        super().__init__(spec, cfg, table_device)
        self.towers = nn.ModuleList(Tower(self.front.out_dim, self.tower_hidden(t), cfg.dropout)
                                    for t in spec.task_names)

    def tower_hidden(self, task: str) -> list[int]:
        # each ESMM tower is a whole network on the embeddings: by default as deep as the other models'
        # bottom + tower (expert_hidden + tower_hidden), unless model.towers sizes it
        return self.cfg.towers.get(task, self.cfg.expert_hidden + self.cfg.tower_hidden)

    def task_logits(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([tower(x) for tower in self.towers], dim=1)
