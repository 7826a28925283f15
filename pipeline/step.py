"""The training step and its machinery, behind one call: ``BatchStep(batch)`` runs forward, backward (the
embedding tables' fused update inside it) and the dense optimizer's step. Around it: how many threads share a
step (``step_threads``), bf16 autocast where the hardware has native bf16 (``mixed_precision``), and glibc's
malloc told to keep what a step frees (``freed_memory_kept``). The worker loop (``pipeline.train``) and the
benches use this same step."""
from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import Any

import torch

from pipeline.config import ConfigError, TrainConfig
from pipeline.weighting import LossWeighting


def step_threads(cfg: TrainConfig, torch_threads: int, use_gpu: bool, num_workers: int, model_splits: bool = True) -> int:
    """The threads that share each training step (``train.step_threads``, 0: auto; see ``BatchStep``).
    ``model_splits``: the model's step can be split after the front (``MultiTaskModel.splits_rows``)."""
    unsupported = [what for what, applies in (("several workers", num_workers > 1), ("GPUs", use_gpu),
                                              ("gradnorm weighting", cfg.loss_weighting == "gradnorm"),
                                              ("compile", cfg.compile),
                                              ("a model whose step does not split (dupn, mose, metaheac)",
                                               not model_splits)) if applies]
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
        if self.pool is None or n < 2 or not self.module.splits_rows:
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
def freed_memory_kept(enabled: bool = True) -> Iterator[None]:
    """Within it, glibc's malloc keeps the memory a training step frees for the next step. By default it
    hands the step's activation buffers back to the kernel (munmap, heap trimming) and the next step
    page-faults them in again, zero-filled: in a Train worker (a fresh process) 2.6M page faults and ~12 % of
    a PLE worker's CPU per 1M rows here. Fixed thresholds stop both. On leaving, the thresholds go back to
    glibc's initial values and the heaps are trimmed, so that what evaluation allocates (its size grows with
    the split) is handed back when freed and the heaps do not keep it (docs/NOTES.md). A no-op where the C
    library is not glibc, or with ``enabled=False`` (``train.keep_freed_memory: false``)."""
    try:
        libc = ctypes.CDLL("libc.so.6") if enabled else None
    except OSError:
        libc = None
    if libc is None:
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
