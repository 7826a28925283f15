"""Embedding tables sharded across the Train workers with TorchRec.

``shard`` wraps a model in ``DistributedModelParallel``: TorchRec's planner places every table of the
embedding front (``model.sharding``: ``auto`` lets the planner choose on GPU and prefers table-wise on CPU,
``cpu_auto_constraints``; or one sharding type for all), the tables are looked up with FBGEMM's batched
kernels and an all-to-all, and updated by an optimizer fused into the backward pass
(``train.table_optimizer``); the dense layers are replicated with DDP as before. gloo on CPU, nccl on GPU:
the process group is the one Ray Train set up.

Every worker steps in lockstep (``lockstep``): sharded lookups are collectives, so a worker whose shard has
run out keeps stepping on empty batches until every worker's shard has, and every batch has the same number
of rows (``pipeline.data.Collate`` pads the last one).
"""
from __future__ import annotations

import socket
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
from torchrec.distributed.types import ShardingPlan, ShardingType
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from pipeline.config import ConfigError

SHARDING_TYPES = {"table_wise": ShardingType.TABLE_WISE, "row_wise": ShardingType.ROW_WISE,
                  "column_wise": ShardingType.COLUMN_WISE, "data_parallel": ShardingType.DATA_PARALLEL}
TABLE_OPTIMIZERS = {"rowwise_adagrad": RowWiseAdagrad, "adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD,
                    "adam": torch.optim.Adam}
CPU_TABLE_OPTIMIZERS = ("rowwise_adagrad", "adagrad", "sgd")  # FBGEMM's CPU kernels (exact_*): no fused Adam


class _AllShardingTypes:
    """TorchRec's sharders offer row-wise and table-row-wise sharding on CUDA only. On CPU with gloo they
    run and learn (tests/test_sharding.py), so they are offered there too."""

    def sharding_types(self, compute_device_type: str) -> list[str]:
        types = super().sharding_types(compute_device_type)
        return types + [t.value for t in (ShardingType.ROW_WISE, ShardingType.TABLE_ROW_WISE) if t.value not in types]


class BagSharder(_AllShardingTypes, EmbeddingBagCollectionSharder):
    pass


class SequenceSharder(_AllShardingTypes, EmbeddingCollectionSharder):
    """An un-pooled table (``EmbeddingCollection``) is never replicated: TorchRec 1.8's data-parallel
    ``EmbeddingCollection`` returns embeddings that do not match its features' lengths (tests/test_sharding.py)."""

    def sharding_types(self, compute_device_type: str) -> list[str]:
        return [t for t in super().sharding_types(compute_device_type) if t != ShardingType.DATA_PARALLEL.value]


def check_table_optimizer(name: str, use_gpu: bool) -> None:
    if not use_gpu and name not in CPU_TABLE_OPTIMIZERS:
        raise ConfigError(f"train.table_optimizer: {name} is fused on GPU only; on CPU FBGEMM fuses "
                          f"{', '.join(CPU_TABLE_OPTIMIZERS)}")


# a replicated table has no shards; FBGEMM logs each kernel's arguments on the root logger, "[TBE=<uuid>] ..."
_NOISE = ("Sharding spec not found for", "caching params will be ignored", "[TBE=")


def _not_noise(record) -> bool:
    return not any(n in record.getMessage() for n in _NOISE)


def quiet() -> None:
    """TorchRec and FBGEMM log every kernel's arguments at INFO, and torch warns about APIs TorchRec 1.8 still
    uses (ShardedTensor, DDP's broadcast_buffers, the *_tensor collectives): none of it is actionable here."""
    import logging
    import warnings

    for name in ("fbgemm_gpu", "torchrec"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)  # "is_fx_tracing will return true ..."
    for logger in (logging.getLogger(), logging.getLogger("torchrec.distributed.utils")):
        logger.addFilter(_not_noise)  # the same function each call: a logger keeps one copy
    for message in ("Please use DTensor instead", "`broadcast_buffers` is deprecated", "`torch.distributed.reduce_scatter_tensor`",
                    "`torch.distributed.all_gather_into_tensor`", "`torch.distributed._all_gather_base`",
                    "`torch.distributed._reduce_scatter_base`"):
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
    # a replicated table's kernel has no registered autograd key; its gradient is exact all the same (the DDP
    # mean of the unsharded model's: tests/test_sharding.py)
    warnings.filterwarnings("ignore", message="fbgemm::dense_embedding_codegen_lookup_function", category=UserWarning)


def shard(model: torch.nn.Module, sharding: str, table_optimizer: str, table_lr: float, device: torch.device,
          batch_size: int = 2048) -> tuple[DistributedModelParallel, dict[str, str]]:
    """The model with its embedding front sharded over the default process group, and the plan: table ->
    "sharding type on ranks"."""
    quiet()
    apply_optimizer_in_backward(TABLE_OPTIMIZERS[table_optimizer], model.front.table_parameters(), {"lr": table_lr})
    world = dist.get_world_size()
    bags = [c.name for c in model.front.bags.embedding_bag_configs()] if model.front.bags is not None else []
    sequences = [c.name for m in model.front.seqs for c in m.embedding_configs()]
    constraints = None
    if sharding != "auto":  # one type for every table (an un-pooled one table-wise instead of replicated)
        unpooled = "table_wise" if sharding == "data_parallel" else sharding
        constraints = {t: ParameterConstraints(sharding_types=[SHARDING_TYPES[sharding].value]) for t in bags}
        constraints |= {t: ParameterConstraints(sharding_types=[SHARDING_TYPES[unpooled].value]) for t in sequences}
    elif device.type == "cpu":
        constraints = cpu_auto_constraints(model.front)
    sharders = [BagSharder(), SequenceSharder()]
    topology = TopologyFactory.create_topology(TrainerConfig(world_size=world), kernel_config=KernelConfig(compute_device=device.type))
    planner = EmbeddingShardingPlanner(topology=topology, batch_size=batch_size, constraints=constraints,
                                       storage_reservation=FixedPercentageStorageReservation(0.15))
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    # one worker: no DDP around the dense layers (nothing to all-reduce)
    dmp = DistributedModelParallel(model, device=device, plan=plan, sharders=sharders, init_data_parallel=world > 1)
    return dmp, plan_summary(plan)


TABLE_WISE_MAX_BYTES = 1 << 30  # on CPU, auto keeps a table of up to 1 GiB of fp32 weights whole on one worker


def cpu_auto_constraints(front: torch.nn.Module) -> dict[str, ParameterConstraints]:
    """``model.sharding: auto`` on CPU: a table of up to ``TABLE_WISE_MAX_BYTES`` of weights goes whole to one
    worker (table-wise), a larger one is split by rows across all of them (row-wise); the planner then places
    the tables. TorchRec's planner ranks plans by a GPU cost model and picks row-wise for every table here,
    even on a lone worker. On CPU that pays for what table-wise does not: bucketizing the ids, a
    reduce-scatter of the pooled gradients, and mean pooling applied after the lookup instead of inside it.
    A plan that mixes the two pays for both kinds of collectives, so the limit is about a worker's memory, not
    about balance: the default job's tables all go table-wise, which trained faster (docs/NOTES.md)."""
    configs = ([] if front.bags is None else front.bags.embedding_bag_configs()) + [
        c for m in front.seqs for c in m.embedding_configs()]
    kind = {c.name: "table_wise" if c.num_embeddings * c.embedding_dim * 4 <= TABLE_WISE_MAX_BYTES else "row_wise"
            for c in configs}
    return {t: ParameterConstraints(sharding_types=[SHARDING_TYPES[k].value]) for t, k in kind.items()}


def plan_summary(plan: ShardingPlan) -> dict[str, str]:
    """table -> "row_wise on ranks 0,1" (what the run prints and records in metrics.json)."""
    out = {}
    for module_plan in plan.plan.values():
        for table, p in module_plan.items():
            ranks = sorted(set(p.ranks or []))
            out[table] = f"{p.sharding_type} on rank{'s' if len(ranks) > 1 else ''} {','.join(map(str, ranks))}"
    return out


def dense_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters not updated inside the backward (everything but the tables)."""
    return list(dict(in_backward_optimizer_filter(model.named_parameters())).values())


def lockstep(batches: Iterable[dict], empty: dict) -> Iterator[dict]:
    """The batches, until every worker's have run out; a worker that runs out first steps on ``empty`` (a
    batch of empty rows) meanwhile. One small all-reduce per step."""
    it = iter(batches)
    several = dist.is_initialized() and dist.get_world_size() > 1
    while True:
        batch = next(it, None)
        if several:
            more = torch.tensor([batch is not None], dtype=torch.int32)
            dist.all_reduce(more, op=dist.ReduceOp.MAX)
            if not more.item():
                return
        elif batch is None:
            return
        yield batch if batch is not None else empty


@contextmanager
def local_process_group() -> Iterator[None]:
    """A one-process gloo group for a sharded model outside Ray Train (a bench's in-memory loop, a test); a
    no-op where a process group exists already (inside a Train worker)."""
    if dist.is_initialized():
        yield
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def gathered_state(state: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """A sharded model's state dict as plain full tensors on rank 0 (None elsewhere): what evaluation,
    export and everything downstream load without a process group. Every rank must call it."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    rank = dist.get_rank()
    out = {}
    for key, value in state.items():
        if isinstance(value, ShardedTensor):
            full = torch.empty(value.size(), dtype=value.dtype) if rank == 0 else None
            value.gather(dst=0, out=full)
            out[key] = full
        else:
            out[key] = value.detach().to("cpu", copy=True) if isinstance(value, torch.Tensor) else value
    return out if rank == 0 else None


@torch.no_grad()
def load_plain(module: torch.nn.Module, plain: dict[str, torch.Tensor], rows: dict[str, torch.Tensor]) -> None:
    """Copy a plain state dict (full tensors, as ``gathered_state`` makes) into this worker's shards of a
    sharded model, in place. For a weight in ``rows``, row r takes ``plain[key][rows[key][r]]``, and a row
    marked -1 keeps what it holds (a warm start's new ids keep their fresh initialisation)."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    for key, value in module.state_dict().items():
        if key not in plain:
            continue
        source = plain[key]
        shards = ([(s.tensor, s.metadata.shard_offsets, s.metadata.shard_sizes) for s in value.local_shards()]
                  if isinstance(value, ShardedTensor) else [(value, [0] * value.dim(), list(value.shape))])
        for target, offsets, sizes in shards:
            cols = tuple(slice(o, o + n) for o, n in zip(offsets[1:], sizes[1:]))
            if key in rows:
                src_rows = rows[key][offsets[0]:offsets[0] + sizes[0]]
                keep = src_rows >= 0
                target[keep] = source[(src_rows[keep], *cols)].to(target.dtype)
            else:
                target.copy_(source[(slice(offsets[0], offsets[0] + sizes[0]), *cols)])
