"""The per-worker training loop, run by Ray Train's TorchTrainer on every worker.

Read it top to bottom: restore from the latest checkpoint if there is one, then for each epoch train on
this worker's shard, evaluate the validation split exactly (predictions gathered on rank 0), checkpoint,
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
from torch.distributed.algorithms.join import Join

from pipeline.checkpoint import load_state, save_state
from pipeline.config import ConfigError, DatasetSpec, JobConfig, TrainConfig, from_dict
from pipeline.data import tensor_batches, without_bad_rows, zeros_batch
from pipeline.diagnostics import GateStats, merge_states, summarize
from pipeline.metrics import gather_to_rank0, predict_shard, split_metrics
from pipeline.models import build_model
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
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    threads_per_step = loop_config["step_threads"]
    torch.set_num_threads(max(1, loop_config["torch_threads"] // threads_per_step))
    torch.manual_seed(cfg.seed)  # same initial weights on every worker; DDP also broadcasts them
    device = ray.train.torch.get_device()
    autocast = mixed_precision(cfg.precision, device)

    progress = {"epoch": 0, "best_score": -math.inf, "best_epoch": -1, "stopped": False, "history": [], "resumes": 0}
    state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # a restarted worker group or a rerun with the same run name
        with checkpoint.as_directory() as d:
            state = load_state(d)
        progress = state["progress"] | {"resumes": state["progress"].get("resumes", 0) + 1}
    epoch_batches = _started_epoch(train_shard, cfg, progress, device)  # its start-up overlaps the set-up below

    model = build_model(spec, job.model)
    if cfg.compile:  # dynamic: the last, smaller batch and evaluation's batches reuse the compiled graph
        model.task_logits = torch.compile(model.task_logits, dynamic=True)
    weighting = LossWeighting(spec.task_names, cfg)
    optimizers = build_optimizers(model, cfg, device, [weighting.log_var] if cfg.loss_weighting == "uncertainty" else [])
    best_model = None
    if state is not None:
        model.load_state_dict(state["model"])
        weighting.load_state_dict(state["weighting"])
        for optimizer, saved in zip(optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(saved)
        best_model = state["best_model"]
        print(f"resumed from the checkpoint of epoch {progress['epoch'] - 1} (resume {progress['resumes']})")
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs=DDP_OPTIONS)  # DDP on >1 worker
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    module = model.module if ddp else model
    if ddp:
        _define_gradient_buckets(model, spec, device)
    best_model = best_model or copy.deepcopy(module.state_dict())
    weighting.to(device)
    step = BatchStep(model, weighting, optimizers, lambda: mixed_precision(cfg.precision, device), threads_per_step)

    while progress["epoch"] < cfg.epochs and not progress["stopped"]:
        epoch = progress["epoch"]
        weighting.set_epoch(epoch)
        weights_used = weighting.log()  # the epoch's weights (learned ones as they were at its start)
        loss_sum = torch.zeros(len(spec.tasks) + 1, device=device)  # summed per row, synced once per epoch
        rows = torch.zeros(2, device=device)  # read, trained
        t0 = time.time()  # the loop asks for the epoch's first batch
        # shards can differ by a batch or two (no rows are dropped to equalise them); Join lets a worker
        # that runs out early shadow the others' all-reduces instead of hanging them
        first_batch_seconds, first_rows = None, 0
        with (Join([model]) if ddp else nullcontext(),
              freed_memory_kept() if cfg.keep_freed_memory else nullcontext()):
            for batch in epoch_batches:
                if first_batch_seconds is None:  # what is left of the data pipeline's start-up
                    first_batch_seconds, first_rows = time.time() - t0, batch["labels"].shape[0]
                rows[0] += batch["labels"].shape[0]
                if "keep" in batch:  # on_bad_rows: drop
                    batch = without_bad_rows(batch)
                    if batch["labels"].shape[0] == 0:
                        continue
                for optimizer in optimizers:
                    optimizer.zero_grad(set_to_none=True)
                loss, per_task = step(batch)  # forward and backward
                weighting.sync_grads()
                for optimizer in optimizers:
                    optimizer.step()
                n = batch["labels"].shape[0]
                loss_sum += torch.cat([loss[None], per_task]) * n
                rows[1] += n
        train_seconds = time.time() - t0
        worker_rows = torch.stack([rows[1], -rows[1]])  # the most and (negated) the fewest rows a worker trained
        if dist.is_initialized():
            dist.all_reduce(loss_sum)
            dist.all_reduce(rows)
            dist.all_reduce(worker_rows, op=dist.ReduceOp.MAX)
        rows_read, n_rows = rows.tolist()
        steady_seconds = train_seconds - (first_batch_seconds or 0.0)
        metrics = {"epoch": epoch, "train/rows_read": rows_read, "train/rows_trained": n_rows, "train/seconds": train_seconds,
                   "train/samples_per_s": n_rows / max(train_seconds, 1e-9),
                   "train/first_batch_seconds": first_batch_seconds or 0.0,
                   # after the first batch (per worker, as rank 0 saw it): the steady state that the start-up hides
                   "train/steady_samples_per_s": (n_rows - first_rows * ctx.get_world_size()) / max(steady_seconds, 1e-9),
                   "train/step_threads": threads_per_step,
                   "train/worker_rows_max": worker_rows[0].item(), "train/worker_rows_min": -worker_rows[1].item(),
                   "train/loss": loss_sum[0].item() / max(n_rows, 1)}
        metrics |= {f"train/{t}/loss": loss_sum[j + 1].item() / max(n_rows, 1) for j, t in enumerate(spec.task_names)}
        metrics |= {f"train/{k}": v for k, v in weights_used.items()}
        metrics |= _evaluate(module, "valid", spec, cfg, autocast)  # rank 0 only; others get {}

        if rank == 0:
            score = metrics[f"valid/{cfg.early_stop_metric}"]
            if score > progress["best_score"]:  # NaN never counts as an improvement
                progress |= {"best_score": score, "best_epoch": epoch}
                best_model = copy.deepcopy(module.state_dict())
            progress["history"].append(metrics)
            progress["stopped"] = epoch - progress["best_epoch"] >= cfg.patience
        progress["epoch"] = epoch + 1
        progress["stopped"] = _broadcast(progress["stopped"])
        epoch_batches = _started_epoch(train_shard, cfg, progress, device)  # while the checkpoint is written
        _report(metrics | {"best_epoch": progress["best_epoch"], "resumes": progress["resumes"]}, rank,
                {"model": module.state_dict(), "optimizers": [o.state_dict() for o in optimizers], "best_model": best_model,
                 "weighting": weighting.state_dict(), "progress": progress}, loop_config)

    # model selection on validation, then one evaluation on test. The final checkpoint keeps the last
    # epoch's weights and optimisers in "model"/"optimizers" (a rerun with more epochs continues from
    # them) and the selected weights in "best_model" (what inference loads).
    last_model = copy.deepcopy(module.state_dict())
    best_model = _broadcast(best_model)
    module.load_state_dict(best_model)
    final = {"epoch": progress["epoch"] - 1, "best_epoch": progress["best_epoch"], "resumes": progress["resumes"], "final": 1}
    final |= _evaluate(module, "valid", spec, cfg, autocast)
    final |= _evaluate(module, "test", spec, cfg, autocast)
    step.close()
    _report(final, rank, {"model": last_model, "optimizers": [o.state_dict() for o in optimizers], "best_model": best_model,
                          "weighting": weighting.state_dict(), "progress": progress}, loop_config, final=True)


# DDP (gloo on CPU, nccl on GPU) without its per-forward buffer sync. The models' buffers are constant index
# tensors built from the spec, the same on every worker (tests/test_models.py), so there is nothing to sync;
# under ``Join`` that sync is an all-reduce (which rank's buffers win) and a broadcast before every forward.
# (Turning it off did not end issue 15's heap corruption in gloo's threads: docs/NOTES.md, "Ninth round".)
DDP_OPTIONS = {"forward_sync_buffers": False}


def build_optimizers(model: torch.nn.Module, cfg, device: torch.device, extra_params: list | tuple = ()
                     ) -> list[torch.optim.Optimizer]:
    """Fused Adam (one kernel over all parameters; 13x the per-tensor loop on CPU here) for the dense
    parameters. On CPU the large embedding tables get sparse gradients and lazy Adam (``SparseAdam``: only
    the rows a batch looked up, and their moments, move), as recsys trainers do for id tables: dense Adam
    zero-fills and sweeps every row of every table each step, a quarter of a PLE step with 16-dim tables here
    (docs/NOTES.md). On GPU the tables stay dense: DDP cannot all-reduce sparse gradients over NCCL, and the
    sweep is cheap there. ``weight_decay`` applies to the dense parameters only."""
    tables = model.front.use_sparse_grads(cfg.batch_size) if device.type == "cpu" else []
    dense = [p for p in model.parameters() if all(p is not t for t in tables)] + list(extra_params)
    optimizers = [torch.optim.Adam(dense, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)]
    if tables:
        optimizers.append(torch.optim.SparseAdam(tables, lr=cfg.lr))
    return optimizers


def step_threads(cfg: TrainConfig, torch_threads: int, use_gpu: bool, num_workers: int) -> int:
    """The threads that share each training step (``train.step_threads``, 0: auto; see ``BatchStep``)."""
    unsupported = [what for what, applies in (("several workers (DDP)", num_workers > 1), ("GPUs", use_gpu),
                                              ("gradnorm weighting", cfg.loss_weighting == "gradnorm"),
                                              ("compile", cfg.compile)) if applies]
    if cfg.step_threads == 0:
        return 1 if unsupported else min(2, torch_threads)
    if cfg.step_threads > 1 and unsupported:
        raise ConfigError(f"train.step_threads: {cfg.step_threads} splits the steps of a lone CPU worker; this run has "
                          f"{' and '.join(unsupported)} (use 0, auto, or 1)")
    return cfg.step_threads


class BatchStep:
    """Forward and backward of one training batch; leaves the gradients in the parameters' ``.grad`` and returns
    the batch's loss and per-task losses (detached).

    With one thread: the model on the whole batch, its ops parallel inside (OpenMP). With k threads: the batch's
    rows in k ranges, each range's forward and backward in its own thread, and the k gradients summed in a fixed
    order (so a run is as reproducible as with one thread). Each range's task losses are weighted by its share
    of the rows they average over (``task_loss_rows``), so the sum is the whole batch's loss and gradient. A
    PLE step is hundreds of small ops, each ending in an OpenMP barrier where a thread that another process
    preempted stalls its partner; split, the threads meet once per step (docs/NOTES.md)."""

    def __init__(self, model: torch.nn.Module, weighting: LossWeighting, optimizers: list[torch.optim.Optimizer],
                 autocast: Callable[[], Any], threads: int = 1) -> None:
        self.model, self.weighting, self.autocast, self.threads = model, weighting, autocast, threads
        self.module = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
        self.params = [p for o in optimizers for g in o.param_groups for p in g["params"] if p.requires_grad]
        self.pool = ThreadPoolExecutor(threads - 1, thread_name_prefix="step") if threads > 1 else None

    def __call__(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pool is None:
            with self.autocast():
                out = self.model(batch)
                per_task = self.module.task_losses(out, batch["labels"])
            self.weighting.gradnorm_step(per_task, self.module.shared_parameter())
            loss = self.weighting(per_task) + self.module.regularizer(out, batch["labels"])
            loss.backward()
            return loss.detach(), per_task.detach()
        n = batch["labels"].shape[0]
        k = min(self.threads, n)
        bounds = [n * i // k for i in range(k + 1)]
        rows = self.module.task_loss_rows(batch["labels"]).clamp(min=1)
        ranges = [self.pool.submit(self._part, batch, lo, hi, n, rows) for lo, hi in zip(bounds[1:-1], bounds[2:])]
        try:
            parts = [self._part(batch, bounds[0], bounds[1], n, rows)] + [r.result() for r in ranges]
        finally:
            wait(ranges)  # no range still writing when a failure leaves the step
        for i, p in enumerate(self.params):
            grads = [part[2][i] for part in parts if part[2][i] is not None]
            grad = sum(grads[1:], grads[0]) if grads else None
            if grad is not None and not grad.is_sparse and grad.stride() != p.stride():
                # backward lays a gradient out as its parameter (fused Adam reads both as flat memory);
                # autograd.grad does not: a weight used transposed gets a transposed gradient
                grad = torch.empty_like(p).copy_(grad)
            p.grad = grad
        return sum(part[0] for part in parts), sum(part[1] for part in parts)

    def _part(self, batch: dict[str, torch.Tensor], lo: int, hi: int, n: int, rows: torch.Tensor) -> tuple:
        part = {key: v[lo:hi] for key, v in batch.items()}
        with self.autocast():  # autocast's state is per thread
            out = self.module(part)
            per_task = self.module.task_losses(out, part["labels"]) * (self.module.task_loss_rows(part["labels"]) / rows)
        share = (hi - lo) / n
        loss = self.weighting(per_task, share) + share * self.module.regularizer(out, part["labels"])
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        return loss.detach(), per_task.detach(), grads

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


def _define_gradient_buckets(model: torch.nn.parallel.DistributedDataParallel, spec: DatasetSpec, device: torch.device
                             ) -> None:
    """Two zero-weighted backwards on every worker before training. A worker whose shard has no rows in an
    epoch (a log of fewer files than workers; a shard of dropped rows only) trains no step in it, and on
    leaving ``Join`` its hook shadows the other workers' all-reduces with zeros shaped like its gradient
    buckets. DDP rebuilds its buckets once, at the second forward, and the bucket of a sparse table has no
    gradient until a backward after that, so the hook failed there ("Expected a proper Tensor but got
    None"). All gradients stay zero, and no optimiser steps on them."""
    batch = {k: torch.from_numpy(v).to(device) for k, v in zeros_batch(spec, rows=2).items()}
    for _ in range(2):
        (model(batch)["logits"].sum() * 0).backward()
    model.zero_grad(set_to_none=True)


def _started_epoch(shard, cfg, progress: dict, device: torch.device) -> Iterator[dict[str, torch.Tensor]] | None:
    """The next epoch's training batches (None when training is over), the first one already requested in a
    background thread. The Data pipeline's start-up (~3 s on a 2-core machine: Train's split coordinator actor
    and the Data tasks' worker processes start and import Ray Data) then overlaps what the loop does before it
    trains: building the model, or writing the previous epoch's checkpoint."""
    if progress["epoch"] >= cfg.epochs or progress["stopped"]:
        return None
    batches = iter(tensor_batches(
        shard, cfg.batch_size, device, local_shuffle_buffer_size=cfg.shuffle_buffer or None,
        local_shuffle_seed=cfg.seed + progress["epoch"], prefetch_batches=2))
    fetcher = ThreadPoolExecutor(1, thread_name_prefix="first-batch")
    first = fetcher.submit(next, batches, None)
    fetcher.shutdown(wait=False)

    def epoch() -> Iterator[dict[str, torch.Tensor]]:
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
    shard = ray.train.get_dataset_shard(split)
    gates = GateStats()
    device = ray.train.torch.get_device()
    batches = tensor_batches(shard, cfg.batch_size * 4, device)
    with autocast:
        local = predict_shard(module, batches, len(spec.tasks), gates)
    gathered = gather_to_rank0(local)
    gate_states = gather_to_rank0({"gates": gates.state()}, concat=False)
    if gathered is None:
        return {}
    metrics = split_metrics(gathered, spec, cfg.objective_weights) | summarize(merge_states(gate_states["gates"]), spec.task_names)
    return {f"{split}/{k}": v for k, v in metrics.items()}


def _report(metrics: dict, rank: int, state: dict, loop_config: dict, final: bool = False) -> None:
    """Every worker reports; rank 0 attaches the checkpoint (model, optimiser, best model, progress,
    preprocessing state, config and code version) and a human-readable metrics.json."""
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as d:
        save_state(d, {**state, "preprocessor": loop_config["preprocessor"], "job": loop_config["job"],
                       "spec": loop_config["spec"], "code_version": loop_config["code_version"]})
        summary = {"final": final, "metrics": metrics, "history": state["progress"]["history"]}
        (Path(d) / "metrics.json").write_text(json.dumps(summary, indent=2, default=float))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def _broadcast(value: Any) -> Any:
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]

