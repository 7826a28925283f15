"""The sequence layers: what reads a behaviour sequence in its order, instead of pooling it.

A sequence arrives jagged (TorchRec's ``EmbeddingCollection``: the rows' embeddings back to back, [N, D],
and the rows' lengths [B], most recent last) and is laid out padded here, [B, L, D] with a mask, by one
gather (``padded``). What each layer computes on the padding is masked out, and the recurrent encoder runs
packed, on the real steps only. An empty sequence encodes to zeros.

- ``TargetAttention`` (DIN, Zhou et al. 2018): each behaviour weighted by an MLP of it, the candidate (the
  query feature's embedding), their cosine and its recency; unnormalised weights, as DIN.
- ``RecurrentEncoder``: an LSTM or GRU over the sequence; every step's state and the last one.
- ``AttentionPooling`` (DUPN, Ni et al. 2018): a softmax attention over the encoder's states with a query
  (the user and context).
- ``SequenceEncoder``: what the front uses per sequence (``IdListFeature.encoder``).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from pipeline.layers import MLP


def padded(values: torch.Tensor, lengths: torch.Tensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Jagged rows (``values`` [N, D], ``lengths`` [B]) laid out as [B, max_len, D] and a mask [B, max_len]:
    position j of row b is its j-th id (most recent last), zeros past its length. One gather from the
    values plus a zero row, so ``torch.export`` keeps the batch and the values' sizes symbolic."""
    lengths = lengths.long()
    starts = torch.cumsum(lengths, 0) - lengths
    steps = torch.arange(max_len, device=values.device)
    mask = steps[None, :] < lengths[:, None]
    index = torch.where(mask, starts[:, None] + steps[None, :], values.shape[0])
    return torch.cat([values, values.new_zeros(1, values.shape[1])])[index], mask


def recency(mask: torch.Tensor) -> torch.Tensor:
    """Each position's age [B, L]: 0 for a row's most recent id, 1 for the one before, ...; 0 on padding."""
    lengths = mask.sum(1, keepdim=True)
    steps = torch.arange(mask.shape[1], device=mask.device)[None, :]
    return torch.where(mask, lengths - 1 - steps, torch.zeros_like(steps))


def _tracing() -> bool:
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


class TargetAttention(nn.Module):
    """DIN's activation unit: weight_j = MLP([q, k_j, q * k_j, cos(q, k_j), r_j]) for the query q [B, D], the
    behaviour k_j and an embedding r_j of its recency; returns [sum_j weight_j k_j, sum_j weight_j], [B, D + 1],
    over the real positions. The cosine tells a behaviour equal to the candidate (a shared table: the same row)
    whatever the embeddings' scale, from the first step (their products are ~1e-4 at the tables' init); the
    weights' sum, how much of the history relates to the candidate, reaches the towers as it is rather than
    only as the direction of a weighted sum of embeddings (docs/NOTES.md: both measured)."""

    def __init__(self, dim: int, hidden: list[int], max_len: int) -> None:
        super().__init__()
        self.recency = nn.Embedding(max_len, dim)
        nn.init.normal_(self.recency.weight, std=0.02)
        self.score = MLP(4 * dim + 1, hidden, out_dim=1)
        self.out_dim = dim + 1

    def forward(self, seq: torch.Tensor, mask: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        q = query[:, None, :].expand_as(seq)
        cosine = torch.nn.functional.cosine_similarity(q, seq, dim=-1, eps=1e-8)[:, :, None]
        weight = self.score(torch.cat([q, seq, q * seq, cosine, self.recency(recency(mask))], dim=-1)).squeeze(-1) * mask
        return torch.cat([(weight[:, :, None] * seq).sum(1), weight.sum(1, keepdim=True)], dim=1)


class RecurrentEncoder(nn.Module):
    """An LSTM (or GRU) over each row's real steps: (states [B, L, H], zeros past the length; last state [B, H],
    zeros for an empty row). Packed, so no step runs on padding. Under ``torch.export`` (whose programs take
    no data-dependent packing) it runs on the padded layout and reads each row's state at its last real step:
    the same numbers, a forward recurrence never sees the padding that follows."""

    def __init__(self, in_dim: int, hidden: int, cell: str = "lstm") -> None:
        super().__init__()
        self.rnn = (nn.LSTM if cell == "lstm" else nn.GRU)(in_dim, hidden, batch_first=True)
        self.out_dim = hidden

    def forward(self, seq: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = mask.sum(1)
        if _tracing() or not bool(lengths.any()):  # no real step at all: the padded path keeps the graph connected
            return self.padded_forward(seq, mask)
        rows = lengths.nonzero().squeeze(1)
        packed = pack_padded_sequence(seq[rows], lengths[rows].cpu(), batch_first=True, enforce_sorted=False)
        states, _ = self.rnn(packed)
        states, _ = pad_packed_sequence(states, batch_first=True, total_length=seq.shape[1])
        full = states.new_zeros(seq.shape[0], seq.shape[1], self.out_dim).index_copy(0, rows, states)
        return full, self._last(full, lengths)

    def padded_forward(self, seq: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        states, _ = self.rnn(seq)
        states = states * mask[:, :, None]
        return states, self._last(states, mask.sum(1))

    @staticmethod
    def _last(states: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        at = (lengths - 1).clamp(min=0)[:, None, None].expand(-1, 1, states.shape[2])
        return states.gather(1, at).squeeze(1) * (lengths > 0)[:, None]


class AttentionPooling(nn.Module):
    """DUPN's attention: softmax over the real positions of score_j = MLP([h_j, p, h_j * p]), p = the query
    projected to the states' size; returns sum_j a_j h_j [B, H] (zeros for an empty row)."""

    def __init__(self, state_dim: int, query_dim: int, hidden: list[int]) -> None:
        super().__init__()
        self.project = nn.Linear(query_dim, state_dim)
        self.score = MLP(3 * state_dim, hidden, out_dim=1)
        self.out_dim = state_dim

    def forward(self, states: torch.Tensor, mask: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        p = self.project(query)[:, None, :].expand_as(states)
        scores = self.score(torch.cat([states, p, states * p], dim=-1)).squeeze(-1)
        weights = scores.masked_fill(~mask, -1e9).softmax(dim=1) * mask  # an empty row: all weights 0
        return (weights[:, :, None] * states).sum(1)


class SequenceEncoder(nn.Module):
    """One sequence feature, as its ``encoder`` reads it: target attention with its query, or an LSTM's last
    state. ``forward(seq, mask, query)`` -> [B, out_dim]."""

    def __init__(self, kind: str, dim: int, max_len: int, attention_hidden: list[int], sequence_hidden: int) -> None:
        super().__init__()
        self.kind = kind
        if kind == "target_attention":
            self.layer = TargetAttention(dim, attention_hidden, max_len)
        else:
            self.layer = RecurrentEncoder(dim, sequence_hidden)
        self.out_dim = self.layer.out_dim

    def forward(self, seq: torch.Tensor, mask: torch.Tensor, query: torch.Tensor | None) -> torch.Tensor:
        if self.kind == "target_attention":
            return self.layer(seq, mask, query)
        return self.layer(seq, mask)[1]

