"""Embedding tables sharded with TorchRec across two gloo processes (no Ray: ``torch.multiprocessing``):
every sharding type trains, a checkpoint (DCP) restores the shards and the fused optimizer state exactly,
and restores them resharded on another number of workers."""
from __future__ import annotations

import socket
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
from test_models import SPEC, make_rows  # noqa: E402

import pipeline.sharding  # noqa: E402
from pipeline.config import DatasetSpec, ModelConfig, TrainConfig, from_dict  # noqa: E402
from pipeline.data import Collate  # noqa: E402
from pipeline.models import build_model  # noqa: E402
from pipeline.sharding import dense_parameters, gathered_state, lockstep, shard  # noqa: E402
from pipeline.checkpoint import load_sharded, save_sharded  # noqa: E402
from pipeline.step import BatchStep, mixed_precision  # noqa: E402
from pipeline.weighting import LossWeighting  # noqa: E402


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _setup(rank: int, world: int, port: int, sharding: str):
    if sharding == "auto":  # the limit at the hour table's 25 x 4 fp32 weights: the larger two row-wise
        pipeline.sharding.TABLE_WISE_MAX_BYTES = 25 * 4 * 4
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    spec = from_dict(DatasetSpec, SPEC)
    torch.manual_seed(0)
    model, plan = shard(build_model(spec, ModelConfig(name="mmoe", num_experts=2), table_device="meta"), sharding,
                        "rowwise_adagrad", 0.05, torch.device("cpu"), batch_size=32)
    optimizer = torch.optim.Adam(dense_parameters(model), lr=1e-2)
    step = BatchStep(model, LossWeighting(spec.task_names, TrainConfig()), optimizer,
                     lambda: mixed_precision("fp32", torch.device("cpu")), empty=Collate(spec, 32).empty())
    return spec, model, plan, optimizer, step


def _batches(spec, rank: int, start: int, count: int):
    # rank 1's shard runs out a step early and its last batch is short: the lockstep and the padding at work
    sizes = [32] * count if rank == 0 else [32] * (count - 2) + [7]
    return [Collate(spec, 32)(make_rows(spec, n, seed=100 * rank + start + i)) for i, n in enumerate(sizes)]


def _train_save_resume(rank: int, world: int, ports: tuple, sharding: str, directory: str, out: str) -> None:
    spec, model, plan, optimizer, step = _setup(rank, world, ports[0], sharding)
    before = gathered_state(model.state_dict())
    losses = [float(step(b)[0]) for b in lockstep(_batches(spec, rank, 0, 4), step.empty)]
    after = gathered_state(model.state_dict())
    save_sharded(directory, model, model.state_dict())
    torch.save(optimizer.state_dict(), f"{directory}/dense-{rank}.pt")
    next_losses = [float(step(b)[0]) for b in lockstep(_batches(spec, rank, 10, 3), step.empty)]
    final = gathered_state(model.state_dict())
    dist.destroy_process_group()

    # a new worker group, from the checkpoint: the same shards, optimizer state and next steps
    spec, model, _, optimizer, step = _setup(rank, world, ports[1], sharding)
    load_sharded(directory, model, model.state_dict())
    optimizer.load_state_dict(torch.load(f"{directory}/dense-{rank}.pt"))
    restored = gathered_state(model.state_dict())
    resumed_losses = [float(step(b)[0]) for b in lockstep(_batches(spec, rank, 10, 3), step.empty)]
    resumed_final = gathered_state(model.state_dict())
    dist.destroy_process_group()
    if rank == 0:
        torch.save({"plan": plan, "losses": losses, "next": next_losses, "resumed": resumed_losses,
                   "moved": {k: float((after[k] - before[k]).abs().max()) for k in before if k.startswith("front.")},
                   "restored_equal": all(torch.equal(restored[k], after[k]) for k in after),
                   "final_equal": all(torch.equal(resumed_final[k], final[k]) for k in final)}, out)


def _spawn(fn, world: int, *args):
    """Run ``fn(rank, world, *args, out)`` on ``world`` processes; rank 0 saves what it returns to the file ``out``
    (a pipe would block a large result until the parent reads it, and the parent reads after they end)."""
    with tempfile.TemporaryDirectory() as d:
        out = f"{d}/result.pt"
        mp.start_processes(fn, args=(world, *args, out), nprocs=world, start_method="spawn")
        return torch.load(out, weights_only=False)


@pytest.mark.parametrize("sharding", ["table_wise", "row_wise", "column_wise", "data_parallel", "auto"])
def test_every_sharding_type_trains_and_resumes_exactly(tmp_path, sharding):
    out = _spawn(_train_save_resume, 2, (_free_port(), _free_port()), sharding, str(tmp_path))
    expected = {t: sharding for t in ("user", "category", "hour")}
    if sharding == "data_parallel":  # an un-pooled (max-pooled) table is never replicated: table-wise
        expected["hour"] = "table_wise"
    if sharding == "auto":  # on CPU: table-wise up to TABLE_WISE_MAX_BYTES, row-wise above
        expected = {"user": "row_wise", "category": "row_wise", "hour": "table_wise"}
    assert {t: p.split(" on ")[0] for t, p in out["plan"].items()} == expected, out["plan"]
    assert all(moved > 0 for moved in out["moved"].values()), out["moved"]  # every table was updated
    assert all(torch.isfinite(torch.tensor(out["losses"])))
    assert out["restored_equal"] and out["final_equal"]
    assert out["resumed"] == out["next"]  # bit for bit: the optimizer state came back too


def _save(rank: int, world: int, port: int, directory: str, out: str) -> None:
    spec, model, plan, optimizer, step = _setup(rank, world, port, "row_wise")
    for b in lockstep(_batches(spec, rank, 0, 3), step.empty):
        step(b)
    save_sharded(directory, model, model.state_dict())
    full = gathered_state(model.state_dict())
    dist.destroy_process_group()
    if rank == 0:
        torch.save({"model": full}, out)


def _load(rank: int, world: int, port: int, directory: str, out: str) -> None:
    spec, model, plan, optimizer, step = _setup(rank, world, port, "table_wise")
    load_sharded(directory, model, model.state_dict())
    full = gathered_state(model.state_dict())
    step(Collate(spec, 32)(make_rows(spec, 32, seed=7)))  # and it trains on
    dist.destroy_process_group()
    torch.save({"model": full, "plan": plan}, out)


def test_a_checkpoint_reshards_onto_another_number_of_workers(tmp_path):
    """Two workers row-wise, then one worker table-wise from their checkpoint: DCP reads each table's rows
    from whichever shards hold them, so a rerun with another worker count (or plan) resumes."""
    saved = _spawn(_save, 2, _free_port(), str(tmp_path))
    loaded = _spawn(_load, 1, _free_port(), str(tmp_path))
    assert all(p.startswith("table_wise on rank 0") for p in loaded["plan"].values())
    assert saved["model"].keys() == loaded["model"].keys()
    for key, value in saved["model"].items():
        assert torch.equal(loaded["model"][key], value), key


def _gradients(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    spec, cfg = from_dict(DatasetSpec, SPEC), ModelConfig(name="mmoe", num_experts=2)
    batches = [Collate(spec, 32)(make_rows(spec, 32, seed=r)) for r in range(world)]
    result = {}
    for sharding in ("table_wise", "row_wise", "column_wise", "data_parallel"):
        torch.manual_seed(0)  # sgd with lr 1 fused into the backward: a sharded table's update is minus its gradient
        model, _ = shard(build_model(spec, cfg, table_device="meta"), sharding, "sgd", 1.0, torch.device("cpu"), 32)
        before = gathered_state(model.state_dict())
        outputs = model(batches[rank])
        model.module.task_losses(outputs, batches[rank]["labels"]).sum().backward()
        after = gathered_state(model.state_dict())
        features = [None] * world
        dist.all_gather_object(features, outputs["features"].detach())
        grads = {name: p.grad for name, p in model.named_parameters() if "front." in name and p.grad is not None}
        replicated = [None] * world
        dist.all_gather_object(replicated, {n: g.clone() for n, g in grads.items()})
        if rank == 0:
            # the reference: the same weights in the unsharded model, each worker's batch's gradient
            reference = build_model(spec, cfg)
            reference.load_state_dict(before)
            per_batch, same_features = [], []
            for b, f in zip(batches, features):
                reference.zero_grad()
                ref = reference(b)
                reference.task_losses(ref, b["labels"]).sum().backward()
                per_batch.append({n: p.grad.clone() for n, p in reference.named_parameters() if n.startswith("front.")})
                same_features.append(torch.allclose(ref["features"], f, atol=1e-6))
            result[sharding] = {"before": before, "after": after, "replicated": replicated[0], "per_batch": per_batch,
                                "same_features": same_features}
        dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        torch.save(result, out)


def test_every_sharding_type_computes_the_unsharded_models_gradients():
    """Against the unsharded model on the same (gathered) weights, which evaluation and export use: the same
    features for every worker's batch, whatever the plan (a sharded collection returns its features grouped by
    shard; the front puts them back in order), and the same gradients. A sharded table's update with sgd, lr 1,
    is minus the mean of the workers' batch gradients; a replicated table's gradient (DDP) is that mean."""
    result = _spawn(_gradients, 2, _free_port())
    for sharding, r in result.items():
        assert all(r["same_features"]), sharding
        for key, per in r["per_batch"][0].items():
            mean = (per + r["per_batch"][1][key]) / 2
            replicated = [g for name, g in r["replicated"].items() if name.endswith(key)]
            if replicated:  # a data-parallel table: the weights wait for the dense optimizer
                assert torch.allclose(replicated[0], mean, atol=1e-6), (sharding, key)
                assert torch.equal(r["after"][key], r["before"][key]), (sharding, key)
            else:
                assert torch.allclose(r["after"][key] - r["before"][key], -mean, atol=1e-6), (sharding, key)
            assert mean.abs().sum() > 0, (sharding, key)
