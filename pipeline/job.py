"""The driver side of a training run: connect to Ray, check and prepare the data, size the workers,
launch the TorchTrainer and write the run's outputs (metrics.json, config.yaml, checkpoint/)."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray
import ray.data
import ray.train
import torch
import yaml
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from pipeline.checkpoint import code_version, filesystem
from pipeline.config import ConfigError, DatasetSpec, JobConfig, TrainConfig
from pipeline.data import BackpressureBackoff, Preprocessor, build_datasets, read_split
from pipeline.models import MODELS, model_spec, warn_without_funnel
from pipeline.plots import plot_gates, plot_learning_curves
from pipeline.progress import DriverBar, board_for_terminal
from pipeline.restarts import RestartLog, describe
from pipeline.synthetic import SPEC_PATH, SyntheticConfig, generate
from pipeline.sharding import check_table_optimizer
from pipeline.step import step_threads
from pipeline.train import train_loop_per_worker
from pipeline import ray_compat, warm_start
from pipeline.validate import DataReport, validate_dataset

DEFAULT_CACHE = Path(os.environ.get("MTREC_CACHE", Path.home() / ".cache" / "mtrec"))


class ExactSplitDataConfig(DataConfig):
    """Ray Train's DataConfig, but shards are split with ``equal=False``: Train's default equalises
    the shards by dropping rows, which would silently drop training rows and make validation AUC
    inexact. The training loop copes with shards that differ by a batch (DDP Join). Each split's
    Data tasks may buffer at most ``buffer_bytes`` of object-store memory ahead of the workers (None:
    Ray Data's default, up to half the object store).

    ``start_splits`` lets the driver start the splits before ``fit``; see there."""

    def __init__(self, buffer_bytes: int | None = None) -> None:
        super().__init__()
        self.buffer_bytes = buffer_bytes
        self._started: dict[str, list] = {}  # dataset -> the shards the driver started
        self._started_for: tuple[str, int] | None = None  # (node id, world size) they were split for
        self._claims: dict[str, str] = {}  # dataset -> a file on the driver's node; who removes it takes the shards

    def start_splits(self, datasets: dict[str, ray.data.Dataset], world_size: int) -> None:
        """Start the splits' coordinator actors now, in the driver. Left to ``configure``, they start when the
        first worker asks for its shard, after Train has started its controller, dataset manager and
        workers; each is a new process (~1-1.5 s on 2 cores), and the first Data task then needs a worker
        process of the controller's runtime env (~0.8 s). Started here, both overlap Train's start-up, and
        the Data tasks run in the driver's runtime env, whose idle workers they can reuse: the first batch
        came after 0.25-0.57 s instead of 0.95-1.40 s (docs/NOTES.md).

        Only the first worker group takes them, and only when all its workers are on this node (for which
        they were split with locality hints): ``configure`` (called per dataset) takes a dataset's shards by
        removing its claim file, so a worker group restarted after a failure (whose predecessor may have
        left a split's epoch barrier half passed) gets fresh splits, as does one on other nodes: that one ends
        the started coordinators at once (``_take_started``), so none idles until the run's end.
        ``release_splits`` ends the rest."""
        node, split = ray.get_runtime_context().get_node_id(), self._split_names(datasets)
        self._started = {name: self._split(name, ds, world_size, [node] * world_size)
                         for name, ds in datasets.items() if name in split}
        for name in self._started:
            fd, self._claims[name] = tempfile.mkstemp(prefix=f"mtrec-started-split-{name}-")
            os.close(fd)
        self._started_for = (node, world_size)

    def release_splits(self) -> None:
        """After ``fit``: drop the unclaimed claims and end the coordinator actors the driver started, taken or
        not. Left to the driver's exit or ``ray.shutdown``, they were ended by a SIGTERM while their executor
        thread could still be in a call into Ray's core worker (docs/NOTES.md, "Shutdown aborts"); a kill ends
        the process at once, and no Data work of this run is left to wait for."""
        for claim in self._claims.values():
            Path(claim).unlink(missing_ok=True)
        for shards in self._started.values():
            ray.kill(ray_compat.split_coordinator(shards), no_restart=True)
        self._started, self._started_for, self._claims = {}, None, {}

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        hints = worker_node_ids if ray_compat.shard_locality(self) else None
        split, output = self._split_names(datasets), [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            if name in split:
                shards = self._take_started(name, world_size, worker_node_ids) or self._split(name, ds, world_size, hints)
                for i, shard in enumerate(shards):
                    output[i][name] = shard
            else:
                ds = self._with_options(name, ds)
                for i in range(world_size):
                    output[i][name] = ds.iterator()
        return output

    def _take_started(self, name: str, world_size: int, worker_node_ids: list[str]) -> list | None:
        """The started shards of this dataset if this worker group can take them, else None; started shards
        that no worker group can take any more (this one is on other nodes) are ended here, not at the end."""
        if name not in self._started:
            return None
        try:
            os.unlink(self._claims[name])  # atomic: one taker, or one to end them
        except FileNotFoundError:  # taken or ended by an earlier worker group, or this is another node
            return None
        if {(node, world_size) for node in worker_node_ids} == {self._started_for}:
            return self._started[name]
        # split with locality hints for the driver's node; their coordinator would idle until the run's end
        ray.kill(ray_compat.split_coordinator(self._started[name]), no_restart=True)
        return None

    def _split_names(self, datasets) -> set[str]:
        names = ray_compat.datasets_to_split(self)
        return set(datasets) if names == "all" else set(names)

    def _split(self, name: str, ds: ray.data.Dataset, world_size: int, hints: list[str] | None) -> list:
        return self._with_options(name, ds).streaming_split(world_size, equal=False, locality_hints=hints)

    def _with_options(self, name: str, ds: ray.data.Dataset) -> ray.data.Dataset:
        ds = ds.copy(ds)
        options = ray_compat.execution_options(self, name)
        if self.buffer_bytes is not None:
            options.resource_limits = options.resource_limits.copy(object_store_memory=self.buffer_bytes)
        ds.context.execution_options = options
        return ds


def connect_ray(progress: bool = False) -> None:
    """Join the cluster in RAY_ADDRESS (set by ``ray job submit``) or start a local one."""
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress  # off in training: one line per operator per update floods job logs
    ctx.print_on_execution_start = progress  # "Starting execution" and the plan, per split per epoch: off in training
    # Parquet through Ray Data's V1 datasource: the V2 one (the 2.60 default) lists the files in a task of
    # its own first, which put 2-4 s before every epoch's first batch here (V1: 0.4-1.3 s) for the same
    # steady throughput (bench/results/throughput.md, docs/NOTES.md)
    ctx.use_datasource_v2 = False
    ray_compat.add_execution_callback(ctx, BackpressureBackoff)  # see its docstring


WORKER_MEMORY_RESERVED = 256 * 2**20  # what a worker reserves on a node with no CPU to spare (scaling_for_cluster)


def scaling_for_cluster(cfg: TrainConfig) -> tuple[ScalingConfig, int]:
    """Size Train workers from the cluster's nodes, keeping CPU headroom on every node for Ray Data's read and
    preprocessing tasks (2 workers x 1 CPU on a 2-CPU machine starves the data pipeline and hangs; a Data task
    takes 1 CPU, so a node with less than that free runs none). CPU workers are spread over the nodes, each
    node's Data tasks feeding its own workers. Returns the scaling config and the torch threads per worker."""
    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0.0)
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else gpus >= 1
    if use_gpu:
        per_worker = {"CPU": cfg.cpus_per_worker or 1.0, "GPU": 1.0}
        return (ScalingConfig(num_workers=cfg.num_workers, use_gpu=True, resources_per_worker=per_worker),
                max(1, int(per_worker["CPU"] + 0.5)))
    node_cpus = [n["Resources"]["CPU"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0] or [1.0]
    cpus = min(node_cpus)  # sized for the smallest node, so that any node can host its share
    per_node = -(-cfg.num_workers // len(node_cpus))  # workers per node, spread evenly
    data_headroom = max(1.0, 0.25 * cpus)
    share = min(8.0, (cpus - data_headroom) / per_node)
    # a node too small for both (1 CPU: a Data task takes all of it) gives its workers no CPU reservation,
    # or the Data tasks never start; Ray refuses an all-zero bundle, so they reserve memory instead
    per_worker = ({"CPU": cfg.cpus_per_worker} if cfg.cpus_per_worker else
                  {"CPU": share} if share >= 0.1 else {"CPU": 0.0, "memory": WORKER_MEMORY_RESERVED})
    # Ray's CPU reservation is logical; torch threads use physical cores. Data tasks mostly wait on I/O
    # and are light next to the model, so a worker gets its share of its node's cores, not just its reservation.
    threads = max(1, int(cpus // per_node))
    # one worker per node at most when there are enough nodes: STRICT_SPREAD, so that a worker group restarted
    # after a node was lost waits for a node rather than packing two workers (and no Data headroom) onto one
    strategy = "PACK" if len(node_cpus) == 1 else "STRICT_SPREAD" if per_node == 1 else "SPREAD"
    return ScalingConfig(num_workers=cfg.num_workers, use_gpu=False, resources_per_worker=per_worker,
                         placement_strategy=strategy), threads


def default_synthetic_data(rows: dict[str, int] | None = None, seed: int = 0) -> Path:
    """The built-in default log: generated once into the cache directory, reused afterwards."""
    cfg = SyntheticConfig(rows=rows, seed=seed)
    key = hashlib.sha1(json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode()).hexdigest()[:12]
    path = DEFAULT_CACHE / f"synthetic-{cfg.rows['train']}-{key}"  # a new generator config, a new log
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        generate(path, cfg)
    return path


def _storage(job: JobConfig) -> str:
    """Where checkpoints go: the config's storage_path, else $MTREC_STORAGE_PATH (cluster.yaml sets an
    s3:// one on every node), else <output>/ray_results on this machine."""
    path = job.storage_path or os.environ.get("MTREC_STORAGE_PATH", "")
    if path:
        return path if "://" in path else str(Path(path).resolve())
    return str((Path(job.output) / "ray_results").resolve())


def fit_or_load_preprocessor(job: JobConfig, spec: DatasetSpec, storage: str) -> tuple[Preprocessor, str]:
    """Fit on the train split once per (data, spec) in this storage: a resumed run reuses the exact same
    encoding, and the runs of a study or a Tune search over one dataset share one fit. Returns it and the
    path of its saved state (``torch.load(weights_only=True)``-able), which is what travels to the workers."""
    fs, root = filesystem(storage)
    drop = job.data.on_bad_rows == "drop"  # then the fit skips the bad rows: another fit
    key = hashlib.sha1(json.dumps([job.data.path, dataclasses.asdict(spec), drop], sort_keys=True).encode()).hexdigest()[:16]
    path = f"{root}/preprocessors/{key}.pt"
    uri = f"{storage.rstrip('/')}/preprocessors/{key}.pt"  # what the workers open: s3:// kept
    if fs.get_file_info(path).type == pafs.FileType.File:
        with fs.open_input_stream(path) as f:
            return Preprocessor.load(io.BytesIO(f.read()), spec, drop), uri
    pre = Preprocessor.fit(job.data.path, spec, drop)
    return pre, save_preprocessor(pre, storage, key, job.data.path)


def save_preprocessor(pre: Preprocessor, storage: str, key: str, data_path: str) -> str:
    """Publish a preprocessing state as ``{storage}/preprocessors/{key}.pt``; returns its URI."""
    fs, root = filesystem(storage)
    path = f"{root}/preprocessors/{key}.pt"
    fs.create_dir(f"{root}/preprocessors", recursive=True)
    buf = io.BytesIO()
    torch.save({"data_path": data_path, "state": pre.state_dict()}, buf)
    tmp = f"{path}.tmp-{os.getpid()}"  # concurrent runs may fit the same data: publish atomically
    with fs.open_output_stream(tmp) as f:
        f.write(buf.getvalue())
    fs.move(tmp, path)
    return f"{storage.rstrip('/')}/preprocessors/{key}.pt"  # what the workers open: s3:// kept


def complete_checkpoints(job: JobConfig, storage: str) -> list[str]:
    """The run's checkpoints in storage, oldest first; one is complete once its config.json is there
    (written last, after state.pt)."""
    fs, root = filesystem(storage)
    selector = pafs.FileSelector(f"{root}/{job.name}", allow_not_found=True)
    checkpoints = sorted(f.path for f in fs.get_file_info(selector)
                         if f.type == pafs.FileType.Directory and f.base_name.startswith("checkpoint_"))
    return [c for c in checkpoints if fs.get_file_info(f"{c}/config.json").type == pafs.FileType.File]


def check_resumable(job: JobConfig, storage: str) -> None:
    """A rerun with an existing run name resumes it; refuse when that run was made on other data or
    with another model, whose checkpoint would silently be evaluated on this data."""
    fs, root = filesystem(storage)
    complete = complete_checkpoints(job, storage)
    if not complete:
        return
    with fs.open_input_stream(f"{complete[-1]}/config.json") as f:
        previous = json.loads(f.read())["job"]
    # the sharding plan is not the model: a checkpoint reshards onto another plan or number of workers (DCP)
    for key in ("data", "model"):
        if _without(previous[key], "sharding") != _without(job.to_dict()[key], "sharding"):
            raise ConfigError(
                f"run {job.name!r} in {storage} was made with {key} {previous[key]}, not {job.to_dict()[key]}; "
                f"pass another --name to start a new run (or delete {root}/{job.name})")


def _without(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


def run(job: JobConfig, callbacks: list | None = None) -> dict[str, Any]:
    """Train and evaluate one model; returns the nested metrics also written to <output>/metrics.json."""
    started = time.time()  # the job's start, as far as its start-up time goes (bench/pre_training.py)
    connect_ray()
    spec = DatasetSpec.load(job.data.spec)
    warn_without_funnel(spec, job.model)
    data = validate_dataset(job.data.path, spec, on_bad_rows=job.data.on_bad_rows)
    validated = time.time()
    print(f"data {job.data.path}: {data.rows} rows, spec {spec.name!r} OK")
    if any(data.dropped.values()):
        print(f"on_bad_rows: drop: leaving out {data.dropped} bad rows ({data.bad_rows})")
    storage = _storage(job)
    check_resumable(job, storage)
    pre, pre_path = fit_or_load_preprocessor(job, spec, storage)
    init_path, warm = "", {}
    if job.init_from and not complete_checkpoints(job, storage):  # a resumed run continues from its own checkpoint
        pre, init_path, warm = warm_start.prepare(job, spec, pre, storage)
        pre_path = save_preprocessor(pre, storage, f"warm-{job.name}", job.data.path)
        print(f"warm start from {job.init_from}: " + ", ".join(f"{k.split('/', 1)[1]} {v}" for k, v in warm.items()))
    stages = {"started": started, "validate_seconds": validated - started, "fit_seconds": time.time() - validated}
    scaling, threads = scaling_for_cluster(job.train)
    threads_per_step = step_threads(job.train, threads, scaling.use_gpu, scaling.num_workers, MODELS[job.model.name].splits_rows)
    check_table_optimizer(job.train.table_optimizer, scaling.use_gpu)
    print(f"workers: {scaling.num_workers} x {scaling.resources_per_worker} ({threads} torch threads each"
          + (f", each step split across {threads_per_step} threads)" if threads_per_step > 1 else ")"))

    board = board_for_terminal()  # a progress bar on the driver's terminal; none in job logs
    datasets = build_datasets(job.data.path, spec, pre, shuffle_window=job.train.shuffle_window,
                              workers=scaling.num_workers)
    data_config = ExactSplitDataConfig(buffer_bytes=job.train.data_buffer_mb * 2**20)
    data_config.start_splits(datasets, scaling.num_workers)
    restarts = RestartLog(storage, job.name)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "job": job.to_dict(), "spec": _spec_dict(model_spec(spec, job.model)), "preprocessor": pre_path,
            "torch_threads": threads, "step_threads": threads_per_step, "code_version": code_version(),
            "init_from": init_path, "train_rows": data.rows.get("train", 0), "board": board,
        },
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        scaling_config=scaling,
        datasets=datasets,
        dataset_config=data_config,
        run_config=RunConfig(
            name=job.name, storage_path=storage,
            failure_config=FailureConfig(max_failures=job.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=[restarts, *(callbacks or [])],
        ),
    )
    try:
        with _sigint_handler_restored(), DriverBar(board, sys.stdout) if board is not None else contextlib.nullcontext():
            result = trainer.fit()
    except Exception:
        print("\n".join(describe(restarts.read())))  # the failures before the one that ended the run
        raise
    finally:
        data_config.release_splits()
    return write_outputs(job, spec, result, data, restarts.read(), stages, warm)


@contextlib.contextmanager
def _sigint_handler_restored():
    """``TorchTrainer.fit`` leaves a SIGINT handler that holds the run's controller actor, and through it the
    worker group's dataset manager and split coordinators (idle, their executors shut down), until the next
    fit or the driver's exit. Putting the previous handler back lets them end with the run."""
    main = threading.current_thread() is threading.main_thread()  # Tune runs fit in a thread: no handler
    previous = signal.getsignal(signal.SIGINT) if main else None
    try:
        yield
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)


def write_outputs(job: JobConfig, spec: DatasetSpec, result: ray.train.Result, data: DataReport,
                  restarts: dict[str, Any], stages: dict[str, float], warm: dict[str, int]) -> dict[str, Any]:
    out = Path(job.output)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out / "checkpoint"
    # copy, then swap: an interrupted copy never replaces the previous run's checkpoint with half a one
    staging = out / f".checkpoint.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    result.checkpoint.to_directory(str(staging))
    if ckpt_dir.exists():
        old = out / f".checkpoint.old-{os.getpid()}"
        ckpt_dir.rename(old)
        staging.rename(ckpt_dir)
        shutil.rmtree(old)
    else:
        staging.rename(ckpt_dir)
    summary = json.loads((ckpt_dir / "metrics.json").read_text())
    metrics = nest_metrics(summary["metrics"] | data.metrics())
    metrics["history"] = summary["history"]
    metrics["checkpoint"] = str(ckpt_dir)
    metrics["restarts"] = restarts  # worker-group failures Train recovered from (restarts.py)
    metrics["pre_training"] = pre_training(stages, summary["history"])
    if warm:
        metrics |= nest_metrics(warm)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    (out / "config.yaml").write_text(yaml.safe_dump(job.to_dict(), sort_keys=False))
    plot_gates(summary["metrics"], spec.task_names, out / "gates.png")
    plot_learning_curves(summary["history"], spec.task_names, out / "learning_curves.png")
    print(format_table(metrics, spec))
    if metrics.get("plan"):
        print("embedding tables: " + "; ".join(f"{t} {p}" for t, p in metrics["plan"].items()))
    for line in describe(restarts):
        print(line)
    print("pre-training: " + ", ".join(f"{k} {v:.1f}" for k, v in metrics["pre_training"].items()))
    for flag in ("collapsed", "identical"):
        hit = [k for k, v in summary["metrics"].items() if k.startswith("valid/gates/") and k.endswith(flag) and v]
        if hit:
            print(f"WARNING: gates {flag}: {', '.join(k.split('/')[2] for k in hit)} (see gates.png)")
    print(f"wrote {out / 'metrics.json'}, {out / 'config.yaml'} and {ckpt_dir}")
    return metrics


def pre_training(stages: dict[str, float], history: list[dict]) -> dict[str, float]:
    """Where the time before training went: validation, the preprocessing fit (0 when its state was reused),
    and the seconds from the job's start to rank 0's first training batch (this run's first epoch; a resumed
    run's earlier epochs ran before this job started)."""
    firsts = [h["train/first_batch_at"] for h in history if h.get("train/first_batch_at", 0) >= stages["started"]]
    out = {"validate_seconds": stages["validate_seconds"], "fit_seconds": stages["fit_seconds"]}
    return out | ({"seconds_to_first_step": min(firsts) - stages["started"]} if firsts else {})


def nest_metrics(flat: dict[str, float]) -> dict[str, Any]:
    """{"test/click/auc": x} -> {"test": {"click": {"auc": x}}}."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        node = nested
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return nested


def format_table(metrics: dict[str, Any], spec: DatasetSpec) -> str:
    lines = [f"{'split':<6} {'task':<10} {'AUC':>7} {'oracle':>7} {'gap':>6} {'logloss':>8}  extra"]
    for split in ("valid", "test"):
        for task in spec.task_names:
            m = metrics.get(split, {}).get(task, {})
            auc, oracle = m.get("auc", float("nan")), m.get("oracle_auc", float("nan"))
            extra = f"cvr_auc={m['cvr_auc']:.4f} (oracle {m.get('oracle_cvr_auc', float('nan')):.4f})" if "cvr_auc" in m else ""
            lines.append(f"{split:<6} {task:<10} {auc:7.4f} {oracle:7.4f} {oracle - auc:6.4f} {m.get('logloss', float('nan')):8.4f}  {extra}")
    return "\n".join(lines)


def _spec_dict(spec: DatasetSpec) -> dict[str, Any]:
    return dataclasses.asdict(spec)
