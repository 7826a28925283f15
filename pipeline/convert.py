"""Bring your own data: CSV or Parquet impression logs -> ``train/ valid/ test/`` Parquet splits plus a
dataset spec YAML, with no code (``jobs/convert.py``; see docs/bring-your-own-data.md).

- Splits: files per split; or fractions of the train files drawn at random (seeded) for the missing
  splits; or the test files split 1:1 at random into valid and test.
- Labels: a 0/1 column (``click``), or derived (``income=income:>50K``: 1 where the stripped column,
  trailing '.' removed, is one of the ``|``-separated values). ``depends_on`` declares the funnel.
- Features are typed from the train split: float -> dense (normalize: standard), integer / bool /
  string -> sparse ids (a vocabulary of the train values, or hashing above ``max_vocab_size``), lists ->
  sequences. Raw ids are written as they are: the pipeline's preprocessing encodes them.
- Every rewrite of a value is counted per column in the report: strings are stripped; empty and ``?``
  strings (and nulls) in id columns become the category ``<missing>``. NaN in a dense column is refused
  with the file, the column and the count (the pipeline refuses NaN), unless a fill value is given.
- Layout, for parallel reading: files of at most ``FILE_ROWS`` rows, each in row groups of
  ``row_group_rows(n)`` rows (16 per file, between 4,096 and 65,536 rows). The pipeline reads a split in
  pieces of whole row groups (``pipeline.data.parquet_pieces``), so even a one-file split of 100k rows feeds
  8 readers and every Train worker. The report gives the files and row groups per split.
- The output is checked with ``pipeline.validate.validate_dataset``, so a bad conversion fails at once.
"""
from __future__ import annotations

import argparse
import fnmatch
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from pipeline.config import DatasetSpec, from_dict
from pipeline.validate import SPLITS, DataValidationError, validate_dataset

MISSING = "<missing>"
SOURCE = "__source_file__"  # each row's input file, for error messages; never written
FILE_ROWS = 1_048_576  # rows per written file at most
ROW_GROUPS_PER_FILE, MIN_GROUP_ROWS, MAX_GROUP_ROWS = 16, 4_096, 65_536


def row_group_rows(n: int) -> int:
    """Rows per row group of a file of ``n`` rows: 16 groups, clamped to 4,096..65,536 rows (smaller groups
    cost Parquet's compression and scan speed; larger ones limit how finely a file can be split)."""
    return int(np.clip(-(-n // ROW_GROUPS_PER_FILE), MIN_GROUP_ROWS, MAX_GROUP_ROWS))


class ConvertError(ValueError):
    """Options that do not fit the input (an unknown column, a split without data); says which and why."""


@dataclass
class ConvertConfig:
    labels: list[str]  # "click" (a 0/1 column) or "NAME=COLUMN:VALUE1|VALUE2"
    depends_on: dict[str, str] = field(default_factory=dict)  # child task -> parent task
    drop: list[str] = field(default_factory=list)  # columns (fnmatch patterns) that are not features
    sparse: list[str] = field(default_factory=list)  # patterns forced to sparse ids
    dense: list[str] = field(default_factory=list)  # patterns forced to dense
    normalize: dict[str, str] = field(default_factory=dict)  # dense pattern -> standard | log_standard | none
    bucketize: dict[str, list[float]] = field(default_factory=dict)  # dense column -> edges: adds sparse <column>_bucket
    dim: int = 8
    max_vocab_size: int = 1_000_001  # more distinct train values than this: hash_buckets of this size
    seq_max_len: int = 20
    split_fractions: dict[str, float] = field(default_factory=dict)  # e.g. {"valid": 0.1, "test": 0.1}
    split_test_into_valid: bool = False
    fill_dense_nan: float | None = None
    seed: int = 0
    header: bool = True  # CSV: the first line is a header
    columns: list[str] = field(default_factory=list)  # CSV column names (required without a header)
    sep: str = ","
    comment: str | None = None  # CSV: ignore the rest of a line after this character
    name: str | None = None  # spec name; default: the output directory's name
    description: str | None = None  # the spec's header comment; default: the inputs


def convert(inputs: dict[str, list[str | Path]], out_dir: str | Path, cfg: ConvertConfig) -> tuple[DatasetSpec, dict]:
    """Read ``inputs`` (split -> files), write ``out_dir/{train,valid,test}/part-NNNNN.parquet`` and
    ``out_dir/spec.yaml``, validate them; returns the spec and a report (rows, positive rates, features
    by kind, value rewrites per column)."""
    out_dir = Path(out_dir)
    frames = {s: read_files(files, cfg) for s, files in inputs.items() if files}
    if "train" not in frames:
        raise ConvertError("no train files")
    tasks, sources = _derive_labels(frames, cfg)
    columns = [c for c in frames["train"].columns if c != SOURCE]
    drop = set(_match(cfg.drop, columns, "--drop"))
    features = [c for c in columns if c not in drop | set(tasks) | sources]
    for split, df in frames.items():
        if absent := [c for c in features if c not in df]:
            raise ConvertError(f"{split} file(s) {_files(df)} lack the train columns {absent}")
    dense, sparse = set(_match(cfg.dense, features, "--dense")), set(_match(cfg.sparse, features, "--sparse"))
    kinds = {c: _kind(frames["train"][c], c, dense, sparse) for c in features}
    rewrites: dict[str, Counter] = {}
    _clean(frames, kinds, cfg, rewrites)
    for col, edges in cfg.bucketize.items():
        if kinds.get(col) != "dense":
            raise ConvertError(f"--bucketize {col!r}: not a dense feature (dense: {[c for c in features if kinds[c] == 'dense']})")
        for df in frames.values():  # bucket i holds edges[i-1] <= value < edges[i]
            df[f"{col}_bucket"] = np.searchsorted(np.asarray(edges, dtype="float64"), df[col], side="right").astype("int64")
        features.append(f"{col}_bucket")
        kinds[f"{col}_bucket"] = "sparse"
    splits = _split(frames, cfg)
    spec_raw = _spec_dict(splits["train"], features, kinds, tasks, cfg, out_dir)
    spec = from_dict(DatasetSpec, spec_raw)
    layout = _write(splits, features + tasks, out_dir)
    description = cfg.description or "made by pipeline.convert from " + "; ".join(
        f"{s}: {', '.join(map(str, fs))}" for s, fs in inputs.items() if fs)
    (out_dir / "spec.yaml").write_text(
        f"# {description}\n# Edit dims, vocabulary sizes, normalisation or shared tables as needed.\n"
        + yaml.safe_dump(spec_raw, sort_keys=False, default_flow_style=None, width=120))
    try:  # a conversion that breaks the spec's rules fails here, at once
        validate_dataset(str(out_dir), spec)
    except DataValidationError as e:
        raise DataValidationError(f"{e} (the converted splits and spec are in {out_dir}: fix the source, or train "
                                  "with --on-bad-rows drop to leave such rows out)") from None
    report = {
        "rows": {s: len(df) for s, df in splits.items()},
        "positive_rate": {s: {t: round(float(df[t].mean()), 4) for t in tasks} for s, df in splits.items()},
        "features": {k: [c for c in features if kinds[c] == k] for k in ("sparse", "sequence", "dense")},
        "rewrites": {c: dict(+n) for c, n in rewrites.items()},
        "layout": layout,
    }
    return spec, report


def read_files(files: list[str | Path], cfg: ConvertConfig) -> pd.DataFrame:
    """One split's files as one frame (Parquet files or directories, else CSV, gzip allowed)."""
    frames = [_read(Path(f), cfg).assign(**{SOURCE: str(f)}) for f in files]
    df = pd.concat(frames, ignore_index=True)
    df.columns = df.columns.astype(str)
    return df


def format_report(report: dict) -> str:
    lines = [f"rows: {report['rows']}", "positive rate:"]
    lines += [f"  {s}: {rates}" for s, rates in report["positive_rate"].items()]
    lines += [f"{k} features ({len(cols)}): {', '.join(cols)}" for k, cols in report["features"].items() if cols]
    lines += [f"rewritten values in {c!r}: {counts}" for c, counts in report["rewrites"].items()]
    lines += [f"{s}: {n['files']} file(s), {n['row_groups']} row groups of up to {n['row_group_rows']} rows"
              for s, n in report["layout"].items()]
    return "\n".join(lines)


def _read(path: Path, cfg: ConvertConfig) -> pd.DataFrame:
    if path.is_dir() or path.suffix == ".parquet":
        return pd.read_parquet(path)
    if not cfg.header and not cfg.columns:
        raise ConvertError(f"{path}: a CSV without a header needs its column names (--columns a,b,c)")
    kw = dict(sep=cfg.sep, skipinitialspace=True, comment=cfg.comment)
    header = 0 if cfg.header else None
    if header is None:
        first = pd.read_csv(path, header=None, nrows=1, dtype=str, **kw).iloc[0]
        if first.str.strip().tolist() == cfg.columns:
            header = 0  # one file of a headerless set has the header anyway (PaddleRec's train.csv): skip it
    # "" is the only null marker: "NA", "null" or "None" can be real category values
    return pd.read_csv(path, header=header, names=cfg.columns or None, keep_default_na=False, na_values=[""], **kw)


def _files(df: pd.DataFrame) -> list[str]:
    return df[SOURCE].unique().tolist()


def _match(patterns: list[str], columns: list[str], option: str) -> list[str]:
    out = []
    for p in patterns:
        hits = [c for c in columns if fnmatch.fnmatchcase(c, p)]
        if not hits:
            raise ConvertError(f"{option} {p!r} matches no column (columns: {columns})")
        out += hits
    return out


def _derive_labels(frames: dict[str, pd.DataFrame], cfg: ConvertConfig) -> tuple[list[str], set[str]]:
    """Adds or casts the label columns; returns the task names and the raw columns labels came from."""
    tasks, sources = [], set()
    for label in cfg.labels:
        name, _, rule = label.partition("=")
        column, colon, values = rule.partition(":")
        if rule and not (colon and column and values):
            raise ConvertError(f"--label {label!r}: expected NAME or NAME=COLUMN:VALUE1|VALUE2")
        for split, df in frames.items():
            if (column or name) not in df:
                raise ConvertError(f"label {name!r}: column {column or name!r} not in the {split} file(s) "
                                   f"{_files(df)} (columns: {[c for c in df.columns if c != SOURCE]})")
            if rule:
                text = df[column].astype("string").str.strip().str.removesuffix(".")
                df[name] = text.isin(values.split("|")).astype("int64")
            elif pd.api.types.is_bool_dtype(df[name]) or pd.api.types.is_integer_dtype(df[name]):
                df[name] = df[name].astype("int64")
        tasks.append(name)
        sources |= {column} if rule else set()
    for child, parent in cfg.depends_on.items():
        if {child, parent} - set(tasks):
            raise ConvertError(f"--depends-on {child}:{parent}: {sorted({child, parent} - set(tasks))} not among the labels {tasks}")
    return tasks, sources


def _kind(col: pd.Series, name: str, dense: set[str], sparse: set[str]) -> str:
    if name in dense:
        return "dense"
    if name in sparse:
        return "sparse"
    values = col.dropna()
    if len(values) and isinstance(values.iloc[0], (list, np.ndarray)):
        return "sequence"
    if pd.api.types.is_float_dtype(col):
        return "dense"
    if pd.api.types.is_integer_dtype(col) or pd.api.types.is_bool_dtype(col) or pd.api.types.is_string_dtype(col):
        return "sparse"
    raise ConvertError(f"column {name!r} has type {col.dtype}: --drop it, or convert it to numbers or strings first")


def _clean(frames: dict[str, pd.DataFrame], kinds: dict[str, str], cfg: ConvertConfig, rewrites: dict[str, Counter]) -> None:
    """Dense -> float64 without NaN; sparse -> int64 ids, or strings in every split when any split has text."""
    problems = []
    for col, kind in kinds.items():
        count = rewrites.setdefault(col, Counter())
        ints = all(pd.api.types.is_integer_dtype(df[col]) or pd.api.types.is_bool_dtype(df[col]) for df in frames.values())
        for df in frames.values():
            if kind == "dense":
                v = pd.to_numeric(df[col], errors="coerce").astype("float64")
                bad = ~np.isfinite(v)
                if bad.any() and cfg.fill_dense_nan is None:
                    total = df[SOURCE].value_counts()
                    problems += [f"{f}: column {col!r}: {n} of {total[f]} rows are NaN, infinite or not a number"
                                 for f, n in df.loc[bad, SOURCE].value_counts(sort=False).items()]
                count["nan_filled"] += int(bad.sum())
                df[col] = v.mask(bad, cfg.fill_dense_nan)
            elif kind == "sparse" and ints:
                df[col] = df[col].astype("int64")
            elif kind == "sparse":
                df[col] = _ids_as_text(df[col], count)
        if not +count:  # + drops zero counts
            del rewrites[col]
    if problems:
        raise DataValidationError("; ".join(problems) + " (the pipeline refuses NaN: fix the data, or pass "
                                  "--fill-dense-nan VALUE; or --sparse COLUMN if it is an id column)")


def _ids_as_text(col: pd.Series, count: Counter) -> pd.Series:
    if pd.api.types.is_float_dtype(col) and (col.dropna() % 1 == 0).all():
        col = col.astype("Int64")  # integer ids that a blank made float: "7", as in a split without blanks
    text = col.astype("string")
    stripped = text.str.strip()
    missing = stripped.isna() | stripped.isin(["", "?"])
    count["stripped"] += int(((stripped != text) & ~missing).sum())
    count[MISSING] += int(missing.sum())
    return stripped.mask(missing, MISSING).astype(str)


def _split(frames: dict[str, pd.DataFrame], cfg: ConvertConfig) -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(cfg.seed)
    if cfg.split_test_into_valid:
        if "test" not in frames or "valid" in frames:
            raise ConvertError("--split-test-into-valid needs test files and no valid files")
        test = frames.pop("test")
        order = rng.permutation(len(test))
        frames["valid"], frames["test"] = test.iloc[order[: len(test) // 2]], test.iloc[order[len(test) // 2:]]
    drawn = [s for s in SPLITS[1:] if s not in frames]
    if set(cfg.split_fractions) - set(drawn):
        raise ConvertError(f"split fractions {cfg.split_fractions}: only splits without files can be drawn from train ({drawn})")
    if set(drawn) - set(cfg.split_fractions):
        raise ConvertError(f"no data for split(s) {drawn}: give their files, a fraction of train "
                           "(--split valid=0.1), or --split-test-into-valid")
    if drawn:
        fractions = [cfg.split_fractions[s] for s in drawn]
        if min(fractions) <= 0 or sum(fractions) >= 1:
            raise ConvertError(f"split fractions {cfg.split_fractions} must be > 0 and sum to < 1")
        train = frames["train"]
        order = rng.permutation(len(train))
        *parts, rest = np.split(order, np.cumsum(np.round(np.array(fractions) * len(train)).astype(int)))
        frames |= {s: train.iloc[p] for s, p in zip(drawn, parts)} | {"train": train.iloc[rest]}
    return {s: frames[s].reset_index(drop=True) for s in SPLITS}


def _spec_dict(train: pd.DataFrame, features: list[str], kinds: dict[str, str], tasks: list[str],
               cfg: ConvertConfig, out_dir: Path) -> dict:
    dense_cols = [c for c in features if kinds[c] == "dense"]
    normalize = {c: m for p, m in cfg.normalize.items() for c in _match([p], dense_cols, "--normalize")}
    spec: dict = {"name": cfg.name or out_dir.name, "sparse": [], "sequences": [], "dense": []}
    for c in features:
        if kinds[c] == "dense":
            spec["dense"].append({"name": c, "normalize": normalize.get(c, "standard")})
            continue
        values = train[c].explode() if kinds[c] == "sequence" else train[c]
        rows = int(values.nunique()) + 1  # + row 0: out of vocabulary (and sequence padding)
        entry = {"name": c, **({"vocab_size": rows} if rows <= cfg.max_vocab_size else {"hash_buckets": cfg.max_vocab_size}),
                 "dim": cfg.dim}
        if kinds[c] == "sequence":
            spec["sequences"].append(entry | {"max_len": cfg.seq_max_len, "pooling": "mean"})
        else:
            spec["sparse"].append(entry)
    spec["tasks"] = [{"name": t} | ({"depends_on": cfg.depends_on[t]} if t in cfg.depends_on else {}) for t in tasks]
    return {k: v for k, v in spec.items() if v != []}


def _write(splits: dict[str, pd.DataFrame], columns: list[str], out_dir: Path) -> dict:
    """Each split as ``part-NNNNN.parquet`` files of at most ``FILE_ROWS`` rows; returns the layout per split
    (files, row groups, rows per group)."""
    layout = {}
    for split, df in splits.items():
        parent = out_dir / split
        existing = list(parent.glob("*.parquet"))
        if existing:
            raise ConvertError(f"{parent} already holds Parquet files (inputs or an earlier conversion: {existing}): "
                               "choose a new output directory")
        parent.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pandas(df[columns], preserve_index=False)
        starts = range(0, max(len(table), 1), FILE_ROWS)
        group = row_group_rows(min(len(table), FILE_ROWS))
        for k, start in enumerate(starts):
            target = parent / f"part-{k:05d}.parquet"
            pq.write_table(table.slice(start, FILE_ROWS), target, row_group_size=group)
        groups = sum(pq.ParquetFile(parent / f"part-{k:05d}.parquet").num_row_groups for k in range(len(starts)))
        layout[split] = {"files": len(starts), "row_groups": groups, "row_group_rows": group}
    return layout


# ----------------------------------------------------------------------------- command line (jobs/convert.py, mtrec-convert)

USAGE = """Convert CSV or Parquet impression logs into train/ valid/ test/ Parquet splits plus a dataset spec.

    # files per split; purchase is over the exposure space (purchase=1 implies click=1)
    python jobs/convert.py --train ali_ccp_train.csv --valid ali_ccp_val.csv --test ali_ccp_test.csv \\
        --label click --label purchase --depends-on purchase:click --out data/ali-ccp
    # 10 % of train drawn at random (seeded) for validation; quoted patterns select columns
    python jobs/convert.py --train aliexpress_train.csv --test aliexpress_test.csv --split valid=0.1 \\
        --label click --label conversion --depends-on conversion:click --drop search_id \\
        --dense 'numerical_*' --out data/aliexpress
    # a CSV without a header, labels derived from a string column, the test file split into valid/test
    python jobs/convert.py --train log.csv --test log_test.csv --split-test-into-valid \\
        --no-header --columns user,item,price,outcome --label buy=outcome:purchase --out data/mylog

Then: python jobs/train_ple.py --data OUT --spec OUT/spec.yaml   (docs/bring-your-own-data.md)"""


def pairs(values: list[str], sep: str, option: str) -> dict[str, str]:
    if bad := [v for v in values if sep not in v]:
        sys.exit(f"{option} {bad[0]!r}: expected KEY{sep}VALUE")
    return dict(v.split(sep, 1) for v in values)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=USAGE.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(USAGE.splitlines()[1:]))
    p.add_argument("--train", nargs="+", required=True, help="CSV (optionally .gz) or Parquet files or directories")
    p.add_argument("--valid", nargs="+", default=[])
    p.add_argument("--test", nargs="+", default=[])
    p.add_argument("--out", required=True, help="output directory: train/ valid/ test/ and spec.yaml")
    p.add_argument("--label", action="append", required=True,
                   help="a 0/1 column, or NAME=COLUMN:VALUE1|VALUE2 (1 where COLUMN is one of the values)")
    p.add_argument("--depends-on", action="append", default=[], metavar="CHILD:PARENT", help="the funnel, e.g. purchase:click")
    p.add_argument("--split", action="append", default=[], metavar="SPLIT=FRACTION",
                   help="draw a split without files from train at random, e.g. valid=0.1")
    p.add_argument("--split-test-into-valid", action="store_true", help="split the test files 1:1 at random into valid and test")
    p.add_argument("--drop", nargs="+", action="extend", default=[], metavar="COL", help="columns (fnmatch patterns) that are not features")
    p.add_argument("--sparse", nargs="+", action="extend", default=[], metavar="COL", help="force sparse ids")
    p.add_argument("--dense", nargs="+", action="extend", default=[], metavar="COL", help="force dense")
    p.add_argument("--normalize", nargs="+", action="extend", default=[], metavar="COL=METHOD",
                   help="dense normalisation: standard (default), log_standard or none")
    p.add_argument("--bucketize", action="append", default=[], metavar="COL=E1,E2,...",
                   help="add the sparse feature COL_bucket: the index of the dense COL among these edges")
    p.add_argument("--dim", type=int, default=8, help="embedding dim (default: %(default)s)")
    p.add_argument("--max-vocab-size", type=int, default=1_000_001, help="hash ids above this many (default: %(default)s)")
    p.add_argument("--fill-dense-nan", type=float, metavar="VALUE", help="fill NaN in dense columns (default: refuse them)")
    p.add_argument("--no-header", action="store_true", help="the CSV files have no header (give --columns)")
    p.add_argument("--columns", help="comma-separated CSV column names")
    p.add_argument("--sep", default=",", help="CSV separator (default: %(default)r)")
    p.add_argument("--comment", help="CSV: ignore the rest of a line after this character")
    p.add_argument("--name", help="spec name (default: the output directory's name)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    cfg = ConvertConfig(
        labels=a.label, depends_on=pairs(a.depends_on, ":", "--depends-on"), drop=a.drop, sparse=a.sparse, dense=a.dense,
        normalize=pairs(a.normalize, "=", "--normalize"),
        bucketize={k: [float(e) for e in v.split(",")] for k, v in pairs(a.bucketize, "=", "--bucketize").items()},
        dim=a.dim, max_vocab_size=a.max_vocab_size, fill_dense_nan=a.fill_dense_nan, seed=a.seed,
        split_fractions={k: float(v) for k, v in pairs(a.split, "=", "--split").items()},
        split_test_into_valid=a.split_test_into_valid, header=not a.no_header,
        columns=a.columns.split(",") if a.columns else [], sep=a.sep, comment=a.comment, name=a.name)
    _, report = convert({"train": a.train, "valid": a.valid, "test": a.test}, a.out, cfg)
    print(format_report(report))
    print(f"wrote {a.out}/{{train,valid,test}}/part-*.parquet and {a.out}/spec.yaml; train with:\n"
          f"  python jobs/train_ple.py --data {a.out} --spec {a.out}/spec.yaml")
    return report


def console_main() -> None:
    try:
        main()
    except ValueError as e:  # bad input or options (ConvertError, DataValidationError, ConfigError): the message says what
        sys.exit(f"convert: {e}")
