"""Typed configuration: the dataset spec (``pipeline.features``) and the training config, as plain
dataclasses loaded from YAML. The loader (``from_dict``) checks every key's type, ``Literal`` choices
included, and names the key path in its message."""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

# the dataset spec and its feature kinds live in pipeline.features (one class per kind); re-exported here
from pipeline.features import (ConfigError, DatasetSpec, DenseFeature, EmbeddingTable, IdFeature,  # noqa: F401
                               IdListFeature, Task)


# ----------------------------------------------------------------------------- training config


ModelName = Literal["single_task", "shared_bottom", "omoe", "mmoe", "ple", "esmm", "aitm", "dupn", "mose", "metaheac"]  # pipeline.models.MODELS
Precision = Literal["auto", "fp32", "bf16"]
Objective = Literal["mean_auc", "min_auc", "weighted_auc"]
LossWeighting = Literal["fixed", "decay", "uncertainty", "gradnorm"]
BadRowPolicy = Literal["fail", "drop"]


@dataclass
class ModelConfig:
    name: ModelName = "ple"
    # hidden sizes of each expert; also the bottom MLP of shared_bottom, single_task and aitm
    expert_hidden: list[int] = field(default_factory=lambda: [128, 64])
    tower_hidden: list[int] = field(default_factory=lambda: [32])
    towers: dict[str, list[int]] = field(default_factory=dict)  # per-task tower sizes (e.g. ESMM's CTR/CVR)
    num_experts: int = 4  # MMoE: experts shared by all tasks
    num_shared_experts: int = 2  # PLE: shared experts per level
    num_task_experts: int = 2  # PLE: experts per task per level
    num_levels: int = 2  # PLE: stacked CGC levels
    dropout: float = 0.0
    # how a task with depends_on is trained: "esmm" = p(task) = p(parent) * p(task | parent) with the
    # loss over all exposures; "masked" = a plain head trained on the parent-positive rows only.
    dependent_loss: Literal["esmm", "masked"] = "esmm"
    aitm_constraint_weight: float = 0.6  # AITM's label-constraint loss weight (the paper's alpha)
    embedding_dim: Optional[int] = None  # overrides every table's dim from the spec (a Tune knob)
    # how the embedding tables are sharded across the workers (TorchRec): auto lets TorchRec's planner choose
    # per table (on CPU: table-wise up to 1 GiB a table, row-wise above; pipeline.sharding); or one
    # sharding type for every table
    sharding: Literal["auto", "table_wise", "row_wise", "column_wise", "data_parallel"] = "auto"
    # how every behaviour sequence is read (overrides the spec's per-sequence ``encoder``): pooled, target
    # attention with the candidate as query (DIN), or an LSTM's last state (pipeline.sequence). dupn and mose
    # read the sequences themselves, with LSTMs
    sequence_encoder: Optional[Literal["pool", "target_attention", "lstm"]] = None
    sequence_hidden: int = 32  # LSTM state size (the lstm encoder, DUPN, each MoSE expert)
    attention_hidden: list[int] = field(default_factory=lambda: [32])  # the attention score MLPs
    num_critics: int = 3  # MetaHeac: critics (shared task heads) mixed per task
    task_embedding_dim: int = 8  # MetaHeac: the task embeddings its gates read
    meta_inner_lr: float = 0.1  # MetaHeac: the inner (support) step's learning rate
    meta_support: float = 0.5  # MetaHeac: the share of each batch's rows in the support part

    def __post_init__(self) -> None:
        if not 0.0 < self.meta_support < 1.0:
            raise ConfigError(f"model.meta_support is the support part's share of a batch, in (0, 1); got {self.meta_support}")


@dataclass
class TrainConfig:
    # one pass is usually best for id-embedding CTR models: a second epoch over the same impressions
    # overfits the embeddings (the "one-epoch phenomenon"; we see valid AUC drop ~2 points on epoch 2)
    epochs: int = 1
    batch_size: int = 2048
    lr: float = 2e-3
    weight_decay: float = 0.0
    # the embedding tables' optimizer, fused into the backward by FBGEMM (on CPU: rowwise_adagrad, adagrad or
    # sgd; adam on GPU), and its learning rate; the dense layers take Adam with ``lr``
    table_optimizer: Literal["rowwise_adagrad", "adagrad", "sgd", "adam"] = "rowwise_adagrad"
    table_lr: float = 0.05
    loss_weights: dict[str, float] = field(default_factory=dict)  # task -> weight (default 1)
    # fixed | uncertainty (Kendall et al. 2018) | gradnorm (Chen et al. 2018) | decay (PLE: w0 * gamma^epoch)
    loss_weighting: LossWeighting = "fixed"
    loss_weight_decay: dict[str, float] = field(default_factory=dict)  # decay: task -> gamma (default 1)
    gradnorm_alpha: float = 1.5
    gradnorm_lr: float = 0.025
    patience: int = 1  # early stopping: epochs without validation improvement
    # the validation objective for early stopping, model selection and Tune: mean_auc, min_auc, or
    # weighted_auc (the tasks' AUCs weighted by objective_weights, default 1 each)
    early_stop_metric: Objective = "mean_auc"
    objective_weights: dict[str, float] = field(default_factory=dict)
    num_workers: int = 2
    use_gpu: Optional[bool] = None  # None: use GPUs when the cluster has them
    cpus_per_worker: Optional[float] = None  # None: sized from the cluster, leaving Data headroom
    # per-epoch shuffle: a new file order, and the rows of every shuffle_window rows of a file permuted by the
    # preprocessing tasks (0: no permutation); shuffle_buffer > 0 adds Ray's local shuffle buffer on each
    # worker, mixing across files too, at a cost in throughput (13 % for PLE on 2 cores)
    shuffle_window: int = 65536
    shuffle_buffer: int = 0
    # object-store memory each split's read and preprocessing tasks may fill ahead of training; without a
    # bound Ray Data buffers up to half the object store, so a longer epoch held more memory (docs/NOTES.md)
    data_buffer_mb: int = 512
    max_failures: int = 2
    seed: int = 0
    precision: Precision = "auto"  # auto (bf16 autocast where the GPU or CPU has native bf16, else fp32) | fp32 | bf16
    # torch.compile the experts, gates and towers (not the embedding lookup: Inductor takes no sparse gradients).
    # PLE on this repo's 2-core CPU: +20-27 % samples/s after a 7-18 s compile per worker (and one more for
    # evaluation), so it pays on epochs of several million rows, not on the 1M-row default (docs/NOTES.md)
    compile: bool = False
    # during the training steps, glibc malloc keeps the memory a step frees instead of page-faulting it in
    # again every step (+10-20 % samples/s on CPU here); evaluation runs with glibc's defaults, so the peak
    # memory at 10M rows stays 1.18-1.21x that at 1M (docs/NOTES.md)
    keep_freed_memory: bool = True
    # threads that share each training step of a lone CPU worker: the batch's rows are split into this many
    # ranges, computed concurrently by threads of (torch threads / step_threads) intra-op threads each, and
    # their gradients summed in a fixed order (the same gradient as the whole batch's). Small models spend
    # much of a step in OpenMP barriers, which stall whenever another process takes a core: PLE on this
    # repo's 2 cores, in a Ray Train worker, 74-78k -> 85-89k samples/s. 0 (auto): 2 on a lone CPU worker
    # with 2 or more threads, else 1 (one thread, intra-op parallelism only). Not with several workers
    # (DDP), GPUs, gradnorm weighting or compile (docs/NOTES.md)
    step_threads: int = 0

    def __post_init__(self) -> None:
        if self.step_threads < 0:
            raise ConfigError(f"train.step_threads must be 0 (auto) or a number of threads, got {self.step_threads}")
        if self.data_buffer_mb <= 0:
            raise ConfigError(f"train.data_buffer_mb must be positive, got {self.data_buffer_mb}")


@dataclass
class DataPaths:
    path: str = ""  # directory or URI holding train/ valid/ test/ sub-directories of Parquet files
    spec: str = ""  # dataset spec YAML
    # rows with a null, a label outside {0, 1}, a conversion without its click, a NaN/inf dense value or a
    # negative / out-of-range id: "fail" refuses the data (file, column, count); "drop" leaves those rows
    # out of training and evaluation and reports the counts per split, column and reason
    on_bad_rows: BadRowPolicy = "fail"

    def __post_init__(self) -> None:
        self.path, self.spec = os.path.expanduser(self.path), os.path.expanduser(self.spec)  # ~/ as a shell would



@dataclass
class JobConfig:
    data: DataPaths = field(default_factory=DataPaths)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    name: str = "ple"  # run name: rerunning with the same name resumes from its latest checkpoint
    storage_path: str = ""  # checkpoints and results (local dir or s3://); default <output>/ray_results
    output: str = "outputs/ple"
    # warm start: train from another run's selected weights (its output or checkpoint directory), its
    # vocabularies extended with this log's ids (pipeline.warm_start); a resumed run ignores it
    init_from: str = ""

    def __post_init__(self) -> None:
        self.storage_path, self.output = os.path.expanduser(self.storage_path), os.path.expanduser(self.output)

    @staticmethod
    def load(path: str | Path) -> "JobConfig":
        return load_yaml(path, JobConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- YAML -> dataclass


def load_yaml(path: str | Path, cls: type) -> Any:
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    try:
        return from_dict(cls, raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def from_dict(cls: type, raw: Any, where: str = "") -> Any:
    """Build dataclass ``cls`` from plain YAML data, refusing unknown keys and wrong types."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = set(raw) - set(fields)
    if unknown:
        raise ConfigError(f"{where or cls.__name__}: unknown keys {sorted(unknown)} (known: {sorted(fields)})")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}" if where else k) for k, v in raw.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from None


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Literal:  # every string choice of a config or spec is checked here, and only here
        if value not in args:
            raise ConfigError(f"{where}: must be one of {'|'.join(map(str, args))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): _coerce(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool) and not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


# dict-valued fields whose keys are task names: an override may add a key ("train.loss_weights.click")
FREE_KEY_FIELDS = {"train.loss_weights", "train.loss_weight_decay", "train.objective_weights", "model.towers"}


def merge_overrides(cfg: JobConfig, overrides: dict[str, Any]) -> JobConfig:
    """Apply dotted overrides such as {"train.epochs": 2} (None values are skipped)."""
    raw = cfg.to_dict()
    for key, value in overrides.items():
        if value is None:
            continue
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        if leaf not in node and ".".join(parents) not in FREE_KEY_FIELDS:
            raise ConfigError(f"unknown config key {key!r}")
        node[leaf] = value
    return from_dict(JobConfig, raw)
