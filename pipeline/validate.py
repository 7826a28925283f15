"""Validate a Parquet impression log against its dataset spec before any training starts.

Every problem is reported with the file, the column and the number of rows affected, e.g.
``.../train/part-00003.parquet: column 'convert': 12 of 250000 rows have convert=1 but click=0``.
Only the columns that need a value check (labels, dense) are read; null counts come from the Parquet
footer statistics when present.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.config import DatasetSpec

SPLITS = ("train", "valid", "test")


class DataValidationError(ValueError):
    """Bad input data; the message names the file, the column and the count."""


@dataclass
class FileReport:
    path: str
    rows: int


def split_files(path: str, split: str) -> tuple[pafs.FileSystem, list[str]]:
    """The Parquet files of ``<path>/<split>/`` (a local directory or a URI such as s3://bucket/log)."""
    fs, root = pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(), path)
    base = f"{root.rstrip('/')}/{split}"
    info = fs.get_file_info(base)
    if info.type != pafs.FileType.Directory:
        raise DataValidationError(f"{path}: split directory {split}/ not found")
    files = sorted(f.path for f in fs.get_file_info(pafs.FileSelector(base, recursive=True))
                   if f.type == pafs.FileType.File and f.path.endswith(".parquet"))
    if not files:
        raise DataValidationError(f"{base}: no .parquet files in split {split!r}")
    return fs, files


def validate_dataset(path: str, spec: DatasetSpec, splits=SPLITS, threads: int = 4) -> dict[str, int]:
    """Check every file of every split; returns rows per split. Raises DataValidationError on the first
    bad file, listing all of that file's problems."""
    rows = {}
    for split in splits:
        fs, files = split_files(path, split)
        with ThreadPoolExecutor(max_workers=threads) as pool:
            reports = list(pool.map(lambda f: validate_file(fs, f, spec), files))
        rows[split] = sum(r.rows for r in reports)
        if rows[split] == 0:
            raise DataValidationError(f"{path}: split {split!r} has 0 rows in {len(files)} file(s)")
    return rows


def validate_file(fs: pafs.FileSystem, path: str, spec: DatasetSpec) -> FileReport:
    try:
        pf = pq.ParquetFile(fs.open_input_file(path))
    except Exception as e:  # truncated or corrupt files raise ArrowInvalid / OSError
        raise DataValidationError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    schema = pf.schema_arrow
    n = pf.metadata.num_rows
    problems = [*_schema_problems(schema, spec)]
    if problems:
        raise DataValidationError(f"{path}: " + "; ".join(problems))
    problems += _null_problems(pf, spec, n)
    value_columns = spec.label_columns + [d.name for d in spec.dense]
    try:
        table = pf.read(columns=value_columns)
    except Exception as e:
        raise DataValidationError(f"{path}: cannot read columns {value_columns} ({type(e).__name__}: {e})") from None
    problems += _value_problems(table, spec, n)
    if problems:
        raise DataValidationError(f"{path}: " + "; ".join(problems))
    return FileReport(path, n)


def _schema_problems(schema: pa.Schema, spec: DatasetSpec):
    def kind(t: pa.DataType) -> str:
        if pa.types.is_integer(t):
            return "int"
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            return "string"
        if pa.types.is_floating(t):
            return "float"
        if pa.types.is_boolean(t):
            return "bool"
        if pa.types.is_list(t) or pa.types.is_large_list(t):
            return "list<" + kind(t.value_type) + ">"
        return str(t)

    expected = (
        [(f.name, {"int", "string"}, "an integer or string id") for f in spec.sparse]
        + [(f.name, {"list<int>", "list<string>"}, "list<int64> (or list<string>)") for f in spec.sequences]
        + [(f.name, {"int", "float"}, "numeric") for f in spec.dense]
        + [(c, {"int", "bool", "float"}, "a 0/1 label") for c in spec.label_columns]
        + [(c, {"float"}, "a probability") for c in spec.oracle.values()]
    )
    for column, kinds, what in expected:
        if column not in schema.names:
            yield f"column {column!r}: missing (spec {spec.name!r} needs it)"
        elif kind(schema.field(column).type) not in kinds:
            yield f"column {column!r}: type {schema.field(column).type} is not {what}"


def _null_problems(pf: pq.ParquetFile, spec: DatasetSpec, n: int):
    columns = spec.feature_columns + spec.label_columns
    names = pf.schema_arrow.names
    nulls = dict.fromkeys(columns, 0)
    unknown = set()
    md = pf.metadata
    for rg in range(md.num_row_groups):
        group = md.row_group(rg)
        for i in range(group.num_columns):
            col = group.column(i)
            top = col.path_in_schema.split(".")[0]
            if top in nulls and top not in unknown:
                stats = col.statistics
                if stats is None or not stats.has_null_count:
                    unknown.add(top)
                elif "." not in col.path_in_schema:  # a list column's leaf counts empty lists too
                    nulls[top] += stats.null_count
    # list columns and columns without statistics: count nulls on the data itself
    recount = [c for c in columns if c in unknown or pa.types.is_list(pf.schema_arrow.field(names.index(c)).type)]
    if recount:
        table = pf.read(columns=recount)
        for c in recount:
            nulls[c] = table[c].null_count
    for c, k in nulls.items():
        if k:
            yield f"column {c!r}: {k} of {n} rows are null"


def _value_problems(table: pa.Table, spec: DatasetSpec, n: int):
    labels = {}
    for c in spec.label_columns:
        v = table[c].to_numpy(zero_copy_only=False).astype(np.float64)
        bad = int(np.sum((v != 0) & (v != 1)))
        if bad:
            yield f"column {c!r}: {bad} of {n} rows have a label outside {{0, 1}}"
        labels[c] = v
    for t in spec.tasks:
        if t.depends_on is not None:
            child, parent = t.label_column, spec.task(t.depends_on).label_column
            bad = int(np.sum((labels[child] == 1) & (labels[parent] != 1)))
            if bad:
                yield f"column {child!r}: {bad} of {n} rows have {child}=1 but {parent}=0 (breaks the {parent} -> {child} funnel)"
    for d in spec.dense:
        v = table[d.name].to_numpy(zero_copy_only=False).astype(np.float64)
        bad = int(np.sum(~np.isfinite(v)))
        if bad:
            yield f"column {d.name!r}: {bad} of {n} rows are NaN or infinite"
        if d.normalize == "log_standard":
            neg = int(np.sum(v < 0))
            if neg:
                yield f"column {d.name!r}: {neg} of {n} rows are negative (normalize: log_standard needs >= 0)"

