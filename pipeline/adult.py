"""UCI Adult in the reference protocol: tasks income > 50K and marital status (never married), both
over all people; train on adult.data, adult.test split 1:1 at random into validation and test (the
MMoE paper's protocol). marital_status and income are labels, never features."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

ADULT_DIR = Path(__file__).resolve().parents[1] / "datasets" / "uci-adult"
SPEC_PATH = ADULT_DIR / "spec.yaml"
COLUMNS = ["age", "workclass", "fnlwgt", "education", "education_num", "marital_status", "occupation",
           "relationship", "race", "sex", "capital_gain", "capital_loss", "hours_per_week", "native_country",
           "income"]
CATEGORICAL = ["workclass", "education", "occupation", "relationship", "race", "sex", "native_country"]
NUMERIC = ["age", "fnlwgt", "education_num", "capital_gain", "capital_loss", "hours_per_week"]
BUCKETS = {
    "age": [18, 25, 30, 35, 40, 45, 50, 55, 60, 65],
    "hours_per_week": [20, 30, 40, 41, 50, 60],
    "capital_gain": [1, 3000, 5000, 7000, 10000, 15000],
    "capital_loss": [1, 1500, 1800, 2000, 2500],
}


def read_adult(path: Path) -> pd.DataFrame:
    df = pd.read_csv(path, header=None, names=COLUMNS, sep=",", skipinitialspace=True,
                     comment="|", na_values=[], keep_default_na=False)  # '?' stays a category of its own
    df = df.dropna(how="all")
    labels = pd.DataFrame({
        "income": df["income"].str.rstrip(".").eq(">50K").astype("int64"),
        "marital": df["marital_status"].eq("Never-married").astype("int64"),
    })
    # bucketised copies of the skewed numeric columns (as in the Wide & Deep census tutorial): the
    # network gets their thresholds as ids instead of having to carve them out of one standardised value
    buckets = pd.DataFrame({
        f"{col}_bucket": np.searchsorted(np.asarray(edges), df[col].astype("float64"), side="right").astype("int64")
        for col, edges in BUCKETS.items()})
    return pd.concat([df[CATEGORICAL], buckets, df[NUMERIC].astype("float64"), labels], axis=1)


def prepare_adult(out_dir: str | Path, seed: int = 0, source: Path = ADULT_DIR) -> Path:
    """Write train/ valid/ test/ Parquet splits of Adult; returns out_dir."""
    out_dir = Path(out_dir)
    train = read_adult(source / "adult.data.gz")
    test = read_adult(source / "adult.test.gz")
    order = np.random.default_rng(seed).permutation(len(test))
    half = len(test) // 2
    splits = {"train": train, "valid": test.iloc[order[:half]], "test": test.iloc[order[half:]]}
    for name, df in splits.items():
        (out_dir / name).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pandas(df.reset_index(drop=True), preserve_index=False),
                       out_dir / name / "part-00000.parquet")
    return out_dir
