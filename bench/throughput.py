"""Training throughput of the full pipeline against this machine's limit, and 1 vs 2 Ray Train workers.

Pipeline: the default PLE job (Ray Data streaming the Parquet log -> preprocessing -> Ray Train), one epoch,
samples/s of its training loop (``train/samples_per_s``: from the loop asking for its first batch to the
last step, so what the model's set-up did not hide of the Data start-up counts). Limit: the same model,
batch size, loss, optimisers (fused Adam; the tables' optimizer fused into the backward) and step (``BatchStep``, split across as many threads as
the pipeline's lone worker splits it) in a tight single-process loop over as many rows, already in memory as
tensors, with all the cores and no Ray running. For reference the bench also measures both with each step in
one thread (``train.step_threads: 1``, intra-op parallelism only).

The step time here drifts by +-10-15 % over tens of seconds (other tenants of the host), so a ratio of two
numbers taken minutes apart says more about the drift than about the pipeline. Every run is therefore
paired: the limit is measured right before and right after it, and the run's ratio is to the mean of the
two. The table shows the median over the repeats and the range. Each run starts a fresh Ray instance, as a
submitted job gets fresh worker processes.

    python bench/throughput.py                 # -> bench/results/throughput.md
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from functools import partial
from statistics import median

import torch
from common import limit_in_a_train_worker, preprocessed_rows, tight_loop, without_ray, write_result

from pipeline.config import DataPaths, DatasetSpec, JobConfig, ModelConfig, TrainConfig
from pipeline.job import connect_ray, default_synthetic_data, fit_or_load_preprocessor, run
from pipeline.synthetic import SPEC_PATH
from pipeline.step import step_threads, uses_bf16


def pipeline_samples_per_s(data: str, model: ModelConfig, workers: int, out: str, name: str,
                           precision: str = TrainConfig.precision, step_threads: int = TrainConfig.step_threads,
                           spec_path: str = str(SPEC_PATH)) -> dict[str, float]:
    """The job's first epoch on ``data`` (the default log unless told): samples/s over the whole epoch, after
    its first batch, and the time to the first batch (the data pipeline's start-up)."""
    job = JobConfig(data=DataPaths(data, spec_path), model=model,
                    train=TrainConfig(epochs=1, num_workers=workers, precision=precision, step_threads=step_threads),
                    name=name, output=f"{out}/{name}", storage_path=f"{out}/ray_results")
    epoch = run(job)["history"][0]
    return {"epoch": epoch["train/samples_per_s"], "steady": epoch["train/steady_samples_per_s"],
            "first_batch_s": epoch["train/first_batch_seconds"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ple")
    p.add_argument("--train-rows", type=int, default=1_000_000)
    p.add_argument("--limit-rows", type=int, default=None,
                   help="rows of the in-memory tight loop (default: the train rows, as many steps as the pipeline's epoch)")
    p.add_argument("--repeats", type=int, default=3, help="paired runs of each kind; the table shows their median")
    p.add_argument("--out", default="outputs/bench/throughput")
    a = p.parse_args()
    connect_ray()
    shutil.rmtree(a.out, ignore_errors=True)  # fresh runs, not resumed ones
    data = str(default_synthetic_data({"train": a.train_rows, "valid": 100_000, "test": 100_000}))
    spec = DatasetSpec.load(SPEC_PATH)
    default, model = TrainConfig(), ModelConfig(name=a.model)
    probe = JobConfig(data=DataPaths(data, str(SPEC_PATH)), storage_path=f"{a.out}/ray_results")
    pre = fit_or_load_preprocessor(probe, spec, f"{a.out}/ray_results")
    a.limit_rows = a.limit_rows or a.train_rows  # as many steps as the pipeline's epoch
    tensors = preprocessed_rows(data, spec, pre, a.limit_rows)

    def limit(threads_per_step: int | None = None) -> float:  # Ray shut down while it runs; started afresh after it
        return without_ray(partial(tight_loop, threads_per_step=threads_per_step), spec, model, tensors, default)

    kinds = {"1 worker": lambda r: pipeline_samples_per_s(data, model, 1, a.out, f"{a.model}-1w-{r}"),
             "1 worker, unsplit": lambda r: pipeline_samples_per_s(data, model, 1, a.out, f"{a.model}-1w1-{r}", step_threads=1),
             "2 workers": lambda r: pipeline_samples_per_s(data, model, 2, a.out, f"{a.model}-2w-{r}"),
             "in-worker loop": lambda r: {"steady": limit_in_a_train_worker(spec, model, tensors, default)}}
    unsplit_limits = [limit(1)]  # the same tight loop with the OpenMP-only step, for reference
    limits, runs = [limit()], {k: [] for k in kinds}
    for r in range(a.repeats):
        for kind, measure in kinds.items():
            m = measure(r)
            limits.append(limit())
            runs[kind].append(m | {"limit": (limits[-2] + limits[-1]) / 2})
            print(f"{kind} run {r}: " + ", ".join(f"{k} {v:,.2f}" for k, v in runs[kind][-1].items()), flush=True)
    unsplit_limits.append(limit(1))

    def row(measure: str, kind: str, key: str, per_worker: dict | None = None) -> dict:
        values = [m[key] for m in runs[kind]]
        ratios = [m[key] / m["limit"] for m in runs[kind]]
        out = {"measure": measure, "samples/s": median(values), "/ limit": median(ratios),
               "/ limit, range": f"{min(ratios):.3f}-{max(ratios):.3f}"}
        if per_worker is not None:
            out["2 workers / 1 worker"] = median(values) / median(m[key] for m in per_worker)
        return out

    name = a.model.upper()
    wait = {k: median(m["first_batch_s"] for m in runs[k]) for k in ("1 worker", "2 workers")}
    rows = [
        {"measure": f"{name} tight in-memory loop, same model/batch/optimiser/step (the limit)", "samples/s": median(limits),
         "/ limit": 1.0, "/ limit, range": f"{min(limits):,.0f}-{max(limits):,.0f} samples/s"},
        {"measure": f"{name} the same loop, each step in one thread (OpenMP inside ops only; first and last measurement)",
         "samples/s": median(unsplit_limits), "/ limit": median(unsplit_limits) / median(limits),
         "/ limit, range": f"{min(unsplit_limits):,.0f}-{max(unsplit_limits):,.0f} samples/s"},
        row(f"{name} same tight loop inside a 1-worker Ray Train run (Ray's own cost, no Data)", "in-worker loop", "steady"),
        row(f"{name} pipeline, 1 worker, after the first batch", "1 worker", "steady"),
        row(f"{name} pipeline, 1 worker, whole epoch (incl. {wait['1 worker']:.1f} s waiting for the first batch)",
            "1 worker", "epoch"),
        row(f"{name} pipeline, 1 worker, each step in one thread (train.step_threads 1), after the first batch",
            "1 worker, unsplit", "steady"),
        row(f"{name} pipeline, 2 workers, after the first batch", "2 workers", "steady", runs["1 worker"]),
        row(f"{name} pipeline, 2 workers, whole epoch (incl. {wait['2 workers']:.1f} s waiting for the first batch)",
            "2 workers", "epoch", runs["1 worker"]),
    ]
    bf16 = uses_bf16(default.precision, torch.device("cpu"))
    write_result(
        "throughput", f"Training throughput: {name} pipeline vs the in-memory limit, 1 vs 2 workers", rows,
        [f"default job config: batch {default.batch_size}, fused Adam lr {default.lr} and {default.table_optimizer} lr {default.table_lr} for the tables, "
         f"precision {default.precision} ({'bf16 autocast' if bf16 else 'fp32'} on this machine), "
         f"{json.dumps(model.__dict__)}",
         f"data: the default synthetic log, {a.train_rows:,} train rows; the tight loop runs over the first "
         f"{a.limit_rows:,} of them, preprocessed into tensors beforehand",
         "pipeline samples/s: train rows / time of the epoch's training loop, from the loop asking for its first batch "
         "(whole epoch) or from the first batch's arrival (after the first batch) to the last optimiser step; the "
         "loop requests the first batch before it builds the model, and the wait shown is the part of the Data "
         "start-up that this did not hide",
         f"paired: each run's ratio is to the mean of the limit measured right before and right after it (Ray shut "
         f"down meanwhile); the table shows the median of {a.repeats} runs of each kind and the range of their ratios",
         f"the step: train.step_threads {default.step_threads} (auto): a lone CPU worker's batch split across "
         f"{step_threads(default, os.cpu_count(), use_gpu=False, num_workers=1)} threads (pipeline.step.BatchStep), "
         "in the limit and the 1-worker pipeline alike; 2 workers take 1 thread each and do not split",
         "limit measurements in order, samples/s: " + ", ".join(f"{v:,.0f}" for v in limits),
         "one-thread-step limit, first and last, samples/s: " + ", ".join(f"{v:,.0f}" for v in unsplit_limits),
         "runs in order of each kind (whole epoch / after the first batch, samples/s): " + "; ".join(
             f"{k}: " + ", ".join(f"{m['epoch']:,.0f} / {m['steady']:,.0f}" if "epoch" in m else f"{m['steady']:,.0f}"
                                  for m in ms) for k, ms in runs.items())],
        "python bench/throughput.py")


if __name__ == "__main__":
    main()
