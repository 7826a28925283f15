"""UCI Adult in the MMoE paper's protocol, through the generic converter (pipeline.convert).

Tasks ``income`` (> 50K) and ``marital`` (marital_status == Never-married), both over all people;
marital_status and income are labels, never features. Train on adult.data; adult.test is split 1:1 at
random (seeded) into validation and test. The spec it writes is committed as datasets/uci-adult/spec.yaml
(``python jobs/prepare_adult.py --write-spec``).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from pipeline.convert import ConvertConfig, convert

ADULT_DIR = Path(__file__).resolve().parents[1] / "datasets" / "uci-adult"
SPEC_PATH = ADULT_DIR / "spec.yaml"
COLUMNS = ["age", "workclass", "fnlwgt", "education", "education_num", "marital_status", "occupation",
           "relationship", "race", "sex", "capital_gain", "capital_loss", "hours_per_week", "native_country",
           "income"]
# Bucketised copies of the skewed numeric columns (as in the Wide & Deep census tutorial): the network
# gets their thresholds as ids instead of carving them out of one standardised value (+1.1 points of
# test income AUC for ESMM, docs/NOTES.md).
BUCKETS = {
    "age": [18, 25, 30, 35, 40, 45, 50, 55, 60, 65],
    "hours_per_week": [20, 30, 40, 41, 50, 60],
    "capital_gain": [1, 3000, 5000, 7000, 10000, 15000],
    "capital_loss": [1, 1500, 1800, 2000, 2500],
}
ADULT = ConvertConfig(
    labels=["income=income:>50K", "marital=marital_status:Never-married"],  # test labels end in '.': stripped
    drop=["marital_status"],
    dense=["age", "fnlwgt", "education_num", "capital_gain", "capital_loss", "hours_per_week"],
    normalize={"fnlwgt": "log_standard", "capital_gain": "log_standard", "capital_loss": "log_standard"},
    bucketize=BUCKETS,
    split_test_into_valid=True,
    header=False, columns=COLUMNS, comment="|",  # adult.test's first line is "|1x3 Cross validator"
    name="uci_adult",
    description="UCI Adult, the MMoE paper's protocol (tasks: income > 50K, marital = never married); "
                "made by pipeline.adult (python jobs/prepare_adult.py --write-spec)",
)


def prepare_adult(out_dir: str | Path, seed: int = 0, source: Path = ADULT_DIR) -> tuple[Path, dict]:
    """Write train/ valid/ test/ Parquet splits of Adult and their spec.yaml; returns out_dir and the report."""
    inputs = {"train": [source / "adult.data.gz"], "test": [source / "adult.test.gz"]}
    _, report = convert(inputs, out_dir, dataclasses.replace(ADULT, seed=seed))
    return Path(out_dir), report
