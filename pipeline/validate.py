"""Validate a Parquet impression log against its dataset spec before any training starts.

Every problem is reported with the file, the column and the number of rows affected, e.g.
``.../train/part-00003.parquet: column 'convert': 12 of 250000 rows have convert=1 but click=0``.

Two kinds of problem:
- **file problems** (not a readable Parquet file, a missing column, a wrong type, a split without rows)
  always stop the run;
- **row problems** (a null, a label outside {0, 1}, a conversion without a click, a NaN/inf or
  negative-for-log dense value, a negative id, an id outside ``[0, num_ids)``) stop the run under
  ``on_bad_rows: fail`` (the default) or, under ``on_bad_rows: drop``, are counted per split, column and
  reason and the rows are left out of training and evaluation (``bad_row_masks`` is the one definition
  of a bad row, used here and by the preprocessing that drops them).

Only the columns that can hold a row problem are read: labels and dense values always, id columns only
when their Parquet footer statistics (null count, min, max) cannot rule a problem out.
"""
from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from pipeline.config import BadRowPolicy, DatasetSpec
from pipeline.features import as_floats, null_mask, type_kind  # noqa: F401  (as_floats re-exported)

SPLITS = ("train", "valid", "test")


class DataValidationError(ValueError):
    """Bad input data; the message names the file, the column and the count."""


@dataclass
class DataReport:
    """What validation found: rows per split, and (policy ``drop``) the bad rows that will be left out."""

    rows: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)  # split -> rows with at least one problem
    bad_rows: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> "column/reason" -> rows

    def metrics(self) -> dict[str, float]:
        """Flat counts for the run's metrics: data/<split>/rows, .../dropped, .../bad/<column>/<reason>."""
        out = {}
        for split, n in self.rows.items():
            out[f"data/{split}/rows"] = n
            out[f"data/{split}/dropped"] = self.dropped.get(split, 0)
            out |= {f"data/{split}/bad/{k}": v for k, v in self.bad_rows.get(split, {}).items()}
        return out


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


PIECE_ROWS = 262_144  # a read task's rows at most, where the row groups allow: bounded blocks, early first batch


@dataclass(frozen=True)
class Piece:
    """A run of consecutive row groups of one Parquet file: one read task, and one block onward."""

    path: str
    row_groups: tuple[int, ...]
    rows: int


def read_footers(fs: pafs.FileSystem, files: list[str], threads: int = 8) -> list[pq.FileMetaData]:
    """Each file's Parquet footer (its schema and row groups), read in threads: I/O, one request each on
    object storage. A file that is not readable Parquet is named."""
    def footer(path: str) -> pq.FileMetaData:
        try:
            return pq.ParquetFile(fs.open_input_file(path)).metadata
        except Exception as e:  # truncated or corrupt files raise ArrowInvalid / OSError
            raise DataValidationError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(footer, files))


def parquet_pieces(fs: pafs.FileSystem, files: list[str], min_pieces: int = 1) -> list[Piece]:
    """The files cut at row-group boundaries into pieces of at most ``PIECE_ROWS`` rows, and into at least
    ``min_pieces`` (the split's consumers, times 2) where the row groups allow, so how a log was written into
    files does not decide how many workers it feeds: a one-file split of several row groups feeds them all.
    Reads only the files' footers."""
    return pieces_of(files, read_footers(fs, files), min_pieces)


def pieces_of(files: list[str], footers: list[pq.FileMetaData], min_pieces: int = 1) -> list[Piece]:
    sizes = [[md.row_group(i).num_rows for i in range(md.num_row_groups)] for md in footers]
    target = max(1, min(PIECE_ROWS, -(-sum(map(sum, sizes)) // max(1, min_pieces))))
    pieces = []
    for path, rows in zip(files, sizes):
        run: list[int] = []
        for i, n in enumerate(rows):
            if run and sum(rows[j] for j in run) + n > target:
                pieces.append(Piece(path, tuple(run), sum(rows[j] for j in run)))
                run = []
            run.append(i)
        if run:
            pieces.append(Piece(path, tuple(run), sum(rows[j] for j in run)))
    return pieces


def validate_dataset(path: str, spec: DatasetSpec, splits=SPLITS, on_bad_rows: BadRowPolicy = "fail") -> DataReport:
    """Check every file of every split: the footers on the driver (readable, the spec's columns and types),
    the rows in tasks, one per piece of row groups (``check_piece``: Ray tasks across the cluster when Ray
    is running, else threads), reduced to counts per file. Raises DataValidationError on the first file with
    a file problem, or (policy ``fail``) with a row problem, listing all of that file's problems."""
    report = DataReport()
    for split in splits:
        fs, files = split_files(path, split)
        footers = read_footers(fs, files)
        for file, md in zip(files, footers):
            problems = list(_schema_problems(md.schema.to_arrow_schema(), spec))
            if problems:
                raise DataValidationError(f"{file}: " + "; ".join(problems))
        checks = run_tasks(check_piece, [(fs, piece, spec) for piece in pieces_of(files, footers, cluster_cpus())])
        per_file = {f: FileCheck(f, md.num_rows, [], 0) for f, md in zip(files, footers)}
        for c in checks:
            merged = per_file[c.path]
            merged.bad += c.bad
            seen = {(column, reason): i for i, (column, reason, *_) in enumerate(merged.problems)}
            for column, reason, message, n in c.problems:
                if (column, reason) in seen:
                    i = seen[(column, reason)]
                    merged.problems[i] = (column, reason, message, merged.problems[i][3] + n)
                else:
                    merged.problems.append((column, reason, message, n))
        for check in per_file.values():  # in file order: the first bad file is the one named
            if check.problems and on_bad_rows == "fail":
                raise DataValidationError(f"{check.path}: " + "; ".join(
                    f"column {c!r}: {n} of {check.rows} rows {message}" for c, _, message, n in check.problems))
        report.rows[split] = sum(c.rows for c in per_file.values())
        if report.rows[split] == 0:
            raise DataValidationError(f"{path}: split {split!r} has 0 rows in {len(files)} file(s)")
        report.dropped[split] = sum(c.bad for c in per_file.values())
        counts = Counter()
        for c in per_file.values():
            counts.update({f"{column}/{reason}": n for column, reason, _, n in c.problems})
        report.bad_rows[split] = dict(counts)
        if report.dropped[split] == report.rows[split]:
            raise DataValidationError(f"{path}: every row of split {split!r} is bad ({dict(counts)})")
    return report


# The stage's Ray tasks spread over the nodes, as Ray Data's do. SPREAD also keeps them out of the caller's
# placement group, which a Tune trial's driver would otherwise hand them, and whose bundles have no CPU.
TASK_OPTIONS = {"scheduling_strategy": "SPREAD"}


def cluster_cpus() -> int:
    return int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else 4


def run_tasks(fn, calls: list[tuple], **options) -> list:
    """``fn(*args)`` for each of ``calls``, in order: as Ray tasks where Ray is running (spread over the
    cluster's CPUs; the driver receives only the results), else in this process's threads (the converter).
    A DataValidationError raised in a task is raised as it is."""
    if ray.is_initialized():
        task = ray.remote(fn).options(**TASK_OPTIONS, **options)
        try:
            return ray.get([task.remote(*args) for args in calls])
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, DataValidationError):
                raise e.cause from None
            raise
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(lambda args: fn(*args), calls))


@dataclass
class FileCheck:
    path: str
    rows: int
    problems: list[tuple[str, str, str, int]]  # (column, reason, message, rows)
    bad: int  # rows with at least one problem


def check_piece(fs: pafs.FileSystem, piece: Piece, spec: DatasetSpec) -> FileCheck:
    """The row problems of one piece, counted: only the columns that can hold one are read (labels, dense
    values, and the id columns whose footer statistics cannot rule a problem out)."""
    pf = pq.ParquetFile(fs.open_input_file(piece.path))
    columns = spec.label_columns + [d.name for d in spec.dense] + _suspect_id_columns(pf, spec)
    try:
        table = pf.read_row_groups(list(piece.row_groups), columns=columns)
    except Exception as e:
        raise DataValidationError(f"{piece.path}: cannot read columns {columns} ({type(e).__name__}: {e})") from None
    masks = bad_row_masks(table, spec)
    bad = np.logical_or.reduce([m for *_, m in masks]) if masks else np.zeros(table.num_rows, bool)
    return FileCheck(piece.path, table.num_rows, [(c, reason, message, int(m.sum())) for c, reason, message, m in masks],
                     int(bad.sum()))


def bad_row_masks(table: pa.Table, spec: DatasetSpec) -> list[tuple[str, str, str, np.ndarray]]:
    """(column, reason, message, rows mask) for every row problem in ``table``; the reasons are null,
    not_binary, funnel, not_finite, negative, negative_id and id_out_of_range. Columns the table lacks
    are skipped."""
    out = []

    def add(column: str, reason: str, message: str, mask: np.ndarray) -> None:
        if mask.any():
            out.append((column, reason, message, mask))

    names = set(table.column_names)
    features = {f.name: f for f in spec.features if f.name in names}
    for f in spec.id_features:  # ids, then labels, then dense values: the order of the messages
        if f.name in features:
            for reason, message, mask in f.bad_rows(table[f.name], spec.tables[f.table_name]):
                add(f.name, reason, message, mask)
    labels = {}
    for c in spec.label_columns:
        if c not in names:
            continue
        add(c, "null", "are null", null_mask(table[c]))
        labels[c] = as_floats(table[c])
        add(c, "not_binary", "have a label outside {0, 1}", (labels[c] != 0) & (labels[c] != 1) & ~np.isnan(labels[c]))
    for t in spec.tasks:
        if t.depends_on is not None and t.label_column in labels:
            child, parent = t.label_column, spec.task(t.depends_on).label_column
            add(child, "funnel", f"have {child}=1 but {parent}=0 (breaks the {parent} -> {child} funnel)",
                (labels[child] == 1) & (labels[parent] != 1))
    for f in spec.dense:
        if f.name in features:
            for reason, message, mask in f.bad_rows(table[f.name]):
                add(f.name, reason, message, mask)
    return out


def _suspect_id_columns(pf: pq.ParquetFile, spec: DatasetSpec) -> list[str]:
    """The id columns whose footer statistics cannot rule out nulls, negative or out-of-range ids (and
    every list column: its statistics describe the ids, not the rows)."""
    features = {f.name: spec.tables[f.table_name].num_ids for f in spec.id_features}
    clean = dict.fromkeys(features, True)
    md = pf.metadata
    for rg in range(md.num_row_groups):
        group = md.row_group(rg)
        for i in range(group.num_columns):
            col = group.column(i)
            name = col.path_in_schema
            if name not in features:  # a list column's leaf is "name.list.element"
                clean.update({name.split(".")[0]: False} if name.split(".")[0] in features else {})
                continue
            s = col.statistics
            if s is None or not s.has_null_count or s.null_count:
                clean[name] = False
            elif isinstance(s.min, int) and (s.min < 0 or (features[name] is not None and s.max >= features[name])):
                clean[name] = False
            elif not s.has_min_max and col.physical_type in ("INT32", "INT64"):
                clean[name] = False
    return [c for c, ok in clean.items() if not ok]


def _schema_problems(schema: pa.Schema, spec: DatasetSpec):
    expected = ([(f.name, *f.accepted_types(spec.tables.get(getattr(f, "table_name", None)))) for f in spec.features]
                + [(c, {"int", "bool", "float"}, "a 0/1 label") for c in spec.label_columns]
                + [(c, {"float"}, "a probability") for c in spec.oracle.values()])
    for column, kinds, what in expected:
        if column not in schema.names:
            yield f"column {column!r}: missing (spec {spec.name!r} needs it)"
        elif type_kind(schema.field(column).type) not in kinds:
            yield f"column {column!r}: type {schema.field(column).type} is not {what}"
