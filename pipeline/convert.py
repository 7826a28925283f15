"""Bring your own data: any CSV or Parquet impression log -> train/ valid/ test/ Parquet splits and a
dataset spec YAML, with no code (``jobs/convert.py``).

Features are typed from the train split: list columns become sequences, float columns dense features,
integer / string / bool columns sparse ids (a vocabulary when the train split has at most
``max_vocab`` distinct values, else hashing). Every rewrite of a value is counted and reported:
strings are stripped, and empty or ``?`` strings become the category ``<missing>``. A NaN in a dense
column is refused (naming the file, the column and the count) unless a fill value is given.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from pipeline.config import DatasetSpec, from_dict
from pipeline.validate import DataValidationError, validate_dataset

MISSING = "<missing>"


@dataclass
class ConvertConfig:
    labels: list[str]  # "click" (a 0/1 column) or "income=income:>50K" (1 where the column is a value)
    depends_on: dict[str, str] = field(default_factory=dict)  # child task -> parent task
    drop: list[str] = field(default_factory=list)
    sparse: list[str] = field(default_factory=list)  # force these columns to sparse ids
    dense: list[str] = field(default_factory=list)  # force these columns to dense
    dim: int = 8
    max_vocab: int = 1_000_000
    split_fractions: dict[str, float] = field(default_factory=dict)  # e.g. {"valid": 0.1, "test": 0.1}
    split_test_into_valid: bool = False  # the test files split 1:1 into valid and test
    fill_dense_nan: float | None = None
    seed: int = 0
    csv_header: bool = True
    csv_columns: list[str] = field(default_factory=list)
    csv_sep: str = ","


def read_files(files: list[str], cfg: ConvertConfig) -> pd.DataFrame:
    frames = []
    for f in files:
        if str(f).endswith(".parquet"):
            df = pd.read_parquet(f)
        else:
            header = 0 if cfg.csv_header else None
            df = pd.read_csv(f, sep=cfg.csv_sep, header=header, names=cfg.csv_columns or None,
                             skipinitialspace=True, keep_default_na=False, na_values=[""])
        frames.append(df.assign(__file__=str(f)))
    return pd.concat(frames, ignore_index=True)


def convert(inputs: dict[str, list[str]], out_dir: str | Path, cfg: ConvertConfig) -> tuple[DatasetSpec, dict]:
    """Convert, write and validate; returns the spec and a report (rows, rates, features, rewrites)."""
    out_dir = Path(out_dir)
    splits = {name: read_files(files, cfg) for name, files in inputs.items() if files}
    splits = _make_splits(splits, cfg)
    tasks = _derive_labels(splits, cfg)
    report: dict = {"rewrites": {}}
    features = [c for c in splits["train"].columns if c not in set(cfg.drop) | set(tasks) | {"__file__"}
                and c not in {lbl.split("=", 1)[1].split(":")[0] for lbl in cfg.labels if "=" in lbl}]
    kinds = {c: _kind(splits["train"][c], c, cfg) for c in features}
    for name, df in splits.items():
        for c in features:
            if kinds[c] == "sparse" and (df[c].dtype == object or pd.api.types.is_string_dtype(df[c])):
                s = df[c].astype(str).str.strip()
                missing = s.isin(["", "?", "nan", "None"])
                if missing.any():
                    report["rewrites"][f"{name}:{c}"] = int(missing.sum())
                df[c] = s.mask(missing, MISSING)
            elif kinds[c] == "dense":
                v = pd.to_numeric(df[c], errors="coerce").astype("float64")
                nan = v.isna()
                if nan.any():
                    if cfg.fill_dense_nan is None:
                        first = df.loc[nan, "__file__"].iloc[0]
                        raise DataValidationError(
                            f"{first}: column {c!r}: {int(nan.sum())} of {len(df)} rows in split {name!r} are NaN or "
                            f"not numbers (the pipeline refuses NaN; pass --fill-dense-nan VALUE to fill them)")
                    report["rewrites"][f"{name}:{c}:nan_filled"] = int(nan.sum())
                    v = v.fillna(cfg.fill_dense_nan)
                df[c] = v
    spec_raw = {"name": out_dir.name, "sparse": [], "sequences": [], "dense": [], "tasks": []}
    for c in features:
        if kinds[c] == "dense":
            spec_raw["dense"].append({"name": c})
        else:
            distinct = _distinct(splits["train"][c], kinds[c])
            size = {"vocab_size": distinct + 1} if distinct < cfg.max_vocab else {"hash_buckets": cfg.max_vocab}
            entry = {"name": c, **size, "dim": cfg.dim}
            (spec_raw["sequences"] if kinds[c] == "sequence" else spec_raw["sparse"]).append(
                entry | ({"max_len": 20, "pooling": "mean"} if kinds[c] == "sequence" else {}))
    spec_raw["tasks"] = [{"name": t, **({"depends_on": cfg.depends_on[t]} if t in cfg.depends_on else {})}
                         for t in tasks]
    unknown = set(cfg.depends_on) - set(tasks) | set(cfg.depends_on.values()) - set(tasks)
    if unknown:
        raise ValueError(f"--depends-on names {sorted(unknown)}, which are not labels ({tasks})")
    spec = from_dict(DatasetSpec, spec_raw)
    for name, df in splits.items():
        (out_dir / name).mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pandas(df[features + tasks].reset_index(drop=True), preserve_index=False)
        pq.write_table(table, out_dir / name / "part-00000.parquet")
    header = (f"# Made by pipeline.convert from {', '.join(f'{k}: {v}' for k, v in inputs.items() if v)}\n"
              "# Edit dims, vocabulary sizes or normalisation as needed.\n")
    (out_dir / "spec.yaml").write_text(header + yaml.safe_dump(spec_raw, sort_keys=False))
    report |= {"rows": {n: len(df) for n, df in splits.items()},
               "positive_rate": {t: float(splits["train"][t].mean()) for t in tasks},
               "features": {k: [c for c in features if kinds[c] == k] for k in ("sparse", "sequence", "dense")}}
    validate_dataset(str(out_dir), spec)  # a conversion that breaks the spec's rules fails here, at once
    return spec, report


def _make_splits(splits: dict[str, pd.DataFrame], cfg: ConvertConfig) -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(cfg.seed)
    if cfg.split_test_into_valid:
        test = splits.pop("test")
        order = rng.permutation(len(test))
        splits["valid"], splits["test"] = test.iloc[order[: len(test) // 2]], test.iloc[order[len(test) // 2:]]
    missing = [s for s in ("valid", "test") if s not in splits]
    if missing:
        if set(missing) - set(cfg.split_fractions):
            raise ValueError(f"no files for split(s) {missing}: give them or --split {missing[0]}=FRACTION")
        train = splits["train"]
        order = rng.permutation(len(train))
        start = 0
        for s in missing:
            n = int(round(cfg.split_fractions[s] * len(train)))
            splits[s] = train.iloc[order[start:start + n]]
            start += n
        splits["train"] = train.iloc[order[start:]]
    return {s: splits[s].copy() for s in ("train", "valid", "test")}


def _derive_labels(splits: dict[str, pd.DataFrame], cfg: ConvertConfig) -> list[str]:
    tasks = []
    for label in cfg.labels:
        name, _, rule = label.partition("=")
        for split, df in splits.items():
            if rule:
                column, _, values = rule.partition(":")
                if column not in df:
                    raise ValueError(f"label {name!r}: column {column!r} not in split {split!r} ({list(df.columns)[:20]})")
                raw = df[column].astype(str).str.strip().str.rstrip(".")
                df[name] = raw.isin(values.split("|")).astype("int64")
            elif name not in df:
                raise ValueError(f"label column {name!r} not in split {split!r} ({list(df.columns)[:20]})")
        tasks.append(name)
    return tasks


def _kind(col: pd.Series, name: str, cfg: ConvertConfig) -> str:
    if name in cfg.dense:
        return "dense"
    if name in cfg.sparse:
        return "sparse"
    sample = col.dropna()
    if len(sample) and isinstance(sample.iloc[0], (list, np.ndarray)):
        return "sequence"
    return "dense" if pd.api.types.is_float_dtype(col) else "sparse"


def _distinct(col: pd.Series, kind: str) -> int:
    return int(col.explode().nunique()) if kind == "sequence" else int(col.nunique())
