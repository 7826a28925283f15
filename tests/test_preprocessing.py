"""Preprocessing fit on train only, and its transform: vocabularies with an out-of-vocabulary row,
hashing into the table's range, sequence pad/truncate, dense normalisation, safe save/load."""
from __future__ import annotations

import io
import re
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch

from pipeline.config import from_dict, DatasetSpec
import pipeline.data
from pipeline.data import (KEEP, BackpressureBackoff, Collate, Preprocess, Preprocessor, build_datasets,
                           read_split, tensor_batches)

TINY = {
    "name": "tiny",
    "sparse": [{"name": "u", "vocab_size": 3, "dim": 4},          # 2 most frequent ids + OOV row
               {"name": "s", "vocab_size": 10, "dim": 4},         # string ids
               {"name": "h", "hash_buckets": 8, "dim": 4}],
    "sequences": [{"name": "hist", "vocab_size": 5, "dim": 4, "max_len": 3}],
    "dense": [{"name": "x"}, {"name": "price", "normalize": "log_standard"}],
    "tasks": [{"name": "click"}],
}


@pytest.fixture
def tiny_ds(ray_local, tmp_path):
    t = pa.table({
        "u": [7, 7, 7, 5, 5, 9], "s": ["a", "b", "a", "c", "a", "b"], "h": [1, 2, 3, 4, 5, 6],
        "hist": [[1, 2, 3, 4], [], [2], [2, 2, 1], [3], [1, 1, 1, 2, 2]],
        "x": [1.0, 2, 3, 4, 5, 6], "price": [0.0, 1, 10, 100, 1000, 10], "click": [0, 1, 0, 1, 0, 0],
    })
    for split in ("train", "valid", "test"):
        (tmp_path / split).mkdir()
        pq.write_table(t, tmp_path / split / "part-0.parquet")
    return str(tmp_path)


def test_fit_and_transform(tiny_ds):
    spec = from_dict(DatasetSpec, TINY)
    pre = Preprocessor.fit(tiny_ds, spec)
    assert pre.vocab["u"].to_pylist() == [7, 5]  # by frequency; 9 does not fit the 3-row table
    assert pre.vocab["hist"].to_pylist() == [2, 1, 3, 4]  # counted over all list entries
    batch = pa.table({"u": [7, 5, 9, 123], "s": ["a", "c", "zzz", "b"], "h": [1, 1, 2, 10**12],
                      "hist": [[1, 2, 3, 4], [], [9], [4, 1]], "x": [1.0, 3.5, 6, 0], "price": [0.0, 1, 10, 1e6],
                      "click": [1, 0, 0, 1]})
    out = pre.transform(batch)
    assert out["u"].to_pylist() == [1, 2, 0, 0]  # unseen / cut ids -> OOV row 0
    assert out["s"].to_pylist() == [1, 3, 0, 2]
    h = out["h"].to_pylist()
    assert h[0] == h[1] and min(h) >= 1 and max(h) < 8  # same raw id, same bucket
    # the last max_len entries (most recent), no padding; unseen 9 -> 0 as well
    assert out["hist"].to_pylist() == [[1, 3, 4], [], [0], [4, 2]]
    assert out["hist"].type == pa.list_(pa.int32()) and out["u"].type == pa.int32()
    assert out["click"].to_pylist() == [1, 0, 0, 1]
    x = np.array([1.0, 2, 3, 4, 5, 6])
    assert np.allclose(out["x"].to_numpy(), (np.array([1.0, 3.5, 6, 0]) - x.mean()) / x.std(), atol=1e-5)
    assert out["x"].type == pa.float32()
    # a worker's batch: one KeyedJaggedTensor of every id feature, dense and label tensors
    b = Collate(spec)(out)
    assert b["ids"].keys() == spec.id_keys and b["ids"]["hist"].to_dense()[0].tolist() == [1, 3, 4]
    assert b["ids"]["hist"].lengths().tolist() == [3, 0, 1, 2] and b["ids"]["u"].values().tolist() == [1, 2, 0, 0]
    assert b["dense"].shape == (4, 2) and b["labels"].tolist() == [[1], [0], [0], [1]] and b["rows"] == 4


def test_state_round_trips_through_weights_only_load(tiny_ds):
    spec = from_dict(DatasetSpec, TINY)
    pre = Preprocessor.fit(tiny_ds, spec)
    buf = io.BytesIO()
    torch.save(pre.state_dict(), buf)
    buf.seek(0)
    again = Preprocessor.from_state_dict(torch.load(buf, weights_only=True), spec)
    batch = pq.read_table(f"{tiny_ds}/valid/part-0.parquet")
    assert pre.transform(batch).equals(again.transform(batch))


def test_synthetic_pipeline_batches(small_log, spec, ray_local):
    pre = Preprocessor.fit(str(small_log), spec)
    assert pre.train_rows == 60_000
    ds = build_datasets(str(small_log), spec, pre, splits=("train", "valid"))
    batch = next(iter(tensor_batches(ds["valid"], spec, 512)))
    ids = batch["ids"]
    assert ids.keys() == spec.id_keys and ids.stride() == 512
    assert ids["hist_category"].lengths().max() <= 20 and ids["user_id"].lengths().tolist() == [1] * 512
    assert batch["dense"].shape == (512, 3) and batch["labels"].shape == (512, 2)
    assert batch["oracle"].shape == (512, 2)
    for key, jt in ids.to_dict().items():
        rows = spec.tables[spec.feature(key).table_name].num_rows
        assert bool((jt.values() < rows).all()) and bool((jt.values() >= 0).all())
    assert "oracle" not in next(iter(tensor_batches(ds["train"], spec, 8)))
    assert sum(b.num_rows for b in ds["train"].iter_batches(batch_size=4096, batch_format="pyarrow")) == 60_000
    # each split reads and preprocesses a piece in one task (a batch size on map_batches breaks this fusion)
    for split in ("train", "valid"):
        assert re.search(r"MapBatches\(read_pieces\)->MapBatches", ds[split].stats()), ds[split].stats()


def test_permuted_transform_shuffles_within_windows(tiny_ds):
    """Train rows are permuted within every ``window`` rows of a block: every row kept once, none moved across a
    window, and a new order on every call (a new epoch)."""
    spec = from_dict(DatasetSpec, TINY)
    pre = Preprocessor.fit(tiny_ds, spec)
    n, window = 1000, 300
    batch = pa.table({"u": [7] * n, "s": ["a"] * n, "h": list(range(n)), "hist": [[1]] * n, "x": np.arange(n, dtype=float),
                      "price": [1.0] * n, "click": [i % 2 for i in range(n)]})
    permute = Preprocess(pre, window)
    orders = []
    for _ in range(2):
        out = permute(batch)
        order = np.rint(out["x"].to_numpy() * pre.dense_std[0] + pre.dense_mean[0]).astype(int)  # x is the row number
        assert sorted(order.tolist()) == list(range(n))
        assert (order // window == np.arange(n) // window).all()
        assert (out["click"].to_numpy() == order % 2).all()  # the columns move together
        orders.append(order)
    assert not (orders[0] == orders[1]).all() and not (orders[0] == np.arange(n)).all()


def test_data_tasks_fetch_the_preprocessor_once_per_process(tiny_ds, ray_local):
    """The fit state goes to the Data tasks through the object store and is deserialised once per process,
    however many tasks the process runs (vocabularies of 100M ids must not be unpickled per block)."""
    import os

    from pipeline.data import _fetched

    spec = from_dict(DatasetSpec, TINY)
    ref = ray_local.put(Preprocessor.fit(tiny_ds, spec))

    def probe(batch):
        return {"pid": [os.getpid()], "object": [id(_fetched(ref))]}
    rows = ray_local.data.range(40, override_num_blocks=40).map_batches(probe, batch_size=None).take_all()
    assert len(rows) == 40
    per_process = {}
    for r in rows:
        per_process.setdefault(r["pid"], set()).add(r["object"])
    assert all(len(objects) == 1 for objects in per_process.values()), per_process
    assert len(per_process) < 40  # processes ran several tasks each


def test_drop_policy_marks_bad_rows_and_fits_without_them(ray_local, tmp_path):
    """on_bad_rows: drop: the fit skips bad rows (a NaN would poison the dense mean) and the transform marks
    them (keep=False) with harmless values; identity-encoded ids map id i to row i + 1."""
    raw = {**TINY, "sparse": TINY["sparse"] + [{"name": "pos", "num_ids": 4, "dim": 4}]}
    spec = from_dict(DatasetSpec, raw)
    t = pa.table({"u": [7, 5, None, 5], "s": ["a", "b", "a", "c"], "h": [1, 2, 3, -4],
                  "hist": [[1], [2, -1], [2], [3]], "x": [1.0, np.nan, 3, 4], "price": [1.0, 2, -3, 4],
                  "click": [0, 1, 2, 1], "pos": [0, 3, 4, 2]})
    (tmp_path / "train").mkdir()
    pq.write_table(t, tmp_path / "train" / "part-0.parquet")
    pre = Preprocessor.fit(str(tmp_path), spec, drop_bad_rows=True)
    assert pre.train_rows == 1  # only row 0 is clean
    assert pre.dense_mean[0] == pytest.approx(1.0)
    out = pre.transform(t)
    assert out[KEEP].to_pylist() == [True, False, False, False]
    assert out["pos"].to_pylist() == [1, 4, 0, 3]  # pos i -> i + 1; row 2's 4 is out of range -> 0
    assert min(out["u"].to_pylist()) >= 0 and out.num_rows == 4
    batch = Collate(spec)(out)  # the worker leaves the bad rows out, and counts them as read
    assert batch["rows"] == 1 and batch["rows_read"] == 4 and batch["ids"]["pos"].values().tolist() == [1]
    kept = Preprocessor.from_state_dict(pre.state_dict(), spec)  # fail policy: no keep column
    assert KEEP not in kept.transform(t.slice(0, 1)).column_names



def test_integer_vocabulary_lookup_paths_agree_with_a_dict():
    """Compact id ranges go through a lookup table, sparse ones through a binary search: same codes."""
    from pipeline.encoding import int_lookup as _int_lookup

    rng = np.random.default_rng(0)
    for vocab in (rng.choice(5_000, 300, replace=False), rng.choice(10**12, 300, replace=False) - 10**11):
        lo, lut, keys, rows = _int_lookup(vocab)
        assert (lut is not None) == (vocab.max() - vocab.min() < 10**6)
        spec = from_dict(DatasetSpec, {"name": "v", "tasks": [{"name": "click"}],
                                       "sparse": [{"name": "u", "vocab_size": 301, "dim": 4}]})
        pre = Preprocessor(spec, {"u": pa.array(vocab)}, np.zeros(0, np.float32), np.ones(0, np.float32))
        queries = np.concatenate([vocab, rng.integers(-10**12, 10**12, 500), [vocab.min() - 1, vocab.max() + 1]])
        expected = [{int(v): i + 1 for i, v in enumerate(vocab)}.get(int(q), 0) for q in queries]
        codes = pre.transform(pa.table({"u": queries, "click": np.zeros(len(queries), np.int64)}))["u"]
        assert codes.to_pylist() == expected


def test_backpressure_backoff_sleeps_only_after_a_step_without_progress(monkeypatch):
    slept = []
    monkeypatch.setattr(pipeline.data.time, "sleep", slept.append)
    metrics = SimpleNamespace(num_inputs_received=0, num_task_outputs_generated=0, num_outputs_taken=0)
    op = type("Op", (), {"metrics": metrics, "num_active_tasks": lambda self: 1})()
    executor, backoff = SimpleNamespace(_topology={op: None}), BackpressureBackoff()
    backoff.on_execution_step(executor)  # the first step: nothing to compare with
    backoff.on_execution_step(executor)  # a block ready but held back: no progress
    metrics.num_outputs_taken += 1
    backoff.on_execution_step(executor)  # the consumer took a block
    assert slept == [0.01]
