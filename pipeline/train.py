"""The per-worker training loop, run by Ray Train's TorchTrainer on every worker.

Read it top to bottom: restore from the latest checkpoint if there is one, then for each epoch train on
this worker's shard, evaluate the validation split exactly (metrics as collectives, no gather), checkpoint,
and stop early when validation stops improving. Finally the best epoch's model (chosen on validation)
is evaluated once on the test split and reported with the final checkpoint.
"""
from __future__ import annotations

import copy
import ctypes
import json
import math
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

import torch.distributed.checkpoint as dcp

from pipeline.checkpoint import PREPROCESSOR_FILE, copy_file, load_state, save_state
from pipeline.config import ConfigError, DatasetSpec, JobConfig, TrainConfig, from_dict
from pipeline.data import Collate, tensor_batches, to_device
from pipeline.diagnostics import GateStats, merge_states, summarize
from pipeline.metrics import gather_to_rank0, predict_shard, split_metrics
from pipeline.models import build_model
from pipeline import warm_start
from pipeline.sharding import dense_parameters, gathered_state, lockstep, shard
from pipeline.weighting import LossWeighting


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    job: JobConfig = from_dict(JobConfig, loop_config["job"])
    spec: DatasetSpec = from_dict(DatasetSpec, loop_config["spec"])
    # every split's shard up front: each sets up a split coordinator actor (a new process, ~1-2 s here)
    # in the background while the model is built, rather than before the first batch of its split
    train_shard = ray.train.get_dataset_shard("train")
    for split in ("valid", "test"):
        ray.train.get_dataset_shard(split)
    cfg = job.train
    rank = ray.train.get_context().get_world_rank()
    threads_per_step = loop_config["step_threads"]
    torch.set_num_threads(max(1, loop_config["torch_threads"] // threads_per_step))
    torch.manual_seed(cfg.seed)  # same initial dense weights on every worker; DDP also broadcasts them
    device = ray.train.torch.get_device()
    autocast = mixed_precision(cfg.precision, device)

    progress = {"epoch": 0, "best_score": -math.inf, "best_epoch": -1, "stopped": False, "history": [], "resumes": 0}
    checkpoint = ray.train.get_checkpoint()
    state = None
    if checkpoint is not None:  # a restarted worker group or a rerun with the same run name
        with checkpoint.as_directory() as d:
            state = load_state(d)
        progress = state["progress"] | {"resumes": state["progress"].get("resumes", 0) + 1}
    epoch_batches = _started_epoch(train_shard, spec, cfg, progress, device)  # its start-up overlaps the set-up below

    # the tables are sharded across the workers (built on "meta": each worker materialises only its shards)
    model, plan = shard(build_model(spec, job.model, table_device="meta"), job.model.sharding, cfg.table_optimizer,
                        cfg.table_lr, device, cfg.batch_size)
    module = model.module  # the model itself, its tables sharded, without the DDP wrapper
    if rank == 0:
        print("embedding tables: " + "; ".join(f"{t} {p}" for t, p in plan.items()))
    plan = {f"plan/{t}": p for t, p in plan.items()}  # recorded with every report
    if cfg.compile:  # dynamic: evaluation's larger batches reuse the compiled graph
        module.task_logits = torch.compile(module.task_logits, dynamic=True)
    weighting = LossWeighting(spec.task_names, cfg).to(device)
    optimizer = torch.optim.Adam(dense_parameters(model) + ([weighting.log_var] if cfg.loss_weighting == "uncertainty" else []),
                                 lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    if state is None and loop_config.get("init_from"):  # a warm start: the previous run's weights
        warm_start.load_into(module, loop_config["init_from"])
    best_model = snapshot(model.state_dict())
    if state is not None:
        with checkpoint.as_directory() as d:
            best_model = load_sharded(d, model, best_model)
        weighting.load_state_dict(state["weighting"])
        optimizer.load_state_dict(state["optimizer"])
        print(f"resumed from the checkpoint of epoch {progress['epoch'] - 1} (resume {progress['resumes']})")
    step = BatchStep(model, weighting, optimizer, lambda: mixed_precision(cfg.precision, device), threads_per_step,
                     empty=to_device(Collate(spec, cfg.batch_size).empty(), device))

    while progress["epoch"] < cfg.epochs and not progress["stopped"]:
        epoch = progress["epoch"]
        weighting.set_epoch(epoch)
        weights_used = weighting.log()  # the epoch's weights (learned ones as they were at its start)
        loss_sum = torch.zeros(len(spec.tasks) + 1, device=device)  # summed per row, synced once per epoch
        rows = torch.zeros(2, device=device)  # read, trained
        t0 = time.time()  # the loop asks for the epoch's first batch
        first_batch_seconds, first_rows = None, 0
        with freed_memory_kept() if cfg.keep_freed_memory else nullcontext():
            for batch in lockstep(epoch_batches, step.empty):  # shards can differ by a batch or two
                if first_batch_seconds is None:  # what is left of the data pipeline's start-up
                    first_batch_seconds, first_rows = time.time() - t0, batch["rows"]
                loss, per_task = step(batch)  # forward, backward (the tables' update inside it), dense update
                n = batch["rows"]
                loss_sum += torch.cat([loss[None], per_task]) * n
                rows += torch.tensor([batch["rows_read"], n], dtype=rows.dtype)
        train_seconds = time.time() - t0
        metrics = _train_metrics(spec, loss_sum, rows, t0, train_seconds, first_batch_seconds, first_rows, epoch,
                                 threads_per_step) | {f"train/{k}": v for k, v in weights_used.items()}
        metrics |= _evaluate(module, "valid", spec, cfg, autocast)  # rank 0 only; others get {}

        if rank == 0:
            score = metrics[f"valid/{cfg.early_stop_metric}"]
            if score > progress["best_score"]:  # NaN never counts as an improvement
                progress |= {"best_score": score, "best_epoch": epoch}
            progress["history"].append(metrics)
            progress["stopped"] = epoch - progress["best_epoch"] >= cfg.patience
        progress["epoch"] = epoch + 1
        progress["stopped"], best_epoch = _broadcast((progress["stopped"], progress["best_epoch"]))
        if best_epoch == epoch:  # every worker keeps its shards of the best epoch's model
            best_model = snapshot(model.state_dict())
        epoch_batches = _started_epoch(train_shard, spec, cfg, progress, device)  # while the checkpoint is written
        _report(metrics | {"best_epoch": progress["best_epoch"], "resumes": progress["resumes"]} | plan, rank,
                model, best_model, {"optimizer": optimizer.state_dict(), "weighting": weighting.state_dict(),
                                    "progress": progress}, loop_config)

    # model selection on validation, then one evaluation on test. The final checkpoint keeps the last
    # epoch's weights and optimisers (a rerun with more epochs continues from them), the selected weights
    # sharded as "best_model", and in state.pt the selected weights gathered into plain tensors
    # ("best_model": what inference and export load, with no process group).
    last_model = snapshot(model.state_dict())
    model.load_state_dict(copy.copy(best_model))  # a copy: DistributedModelParallel prefixes the keys in place
    final = {"epoch": progress["epoch"] - 1, "best_epoch": progress["best_epoch"], "resumes": progress["resumes"],
             "final": 1} | plan
    final |= _evaluate(module, "valid", spec, cfg, autocast)
    final |= _evaluate(module, "test", spec, cfg, autocast)
    plain = gathered_state(module.state_dict())
    model.load_state_dict(last_model)  # (and leaves it prefixed: not used after this)
    step.close()
    _report(final, rank, model, best_model, {"optimizer": optimizer.state_dict(), "weighting": weighting.state_dict(),
                                             "progress": progress, "best_model": plain}, loop_config, final=True)


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


def step_threads(cfg: TrainConfig, torch_threads: int, use_gpu: bool, num_workers: int) -> int:
    """The threads that share each training step (``train.step_threads``, 0: auto; see ``BatchStep``)."""
    unsupported = [what for what, applies in (("several workers", num_workers > 1), ("GPUs", use_gpu),
                                              ("gradnorm weighting", cfg.loss_weighting == "gradnorm"),
                                              ("compile", cfg.compile)) if applies]
    if cfg.step_threads == 0:
        return 1 if unsupported else min(2, torch_threads)
    if cfg.step_threads > 1 and unsupported:
        raise ConfigError(f"train.step_threads: {cfg.step_threads} splits the steps of a lone CPU worker; this run has "
                          f"{' and '.join(unsupported)} (use 0, auto, or 1)")
    return cfg.step_threads


class BatchStep:
    """One training step on a batch: forward, backward (which also updates the embedding tables: their
    optimizer is fused into it), then the dense optimizer's step. Returns the batch's loss and per-task
    losses (detached), over its real rows: a batch's padding rows (``Collate``) are left out of the losses.

    With one thread: the model on the whole batch, its ops parallel inside (OpenMP). With k threads (a lone
    CPU worker): the embedding front once, on the whole batch; then everything after it on the batch's rows
    in k ranges, each range's forward and backward in its own thread, their gradients summed in a fixed order
    (so a run is as reproducible as with one thread), and the front's backward once with the ranges'
    gradients of its output. Each range's task losses are weighted by its share of the rows they average over
    (``task_loss_rows``), so the sum is the whole batch's loss and gradient. A PLE step is hundreds of small
    ops, each ending in an OpenMP barrier where a thread that another process preempted stalls its partner;
    split, the threads meet once per step (docs/NOTES.md)."""

    def __init__(self, model: torch.nn.Module, weighting: LossWeighting, optimizer: torch.optim.Optimizer,
                 autocast: Callable[[], Any], threads: int = 1, empty: dict | None = None) -> None:
        self.model, self.weighting, self.optimizer, self.autocast, self.threads = model, weighting, optimizer, autocast, threads
        self.module = getattr(model, "module", model)  # DistributedModelParallel: the model itself
        self.params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        self.pool = ThreadPoolExecutor(threads - 1, thread_name_prefix="step") if threads > 1 else None
        self.empty = empty  # a batch of empty rows: what a worker steps on once its shard has run out

    def __call__(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        loss, per_task = self._forward_backward(batch)
        self.weighting.sync_grads()
        self.optimizer.step()
        return loss, per_task

    def _forward_backward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        n, labels = batch["rows"], batch["labels"][:batch["rows"]]
        if self.pool is None or n < 2:
            with self.autocast():
                out = self.model(batch)
                real = {k: v[:n] for k, v in out.items()}
                per_task = self.module.task_losses(real, labels) if n else out["logits"].new_zeros(len(self.module.parents))
            if n:
                self.weighting.gradnorm_step(per_task, self.module.shared_parameter(real))
                loss = self.weighting(per_task) + self.module.regularizer(real, labels)
            else:  # an empty batch: no loss, but every parameter still takes part (DDP all-reduces zeros)
                loss = out["logits"].sum() * 0.0
            loss.backward()
            return loss.detach(), per_task.detach()
        with self.autocast():
            x = self.module.front(batch["ids"], batch.get("dense"))
        features = x.detach().requires_grad_()
        k = min(self.threads, n)
        bounds = [n * i // k for i in range(k + 1)]
        rows = self.module.task_loss_rows(labels).clamp(min=1)
        ranges = [self.pool.submit(self._part, features, labels, lo, hi, n, rows) for lo, hi in zip(bounds[1:-1], bounds[2:])]
        try:
            parts = [self._part(features, labels, bounds[0], bounds[1], n, rows)] + [r.result() for r in ranges]
        finally:
            wait(ranges)  # no range still writing when a failure leaves the step
        for i, p in enumerate(self.params):
            grads = [part[2][i] for part in parts if part[2][i] is not None]
            grad = sum(grads[1:], grads[0]) if grads else None
            if grad is not None and grad.stride() != p.stride():
                # backward lays a gradient out as its parameter (fused Adam reads both as flat memory);
                # autograd.grad does not: a weight used transposed gets a transposed gradient
                grad = torch.empty_like(p).copy_(grad)
            p.grad = grad
        grad_x = torch.cat([part[3] for part in parts] + [x.new_zeros(x.shape[0] - n, x.shape[1])])
        x.backward(grad_x)  # the front's backward, once, on the whole batch: the tables' fused update
        return sum(part[0] for part in parts), sum(part[1] for part in parts)

    def _part(self, features: torch.Tensor, labels: torch.Tensor, lo: int, hi: int, n: int, rows: torch.Tensor) -> tuple:
        x = features[lo:hi].detach().requires_grad_()
        with self.autocast():  # autocast's state is per thread
            out = self.module.heads_from(x)
            per_task = self.module.task_losses(out, labels[lo:hi]) * (self.module.task_loss_rows(labels[lo:hi]) / rows)
        share = (hi - lo) / n
        loss = self.weighting(per_task, share) + share * self.module.regularizer(out, labels[lo:hi])
        *grads, grad_x = torch.autograd.grad(loss, self.params + [x], allow_unused=True)
        return loss.detach(), per_task.detach(), grads, grad_x

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
GLIBC_DEFAULT_THRESHOLD = 128 << 10


@contextmanager
def freed_memory_kept() -> Iterator[None]:
    """Within it, glibc's malloc keeps the memory a training step frees for the next step. By default it
    hands the step's activation buffers back to the kernel (munmap, heap trimming) and the next step
    page-faults them in again, zero-filled: in a Train worker (a fresh process) 2.6M page faults and ~12 % of
    a PLE worker's CPU per 1M rows here. Fixed thresholds stop both. On leaving, the thresholds go back to
    glibc's initial values and the heaps are trimmed, so that what evaluation allocates (its size grows with
    the split) is handed back when freed and the heaps do not keep it (docs/NOTES.md). A no-op where the C
    library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        yield
        return
    libc.mallopt(M_TRIM_THRESHOLD, 64 << 20)  # free space at the top of a heap is kept up to 64 MiB
    libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)  # blocks up to 32 MiB (glibc's maximum) come from the heap
    try:
        yield
    finally:
        libc.mallopt(M_TRIM_THRESHOLD, GLIBC_DEFAULT_THRESHOLD)
        libc.mallopt(M_MMAP_THRESHOLD, GLIBC_DEFAULT_THRESHOLD)
        libc.malloc_trim(0)


def _started_epoch(shard, spec: DatasetSpec, cfg, progress: dict, device: torch.device) -> Iterator[dict] | None:
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


def uses_bf16(precision: str, device: torch.device) -> bool:
    """"auto": bf16 on GPUs that support it and on CPUs with native bf16 matmuls (AVX512-BF16 or AMX), where
    the experts' matmuls run ~4x faster (without them bf16 is emulated and slower)."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def mixed_precision(precision: str, device: torch.device):
    """bf16 autocast for the forward pass and the losses where ``uses_bf16``, else a no-op. Parameters,
    gradients and the heads' logits stay fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(precision, device))


def _evaluate(module: torch.nn.Module, split: str, spec: DatasetSpec, cfg, autocast) -> dict[str, float]:
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


def snapshot(state: dict[str, Any]) -> dict[str, Any]:
    """A copy of a (sharded) state dict: this worker's shards and the dense tensors, cloned."""
    return copy.deepcopy(state)


SHARDED_DIR = "sharded"  # a checkpoint's torch.distributed.checkpoint files: every worker writes its shards


def sharded_state(model, best_model: dict[str, Any]) -> dict[str, Any]:
    """What every worker writes to, and reads from, a checkpoint's DCP files: its shards of the model, of the
    best model and of the tables' fused optimizer state. A worker that holds no table's optimizer state (all
    its tables replicated, or placed on other workers) leaves that entry out: DCP would save an empty
    container as an object under a key that no other worker has, and find it missing on load."""
    state = {"model": model.state_dict(), "best_model": best_model}
    tables = model.fused_optimizer.state_dict()
    return state | ({"tables": tables} if tables.get("state") else {})


def save_sharded(directory: str, model, best_model: dict[str, Any]) -> None:
    dcp.save(sharded_state(model, best_model), checkpoint_id=str(Path(directory) / SHARDED_DIR))


def load_sharded(directory: str, model, best_template: dict[str, Any]) -> dict[str, Any]:
    """Restore the model, the tables' fused optimizer state and the best model from a checkpoint's DCP files,
    resharded to this run's plan where it differs (DCP reads each shard's rows from whichever files hold
    them). Returns the best model (sharded)."""
    model.fused_optimizer.init_state()  # dcp.load fills existing state in place: without it the state is lost
    state = sharded_state(model, best_template)
    dcp.load(state, checkpoint_id=str(Path(directory) / SHARDED_DIR))
    model.load_state_dict(state["model"])
    if "tables" in state:
        model.fused_optimizer.load_state_dict(state["tables"])
    return state["best_model"]


def _report(metrics: dict, rank: int, model, best_model: dict, state: dict, loop_config: dict, final: bool = False) -> None:
    """Every worker reports its part of the checkpoint: its shards of the model, of the tables' optimizer
    state and of the best model (torch.distributed.checkpoint, into one directory that Ray Train assembles
    from every worker's). Rank 0 adds ``state.pt`` (dense optimizer, loss weighting, progress, preprocessing
    state, config and code version; in the final one the best model gathered into plain tensors) and a
    human-readable metrics.json."""
    with tempfile.TemporaryDirectory() as d:
        save_sharded(d, model, best_model)
        if rank == 0:
            save_state(d, {**state, "job": loop_config["job"], "spec": loop_config["spec"],
                           "code_version": loop_config["code_version"]})
            copy_file(loop_config["preprocessor"], Path(d) / PREPROCESSOR_FILE)
            summary = {"final": final, "metrics": metrics, "history": state["progress"]["history"]}
            (Path(d) / "metrics.json").write_text(json.dumps(summary, indent=2, default=float))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def _broadcast(value: Any) -> Any:
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
