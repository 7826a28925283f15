"""The per-worker training loop, run by Ray Train's TorchTrainer on every worker.

Read it top to bottom: restore from the latest checkpoint if there is one (or start from a warm-start
model), then for each epoch train on this worker's shard, evaluate the validation split exactly (metrics as
collectives, no gather), checkpoint, and stop early when validation stops improving. Finally the best
epoch's model (chosen on validation) is evaluated once on the test split and reported with the final
checkpoint. The step itself (threads, precision, allocator) is ``pipeline.step``; the checkpoint files are
``pipeline.checkpoint``.
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from pipeline import ray_compat, warm_start
from pipeline.checkpoint import load_sharded, load_state, report, snapshot
from pipeline.config import DatasetSpec, JobConfig, TrainConfig, from_dict
from pipeline.data import Collate, tensor_batches, to_device
from pipeline.diagnostics import GateStats, merge_states, summarize
from pipeline.metrics import gather_to_rank0, predict_shard, split_metrics
from pipeline.models import build_model
from pipeline.progress import EpochProgress, say
from pipeline.sharding import dense_parameters, gathered_state, lockstep, shard
from pipeline.step import BatchStep, freed_memory_kept, mixed_precision
from pipeline.weighting import LossWeighting


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    job, spec = from_dict(JobConfig, loop_config["job"]), from_dict(DatasetSpec, loop_config["spec"])
    cfg, rank, device = job.train, ray.train.get_context().get_world_rank(), ray.train.torch.get_device()
    train_shard = open_shards()
    ray_compat.quiet_train_reports()  # the run's own lines (progress, one per epoch, the table) are what it shows
    threads = loop_config["step_threads"]
    torch.set_num_threads(max(1, loop_config["torch_threads"] // threads))
    torch.manual_seed(cfg.seed)  # same initial dense weights on every worker; DDP also broadcasts them
    autocast = mixed_precision(cfg.precision, device)

    checkpoint = ray.train.get_checkpoint()  # a restarted worker group, or a rerun with the same run name
    state = checkpoint_state(checkpoint)
    progress = resumed_progress(state)
    epoch_batches = started_epoch(train_shard, spec, cfg, progress, device)  # its start-up overlaps the set-up below
    model, plan = sharded_model(spec, job, device, rank)
    weighting = LossWeighting(spec.task_names, cfg).to(device)
    optimizer = torch.optim.Adam(dense_parameters(model) + ([weighting.log_var] if cfg.loss_weighting == "uncertainty" else []),
                                 lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    best_model = restore_or_initialise(model, weighting, optimizer, checkpoint, state, progress, loop_config)
    step = BatchStep(model, weighting, optimizer, lambda: mixed_precision(cfg.precision, device), threads,
                     empty=to_device(Collate(spec, cfg.batch_size).empty(), device))
    trainer_state = lambda: {"optimizer": optimizer.state_dict(), "weighting": weighting.state_dict(),  # noqa: E731
                             "progress": progress}

    while epoch_batches is not None:  # per epoch: train, evaluate on validation, keep the best, checkpoint
        shown = EpochProgress(progress["epoch"], cfg.epochs, loop_config.get("train_rows", 0),
                              dist.get_world_size() if dist.is_initialized() else 1, loop_config.get("board"), rank == 0)
        metrics = train_epoch(step, epoch_batches, weighting, spec, cfg, progress["epoch"], threads, shown)
        metrics |= evaluate(model.module, "valid", spec, cfg, autocast)  # rank 0 only; others get {}
        if end_epoch(progress, metrics, cfg, rank):  # this epoch's model is the best so far:
            best_model = snapshot(model.state_dict())  # every worker keeps its shards of it
        epoch_batches = started_epoch(train_shard, spec, cfg, progress, device)  # while the checkpoint is written
        report(metrics | {"best_epoch": progress["best_epoch"], "resumes": progress["resumes"]} | plan, rank,
               model, best_model, trainer_state(), loop_config)

    final, plain = test_selected(model, best_model, spec, cfg, autocast, progress, plan)
    step.close()
    report(final, rank, model, best_model, trainer_state() | {"best_model": plain}, loop_config, final=True)


def open_shards():
    """Every split's shard up front: each sets up a split coordinator actor (a new process, ~1-2 s here) in
    the background while the model is built, rather than before the first batch of its split. Returns the
    train shard."""
    for split in ("valid", "test"):
        ray.train.get_dataset_shard(split)
    return ray.train.get_dataset_shard("train")


def checkpoint_state(checkpoint) -> dict | None:
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        return load_state(d)


def resumed_progress(state: dict | None) -> dict[str, Any]:
    """Where training stands: a fresh run's start, or the checkpoint's progress with one more resume."""
    if state is None:
        return {"epoch": 0, "best_score": -math.inf, "best_epoch": -1, "stopped": False, "history": [], "resumes": 0}
    return state["progress"] | {"resumes": state["progress"].get("resumes", 0) + 1}


def sharded_model(spec: DatasetSpec, job: JobConfig, device: torch.device, rank: int):
    """The model with its tables sharded across the workers (built on "meta": each worker materialises only
    its shards) and the plan, as report keys (``plan/<table>``: recorded with every report)."""
    model, plan = shard(build_model(spec, job.model, table_device="meta"), job.model.sharding, job.train.table_optimizer,
                        job.train.table_lr, device, job.train.batch_size)
    if rank == 0:
        say("embedding tables: " + "; ".join(f"{t} {p}" for t, p in plan.items()))
    if job.train.compile:  # dynamic: evaluation's larger batches reuse the compiled graph
        model.module.task_logits = torch.compile(model.module.task_logits, dynamic=True)
    return model, {f"plan/{t}": p for t, p in plan.items()}


def restore_or_initialise(model, weighting, optimizer, checkpoint, state, progress, loop_config) -> dict[str, Any]:
    """The checkpoint's model, optimisers and loss weighting, or (a fresh run) a warm start's weights where one
    is given; returns the best model so far (this worker's shards)."""
    if state is None and loop_config.get("init_from"):  # a warm start: the previous run's weights
        warm_start.load_into(model.module, loop_config["init_from"])
    best_model = snapshot(model.state_dict())
    if state is not None:
        with checkpoint.as_directory() as d:
            best_model = load_sharded(d, model, best_model)
        weighting.load_state_dict(state["weighting"])
        optimizer.load_state_dict(state["optimizer"])
        say(f"resumed from the checkpoint of epoch {progress['epoch'] - 1} (resume {progress['resumes']})")
    return best_model


def train_epoch(step: BatchStep, batches: Iterator[dict], weighting: LossWeighting, spec: DatasetSpec,
                cfg: TrainConfig, epoch: int, threads: int, shown: "EpochProgress") -> dict[str, float]:
    """One pass over this worker's shard, in lockstep with the others (shards can differ by a batch or two);
    the epoch's training metrics, reduced over the workers."""
    weighting.set_epoch(epoch)
    weights_used = weighting.log()  # the epoch's weights (learned ones as they were at its start)
    device = ray.train.torch.get_device()
    loss_sum = torch.zeros(len(spec.tasks) + 1, device=device)  # summed per row, synced once per epoch
    rows = torch.zeros(2, device=device)  # read, trained
    t0 = time.time()  # the loop asks for the epoch's first batch
    first_batch_seconds, first_rows = None, 0
    with freed_memory_kept(cfg.keep_freed_memory):
        for batch in lockstep(batches, step.empty):
            if first_batch_seconds is None:  # what is left of the data pipeline's start-up
                first_batch_seconds, first_rows = time.time() - t0, batch["rows"]
            loss, per_task = step(batch)  # forward, backward (the tables' update inside it), dense update
            shown.update(batch["rows"])
            loss_sum += torch.cat([loss[None], per_task]) * batch["rows"]
            rows += torch.tensor([batch["rows_read"], batch["rows"]], dtype=rows.dtype)
    return _train_metrics(spec, loss_sum, rows, t0, time.time() - t0, first_batch_seconds, first_rows, epoch,
                          threads) | {f"train/{k}": v for k, v in weights_used.items()}


def epoch_line(metrics: dict, cfg: TrainConfig, progress: dict) -> str:
    """One line per epoch: the per-task train loss and validation AUC, the speed, and early stopping's view."""
    tasks = [k.split("/")[1] for k in metrics if k.startswith("valid/") and k.endswith("/auc") and k.count("/") == 2]
    loss = ", ".join(f"{t} {metrics[f'train/{t}/loss']:.4f}" for t in tasks if f"train/{t}/loss" in metrics)
    auc = ", ".join(f"{t} {metrics[f'valid/{t}/auc']:.4f}" for t in tasks)
    best = "best so far" if progress["best_epoch"] == metrics["epoch"] else f"best epoch {progress['best_epoch'] + 1}"
    return (f"epoch {metrics['epoch'] + 1}/{cfg.epochs}: train loss {loss} | valid AUC {auc} | "
            f"{metrics['train/samples_per_s']:,.0f} samples/s, {metrics['train/seconds']:.0f} s | {best}")


def end_epoch(progress: dict, metrics: dict, cfg: TrainConfig, rank: int) -> bool:
    """Rank 0 records the epoch and decides on early stopping (on validation); every worker learns the
    decision. True when this epoch's model is the best so far."""
    epoch = progress["epoch"]
    if rank == 0:
        score = metrics[f"valid/{cfg.early_stop_metric}"]
        if score > progress["best_score"]:  # NaN never counts as an improvement
            progress |= {"best_score": score, "best_epoch": epoch}
        progress["history"].append(metrics)
        progress["stopped"] = epoch - progress["best_epoch"] >= cfg.patience
        say(epoch_line(metrics, cfg, progress))
    progress["epoch"] = epoch + 1
    progress["stopped"], best_epoch = _broadcast((progress["stopped"], progress["best_epoch"]))
    return best_epoch == epoch


def test_selected(model, best_model: dict, spec: DatasetSpec, cfg: TrainConfig, autocast, progress: dict,
                  plan: dict) -> tuple[dict, dict]:
    """Model selection on validation, then one evaluation on test. The final checkpoint keeps the last epoch's
    weights and optimisers (a rerun with more epochs continues from them), the selected weights sharded as
    "best_model", and in state.pt the selected weights gathered into plain tensors (``plain``: what inference
    and export load, with no process group)."""
    module = model.module  # the model itself, its tables sharded, without the DDP wrapper
    last_model = snapshot(model.state_dict())
    model.load_state_dict(copy.copy(best_model))  # a copy: DistributedModelParallel prefixes the keys in place
    final = {"epoch": progress["epoch"] - 1, "best_epoch": progress["best_epoch"], "resumes": progress["resumes"],
             "final": 1} | plan
    final |= evaluate(module, "valid", spec, cfg, autocast)
    final |= evaluate(module, "test", spec, cfg, autocast)
    plain = gathered_state(module.state_dict())
    model.load_state_dict(last_model)  # (and leaves it prefixed: not used after this)
    return final, plain


def _train_metrics(spec, loss_sum, rows, started, train_seconds, first_batch_seconds, first_rows, epoch,
                   threads_per_step) -> dict[str, float]:
    worker_rows = torch.stack([rows[1], -rows[1]])  # the most and (negated) the fewest rows a worker trained
    if dist.is_initialized():
        dist.all_reduce(loss_sum)
        dist.all_reduce(rows)
        dist.all_reduce(worker_rows, op=dist.ReduceOp.MAX)
    world = dist.get_world_size() if dist.is_initialized() else 1
    rows_read, n_rows = rows.tolist()
    steady_seconds = train_seconds - (first_batch_seconds or 0.0)
    metrics = {"epoch": epoch, "train/rows_read": rows_read, "train/rows_trained": n_rows, "train/seconds": train_seconds,
               "train/samples_per_s": n_rows / max(train_seconds, 1e-9),
               "train/first_batch_seconds": first_batch_seconds or 0.0,
               # wall clock (Unix seconds) of rank 0's first batch: the driver's start-up time ends here
               "train/first_batch_at": started + (first_batch_seconds or 0.0),
               # after the first batch (per worker, as rank 0 saw it): the steady state that the start-up hides
               "train/steady_samples_per_s": (n_rows - first_rows * world) / max(steady_seconds, 1e-9),
               "train/step_threads": threads_per_step,
               "train/worker_rows_max": worker_rows[0].item(), "train/worker_rows_min": -worker_rows[1].item(),
               "train/loss": loss_sum[0].item() / max(n_rows, 1)}
    return metrics | {f"train/{t}/loss": loss_sum[j + 1].item() / max(n_rows, 1) for j, t in enumerate(spec.task_names)}


def started_epoch(shard, spec: DatasetSpec, cfg, progress: dict, device: torch.device) -> Iterator[dict] | None:
    """The next epoch's training batches (None when training is over), the first one already requested in a
    background thread. The Data pipeline's start-up (~3 s on a 2-core machine: Train's split coordinator actor
    and the Data tasks' worker processes start and import Ray Data) then overlaps what the loop does before it
    trains: building the model, or writing the previous epoch's checkpoint."""
    if progress["epoch"] >= cfg.epochs or progress["stopped"]:
        return None
    batches = iter(tensor_batches(
        shard, spec, cfg.batch_size, device, local_shuffle_buffer_size=cfg.shuffle_buffer or None,
        local_shuffle_seed=cfg.seed + progress["epoch"], prefetch_batches=2))
    fetcher = ThreadPoolExecutor(1, thread_name_prefix="first-batch")
    first = fetcher.submit(next, batches, None)
    fetcher.shutdown(wait=False)

    def epoch() -> Iterator[dict]:
        batch = first.result()  # re-raises what the fetch raised
        if batch is not None:
            yield batch
            yield from batches
    return epoch()


def evaluate(module: torch.nn.Module, split: str, spec: DatasetSpec, cfg, autocast) -> dict[str, float]:
    """Every worker predicts its shard of the split (in lockstep: the tables are sharded) and keeps it; the
    metrics over all of the split's rows are collectives (``split_metrics``); rank 0 returns them."""
    shard = ray.train.get_dataset_shard(split)
    gates = GateStats()
    device = ray.train.torch.get_device()
    empty = to_device(Collate(spec, cfg.batch_size * 4).empty(), device)
    batches = lockstep(tensor_batches(shard, spec, cfg.batch_size * 4, device), empty)
    with autocast:
        local = predict_shard(module, batches, len(spec.tasks), gates)
    metrics = split_metrics(local, spec, cfg.objective_weights)  # a collective: no rank gathers the split
    gate_states = gather_to_rank0({"gates": gates.state()}, concat=False)  # a few numbers per worker
    if gate_states is None:
        return {}
    metrics |= summarize(merge_states(gate_states["gates"]), spec.task_names)
    return {f"{split}/{k}": v for k, v in metrics.items()}


def _broadcast(value: Any) -> Any:
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
