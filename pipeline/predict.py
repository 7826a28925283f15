"""Batch inference on Ray Data (``jobs/predict.py``): a Parquet log in, per-task probabilities out.

Parquet read (feature and key columns, each row's file kept) -> ``map_batches(Score)``, a callable class in an
actor pool that loads the exported model once per actor (GPU actors where the cluster has GPUs; Ray Data runs
the read inside the actors) -> Parquet
write of the key columns, the probabilities and the model version. Labels are not needed. Rows in = rows out is
checked from the Parquet footers of the input and of what was written.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from pipeline.checkpoint import filesystem

PATH = "path"  # the input file of each row (read_parquet's include_paths), for bad-row messages; not written


def artifact_files(export_dir: str | Path) -> dict[str, bytes]:
    """The exported artifact's files by relative path: the actors get them through Ray's object store, so the
    export need not be on a path every node sees."""
    root = Path(export_dir)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


class Score:
    """One actor's scorer: ``pipeline.serving.Scorer`` loaded once, applied to each batch of raw rows."""

    def __init__(self, files: "ray.ObjectRef", keys: list[str], on_bad_rows: str, device: str, threads: int) -> None:
        import tempfile

        import torch

        from pipeline.serving import Scorer

        torch.set_num_threads(threads)
        self._dir = tempfile.TemporaryDirectory(prefix="mtrec-export-")  # removed with the actor
        for name, data in ray.get(files).items():  # the artifact's bytes, through the object store
            path = Path(self._dir.name) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        self.scorer, self.keys, self.on_bad_rows = Scorer.load(self._dir.name, device=device), keys, on_bad_rows
        self.version = self.scorer.manifest["version"]

    def __call__(self, batch: pa.Table) -> pa.Table:
        source = ", ".join(sorted(pc.unique(batch[PATH]).to_pylist())) if batch.num_rows else "input"
        scored = self.scorer.score(batch, on_bad_rows=self.on_bad_rows, source=source)
        out = {k: batch[k] for k in self.keys}
        out |= {c: scored[c] for c in scored.column_names}
        out["model_version"] = pa.repeat(pa.scalar(self.version, pa.string()), batch.num_rows)
        return pa.table(out)


def parquet_files(uri: str) -> tuple["pa.fs.FileSystem", list[str]]:
    fs, root = filesystem(uri)
    return fs, [f.path for f in fs.get_file_info(pa.fs.FileSelector(root, recursive=True))
                if f.type == pa.fs.FileType.File and f.path.endswith(".parquet")]


def parquet_rows(uri: str) -> tuple[int, dict[str, int]]:
    """(rows, null count per column) of the Parquet files under ``uri``, from their footers."""
    fs, files = parquet_files(uri)
    rows, nulls = 0, {}
    for path in files:
        meta = pq.read_metadata(path, filesystem=fs)
        rows += meta.num_rows
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            for c in range(group.num_columns):
                col = group.column(c)
                if col.statistics is not None and col.statistics.has_null_count:
                    nulls[col.path_in_schema] = nulls.get(col.path_in_schema, 0) + col.statistics.null_count
    return rows, nulls


def predict(export_dir: str, data: str, out: str, keys: list[str], on_bad_rows: str = "fail",
            actors: int | None = None, batch_rows: int | None = None, use_gpu: bool | None = None) -> dict:
    """Score every row of the Parquet log ``data`` into Parquet under ``out``; returns the run's summary."""
    manifest = json.loads((Path(export_dir) / "manifest.json").read_text())
    columns = list(dict.fromkeys(keys + manifest["inputs"]["id_keys"] + manifest["inputs"]["dense"]))
    gpus = ray.cluster_resources().get("GPU", 0)
    use_gpu = gpus >= 1 if use_gpu is None else use_gpu
    cpus = ray.cluster_resources().get("CPU", 1)
    actors = actors or (int(gpus) if use_gpu else max(1, int(cpus)))
    # CPU actors leave one CPU for the read and write tasks (a Data task takes 1): without it the pool
    # holds every CPU and the read never runs. Torch threads use the physical cores regardless.
    per_actor = {"num_gpus": 1} if use_gpu else {"num_cpus": max(0.1, (cpus - 1) / actors)}
    rows_in, _ = parquet_rows(data)
    started = time.time()
    if PATH in columns:
        raise ValueError(f"{data}: a key or feature column named {PATH!r} clashes with the input file column predict adds")
    # no rename of the path column: a rename is an operator of its own, one task per read block (180 for
    # 1M rows), and cost 3x the scoring's wall time here
    # One read task per file, in the actors' CPU share, and whole read blocks per call (no batch_size): Ray
    # Data then fuses the read into the scoring actors (ReadParquet->MapBatches(Score)), so a block is decoded
    # where it is scored and never crosses the object store. Its default 200 read blocks split the files,
    # and a split read is not fused: 180 blocks of 5,555 rows for 1M rows cost ~4 s of scheduling. With
    # fewer files than actors it still splits them, so that every actor gets work.
    ds = ray.data.read_parquet(data, columns=columns, include_paths=True, override_num_blocks=max(len(parquet_files(data)[1]), actors),
                               **per_actor)
    scored = ds.map_batches(Score, batch_format="pyarrow", batch_size=batch_rows, compute=ray.data.ActorPoolStrategy(size=actors),
                            fn_constructor_args=(ray.put(artifact_files(export_dir)), keys, on_bad_rows, "cuda" if use_gpu else "cpu",
                                                 1 if use_gpu else max(1, int(cpus // actors))),
                            **per_actor)
    scored.write_parquet(out)
    seconds = time.time() - started
    rows_out, nulls = parquet_rows(out)
    if rows_out != rows_in:
        raise RuntimeError(f"{out}: wrote {rows_out} rows for the {rows_in} rows of {data}")
    first = manifest["outputs"] and next(iter(manifest["outputs"]))
    return {"rows_in": rows_in, "rows_out": rows_out, "seconds": seconds, "rows_per_s": rows_in / max(seconds, 1e-9),
            "scored_as_null": nulls.get(first, 0), "actors": actors, "gpu": use_gpu, "model_version": manifest["version"]}


def main(argv: list[str] | None = None) -> None:
    """``jobs/predict.py`` and ``mtrec-predict``."""
    import argparse
    import sys
    import tempfile
    from typing import get_args

    from pipeline.export import ServingPrecision, export_run
    from pipeline.job import connect_ray

    p = argparse.ArgumentParser(description="Score a Parquet log with an exported model (or a run) on Ray Data.")
    p.add_argument("--run", required=True, help="an export (jobs/export.py), a job's output or a checkpoint")
    p.add_argument("--data", required=True, help="Parquet files: a directory or a URI")
    p.add_argument("--out", required=True, help="where the scores go: a directory or a URI")
    p.add_argument("--keys", nargs="*", default=[], help="input columns copied to each output row (e.g. request_id)")
    p.add_argument("--on-bad-rows", choices=["fail", "null"], default="fail",
                   help="rows with bad values: refuse the data, naming file, column and count (default), or score them as nulls")
    p.add_argument("--actors", type=int, help="scoring actors (default: one per GPU, else one per CPU)")
    p.add_argument("--precision", choices=get_args(ServingPrecision), default="fp32",
                   help="when --run is not an export: the program's precision (see jobs/export.py --precision)")
    p.add_argument("--batch-rows", type=int, help="rows per Ray Data batch an actor scores (default: each read block "
                   "whole, at most Ray Data's target block size, which lets the read run inside the actors)")
    a = p.parse_args(argv)
    connect_ray(progress=sys.stdout.isatty())  # the bars on a terminal; one line per operator update in logs
    with tempfile.TemporaryDirectory() as tmp:
        export = a.run
        if not (Path(a.run) / "manifest.json").exists():  # a run: export it first
            export_run(a.run, tmp, aoti=True, precision=a.precision)
            export = tmp
        s = predict(export, a.data, a.out, a.keys, a.on_bad_rows, a.actors, a.batch_rows)
    print(f"scored {s['rows_in']:,} rows -> {s['rows_out']:,} rows in {a.out} in {s['seconds']:.1f} s "
          f"({s['rows_per_s']:,.0f} rows/s, {s['actors']} {'GPU' if s['gpu'] else 'CPU'} actor(s), "
          f"model {s['model_version']}); scored as null: {s['scored_as_null']}")
