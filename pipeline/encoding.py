"""Raw feature columns -> model inputs, from a fit preprocessing state. Ray-free and torch-free: the Ray Data
preprocessing tasks (``pipeline.data.Preprocessor``, which adds the fit and the labels) and the serving loader
(``pipeline.serving``) encode with this one class, so training and serving cannot drift apart.

Each id table encodes as its spec says (``EmbeddingTable.encoding``):
    vocab     the train split's most frequent values, by descending count: value i -> row i + 1
    hash      ``pandas.util.hash_array`` of the raw value (strings as objects) modulo (num_rows - 1), plus 1
    identity  raw id i in [0, num_rows - 1) -> row i + 1
and row 0 is the out-of-vocabulary row (an unseen, or out-of-range, id). A dense feature is standardised with
the train split's mean and std (of ``log1p`` under ``normalize: log_standard``).

The portable form (``save``/``load``, what ``jobs/export.py`` writes) is a directory:
    preprocessing.json   {"format": "mtrec-preprocessing/1", "tables": {table: {"encoding", "num_rows",
                          "vocab_file"}}, "dense": [{"name", "normalize", "mean", "std"}],
                          "sequences": {feature: max_len}, "train_rows"}
    vocab/<table>.parquet  one column ``value``: row i + 1 is value i (vocab tables only)
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.features import DatasetSpec

IDS = np.int32  # encoded ids
FORMAT = "mtrec-preprocessing/1"


@dataclass
class FeatureEncoder:
    spec: DatasetSpec
    vocab: dict[str, pa.Array] = field(default_factory=dict)  # table -> values; value i -> index i + 1
    dense_mean: np.ndarray = None
    dense_std: np.ndarray = None
    # integer vocabularies as lookup structures, built once per process (derived, never saved)
    _lookup: dict[str, tuple] = field(default_factory=dict, init=False, repr=False, compare=False)

    def encode_features(self, batch: pa.Table) -> dict[str, pa.Array]:
        """Every feature column of ``batch``, encoded by its feature class."""
        out = {f.name: f.encode(batch[f.name].combine_chunks(), self.encode_ids) for f in self.spec.id_features}
        for j, d in enumerate(self.spec.dense):
            out[d.name] = d.encode(batch[d.name], self.dense_mean[j], self.dense_std[j])
        return out

    def encode_ids(self, values: pa.Array, table: str) -> np.ndarray:
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
                self._lookup[table] = int_lookup(vocab.to_numpy().astype(np.int64))
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

    # ------------------------------------------------------------------ the portable form

    def save(self, directory: str | Path, train_rows: int = 0) -> None:
        directory = Path(directory)
        (directory / "vocab").mkdir(parents=True, exist_ok=True)
        tables = {}
        for name, t in sorted(self.spec.tables.items()):
            tables[name] = {"encoding": t.encoding, "num_rows": t.num_rows}
            if t.encoding == "vocab":
                pq.write_table(pa.table({"value": self.vocab[name]}), directory / "vocab" / f"{name}.parquet")
                tables[name]["vocab_file"] = f"vocab/{name}.parquet"
        state = {"format": FORMAT, "tables": tables,
                 "dense": [{"name": d.name, "normalize": d.normalize, "mean": float(m), "std": float(s)}
                           for d, m, s in zip(self.spec.dense, self.dense_mean, self.dense_std)],
                 "sequences": {f.name: f.max_len for f in self.spec.id_features if f.kind == "id_list"},
                 "train_rows": train_rows}
        (directory / "preprocessing.json").write_text(json.dumps(state, indent=2))

    @staticmethod
    def load(directory: str | Path, spec: DatasetSpec) -> "FeatureEncoder":
        directory = Path(directory)
        state: dict[str, Any] = json.loads((directory / "preprocessing.json").read_text())
        if state.get("format") != FORMAT:
            raise ValueError(f"{directory / 'preprocessing.json'}: format {state.get('format')!r}, expected {FORMAT!r}")
        for name, t in spec.tables.items():  # the spec beside it must be the one the state was fit for
            saved = state["tables"].get(name)
            if saved is None or (saved["encoding"], saved["num_rows"]) != (t.encoding, t.num_rows):
                raise ValueError(f"{directory}: table {name!r} is {saved} in the state, the spec says "
                                 f"{t.encoding} of {t.num_rows} rows")
        vocab = {name: pq.read_table(directory / t["vocab_file"])["value"].combine_chunks()
                 for name, t in state["tables"].items() if "vocab_file" in t}
        return FeatureEncoder(spec, vocab, np.array([d["mean"] for d in state["dense"]], np.float32),
                              np.array([d["std"] for d in state["dense"]], np.float32))


def int_lookup(values: np.ndarray) -> tuple:
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


def extend_vocabulary(old: pa.Array, new_top: pa.Array, capacity: int) -> tuple[pa.Array, np.ndarray]:
    """A warm start's vocabulary: yesterday's ``old`` (value i at row i + 1) extended with today's ``new_top``
    (today's most frequent values, most frequent first) within ``capacity`` rows (num_rows - 1).

    Old values keep their rows. Today's values that are new take the free rows, most frequent first; when
    the table is full, they take the rows of the old values that are not in today's top (those are the least
    frequent today), the least frequent of yesterday first (the end of the old vocabulary). Every value of
    today's top thus gets a row. Returns the vocabulary (value i at row i + 1) and, for each of its values,
    the row it had yesterday (0: a new value, whose embedding starts afresh)."""
    old_np = old.to_numpy(zero_copy_only=False)
    in_today = pc.is_in(old, value_set=new_top).to_numpy(zero_copy_only=False)
    fresh = pc.filter(new_top, pc.invert(pc.is_in(new_top, value_set=old))).to_numpy(zero_copy_only=False)
    values = list(old_np[:capacity])
    source = list(range(1, min(len(old_np), capacity) + 1))
    free = min(len(fresh), capacity - len(values))
    values += list(fresh[:free])
    source += [0] * free
    evictable = [i for i in range(len(values) - free - 1, -1, -1) if not in_today[i]]  # least frequent first
    for slot, value in zip(evictable, fresh[free:]):
        values[slot], source[slot] = value, 0
    return pa.array(values, type=old.type), np.asarray(source, np.int64)
