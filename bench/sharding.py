"""Sharded embedding tables (TorchRec): memory per worker with a 10M-id table, and the default job's samples/s
against the previous engine (every table replicated on every worker, DDP with sparse gradients), measured
side by side in one run.

    python bench/sharding.py                    # -> bench/results/sharding.md
    python bench/sharding.py --skip-speed       # the memory part only (no Ray)

Memory: a model over the default spec whose user_id table has ``--ids`` rows (10M), its tables sharded
(row-wise) or replicated (data-parallel, DDP), on 1 and 2 gloo processes (``torch.multiprocessing``, no Ray, so
that nothing else counts), a few training steps each: per worker, the bytes of the embedding weights and of
their optimizer state it holds, and its peak RSS. Speed: ``python jobs/train_ple.py`` (2 workers, the default
log) from this tree and from a git worktree of ``--baseline`` (the last commit of the previous engine), in
alternation, ``--repeats`` pairs; the table shows the medians and the pairs' ratios.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import median

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import ROOT, write_result

from pipeline.config import DatasetSpec, ModelConfig, TrainConfig, from_dict
from pipeline.data import Collate, empty_rows
from pipeline.models import build_model
from pipeline.sharding import dense_parameters, lockstep, shard
from pipeline.synthetic import SPEC_PATH
from pipeline.step import BatchStep, mixed_precision

BASELINE = "f819fae"  # main before the TorchRec engine


def _tensor_bytes(value) -> int:
    if hasattr(value, "local_shards"):
        return sum(s.tensor.numel() * s.tensor.element_size() for s in value.local_shards())
    return value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0


def _memory_worker(rank: int, world: int, port: int, sharding: str, ids: int, steps: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    raw = json.loads(json.dumps(_spec_dict()))
    next(f for f in raw["sparse"] if f["name"] == "user_id")["vocab_size"] = ids
    spec = from_dict(DatasetSpec, raw)
    torch.manual_seed(0)
    train = TrainConfig(batch_size=2048)
    model, plan = shard(build_model(spec, ModelConfig(name="ple"), table_device="meta"), sharding, train.table_optimizer,
                        train.table_lr, torch.device("cpu"), train.batch_size)
    optimizer = torch.optim.Adam(dense_parameters(model), lr=train.lr, fused=True)
    step = BatchStep(model, _weighting(spec, train), optimizer, lambda: mixed_precision("fp32", torch.device("cpu")),
                     empty=Collate(spec, train.batch_size).empty())
    rows = _random_rows(spec, train.batch_size, rank)
    for _ in lockstep([Collate(spec, train.batch_size)(rows)] * steps, step.empty):
        step(_)
    tables = {k: v for k, v in model.state_dict().items() if k.startswith("front.")}
    weights = sum(_tensor_bytes(v) for v in tables.values())
    fused = sum(_tensor_bytes(v) for state in model.fused_optimizer.state_dict()["state"].values() for v in state.values())
    dense_state = sum(_tensor_bytes(v) for s in optimizer.state.values() for v in s.values()
                      if isinstance(v, torch.Tensor) and v.numel() > 1)
    # a replicated table is a DDP parameter: Adam's two moments; only the tables' share of them counts
    table_params = {id(p) for n, p in model.named_parameters() if "front." in n}
    replicated_state = sum(_tensor_bytes(v) for p, s in optimizer.state.items() if id(p) in table_params
                           for v in s.values() if isinstance(v, torch.Tensor) and v.numel() > 1)
    result = {"rank": rank, "plan": plan["user_id"], "table_weights": weights, "table_optimizer": fused + replicated_state,
              "dense_optimizer": dense_state - replicated_state,
              "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    gathered = [None] * world
    dist.all_gather_object(gathered, result)
    dist.destroy_process_group()
    if rank == 0:
        torch.save(gathered, out)


def _spec_dict() -> dict:
    import dataclasses

    return dataclasses.asdict(DatasetSpec.load(SPEC_PATH))


def _weighting(spec, train):
    from pipeline.weighting import LossWeighting

    return LossWeighting(spec.task_names, train)


def _random_rows(spec, n: int, seed: int):
    import numpy as np
    import pyarrow as pa

    g = np.random.default_rng(seed)
    rows = empty_rows(spec, n)
    cols = {c: rows[c] for c in rows.column_names}
    for f in spec.sparse:
        cols[f.name] = pa.array(g.integers(0, spec.tables[f.table_name].num_rows, n).astype(np.int32))
    for s in spec.sequences:
        lengths = g.integers(0, s.max_len + 1, n)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        ids = g.integers(1, spec.tables[s.table_name].num_rows, offsets[-1]).astype(np.int32)
        cols[s.name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids))
    cols[spec.label_columns[0]] = pa.array((g.random(n) < 0.1).astype(np.float32))
    return pa.table(cols)


def memory(ids: int, steps: int) -> list[dict]:
    import socket

    out = []
    for sharding in ("row_wise", "data_parallel"):
        for world in (1, 2):
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            with tempfile.TemporaryDirectory() as d:
                mp.start_processes(_memory_worker, args=(world, port, sharding, ids, steps, f"{d}/r.pt"), nprocs=world,
                                   start_method="spawn")
                ranks = torch.load(f"{d}/r.pt")
            gib = 2**30
            per_worker = max(r["table_weights"] + r["table_optimizer"] for r in ranks)
            out.append({"tables": "sharded (row-wise)" if sharding == "row_wise" else "replicated (DDP)", "workers": world,
                        "user_id table": ranks[0]["plan"],
                        "tables + their optimizer state per worker (GiB)": per_worker / gib,
                        "of which optimizer state (GiB)": max(r["table_optimizer"] for r in ranks) / gib,
                        "peak RSS per worker (GiB)": max(r["peak_rss"] for r in ranks) / gib, "_bytes": per_worker})
    for r in out:
        one = next(x for x in out if x["tables"] == r["tables"] and x["workers"] == 1)
        r["vs 1 worker"] = r["_bytes"] / one["_bytes"]
    return out


def job_samples_per_s(tree: Path, out: Path, name: str, *flags: str) -> dict:
    """The default job (2 workers) run from ``tree``: its epoch's samples/s and test AUCs from metrics.json."""
    run_out = out / name
    shutil.rmtree(run_out, ignore_errors=True)
    cmd = [sys.executable, str(tree / "jobs" / "train_ple.py"), "--name", name, "--output", str(run_out / "run"),
           "--storage-path", str(run_out / "ray_results"), *flags]
    done = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, env=_env(tree))
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    metrics = json.loads((run_out / "run" / "metrics.json").read_text())
    epoch = metrics["history"][0]
    return {"samples_per_s": epoch["train/samples_per_s"], "steady": epoch["train/steady_samples_per_s"],
            "test_auc": {t: metrics["test"][t]["auc"] for t in ("click", "convert")}}


def _env(tree: Path) -> dict:
    import os

    return os.environ | {"PYTHONPATH": str(tree)}  # the tree's own pipeline package, not the installed one


def large_table_spec(out: Path, ids: int) -> Path:
    """The default spec with item_id hashed into ``ids`` rows: the default log, read with a table that size."""
    text = SPEC_PATH.read_text()
    old = "{name: item_id, hash_buckets: 262144, dim: 8}"
    assert old in text, f"{SPEC_PATH} no longer has {old}"
    path = out / f"item_id_{ids}.yaml"
    path.write_text(text.replace(old, f"{{name: item_id, hash_buckets: {ids}, dim: 8}}"))
    return path


def speed(baseline: str, repeats: int, out: Path, ids: int) -> list[dict]:
    worktree = out / "baseline-tree"
    subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT, capture_output=True)
    subprocess.run(["git", "worktree", "add", "--detach", str(worktree), baseline], cwd=ROOT, check=True,
                   capture_output=True)
    configs = {"default log": [], f"item_id table {ids:,} rows": ["--spec", str(large_table_spec(out, ids))]}
    rows = []
    try:
        for config, flags in configs.items():
            runs = {"sharded": [], "replicated": []}
            for r in range(repeats):  # paired, in alternation: the machine's speed drifts
                tag = f"{r}-{len(rows)}"
                runs["replicated"].append(job_samples_per_s(worktree, out, f"replicated-{tag}", *flags))
                runs["sharded"].append(job_samples_per_s(ROOT, out, f"sharded-{tag}", *flags))
            rows += _speed_rows(config, baseline, runs)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT, capture_output=True)
    return rows


def _speed_rows(config: str, baseline: str, runs: dict) -> list[dict]:
    ratios = [s["samples_per_s"] / p["samples_per_s"] for s, p in zip(runs["sharded"], runs["replicated"])]
    rows = []
    for kind, label in (("replicated", f"replicated, DDP with sparse gradients ({baseline})"),
                        ("sharded", "sharded, TorchRec (auto plan)")):
        rs = runs[kind]
        rows.append({"config": config, "engine": label, "samples/s (epoch)": median(r["samples_per_s"] for r in rs),
                     "samples/s (after the first batch)": median(r["steady"] for r in rs),
                     "test AUC click": median(r["test_auc"]["click"] for r in rs),
                     "test AUC convert": median(r["test_auc"]["convert"] for r in rs)})
    rows.append({"config": config, "engine": "sharded / replicated", "samples/s (epoch)": median(ratios),
                 "samples/s (after the first batch)": f"pairs {min(ratios):.3f}-{max(ratios):.3f}"})
    return rows


def quality(seeds: list[int], out: Path) -> list[dict]:
    """The default job's test AUCs with every table row-wise, table-wise and replicated, over ``seeds``."""
    runs = {k: [job_samples_per_s(ROOT, out, f"{k}-seed{seed}", "--sharding", k, "--seed", str(seed)) for seed in seeds]
            for k in ("data_parallel", "row_wise", "table_wise")}
    rows = []
    for kind, rs in runs.items():
        row = {"sharding": kind}
        for task in ("click", "convert"):
            aucs = [r["test_auc"][task] for r in rs]
            ref = sum(r["test_auc"][task] for r in runs["data_parallel"]) / len(seeds)
            row |= {f"test AUC {task} (seeds {seeds})": " / ".join(f"{a:.4f}" for a in aucs),
                    f"{task}: mean - replicated mean (points)": 100 * (sum(aucs) / len(aucs) - ref)}
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ids", type=int, default=10_000_000, help="rows of the large (user_id) table")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--baseline", default=BASELINE, help="the commit of the previous engine")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--quality", type=int, nargs="*", metavar="SEED",
                   help="instead: the default job's test AUCs, row-wise / table-wise / replicated, over these seeds")
    p.add_argument("--out", default="outputs/bench/sharding")
    a = p.parse_args()
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if a.quality:
        write_result("sharding_quality", "Sharded embedding tables: test AUC by sharding type, default job", quality(a.quality, out),
                     [f"the default job (`python jobs/train_ple.py`: PLE, 2 workers, the 1M-row default log) with "
                      f"`--sharding` row_wise, table_wise and data_parallel (every table replicated), seeds {a.quality}; "
                      "the differences are in AUC points (0.01 AUC = 1 point)"],
                     "python bench/sharding.py " + " ".join(sys.argv[1:]))
        return
    rows = memory(a.ids, a.steps)
    notes = [f"memory: the default spec with a {a.ids:,}-row user_id table (dim 8), PLE, batch 2048, {a.steps} steps per "
             "worker on gloo processes (no Ray); tables + optimizer state = the embedding weights a worker holds and "
             "their optimizer state (sharded: row-wise Adagrad's one value per row; replicated: Adam's two moments, as "
             "DDP parameters)"]
    for r in rows:
        r.pop("_bytes")
    if not a.skip_speed:
        rows += speed(a.baseline, a.repeats, out, a.ids)
        notes.append(f"speed: the default job (`python jobs/train_ple.py`: PLE, 2 workers, the 1M-row default log), from "
                     f"this tree and from {a.baseline} (every table on every worker, DDP with sparse gradients and lazy "
                     f"Adam), {a.repeats} pairs in alternation; medians, and the range of the pairs' ratios; then the same "
                     f"with the default log read through a spec whose item_id is hashed into {a.ids:,} rows")
    write_result("sharding", "Sharded embedding tables: memory per worker and samples/s vs replicated", rows, notes,
                 "python bench/sharding.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
