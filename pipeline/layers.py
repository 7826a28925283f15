"""The layer vocabulary every model is composed from: embedding front, MLP, experts, gate, tower (and its logit)."""
from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import DatasetSpec


class EmbeddingFront(nn.Module):
    """All id features through one fused lookup per embedding dim (TorchRec style), plus dense features.

    Tables of the same dim are stacked into one weight; each feature indexes it through a row offset,
    so a batch's sparse ids are looked up with a single ``F.embedding`` and its sequences with a single
    ``F.embedding_bag`` per (dim, pooling), whatever the number of features. A shared table (a behaviour
    sequence of categories and the target item's category) is stored once.

    Inputs hold table-local indices: ``sparse`` [B, F], ``seq`` [B, S, L] (0 = padding) and ``dense``
    [B, D]. Output: [B, out_dim] = flattened sparse embeddings, pooled sequences, dense.

    ``stacked[g].sparse``: weight g's gradient is sparse (the batch's rows only) instead of a dense tensor of
    the weight's full size, which the backward zero-fills and the optimiser sweeps every step
    (``use_sparse_grads``).
    """

    def __init__(self, spec: DatasetSpec, init_std: float = 0.02) -> None:
        super().__init__()
        by_dim: dict[int, list] = defaultdict(list)
        for table in spec.tables.values():
            by_dim[table.dim].append(table)
        self.dims = sorted(by_dim)
        # nn.Embedding modules only as holders of the stacked weights (looked up with F.embedding/embedding_bag
        # below): DDP recognises a sparse-gradient parameter by its module's type and ``sparse`` flag
        self.stacked = nn.ModuleList()
        table_offset: dict[str, int] = {}
        for dim in self.dims:
            rows = 0
            for table in by_dim[dim]:
                table_offset[table.name] = rows
                rows += table.num_rows
            self.stacked.append(nn.Embedding(rows, dim, _weight=torch.randn(rows, dim) * init_std))
        group_of = {t.name: self.dims.index(t.dim) for t in spec.tables.values()}
        self.ids_per_example = [sum(group_of[f.table_name] == g for f in spec.sparse)
                                + sum(s.max_len for s in spec.sequences if group_of[s.table_name] == g)
                                for g in range(len(self.dims))]

        # per dim group: which sparse columns it serves and their row offsets
        self.sparse_groups: list[int] = []
        for g in range(len(self.dims)):
            cols = [j for j, f in enumerate(spec.sparse) if group_of[f.table_name] == g]
            if cols:
                self.sparse_groups.append(g)
                self.register_buffer(f"sparse_cols_{g}", torch.tensor(cols), persistent=False)
                self.register_buffer(f"sparse_off_{g}", torch.tensor(
                    [table_offset[spec.sparse[j].table_name] for j in cols]), persistent=False)
        # per (dim group, pooling): which sequence features and their offsets
        self.seq_groups: list[tuple[int, str]] = []
        for g in range(len(self.dims)):
            for pooling in ("mean", "sum", "max"):
                cols = [j for j, s in enumerate(spec.sequences) if group_of[s.table_name] == g and s.pooling == pooling]
                if cols:
                    k = len(self.seq_groups)
                    self.seq_groups.append((g, pooling))
                    self.register_buffer(f"seq_cols_{k}", torch.tensor(cols), persistent=False)
                    self.register_buffer(f"seq_off_{k}", torch.tensor(
                        [table_offset[spec.sequences[j].table_name] for j in cols]), persistent=False)
        self.out_dim = (sum(f.dim for f in spec.sparse) + sum(spec.tables[s.table_name].dim for s in spec.sequences)
                        + len(spec.dense))

    def forward(self, sparse: torch.Tensor, seq: torch.Tensor | None = None,
                dense: torch.Tensor | None = None) -> torch.Tensor:
        batch = sparse.shape[0]
        parts = []
        for g in self.sparse_groups:
            idx = sparse[:, getattr(self, f"sparse_cols_{g}")] + getattr(self, f"sparse_off_{g}")
            parts.append(F.embedding(idx, self.stacked[g].weight, sparse=self.stacked[g].sparse).reshape(batch, -1))
        for k, (g, pooling) in enumerate(self.seq_groups):
            ids = seq[:, getattr(self, f"seq_cols_{k}")]  # [B, S, L]
            parts.append(self._pool(ids, getattr(self, f"seq_off_{k}"), self.stacked[g], pooling).reshape(batch, -1))
        if dense is not None and dense.shape[-1] > 0:
            parts.append(dense)
        return torch.cat(parts, dim=1)

    def use_sparse_grads(self, batch_size: int) -> list[nn.Parameter]:
        """Sparse gradients for the weights with more rows than a batch looks up (the large id tables; a small
        one is cheaper to update densely); returns those weights, for a sparse optimiser."""
        for table, n in zip(self.stacked, self.ids_per_example):
            table.sparse = table.num_embeddings > batch_size * n
        return [t.weight for t in self.stacked if t.sparse]

    @property
    def weights(self) -> list[nn.Parameter]:
        """The stacked table weights, one per embedding dim (``dims``)."""
        return [t.weight for t in self.stacked]

    @staticmethod
    def _pool(ids: torch.Tensor, offsets: torch.Tensor, table: nn.Embedding, pooling: str) -> torch.Tensor:
        batch, s, length = ids.shape
        weight, sparse = table.weight, table.sparse
        mask = ids != 0
        idx = (ids + offsets[None, :, None]).reshape(batch * s, length)
        if pooling == "max":
            emb = F.embedding(idx, weight, sparse=sparse).masked_fill(~mask.reshape(batch * s, length, 1), -math.inf)
            pooled = emb.max(dim=1).values
            return torch.where(torch.isinf(pooled), torch.zeros_like(pooled), pooled).reshape(batch, s, -1)
        w = mask.reshape(batch * s, length).to(weight.dtype)
        if pooling == "mean":
            w = w / w.sum(dim=1, keepdim=True).clamp(min=1)
        # padded positions get weight 0, so an all-padding sequence pools to zeros
        return F.embedding_bag(idx, weight, per_sample_weights=w, mode="sum", sparse=sparse).reshape(batch, s, -1)


class MLP(nn.Sequential):
    """Linear + ReLU (+ Dropout) per hidden size; with ``out_dim``, a final plain Linear (no activation)."""

    def __init__(self, in_dim: int, hidden: list[int], dropout: float = 0.0, out_dim: int | None = None) -> None:
        layers: list[nn.Module] = []
        for h in hidden:
            layers += [nn.Linear(in_dim, h), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout > 0 else [])
            in_dim = h
        if out_dim is not None:
            layers.append(nn.Linear(in_dim, out_dim))
            in_dim = out_dim
        super().__init__(*layers)
        self.out_dim = in_dim


class Experts(nn.Module):
    """``num_experts`` MLPs evaluated as one batched matmul per layer: weights [E, in, out].

    ``x`` is either [B, in] (every expert reads the same input) or [B, E, in] (each expert its own,
    as in PLE's upper levels). Returns [B, E, out]."""

    def __init__(self, in_dim: int, hidden: list[int], num_experts: int, dropout: float = 0.0) -> None:
        super().__init__()
        dims = [in_dim, *hidden]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for i, o in zip(dims[:-1], dims[1:]):
            bound = 1 / math.sqrt(i)  # nn.Linear's default init, per expert
            self.weights.append(nn.Parameter(torch.empty(num_experts, i, o).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(num_experts, o).uniform_(-bound, bound)))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.num_experts, self.out_dim = num_experts, dims[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for w, b in zip(self.weights, self.biases):
            x = torch.einsum("bi,eio->beo" if x.dim() == 2 else "bei,eio->beo", x, w) + b
            x = self.dropout(F.relu(x))
        return x


class Gate(nn.Module):
    """Softmax gates over ``num_experts`` experts: one gate [B, in] -> [B, E]; or ``num_gates`` gates
    computed together, [B, in] (one input for all) or [B, G, in] (each gate its own) -> [B, G, E]."""

    def __init__(self, in_dim: int, num_experts: int, num_gates: int | None = None) -> None:
        super().__init__()
        self.single = num_gates is None
        bound = 1 / math.sqrt(in_dim)
        # laid out [in, G, E] so that a shared input is one plain matmul with contiguous gradients
        self.weight = nn.Parameter(torch.empty(in_dim, num_gates or 1, num_experts).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(num_gates or 1, num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            logits = (x @ self.weight.flatten(1)).view(x.shape[0], *self.bias.shape)
        else:
            logits = torch.einsum("bgi,ige->bge", x, self.weight)
        gates = (logits + self.bias).softmax(dim=-1)
        return gates.squeeze(1) if self.single else gates


class Logit(nn.Linear):
    """The last layer of a task head, [B, in] -> [B], always in fp32: under bf16 autocast a bf16 logit keeps
    ~3 significant digits, which would tie predictions and coarsen AUC."""

    def __init__(self, in_dim: int) -> None:
        super().__init__(in_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float()).squeeze(-1)


class Tower(nn.Module):
    """A task head: MLP then one logit. [B, in] -> [B]."""

    def __init__(self, in_dim: int, hidden: list[int], dropout: float = 0.0) -> None:
        super().__init__()
        self.mlp = MLP(in_dim, hidden, dropout)
        self.out = Logit(self.mlp.out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.mlp(x))
