"""DUPN (Ni et al., KDD 2018): one user representation shared by several tasks, from the behaviour sequence.

Each behaviour sequence's embeddings go through an LSTM; an attention over its states, with the user and
context (every other feature) as the query, pools them into the representation; concatenated with the other
features, it feeds a shared MLP and the task towers. The paper's property-gated LSTM also feeds each
behaviour's item properties into the LSTM's gates; here a behaviour is its id (a category) alone, so the LSTM
is a plain one over those embeddings (a sequence of several properties would be one id list per property)."""
from __future__ import annotations

import torch
from torch import nn

from pipeline.config import DatasetSpec, ModelConfig
from pipeline.layers import MLP, Tower
from pipeline.models.base import MultiTaskModel
from pipeline.sequence import AttentionPooling, RecurrentEncoder


class DUPN(MultiTaskModel):
    reads_sequences, splits_rows = True, False

    def __init__(self, spec: DatasetSpec, cfg: ModelConfig, table_device=None) -> None:
        super().__init__(spec, cfg, table_device)
        context = self.front.out_dim  # every feature but the sequences, and the dense ones
        self.lstms = nn.ModuleList(RecurrentEncoder(f.dim, cfg.sequence_hidden) for f in self.spec.sequences)
        self.attention = nn.ModuleList(AttentionPooling(cfg.sequence_hidden, context, cfg.attention_hidden)
                                       for _ in self.spec.sequences)
        self.bottom = MLP(context + cfg.sequence_hidden * len(self.spec.sequences), cfg.expert_hidden, cfg.dropout)
        self.towers = nn.ModuleList(Tower(self.bottom.out_dim, self.tower_hidden(t), cfg.dropout) for t in spec.task_names)

    def task_logits(self, x: torch.Tensor, sequences: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        users = [attend(lstm(seq, mask)[0], mask, x) for (seq, mask), lstm, attend in zip(sequences, self.lstms, self.attention)]
        shared = self.bottom(torch.cat([x, *users], dim=1))
        return torch.stack([tower(shared) for tower in self.towers], dim=1)
