"""Typed configuration: the dataset spec and the training config, as plain dataclasses loaded from YAML.

A dataset spec describes one impression log: its sparse id features, multi-valued (sequence) id
features, dense features and tasks. Embedding tables are derived from the features: a feature owns
a table unless it names a shared one with ``table:`` (e.g. the behaviour sequence of categories
shares the ``category`` table with the target item's category).
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A spec or config that cannot be used; the message says where and why."""


# ----------------------------------------------------------------------------- dataset spec


@dataclass
class SparseFeature:
    """A single-valued id column (int64 or string). Exactly one of ``vocab_size``, ``hash_buckets`` or
    ``num_ids`` sizes its table (unless it uses a table another feature defines)."""

    name: str
    vocab_size: Optional[int] = None  # ordinal encoding fit on train; index 0 is out-of-vocabulary
    hash_buckets: Optional[int] = None  # or: hash the raw id into this many buckets
    # or: the ids are already indices in [0, num_ids) (a pre-encoded log) and are used as they are; an
    # id outside that range is bad input (refused, or its row dropped under on_bad_rows: drop)
    num_ids: Optional[int] = None
    dim: int = 16
    table: Optional[str] = None  # share an embedding table with other features of this name

    @property
    def table_name(self) -> str:
        return self.table or self.name


@dataclass
class SequenceFeature:
    """A multi-valued id column (``list<int64>``): a behaviour sequence, padded/truncated to max_len."""

    name: str
    max_len: int = 20
    pooling: str = "mean"  # mean | sum | max
    vocab_size: Optional[int] = None
    hash_buckets: Optional[int] = None
    num_ids: Optional[int] = None
    dim: int = 16
    table: Optional[str] = None

    @property
    def table_name(self) -> str:
        return self.table or self.name


@dataclass
class DenseFeature:
    name: str
    normalize: str = "standard"  # standard | log_standard | none


@dataclass
class Task:
    """A binary task. ``depends_on`` names the task that must be positive first (the funnel:
    convert depends on click); its label is over the full exposure space (convert=1 implies click=1)."""

    name: str
    label: Optional[str] = None  # label column; defaults to the task name
    depends_on: Optional[str] = None

    @property
    def label_column(self) -> str:
        return self.label or self.name


@dataclass
class EmbeddingTable:
    name: str
    num_rows: int  # including the out-of-vocabulary / padding row 0
    dim: int
    encoding: str  # "vocab" (ordinal, fit on train), "hash" or "identity" (id i -> row i + 1)

    @property
    def num_ids(self) -> Optional[int]:
        """The valid raw ids [0, num_ids) of an identity table; None for the others (any id is fine)."""
        return self.num_rows - 1 if self.encoding == "identity" else None


@dataclass
class DatasetSpec:
    name: str
    tasks: list[Task]
    sparse: list[SparseFeature] = field(default_factory=list)
    sequences: list[SequenceFeature] = field(default_factory=list)
    dense: list[DenseFeature] = field(default_factory=list)
    # task name -> column with the true probability P(task label = 1 | exposure); never a feature.
    oracle: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.tables = self._derive_tables()
        names = [t.name for t in self.tasks]
        if not names:
            raise ConfigError(f"spec {self.name!r}: at least one task is required")
        for t in self.tasks:
            if t.depends_on is not None and t.depends_on not in names:
                raise ConfigError(f"spec {self.name!r}: task {t.name!r} depends_on unknown task {t.depends_on!r}")
            if t.depends_on == t.name:
                raise ConfigError(f"spec {self.name!r}: task {t.name!r} depends on itself")
        for s in self.sequences:
            if s.pooling not in ("mean", "sum", "max"):
                raise ConfigError(f"spec {self.name!r}: sequence {s.name!r} pooling must be mean|sum|max, got {s.pooling!r}")
        for d in self.dense:
            if d.normalize not in ("standard", "log_standard", "none"):
                raise ConfigError(f"spec {self.name!r}: dense {d.name!r} normalize must be standard|log_standard|none")
        cols = self.feature_columns + self.label_columns + list(self.oracle.values())
        dup = {c for c in cols if cols.count(c) > 1}
        if dup:
            raise ConfigError(f"spec {self.name!r}: columns used twice: {sorted(dup)}")
        if set(self.oracle) - set(names):
            raise ConfigError(f"spec {self.name!r}: oracle names unknown tasks {sorted(set(self.oracle) - set(names))}")

    def _derive_tables(self) -> dict[str, EmbeddingTable]:
        tables: dict[str, EmbeddingTable] = {}
        for f in [*self.sparse, *self.sequences]:
            sizes = {k: v for k, v in (("vocab_size", f.vocab_size), ("hash_buckets", f.hash_buckets),
                                       ("num_ids", f.num_ids)) if v is not None}
            if len(sizes) > 1:
                raise ConfigError(f"spec {self.name!r}: feature {f.name!r} sets both {' and '.join(sizes)}")
            if not sizes:
                if f.table_name in tables:
                    continue  # uses a table another feature defines
                raise ConfigError(f"spec {self.name!r}: feature {f.name!r} needs vocab_size, hash_buckets or num_ids "
                                  "(or a shared table)")
            (kind, size), = sizes.items()
            if size < (1 if kind == "num_ids" else 2):
                raise ConfigError(f"spec {self.name!r}: feature {f.name!r} {kind} is too small: {size}")
            encoding = {"vocab_size": "vocab", "hash_buckets": "hash", "num_ids": "identity"}[kind]
            table = EmbeddingTable(f.table_name, size + (kind == "num_ids"), f.dim, encoding)
            old = tables.get(f.table_name)
            if old is not None and old != table:
                raise ConfigError(f"spec {self.name!r}: shared table {f.table_name!r} defined differently: {old} vs {table}")
            tables[f.table_name] = table
        for f in [*self.sparse, *self.sequences]:
            if f.table_name not in tables:
                raise ConfigError(f"spec {self.name!r}: feature {f.name!r} uses undefined table {f.table_name!r}")
            if tables[f.table_name].dim != f.dim and (f.vocab_size or f.hash_buckets or f.num_ids) is None:
                f.dim = tables[f.table_name].dim
        return tables

    @property
    def feature_columns(self) -> list[str]:
        return [f.name for f in self.sparse] + [f.name for f in self.sequences] + [f.name for f in self.dense]

    @property
    def label_columns(self) -> list[str]:
        return [t.label_column for t in self.tasks]

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def task(self, name: str) -> Task:
        return next(t for t in self.tasks if t.name == name)

    @staticmethod
    def load(path: str | Path) -> "DatasetSpec":
        return load_yaml(path, DatasetSpec)


# ----------------------------------------------------------------------------- training config


@dataclass
class ModelConfig:
    name: str = "ple"  # single_task | shared_bottom | omoe | mmoe | ple | esmm | aitm
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
    dependent_loss: str = "esmm"
    aitm_constraint_weight: float = 0.6  # AITM's label-constraint loss weight (the paper's alpha)
    embedding_dim: Optional[int] = None  # overrides every table's dim from the spec (a Tune knob)


PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class TrainConfig:
    # one pass is usually best for id-embedding CTR models: a second epoch over the same impressions
    # overfits the embeddings (the "one-epoch phenomenon"; we see valid AUC drop ~2 points on epoch 2)
    epochs: int = 1
    batch_size: int = 2048
    lr: float = 2e-3
    weight_decay: float = 0.0
    loss_weights: dict[str, float] = field(default_factory=dict)  # task -> weight (default 1)
    # fixed | uncertainty (Kendall et al. 2018) | gradnorm (Chen et al. 2018) | decay (PLE: w0 * gamma^epoch)
    loss_weighting: str = "fixed"
    loss_weight_decay: dict[str, float] = field(default_factory=dict)  # decay: task -> gamma (default 1)
    gradnorm_alpha: float = 1.5
    gradnorm_lr: float = 0.025
    patience: int = 1  # early stopping: epochs without validation improvement
    # the validation objective for early stopping, model selection and Tune: mean_auc, min_auc, or
    # weighted_auc (the tasks' AUCs weighted by objective_weights, default 1 each)
    early_stop_metric: str = "mean_auc"
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
    precision: str = "auto"  # auto (bf16 autocast where the GPU or CPU has native bf16, else fp32) | fp32 | bf16
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
        if self.precision not in PRECISIONS:
            raise ConfigError(f"train.precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.early_stop_metric not in ("mean_auc", "min_auc", "weighted_auc"):
            raise ConfigError(f"train.early_stop_metric must be mean_auc, min_auc or weighted_auc, got {self.early_stop_metric!r}")


@dataclass
class DataPaths:
    path: str = ""  # directory or URI holding train/ valid/ test/ sub-directories of Parquet files
    spec: str = ""  # dataset spec YAML
    # rows with a null, a label outside {0, 1}, a conversion without its click, a NaN/inf dense value or a
    # negative / out-of-range id: "fail" refuses the data (file, column, count); "drop" leaves those rows
    # out of training and evaluation and reports the counts per split, column and reason
    on_bad_rows: str = "fail"

    def __post_init__(self) -> None:
        self.path, self.spec = os.path.expanduser(self.path), os.path.expanduser(self.spec)  # ~/ as a shell would
        if self.on_bad_rows not in ("fail", "drop"):
            raise ConfigError(f"data.on_bad_rows must be fail or drop, got {self.on_bad_rows!r}")


@dataclass
class JobConfig:
    data: DataPaths = field(default_factory=DataPaths)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    name: str = "ple"  # run name: rerunning with the same name resumes from its latest checkpoint
    storage_path: str = ""  # checkpoints and results (local dir or s3://); default <output>/ray_results
    output: str = "outputs/ple"

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
