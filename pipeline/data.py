"""Ray Data ingest: Parquet splits -> preprocessing fit on train -> model-ready tensor batches.

The data path is one straight line: a Parquet read per piece of row groups (column selection, piece order
shuffled per epoch for train) -> ``map_batches(Preprocessor.transform)`` fused into the read task (train: rows
permuted within windows of each block) -> streaming split across Train workers -> ``tensor_batches``. Nothing
is materialised: each epoch re-streams the files.

A transformed block holds one column per feature, encoded by its feature class (``pipeline.features``):
    <id feature>       int32         table-local index, 0 = out of vocabulary (int32: half the bytes of int64
                                     through the Data path; every table has far fewer than 2**31 rows)
    <id list feature>  list<int32>   the most recent ``max_len`` ids, no padding (the jagged layout)
    <dense feature>    float32       normalised
    <label column>     float32       (and the oracle columns, float32, on evaluation splits of synthetic data)
    _keep              bool          only under ``on_bad_rows: drop``: False for a bad row, which the worker
                                     counts as read and leaves out of training and evaluation
A worker's ``Collate`` wraps a batch of those rows into one ``KeyedJaggedTensor`` of all id features plus
dense, label and oracle tensors.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray.data
from ray.data.collate_fn import ArrowBatchCollateFn

from pipeline.config import DatasetSpec, TrainConfig
from pipeline.encoding import IDS, FeatureEncoder
from pipeline.ray_compat import ExecutionCallback, executor_progress
from pipeline.features import as_floats
from pipeline.validate import TASK_OPTIONS, Piece, bad_row_masks, cluster_cpus, parquet_pieces, split_files

KEEP = "_keep"  # the column marking a row good under on_bad_rows: drop


@dataclass
class Preprocessor(FeatureEncoder):
    """State fit on the train split: each vocabulary table's values by descending frequency, and the
    dense features' mean/std (the encoding itself: ``pipeline.encoding.FeatureEncoder``). Plain tensors and
    lists, so it saves with ``torch.save`` and loads with ``torch.load(weights_only=True)``."""

    train_rows: int = 0
    drop_bad_rows: bool = False  # on_bad_rows: drop (a job setting, not saved with the state)

    # ------------------------------------------------------------------ fit

    @staticmethod
    def fit(path: str, spec: DatasetSpec, drop_bad_rows: bool = False) -> "Preprocessor":
        """Fit on the train split of ``path`` in one pass of Ray tasks, one per piece of row groups
        (``fit_piece``). Each task counts its pieces' vocabulary values, hash-partitioned into as many parts as
        the cluster has CPUs, and sums its dense values and their squares. One task per (table, part) reduces
        that part's counts over all pieces to its top ``num_rows - 1`` values (``top_counts``); the driver
        merges those lists, which is exact because a value lives in one part, and adds up the moments. So the
        driver never holds the log's rows or its full value counts, only the vocabularies kept."""
        fs, files = split_files(path, "train")
        parts = cluster_cpus()
        tables = sorted(n for n, t in spec.tables.items() if t.encoding == "vocab")
        fit = ray.remote(fit_piece).options(**TASK_OPTIONS, num_returns=1 + len(tables) * parts)
        outs = [fit.remote(fs, piece, spec, tables, parts, drop_bad_rows)
                for piece in parquet_pieces(fs, files, min_pieces=parts)]
        outs = [o if isinstance(o, list) else [o] for o in outs]
        reduce = ray.remote(top_counts).options(**TASK_OPTIONS)
        tops = {t: [reduce.remote(spec.tables[t].num_rows - 1, *[o[1 + i * parts + r] for o in outs]) for r in range(parts)]
                for i, t in enumerate(tables)}
        moments = ray.get([o[0] for o in outs])  # (rows, dense sums, dense sums of squares) per piece
        rows = sum(m[0] for m in moments)
        if rows == 0:
            raise ValueError(f"cannot fit preprocessing: the train split of {path} has no rows")
        vocab = {t: top_counts(spec.tables[t].num_rows - 1, *ray.get(refs))["value"].combine_chunks()
                 for t, refs in tops.items()}
        mean = sum(m[1] for m in moments) / rows
        std = np.sqrt(np.maximum(sum(m[2] for m in moments) / rows - mean**2, 0.0))
        return Preprocessor(spec, vocab, mean.astype(np.float32), np.where(std > 1e-12, std, 1.0).astype(np.float32), rows,
                            drop_bad_rows)

    # ------------------------------------------------------------------ transform

    def transform(self, batch: pa.Table) -> pa.Table:
        """Raw rows -> model-ready rows: each feature encoded by its class, labels and oracle as float32."""
        spec, n = self.spec, batch.num_rows
        out = self.encode_features(batch)
        for c in spec.label_columns:
            out[c] = pa.array(as_floats(batch[c]).astype(np.float32))
        if spec.oracle and all(c in batch.column_names for c in spec.oracle.values()):
            out |= {c: pa.array(batch[c].to_numpy(zero_copy_only=False).astype(np.float32)) for c in spec.oracle.values()}
        if self.drop_bad_rows:  # bad values above are encoded harmlessly; their rows are never used
            masks = bad_row_masks(batch, spec)
            out[KEEP] = pa.array(~np.logical_or.reduce([m for *_, m in masks]) if masks else np.ones(n, bool))
        return pa.table(out)

    # ------------------------------------------------------------------ save / load

    def state_dict(self) -> dict[str, Any]:
        import torch  # here, not at the top: the Data tasks that run transform() need no torch (0.75 s to import)

        return {
            "vocab": {k: (torch.from_numpy(v.to_numpy(zero_copy_only=False).astype(np.int64))
                          if pa.types.is_integer(v.type) else v.to_pylist()) for k, v in self.vocab.items()},
            "dense_mean": torch.from_numpy(self.dense_mean),
            "dense_std": torch.from_numpy(self.dense_std),
            "train_rows": self.train_rows,
        }

    @staticmethod
    def load(f, spec: DatasetSpec, drop_bad_rows: bool = False) -> "Preprocessor":
        """From a saved fit (``fit_or_load_preprocessor``'s file, a checkpoint's copy): a path or a file object."""
        import torch

        return Preprocessor.from_state_dict(torch.load(f, weights_only=True)["state"], spec, drop_bad_rows)

    @staticmethod
    def from_state_dict(state: dict[str, Any], spec: DatasetSpec, drop_bad_rows: bool = False) -> "Preprocessor":
        import torch

        vocab = {k: pa.array(v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in state["vocab"].items()}
        return Preprocessor(spec, vocab, state["dense_mean"].numpy(), state["dense_std"].numpy(), state["train_rows"],
                            drop_bad_rows)


def fit_piece(fs: pafs.FileSystem, piece: Piece, spec: DatasetSpec, tables: list[str], parts: int,
              drop_bad_rows: bool) -> list:
    """One fit task: [(rows, dense sums, dense sums of squares)] + for each vocabulary table in ``tables``,
    ``parts`` tables of (value, count), the piece's value counts partitioned by the values' hash. Under
    ``drop_bad_rows`` the bad rows are left out, as training leaves them out."""
    columns = (spec.feature_columns + spec.label_columns if drop_bad_rows else
               [f.name for f in spec.id_features if f.table_name in tables] + [d.name for d in spec.dense])
    batch = pq.ParquetFile(fs.open_input_file(piece.path)).read_row_groups(list(piece.row_groups),
                                                                           columns=list(dict.fromkeys(columns)))
    if drop_bad_rows and (masks := bad_row_masks(batch, spec)):
        batch = batch.filter(pa.array(~np.logical_or.reduce([m for *_, m in masks])))
    out: list = []
    for t in tables:
        ids = [f.raw_ids(batch[f.name].combine_chunks()) for f in spec.id_features if f.table_name == t]
        vc = pc.value_counts(pa.concat_arrays(ids) if len(ids) > 1 else ids[0])
        values, counts = vc.field("values"), vc.field("counts")
        raw = values.to_numpy(zero_copy_only=False)
        part = pd.util.hash_array(raw.astype(object) if raw.dtype.kind in "OU" else raw) % np.uint64(parts)
        out += [pa.table({"value": values.filter(pa.array(part == r)), "count": counts.filter(pa.array(part == r))})
                for r in range(parts)]
    dense = np.stack([d.values(batch[d.name]) for d in spec.dense]) if spec.dense else np.zeros((0, batch.num_rows))
    out.insert(0, (batch.num_rows, dense.sum(axis=1, dtype=np.float64), np.square(dense, dtype=np.float64).sum(axis=1)))
    return out if len(out) > 1 else out[0]


def top_counts(k: int, *parts: pa.Table) -> pa.Table:
    """The ``k`` most frequent values of the (value, count) tables, summed per value; ties by value."""
    merged = pa.concat_tables(parts, promote_options="permissive").group_by("value").aggregate([("count", "sum")])
    merged = merged.rename_columns(["value", "count"])
    return merged.sort_by([("count", "descending"), ("value", "ascending")]).slice(0, k)


def read_pieces(batch: pa.Table, fs: pafs.FileSystem, columns: list[str]) -> pa.Table:
    """A read task: the ``columns`` of the block's pieces (a block holds one), read with pyarrow."""
    return pa.concat_tables([pq.ParquetFile(fs.open_input_file(path)).read_row_groups(list(groups), columns=columns)
                             for path, groups in zip(batch["path"].to_pylist(), batch["row_groups"].to_pylist())])


def read_split(path: str, split: str, spec: DatasetSpec, shuffle_files: bool = False,
               workers: int = 1) -> ray.data.Dataset:
    """The raw columns the spec needs (plus oracle columns on evaluation splits), streamed from Parquet: one
    read task per piece of row groups (``parquet_pieces``), in a new random order every execution (every
    epoch) with ``shuffle_files``. Ray's ``read_parquet`` splits a read only between files (one task and
    block per file here: its default of >= 200 small blocks cost more to pass on than the read itself, 1M rows
    1.6 s -> 0.6 s), so a one-file split went to one worker. ``workers``: the split's consumers."""
    fs, files = split_files(path, split)
    columns = spec.feature_columns + spec.label_columns
    if split != "train":
        columns += list(spec.oracle.values())
    pieces = parquet_pieces(fs, files, min_pieces=2 * workers)
    if len(pieces) < workers:
        warnings.warn(f"{path}: split {split!r} is {len(files)} file(s) of {len(pieces)} row group(s) in all, fewer than "
                      f"its {workers} workers: some stay idle. Write it in more row groups (jobs/convert.py "
                      "does) or files.", stacklevel=2)
    ds = ray.data.from_items([{"path": p.path, "row_groups": list(p.row_groups)} for p in pieces],
                             override_num_blocks=len(pieces))
    if shuffle_files:
        ds = ds.randomize_block_order()  # unseeded: a new order each time the dataset executes
    return ds.map_batches(read_pieces, fn_kwargs={"fs": fs, "columns": columns}, batch_format="pyarrow",
                          batch_size=None)


def build_datasets(path: str, spec: DatasetSpec, preprocessor: Preprocessor, splits=("train", "valid", "test"),
                   shuffle_window: int = TrainConfig.shuffle_window, workers: int = 1) -> dict[str, ray.data.Dataset]:
    """Model-ready datasets per split. Train files are read in a new random order every epoch and the rows
    of every ``shuffle_window`` rows of a read block are permuted, by the Data tasks. Each split is read in at
    least ``2 * workers`` pieces where its row groups allow (``parquet_pieces``).

    The preprocessing takes whole read blocks (``batch_size=None``: a piece each, or Ray's target block size of
    a larger piece), so Ray fuses it into the read task: one task reads and preprocesses a piece. A batch size
    stops that fusion (Ray cannot tell how many rows a read yields), which cost ingest 25 % here: every block
    went through the object store between two tasks (bench/results/ingest.md)."""
    shared = ray.put(preprocessor)  # once: every Data task fetches it from the object store, once per process
    out = {}
    for split in splits:
        window = shuffle_window if split == "train" else 0
        out[split] = read_split(path, split, spec, shuffle_files=(split == "train"), workers=workers).map_batches(
            Preprocess(shared, window), batch_format="pyarrow", batch_size=None)
    return out


def tensor_batches(ds, spec: DatasetSpec, batch_size: int, device: "torch.device | None" = None, pad: bool = True,
                   **kwargs):
    """A worker's batches (``Collate``), each padded to ``batch_size`` rows (``pad``), built in the iterator's
    own (prefetch) thread. Ray's default collate hands the columns to a pool of 4 threads: over a materialised
    1M-row split here, ~6k more context switches and 0.1 s more CPU, wake-ups that preempt a training worker's
    compute threads on a small machine."""
    collate = Collate(spec, batch_size if pad else None)
    batches = ds.iter_torch_batches(batch_size=batch_size, collate_fn=collate, **kwargs)
    if device is None or device.type == "cpu":
        return batches
    return (to_device(b, device) for b in batches)


def to_device(batch: dict, device: "torch.device") -> dict:
    return {k: v.to(device, non_blocking=True) if hasattr(v, "to") else v for k, v in batch.items()}


class Collate(ArrowBatchCollateFn):
    """A worker's batch from preprocessed rows: ``ids``, one ``KeyedJaggedTensor`` of every id feature (keys
    ``spec.id_keys``: the features' encoded values and lengths, concatenated), ``dense`` [B, D], ``labels``
    [B, T] and, where the split has them, ``oracle`` [B, T]; ``rows``, how many rows are real, and
    ``rows_read``, how many the batch read (under ``on_bad_rows: drop`` the bad ones are left out here).

    With ``pad_to``, a batch is padded to that many rows with empty ones (no ids, zero dense values and
    labels), which the loop leaves out of losses and metrics. Every worker then steps with the same batch
    size, as sharded tables need: row-wise sharding's backward all-gathers the pooled gradients, which gloo
    takes only in equal parts, and a worker whose shard has run out steps on an all-empty batch (``empty``)."""

    def __init__(self, spec: DatasetSpec, pad_to: int | None = None) -> None:
        self.spec, self.pad_to = spec, pad_to
        self.id_features = [spec.feature(k) for k in spec.id_keys]
        self.oracle = [spec.oracle.get(t) for t in spec.task_names]

    def __call__(self, table: pa.Table) -> dict:
        import torch
        from torchrec import KeyedJaggedTensor

        read = table.num_rows
        if KEEP in table.column_names:
            table = table.filter(table[KEEP])
        n = table.num_rows
        rows = max(n, self.pad_to or 0)
        values, lengths = [], []
        for f in self.id_features:
            v, length = f.jagged(table[f.name].combine_chunks())
            values.append(v)
            lengths += [length, np.zeros(rows - n, np.int32)]
        ids = KeyedJaggedTensor(keys=self.spec.id_keys, values=torch.from_numpy(np.concatenate(values).astype(np.int64)),
                                lengths=torch.from_numpy(np.concatenate(lengths)))
        out = {"ids": ids, "dense": self._stack([d.name for d in self.spec.dense], table, rows),
               "labels": self._stack(self.spec.label_columns, table, rows), "rows": n, "rows_read": read}
        if self.spec.oracle and all(c in table.column_names for c in self.spec.oracle.values()):
            out["oracle"] = self._stack(self.oracle, table, rows)
        return out

    def empty(self) -> dict:
        """A batch of ``pad_to`` empty rows: what a worker whose shard has run out steps on."""
        return self(empty_rows(self.spec))

    @staticmethod
    def _stack(columns: list, table: pa.Table, rows: int) -> "torch.Tensor":
        import torch

        out = np.zeros((rows, len(columns)), np.float32)
        for j, c in enumerate(columns):
            out[:table.num_rows, j] = table[c].to_numpy() if c is not None else np.nan
        return torch.from_numpy(out)


def empty_rows(spec: DatasetSpec, rows: int = 0) -> pa.Table:
    """``rows`` preprocessed rows of out-of-vocabulary ids, empty id lists, zero dense values and labels."""
    kinds = {"id": pa.array(np.zeros(rows, IDS)), "dense": pa.array(np.zeros(rows, np.float32)),
             "id_list": pa.ListArray.from_arrays(pa.array(np.zeros(rows + 1, np.int32)), pa.array([], pa.int32()))}
    return pa.table({f.name: kinds[f.kind] for f in spec.features}
                    | {c: pa.array(np.zeros(rows, np.float32)) for c in spec.label_columns})


_FETCHED: dict[str, Preprocessor] = {}  # object id -> its preprocessor, fetched once in this process
_FETCHED_MAX = 4  # the latest few (Tune trials share the worker processes, each with its own object)


def _fetched(preprocessor: "Preprocessor | ray.ObjectRef") -> Preprocessor:
    if not isinstance(preprocessor, ray.ObjectRef):
        return preprocessor
    key = preprocessor.hex()
    if key not in _FETCHED:
        while len(_FETCHED) >= _FETCHED_MAX:
            del _FETCHED[next(iter(_FETCHED))]  # the oldest
        _FETCHED[key] = ray.get(preprocessor)
    return _FETCHED[key]


class Preprocess:
    """A Data task's preprocessing: ``Preprocessor.transform``, then (``window`` > 0) a random permutation of
    the rows within every ``window`` rows of the block, the within-file part of the per-epoch shuffle. (Ray's
    local shuffle buffer does that on the training worker, where it cost 13 % of PLE's training throughput on
    2 cores; docs/NOTES.md.)

    Given an object store reference, it fetches and deserialises the state (the vocabularies) once per process
    and keeps its integer lookups there, instead of once per task as a state carried in the task's function
    is."""

    def __init__(self, preprocessor: "Preprocessor | ray.ObjectRef", window: int = 0) -> None:
        self.preprocessor, self.window = preprocessor, window

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = _fetched(self.preprocessor).transform(batch)
        if self.window <= 0:
            return out
        rng = np.random.default_rng()  # fresh entropy: a new order every epoch
        order = np.arange(batch.num_rows)
        for start in range(0, batch.num_rows, self.window):
            rng.shuffle(order[start:start + self.window])  # in place, through the view
        return out.take(order)


class BackpressureBackoff(ExecutionCallback):
    """Ray Data 2.60's streaming executor waits for its running tasks between scheduling steps (``ray.wait``
    on all of them, up to 0.1 s). Held back by a full output buffer (a split's ``data_buffer_mb``), it neither
    launches tasks nor reads the blocks a task has ready, so that wait returns at once and the loop spins. It
    then took 0.8 of a core in the split coordinator actor for as long as the rest of the log did not fit in
    the buffer: the first half of a 3M-row epoch, where a 1-worker PLE trained at 45-47k samples/s instead
    of 71-76k (docs/NOTES.md). This sleeps 10 ms after a step in which no operator received, produced or
    handed on a block or started or finished a task, so a full buffer is polled a hundred times a second."""

    def __init__(self) -> None:
        self.last: tuple | None = None

    def on_execution_step(self, executor) -> None:
        progress = executor_progress(executor)
        if progress and progress == self.last:
            time.sleep(0.01)
        self.last = progress
