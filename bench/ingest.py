"""Ingest throughput: Ray Data ``read_parquet -> iter_torch_batches`` against plain pyarrow reading the same
files into torch tensors, measured side by side in one run, on the raw columns and through our
preprocessing (the path a training worker consumes).

    python bench/ingest.py                      # -> bench/results/ingest.md
"""
from __future__ import annotations

import argparse
import time
from statistics import median

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from common import ARROW_BATCH_ROWS, write_result

from pipeline.config import DataPaths, DatasetSpec, JobConfig
from ray.data.collate_fn import DefaultCollateFn

from pipeline.data import Collate, build_datasets, read_split, tensor_batches
from pipeline.job import connect_ray, default_synthetic_data, fit_or_load_preprocessor
from pipeline.synthetic import SPEC_PATH
from pipeline.validate import split_files

BATCH = 2048


def flat_columns(spec: DatasetSpec) -> list[str]:
    """The columns a plain torch batch can hold (the list column needs the preprocessing's padding)."""
    return [f.name for f in spec.sparse] + [d.name for d in spec.dense] + spec.label_columns


def timed(batches) -> tuple[int, float]:
    t0, rows = time.perf_counter(), 0
    for batch in batches:
        rows += batch["rows"] if "rows" in batch else len(next(iter(batch.values())))
    return rows, time.perf_counter() - t0


def pyarrow_batches(files: list[str], columns: list[str], transform=None, collate=None):
    """Plain pyarrow: each file's record batches -> torch, BATCH rows at a time: the raw columns as tensors, or
    preprocessed (``transform``) and wrapped as a worker's batch (``collate``: a KeyedJaggedTensor and tensors)."""
    for f in files:
        for rb in pq.ParquetFile(f).iter_batches(batch_size=ARROW_BATCH_ROWS, columns=columns):
            table = pa.Table.from_batches([rb])
            if transform is not None:
                table = transform(table)
                for i in range(0, table.num_rows, BATCH):
                    yield collate(table.slice(i, BATCH))
                continue
            tensors = {c: torch.from_numpy(table[c].to_numpy()) for c in columns}
            for i in range(0, table.num_rows, BATCH):
                yield {k: v[i:i + BATCH] for k, v in tensors.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000],
                   help="train rows of the logs measured (each generated once into the cache, as the scale bench's)")
    p.add_argument("--repeats", type=int, default=3, help="paired passes of each; the table shows the medians")
    p.add_argument("--out", default="outputs/bench/ingest")
    a = p.parse_args()
    connect_ray()
    spec = DatasetSpec.load(SPEC_PATH)
    cols = flat_columns(spec)
    rows = []
    for n in a.rows:
        data = str(default_synthetic_data({"train": n, "valid": max(n // 10, 1000), "test": max(n // 10, 1000)}))
        pre, _ = fit_or_load_preprocessor(JobConfig(data=DataPaths(data, str(SPEC_PATH))), spec, a.out)
        _, files = split_files(data, "train")
        for what, ray_batches, arrow_batches in [
            ("raw columns", lambda: read_split(data, "train", spec).select_columns(cols).iter_torch_batches(
                batch_size=BATCH, collate_fn=DefaultCollateFn(num_workers=0)), lambda: pyarrow_batches(files, cols)),
            ("preprocessed (worker input)",
             # the evaluation splits' path: the same transform on both sides (train adds a row permutation)
             lambda: tensor_batches(build_datasets(data, spec, pre, splits=("train",), shuffle_window=0)["train"], spec,
                                    BATCH, pad=False),
             lambda: pyarrow_batches(files, spec.feature_columns + spec.label_columns, pre.transform, Collate(spec))),
        ]:
            timed(ray_batches())  # warm-up: worker processes started, files in the page cache
            ray_rate, arrow_rate = [], []
            for _ in range(a.repeats):  # paired: a Ray Data pass, then a pyarrow pass (the machine's speed drifts)
                n_ray, s_ray = timed(ray_batches())
                n_arrow, s_arrow = timed(arrow_batches())
                assert n_ray == n_arrow == n, (n_ray, n_arrow)
                ray_rate.append(n_ray / s_ray)
                arrow_rate.append(n_arrow / s_arrow)
            ratios = [r / p for r, p in zip(ray_rate, arrow_rate)]
            rows.append({"train rows": f"{n:,} ({len(files)} files)", "input": what,
                         "Ray Data (rows/s)": median(ray_rate), "plain pyarrow (rows/s)": median(arrow_rate),
                         "Ray Data / pyarrow": median(ratios), "range": f"{min(ratios):.3f}-{max(ratios):.3f}"})
    write_result("ingest", "Ingest: Ray Data read_parquet -> iter_torch_batches vs plain pyarrow -> torch", rows,
                 ["the default synthetic log's train split at each size, batches of "
                  f"{BATCH} rows; after a warm-up pass, {a.repeats} pairs of passes (Ray Data, then pyarrow), and the "
                  "medians of the rows/s and of the pairs' ratios; Ray Data's rows/s include its start-up (~0.4 s "
                  "to the first batch), which weighs on the smaller log",
                  "Ray Data's side iterates as the training workers do (pipeline.data.tensor_batches: columns "
                  "converted in the iterator's prefetch thread, not Ray's default pool of 4 threads)",
                  f"raw columns: {len(cols)} flat columns (ids, dense, labels); preprocessed: our Preprocessor.transform "
                  "(vocabulary/hash encoding, id lists cut to max_len, normalisation) and the worker's collate into a "
                  "KeyedJaggedTensor, by Ray Data on whole read blocks "
                  f"(a file each) in the read tasks, by pyarrow in-process on {ARROW_BATCH_ROWS:,}-row record batches"],
                 "python bench/ingest.py")


if __name__ == "__main__":
    main()
