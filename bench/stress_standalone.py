"""Stress without Ray: the Train worker's step pattern on 2 gloo processes, for as many steps as time allows.

What a default-job worker did per step before the ninth round, minus Ray: PLE on the synthetic spec, DDP over
gloo with its per-forward buffer sync (under ``Join``: an int64 all-reduce and a broadcast) and Join's two
one-float all-reduces per forward, sparse embedding gradients with SparseAdam and fused Adam,
``freed_memory_kept`` around every epoch, and batches made by a producer thread (numpy -> ``torch.as_tensor``,
like Ray's prefetch thread) while the training thread steps. Epochs differ by one step between the ranks, so
one rank shadows the other under ``Join`` at every epoch end. A crash ends the run with the dead rank's
signal. Flags switch each suspect off, for bisection. It did not crash (docs/NOTES.md, ninth round): what
corrupted the heap needs the Ray worker around it.

    python bench/stress_standalone.py --seconds 600                   # ~22k steps per rank here
    python bench/stress_standalone.py --seconds 600 --no-join --no-keep-freed-memory
Not in CI; docs/NOTES.md (eighth and ninth rounds) has what it showed.
"""
from __future__ import annotations

import argparse
import faulthandler
import os
import queue
import socket
import threading
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.algorithms.join import Join

from common import machine  # noqa: F401  (puts the repo on the path)
from pipeline.config import DatasetSpec, ModelConfig, TrainConfig
from pipeline.models import build_model
from pipeline.synthetic import SPEC_PATH
from pipeline.train import BatchStep, _define_gradient_buckets, build_optimizers, freed_memory_kept
from pipeline.weighting import LossWeighting


def random_batch(spec: DatasetSpec, rows: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    length = max(s.max_len for s in spec.sequences)
    return {"sparse": np.stack([rng.integers(0, spec.tables[f.table_name].num_rows, rows) for f in spec.sparse], 1),
            "seq": np.stack([rng.integers(0, spec.tables[s.table_name].num_rows, (rows, length))
                             for s in spec.sequences], 1),
            "dense": rng.standard_normal((rows, len(spec.dense)), dtype=np.float32),
            "labels": (rng.random((rows, len(spec.label_columns))) < 0.3).astype(np.float32)}


def produced(spec: DatasetSpec, steps: int, rows: int, rng: np.random.Generator, thread: bool):
    """An epoch's batches, made in a producer thread (two ahead) or, without ``thread``, up front."""
    make = lambda: {k: torch.as_tensor(v) for k, v in random_batch(spec, rows, rng).items()}  # noqa: E731
    if not thread:
        return iter([make() for _ in range(steps)])
    q: queue.Queue = queue.Queue(maxsize=2)
    threading.Thread(target=lambda: [q.put(make()) for _ in range(steps)] + [q.put(None)], daemon=True).start()
    return iter(q.get, None)


def worker(rank: int, a: argparse.Namespace) -> None:
    faulthandler.enable(all_threads=True)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{a.port}", rank=rank, world_size=2)
    torch.set_num_threads(1)  # as a default-job worker on 2 cores
    spec, cfg = DatasetSpec.load(SPEC_PATH), TrainConfig(batch_size=a.batch_size)
    torch.manual_seed(0)
    model = build_model(spec, ModelConfig(name="ple"))
    weighting = LossWeighting(spec.task_names, cfg)
    optimizers = build_optimizers(model, cfg, torch.device("cpu"))
    model = torch.nn.parallel.DistributedDataParallel(model, forward_sync_buffers=not a.no_sync_buffers)
    _define_gradient_buckets(model, spec, torch.device("cpu"))
    step = BatchStep(model, weighting, optimizers, nullcontext)
    rng, steps, epochs, t0 = np.random.default_rng(rank), 0, 0, time.time()
    while time.time() - t0 < a.seconds:
        batches = produced(spec, a.epoch_steps + rank, a.batch_size, rng, not a.no_thread)
        with (nullcontext() if a.no_join else Join([model])), \
             (nullcontext() if a.no_keep_freed_memory else freed_memory_kept()):
            for batch in batches:
                for o in optimizers:
                    o.zero_grad(set_to_none=True)
                step(batch)
                for o in optimizers:
                    o.step()
                steps += 1
        epochs += 1
        dist.barrier()
    if rank == 0:
        print(f"{epochs} epochs, {steps} steps per rank in {time.time() - t0:.0f} s, no crash")
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=600)
    p.add_argument("--batch-size", type=int, default=256, help="small: more steps (and collectives) per second")
    p.add_argument("--epoch-steps", type=int, default=200)
    for flag in ("no-join", "no-sync-buffers", "no-keep-freed-memory", "no-thread"):
        p.add_argument(f"--{flag}", action="store_true")
    a = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        a.port = s.getsockname()[1]
    print(machine())
    try:
        torch.multiprocessing.spawn(worker, args=(a,), nprocs=2)
    except torch.multiprocessing.ProcessExitedException as e:  # a rank died: its signal
        raise SystemExit(f"CRASH: rank {e.error_index} exited with {e.exit_code} (signal {e.signal_name})")


if __name__ == "__main__":
    main()
