"""Ray Data ingest: Parquet splits -> preprocessing fit on train -> model-ready tensor batches.

The data path is one straight line: ``read_parquet`` (column selection, file order shuffled per epoch for
train) -> ``map_batches(Preprocessor.transform)`` fused into the read task (train: rows permuted within
windows of each block) -> streaming split across Train workers -> ``tensor_batches``. Nothing is
materialised: each epoch re-streams the files.

A transformed batch holds four packed arrays instead of one column per feature, so a worker converts
a handful of tensors per batch:
    sparse [B, F] int32   table-local indices, 0 = out of vocabulary (int32: half the bytes of int64
                           through the Data path; every table has far fewer than 2**31 rows)
    seq    [B, S, L] int32 most recent L ids of each sequence feature, 0 = padding
    dense  [B, D] float32  normalised
    labels [B, T] float32  (and oracle [B, T] float32 on evaluation splits of synthetic data)
    keep   [B] bool        only under ``on_bad_rows: drop``: False for a bad row, which the worker counts
                           as read and leaves out of training and evaluation
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import ray.data
from ray.data._internal.execution.execution_callback import ExecutionCallback
from ray.data.collate_fn import DefaultCollateFn

from pipeline.config import DatasetSpec, TrainConfig
from pipeline.validate import as_floats, bad_row_masks, split_files

FIT_BATCH_ROWS = 65_536
IDS = np.int32  # encoded ids
_REDUCE_EVERY = 2_000_000  # merge partial value counts once this many (value, count) pairs pile up


@dataclass
class Preprocessor:
    """State fit on the train split: each vocabulary table's values by descending frequency, and the
    dense features' mean/std. Plain tensors and lists, so it saves with ``torch.save`` and loads with
    ``torch.load(weights_only=True)``."""

    spec: DatasetSpec
    vocab: dict[str, pa.Array] = field(default_factory=dict)  # table -> values; value i -> index i + 1
    dense_mean: np.ndarray = None
    dense_std: np.ndarray = None
    train_rows: int = 0
    drop_bad_rows: bool = False  # on_bad_rows: drop (a job setting, not saved with the state)
    # integer vocabularies as lookup structures, built once per process (derived, never saved)
    _lookup: dict[str, tuple] = field(default_factory=dict, repr=False, compare=False)

    # ------------------------------------------------------------------ fit

    @staticmethod
    def fit(train: ray.data.Dataset, spec: DatasetSpec, drop_bad_rows: bool = False) -> "Preprocessor":
        vocab_tables = {n for n, t in spec.tables.items() if t.encoding == "vocab"}
        counts: dict[str, list[pa.Table]] = {t: [] for t in vocab_tables}
        pending = dict.fromkeys(vocab_tables, 0)
        dense_sum = np.zeros(len(spec.dense))
        dense_sq = np.zeros(len(spec.dense))
        rows = 0
        for batch in train.iter_batches(batch_size=FIT_BATCH_ROWS, batch_format="pyarrow"):
            if drop_bad_rows and (masks := bad_row_masks(batch, spec)):  # fit on the rows that will train
                batch = batch.filter(pa.array(~np.logical_or.reduce([m for *_, m in masks])))
            rows += batch.num_rows
            for f in [*spec.sparse, *spec.sequences]:
                if f.table_name not in vocab_tables:
                    continue
                col = batch[f.name].combine_chunks()
                if isinstance(col.type, (pa.ListType, pa.LargeListType)):
                    col = col.flatten()
                vc = pc.value_counts(col)
                counts[f.table_name].append(pa.table({"value": vc.field("values"), "count": vc.field("counts")}))
                pending[f.table_name] += len(vc)
                if pending[f.table_name] > _REDUCE_EVERY:
                    counts[f.table_name] = [_merge_counts(counts[f.table_name])]
                    pending[f.table_name] = len(counts[f.table_name][0])
            for j, d in enumerate(spec.dense):
                v = _dense_values(batch[d.name], d.normalize)
                dense_sum[j] += v.sum()
                dense_sq[j] += np.square(v).sum()
        if rows == 0:
            raise ValueError("cannot fit preprocessing: the train split has no rows")
        vocab = {}
        for name, parts in counts.items():
            merged = _merge_counts(parts).sort_by([("count", "descending"), ("value", "ascending")])
            vocab[name] = merged["value"].combine_chunks()[: spec.tables[name].num_rows - 1]
        mean = dense_sum / rows
        std = np.sqrt(np.maximum(dense_sq / rows - mean**2, 0.0))
        return Preprocessor(spec, vocab, mean.astype(np.float32), np.where(std > 1e-12, std, 1.0).astype(np.float32), rows,
                            drop_bad_rows)

    # ------------------------------------------------------------------ transform

    def transform(self, batch: pa.Table) -> dict[str, np.ndarray]:
        spec, n = self.spec, batch.num_rows
        out = zeros_batch(spec, n)  # the layout; ids and padding filled in place below
        if self.drop_bad_rows:  # bad values below are encoded harmlessly; their rows are never used
            masks = bad_row_masks(batch, spec)
            out["keep"] = ~np.logical_or.reduce([m for *_, m in masks]) if masks else np.ones(n, bool)
        for j, f in enumerate(spec.sparse):
            out["sparse"][:, j] = self._encode(batch[f.name].combine_chunks(), f.table_name)
        for j, s in enumerate(spec.sequences):
            out["seq"][:, j, : s.max_len] = self._encode_sequence(batch[s.name].combine_chunks(), s)
        if spec.dense:
            dense = np.stack([_dense_values(batch[d.name], d.normalize) for d in spec.dense], axis=1)
            out["dense"] = ((dense - self.dense_mean) / self.dense_std).astype(np.float32)
        out["labels"] = np.stack([as_floats(batch[c]) for c in spec.label_columns], axis=1).astype(np.float32)
        if spec.oracle and all(c in batch.column_names for c in spec.oracle.values()):
            out["oracle"] = np.stack([
                batch[spec.oracle[t]].to_numpy(zero_copy_only=False).astype(np.float32)
                if t in spec.oracle else np.full(n, np.nan, np.float32) for t in spec.task_names], axis=1)
        return out

    def _encode(self, values: pa.Array, table: str) -> np.ndarray:
        """Raw ids -> table-local indices in [0, num_rows); 0 is the out-of-vocabulary row."""
        t = self.spec.tables[table]
        if values.null_count:  # only a row that is dropped has one
            values = values.fill_null(pa.scalar("" if pa.types.is_string(values.type) else 0, values.type))
        if t.encoding == "identity":
            ids = values.to_numpy(zero_copy_only=False).astype(np.int64)
            return np.where((ids >= 0) & (ids < t.num_ids), ids + 1, 0).astype(IDS)
        if t.encoding == "hash":
            raw = values.to_numpy(zero_copy_only=False)
            return ((pd.util.hash_array(raw.astype(object) if raw.dtype.kind in "OU" else raw)
                     % np.uint64(t.num_rows - 1)) + 1).astype(IDS)
        vocab = self.vocab[table]
        if pa.types.is_integer(values.type) and pa.types.is_integer(vocab.type) and len(vocab):
            # integer ids: a lookup table over the vocabulary's id range when that range is compact (one
            # indexing op), else a binary search in the sorted vocabulary. pc.index_in would hash the whole
            # vocabulary again on every batch.
            if table not in self._lookup:
                self._lookup[table] = _int_lookup(vocab.to_numpy().astype(np.int64))
            lo, lut, keys, rows = self._lookup[table]
            ids = values.to_numpy(zero_copy_only=False).astype(np.int64)
            if lut is not None:
                codes = lut[np.clip(ids - lo, 0, len(lut) - 1)]
                return np.where((ids >= lo) & (ids < lo + len(lut)), codes, 0).astype(IDS)
            pos = np.searchsorted(keys, ids).clip(max=len(keys) - 1)
            return np.where(keys[pos] == ids, rows[pos], 0).astype(IDS)
        if vocab.type != values.type:
            vocab = vocab.cast(values.type)
        return (pc.index_in(values, value_set=vocab).fill_null(-1).to_numpy() + 1).astype(IDS)

    def _encode_sequence(self, values: pa.Array, s) -> np.ndarray:
        """Keep the last ``max_len`` entries of each list (the most recent), right-padded with 0."""
        offsets = values.offsets.to_numpy()
        flat = values.values.slice(offsets[0], offsets[-1] - offsets[0])
        offsets = offsets - offsets[0]
        codes = self._encode(flat, s.table_name)
        n, max_len = len(values), s.max_len
        keep = np.minimum(np.diff(offsets), max_len)
        rows = np.repeat(np.arange(n), keep)
        cols = np.arange(keep.sum()) - np.repeat(np.cumsum(keep) - keep, keep)
        src = np.repeat(offsets[1:] - keep, keep) + cols
        out = np.zeros((n, max_len), dtype=IDS)
        out[rows, cols] = codes[src]
        return out

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
    def from_state_dict(state: dict[str, Any], spec: DatasetSpec, drop_bad_rows: bool = False) -> "Preprocessor":
        import torch

        vocab = {k: pa.array(v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in state["vocab"].items()}
        return Preprocessor(spec, vocab, state["dense_mean"].numpy(), state["dense_std"].numpy(), state["train_rows"],
                            drop_bad_rows)


def _int_lookup(values: np.ndarray) -> tuple:
    """(lowest id, table id - lowest -> row or None, sorted ids, their rows) for an integer vocabulary whose
    value i is row i + 1. The table is built when the id range is at most 16x the vocabulary (+64k)."""
    lo, hi = int(values.min()), int(values.max())
    rows = np.arange(1, len(values) + 1, dtype=IDS)
    if hi - lo + 1 <= 16 * len(values) + 65_536:
        lut = np.zeros(hi - lo + 1, IDS)
        lut[values - lo] = rows
        return lo, lut, None, None
    order = np.argsort(values, kind="stable")
    return lo, None, values[order], rows[order]


def zeros_batch(spec: DatasetSpec, rows: int) -> dict[str, np.ndarray]:
    """A batch of all-zero rows (out-of-vocabulary ids, mean dense values) in ``Preprocessor.transform``'s layout."""
    out = {"sparse": np.zeros((rows, len(spec.sparse)), dtype=IDS)}
    if spec.sequences:
        out["seq"] = np.zeros((rows, len(spec.sequences), max(s.max_len for s in spec.sequences)), dtype=IDS)
    if spec.dense:
        out["dense"] = np.zeros((rows, len(spec.dense)), dtype=np.float32)
    out["labels"] = np.zeros((rows, len(spec.label_columns)), dtype=np.float32)
    return out


def without_bad_rows(batch: dict[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
    """A worker's batch without the rows the preprocessing marked bad (on_bad_rows: drop)."""
    keep = batch["keep"]
    return {k: v[keep] for k, v in batch.items() if k != "keep"}


def _merge_counts(parts: list[pa.Table]) -> pa.Table:
    merged = pa.concat_tables(parts).group_by("value").aggregate([("count", "sum")])
    return merged.rename_columns(["value", "count"])


def _dense_values(column: pa.ChunkedArray, normalize: str) -> np.ndarray:
    v = as_floats(column)
    return np.log1p(v, where=v >= 0, out=np.full_like(v, np.nan)) if normalize == "log_standard" else v


def read_split(path: str, split: str, spec: DatasetSpec, shuffle_files: bool = False) -> ray.data.Dataset:
    """The raw columns the spec needs (plus oracle columns on evaluation splits), streamed from Parquet."""
    fs, files = split_files(path, split)
    columns = spec.feature_columns + spec.label_columns
    if split != "train":
        columns += list(spec.oracle.values())
    # one read task and block per file: by default Ray cuts the read into >= 200 blocks (50 per file of the
    # default log), and the small blocks cost more to pass on than the read itself (1M rows: 1.6 s -> 0.6 s)
    ds = ray.data.read_parquet(files, filesystem=fs, shuffle="files" if shuffle_files else None,
                               override_num_blocks=len(files))
    return ds.select_columns(columns)  # pushed down into the Parquet reader


def build_datasets(path: str, spec: DatasetSpec, preprocessor: Preprocessor, splits=("train", "valid", "test"),
                   shuffle_window: int = TrainConfig.shuffle_window) -> dict[str, ray.data.Dataset]:
    """Model-ready datasets per split. Train files are read in a new random order every epoch and the rows
    of every ``shuffle_window`` rows of a read block are permuted, by the Data tasks.

    The preprocessing takes whole read blocks (``batch_size=None``: a file each, or Ray's target block size of
    a larger file), so Ray fuses it into the read task: one task reads and preprocesses a file. A batch size
    stops that fusion (Ray cannot tell how many rows a read yields), which cost ingest 25 % here: every block
    went through the object store between two tasks (bench/results/ingest.md)."""
    out = {}
    for split in splits:
        train = split == "train" and shuffle_window > 0
        out[split] = read_split(path, split, spec, shuffle_files=(split == "train")).map_batches(
            PermutedTransform(preprocessor, shuffle_window) if train else preprocessor.transform,
            batch_format="pyarrow", batch_size=None)
    return out


def tensor_batches(ds, batch_size: int, device: "torch.device | None" = None, **kwargs):
    """``iter_torch_batches`` with each batch's columns converted to tensors in the iterator's own (prefetch)
    thread. Ray's default collate hands them to a pool of 4 threads: over a materialised 1M-row split here,
    ~6k more context switches and 0.1 s more CPU (3.7M -> 5.8M rows/s), wake-ups that preempt a training
    worker's compute threads on a small machine."""
    cuda = device is not None and device.type == "cuda"
    # as Ray's default: chunked columns are combined on the host for CPU, and on the way to a GPU
    return ds.iter_torch_batches(batch_size=batch_size, device=device or "auto", pin_memory=cuda,
                                 collate_fn=DefaultCollateFn(combine_chunks=not cuda, num_workers=0), **kwargs)


class PermutedTransform:
    """The preprocessing, then a random permutation of the rows within every ``window`` rows of the block:
    the within-file part of the per-epoch shuffle, done by the Data tasks. (Ray's local shuffle buffer does
    it on the training worker, where it cost 13 % of PLE's training throughput on 2 cores; docs/NOTES.md.)"""

    def __init__(self, preprocessor: Preprocessor, window: int) -> None:
        self.preprocessor, self.window = preprocessor, window

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        out = self.preprocessor.transform(batch)
        rng = np.random.default_rng()  # fresh entropy: a new order every epoch
        order = np.arange(batch.num_rows)
        for start in range(0, batch.num_rows, self.window):
            rng.shuffle(order[start:start + self.window])  # in place, through the view
        return {k: v[order] for k, v in out.items()}


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
        ops = list(getattr(executor, "_topology", None) or {})
        progress = tuple((op.metrics.num_inputs_received, op.metrics.num_task_outputs_generated,
                          op.metrics.num_outputs_taken, op.num_active_tasks()) for op in ops)
        if ops and progress == self.last:
            time.sleep(0.01)
        self.last = progress
