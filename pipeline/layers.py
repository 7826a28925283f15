"""The layer vocabulary every model is composed from: embedding front, MLP, experts, gate, tower (and its logit)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import DatasetSpec


class EmbeddingFront(nn.Module):
    """Every id feature through TorchRec, plus the dense features: [B, out_dim].

    Input: one ``KeyedJaggedTensor`` with keys ``spec.id_keys`` (``pipeline.data.Collate``) and dense [B, D].
    The tables the spec pools by sum or mean (``EmbeddingTable.pooling``) are one ``EmbeddingBagCollection``:
    FBGEMM's batched kernels look up and pool every feature in one call, and under
    ``DistributedModelParallel`` they are sharded and updated by an optimizer fused into the backward
    (``pipeline.sharding``). A table with a max-pooled feature, or with a sequence read in order (its
    ``encoder``: target attention, an LSTM), is looked up un-pooled, in an ``EmbeddingCollection`` per
    embedding dim (TorchRec's ``EmbeddingCollection`` takes one dim), and pooled or encoded here
    (``pipeline.sequence``). A shared table (the behaviour sequence of categories and the target item's
    category) is stored once. An empty id list pools or encodes to zeros.

    With ``raw_sequences`` (a model that reads the sequences itself: DUPN, MoSE), the sequences with an
    encoder are left out of the output and handed over padded by ``embed``.

    ``device="meta"`` builds the tables without memory, for ``DistributedModelParallel`` to materialise
    only this worker's shards."""

    def __init__(self, spec: DatasetSpec, init_std: float = 0.02, device: torch.device | str | None = None,
                 attention_hidden: list[int] = (32,), sequence_hidden: int = 32, raw_sequences: bool = False) -> None:
        super().__init__()
        from torchrec import EmbeddingBagCollection, EmbeddingCollection

        device = torch.device(device or "cpu")
        self.keys = spec.id_keys
        pooled = [t.torchrec_config(init_std) for t in spec.tables.values() if t.pooling is not None]
        self.bags = EmbeddingBagCollection(tables=pooled, device=device) if pooled else None
        # the pooled features' order in the output: the unsharded collection's. A sharded one returns its
        # features grouped by the shards that pooled them, an order that changes with the plan.
        self.bag_keys = [n for c in pooled for n in c.feature_names]
        self.split_sizes = [len(spec.pooled_keys)]
        self.seqs = nn.ModuleList()
        self.seq_features: list[list] = []  # per EmbeddingCollection: its features (the spec's objects)
        for dim in sorted({t.dim for t in spec.tables.values() if t.pooling is None}):
            tables = [t for t in spec.tables.values() if t.pooling is None and t.dim == dim]
            self.seqs.append(EmbeddingCollection(tables=[t.torchrec_config(init_std) for t in tables], device=device))
            self.seq_features.append([spec.feature(n) for t in tables for n in t.features])
            self.split_sizes.append(len(self.seq_features[-1]))
        ordered = [f for f in spec.sequences if f.encoder != "pool"]
        self.raw = [f.name for f in ordered] if raw_sequences else []
        self.encoders = nn.ModuleDict({f.name: SequenceEncoder(f.encoder, f.dim, f.max_len, list(attention_hidden),
                                                               sequence_hidden) for f in ordered if not raw_sequences})
        dims = {f.name: self.encoders[f.name].out_dim if f.name in self.encoders else 0 if f.name in self.raw
                else spec.tables[f.table_name].dim for f in spec.id_features}
        self.out_dim = sum(dims.values()) + len(spec.dense)

    def table_parameters(self) -> list[nn.Parameter]:
        """The embedding tables' parameters: what the fused optimizer updates in the backward."""
        return [p for m in [self.bags, *self.seqs] if m is not None for p in m.parameters()]

    def forward(self, ids, dense: torch.Tensor | None = None) -> torch.Tensor:
        return self.embed(ids, dense)[0]

    def embed(self, ids, dense: torch.Tensor | None = None) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """(the output [B, out_dim]; for ``raw_sequences``, each of them padded [B, L, D] and its mask [B, L])."""
        if ids.keys() != self.keys:  # batches built from a spec that pools differently (before ``model_spec``)
            ids = ids.permute([ids.keys().index(k) for k in self.keys])
        groups = ids.split(self.split_sizes) if len(self.split_sizes) > 1 else [ids]
        bagged = self.bags(groups[0]) if self.bags is not None else None
        parts = [self._in_order(bagged)] if bagged is not None else []
        raw: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for collection, features, group in zip(self.seqs, self.seq_features, groups[1:]):
            looked_up = collection(group)
            rows = {}
            for f in features:
                values, lengths = looked_up[f.name].values(), looked_up[f.name].lengths()
                if f.kind == "id":  # one id per row, gathered so that its size is the batch's
                    rows[f.name] = padded(values, lengths, 1)[0][:, 0]
                elif f.encoder == "pool":
                    rows[f.name] = pool_jagged(values, lengths, f.pooling)
                else:
                    raw[f.name] = padded(values, lengths, f.max_len)
            for f in features:  # the encoders, once their queries are looked up
                if f.name in self.encoders:
                    query = None if f.query is None else rows[f.query] if f.query in rows else bagged[f.query]
                    rows[f.name] = self.encoders[f.name](*raw[f.name], query)
                if f.name in rows:
                    parts.append(rows[f.name])
        if dense is not None and dense.shape[-1] > 0:
            parts.append(dense)
        return torch.cat(parts, dim=1), [raw[name] for name in self.raw]

    def _in_order(self, pooled) -> torch.Tensor:
        if pooled.keys() == self.bag_keys:
            return pooled.values()
        from torchrec import KeyedTensor

        return KeyedTensor.regroup([pooled], [self.bag_keys])[0]


def pool_jagged(values: torch.Tensor, lengths: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool each row's run of ``values`` [N, D] (``lengths`` [B] long): [B, D]; an empty row pools to zeros."""
    rows = torch.repeat_interleave(torch.arange(len(lengths), device=values.device), lengths)
    reduce = {"max": "amax", "sum": "sum", "mean": "mean"}[pooling]
    out = values.new_zeros(len(lengths), values.shape[1])
    return out.scatter_reduce(0, rows[:, None].expand_as(values), values, reduce=reduce, include_self=False)


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


# the sequence layers build on MLP above (and the front uses them)
from pipeline.sequence import SequenceEncoder, padded  # noqa: E402
