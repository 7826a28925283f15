"""What the benchmarks share: the machine line, the in-memory data they compare against, the tight
training loop that is the ceiling for a model on this machine, and the result files."""
from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Ray workers of the local instance a benchmark starts import this module and the package from here
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "bench"), str(ROOT), os.environ.get("PYTHONPATH", "")])

from pipeline.config import DatasetSpec, ModelConfig, TrainConfig  # noqa: E402
from pipeline.data import Collate, Preprocessor  # noqa: E402
from pipeline.models import build_model  # noqa: E402
from pipeline.sharding import dense_parameters, local_process_group, shard  # noqa: E402
from pipeline.step import BatchStep, freed_memory_kept, mixed_precision, step_threads  # noqa: E402
from pipeline.weighting import LossWeighting  # noqa: E402
from pipeline.validate import split_files  # noqa: E402

RESULTS = ROOT / "bench" / "results"
ARROW_BATCH_ROWS = 65_536  # rows per pyarrow record batch (and preprocessing call) on the plain-pyarrow side


def machine() -> dict:
    import ray

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpu": cpu, "cores": os.cpu_count(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
            "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
            "platform": platform.platform()}


def write_result(name: str, title: str, rows: list[dict], notes: list[str], command: str) -> Path:
    """bench/results/<name>.md (table + machine + command) and <name>.json; prints the table."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    m = machine()
    cols = list(dict.fromkeys(k for r in rows for k in r))
    cell = lambda v: f"{v:,.3f}" if isinstance(v, float) and abs(v) < 10 else (f"{v:,.0f}" if isinstance(v, float) else str(v))  # noqa: E731
    table = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    table += ["| " + " | ".join(cell(r.get(c, "")) for c in cols) + " |" for r in rows]
    text = "\n".join([f"# {title}", "", *table, "", *[f"- {n}" for n in notes], "",
                      f"Command: `{command}`", "",
                      "Machine: " + ", ".join(f"{k} {v}" for k, v in m.items()), ""])
    (RESULTS / f"{name}.md").write_text(text)
    (RESULTS / f"{name}.json").write_text(json.dumps({"title": title, "rows": rows, "notes": notes,
                                                      "command": command, "machine": m}, indent=2, default=float))
    print(text)
    return RESULTS / f"{name}.md"


def preprocessed_rows(data: str, spec: DatasetSpec, pre: Preprocessor, rows: int) -> pa.Table:
    """The first ``rows`` train rows, read with pyarrow and preprocessed once (``Preprocessor.transform``'s
    layout): the in-memory data of the tight loop and of the peers."""
    _, files = split_files(data, "train")
    parts, n = [], 0
    for f in files:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=ARROW_BATCH_ROWS,
                                                    columns=spec.feature_columns + spec.label_columns):
            parts.append(pre.transform(pa.Table.from_batches([batch])))
            n += batch.num_rows
            if n >= rows:
                break
        if n >= rows:
            break
    return pa.concat_tables(parts).slice(0, rows).combine_chunks()


def padded_arrays(rows: pa.Table, spec: DatasetSpec) -> dict[str, np.ndarray]:
    """Preprocessed rows as the padded arrays a peer library takes: ids [N, F], each id list [N, max_len]
    (right-padded with 0, the out-of-vocabulary row), dense [N, D] and labels [N, T]."""
    out = {"sparse": np.stack([rows[f.name].to_numpy() for f in spec.sparse], 1).astype(np.int64)}
    for s in spec.sequences:
        lists = rows[s.name].combine_chunks()
        offsets, values = lists.offsets.to_numpy(), lists.values.to_numpy()
        lengths = np.diff(offsets)
        padded = np.zeros((len(lists), s.max_len), np.int64)
        cols = np.arange(lengths.sum()) - np.repeat(offsets[:-1], lengths)
        padded[np.repeat(np.arange(len(lists)), lengths), cols] = values[offsets[0]:offsets[-1]]
        out[f"seq:{s.name}"] = padded
    out["dense"] = np.stack([rows[d.name].to_numpy() for d in spec.dense], 1) if spec.dense else np.zeros((len(rows), 0), np.float32)
    out["labels"] = np.stack([rows[c].to_numpy() for c in spec.label_columns], 1)
    return out


def without_ray(fn, *args):
    """``fn(*args)`` with no Ray instance running beside it (Ray's idle daemons and actors would slow an
    in-process loop); Ray is started again afterwards."""
    import ray

    from pipeline.job import connect_ray

    ray.shutdown()
    try:
        return fn(*args)
    finally:
        connect_ray()


def limit_in_a_train_worker(spec: DatasetSpec, model_cfg: ModelConfig, tensors: pa.Table, train: TrainConfig) -> float:
    """The same tight loop run inside a 1-worker Ray Train run (its worker reserves 1 CPU and uses 2 torch
    threads, as the pipeline's does): what Ray's worker environment alone costs, without any Data."""
    import ray
    import ray.train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def loop(config: dict) -> None:
        sps = tight_loop(spec, model_cfg, ray.get(config["tensors"][0]), train)
        with tempfile.TemporaryDirectory() as d:  # Result.metrics holds the reports that carry a checkpoint
            ray.train.report({"samples_per_s": sps}, checkpoint=ray.train.Checkpoint.from_directory(d))

    with tempfile.TemporaryDirectory() as storage:
        result = TorchTrainer(loop, train_loop_config={"tensors": [ray.put(tensors)]},
                              scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                              run_config=RunConfig(name="limit-in-worker", storage_path=storage)).fit()
    return result.metrics["samples_per_s"]


def tight_loop(spec: DatasetSpec, model_cfg: ModelConfig, rows: pa.Table, train: TrainConfig,
               warmup_steps: int = 5, threads_per_step: int | None = None) -> float:
    """Samples/s of the training step alone: the same model (its tables through TorchRec, on one worker),
    batch size, loss, optimisers and step (``BatchStep``, its threads as the pipeline's lone CPU worker would
    split it unless ``threads_per_step`` says otherwise) as the pipeline's loop, over batches already in
    memory, in one process with all the cores (the ceiling on this machine)."""
    threads = os.cpu_count()
    if threads_per_step is None:
        threads_per_step = step_threads(train, threads, use_gpu=False, num_workers=1)
    torch.manual_seed(train.seed)
    torch.set_num_threads(max(1, threads // threads_per_step))
    n, batch_size = rows.num_rows, train.batch_size
    collate = Collate(spec)
    batches = [collate(rows.slice(i, batch_size)) for i in range(0, n - batch_size + 1, batch_size)]
    with local_process_group():  # a lone Train worker's (inside one, Ray's own)
        model, _ = shard(build_model(spec, model_cfg, table_device="meta"), model_cfg.sharding, train.table_optimizer,
                         train.table_lr, torch.device("cpu"), batch_size)
        optimizer = torch.optim.Adam(dense_parameters(model), lr=train.lr, weight_decay=train.weight_decay, fused=True)
        step = BatchStep(model, LossWeighting(spec.task_names, train), optimizer,
                         lambda: mixed_precision(train.precision, torch.device("cpu")), threads_per_step)
        try:
            with freed_memory_kept(train.keep_freed_memory):  # as the pipeline's training steps
                for batch in batches[:warmup_steps]:
                    step(batch)
                t0 = time.perf_counter()
                for batch in batches:
                    step(batch)
                return len(batches) * batch_size / (time.perf_counter() - t0)
        finally:
            step.close()
