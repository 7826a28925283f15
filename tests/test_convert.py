"""Bring your own data: CSV/Parquet logs -> Parquet splits + spec, on the public Ali-CCP and AliExpress
samples and UCI Adult; bad input refused with the file, column and count."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.adult import SPEC_PATH as ADULT_SPEC, prepare_adult
from pipeline.config import DatasetSpec
from pipeline.convert import ConvertConfig, convert
from pipeline.validate import DataValidationError, validate_dataset

DATA = Path(__file__).parent / "data"


def test_adult_protocol(tmp_path):
    out = prepare_adult(tmp_path / "adult", seed=0)
    spec = DatasetSpec.load(ADULT_SPEC)
    rows = validate_dataset(str(out), spec)
    assert rows["train"] == 32_561 and rows["valid"] + rows["test"] == 16_281 and abs(rows["valid"] - rows["test"]) <= 1
    train = pd.read_parquet(out / "train")
    assert train["income"].mean() == pytest.approx(7_841 / 32_561)
    assert 0.3 < train["marital"].mean() < 0.36
    assert "marital_status" not in train and "income" not in spec.feature_columns
    # every category of the spec's features fits its vocabulary (no silent out-of-vocabulary in train)
    for f in spec.sparse:
        assert train[f.name].nunique() <= f.vocab_size - 1, f.name
    again = prepare_adult(tmp_path / "again", seed=0)
    assert pd.read_parquet(again / "test").equals(pd.read_parquet(out / "test"))  # the split is seeded


def test_ali_ccp_sample(tmp_path):
    d = DATA / "ali-ccp"
    spec, report = convert({"train": [str(d / "ali_ccp_train_sample.csv")], "valid": [str(d / "ali_ccp_val_sample.csv")],
                            "test": [str(d / "ali_ccp_test_sample.csv")]}, tmp_path / "ali",
                           ConvertConfig(labels=["click", "purchase"], depends_on={"purchase": "click"}))
    assert report["rows"] == {"train": 100, "valid": 50, "test": 50}
    assert len(spec.sparse) == 23 and len(spec.dense) == 8
    assert all(f.name.startswith("D") for f in spec.dense)
    assert spec.task("purchase").depends_on == "click"
    assert DatasetSpec.load(tmp_path / "ali" / "spec.yaml").task_names == ["click", "purchase"]


def test_aliexpress_sample_split_at_random(tmp_path):
    d = DATA / "aliexpress"
    spec, report = convert({"train": [str(d / "aliexpress_train_sample.csv")], "test": [str(d / "aliexpress_test_sample.csv")]},
                           tmp_path / "ae", ConvertConfig(labels=["click", "conversion"], depends_on={"conversion": "click"},
                                                          drop=["search_id"], split_fractions={"valid": 0.2},
                                                          # some numerical_* columns hold only integers in the sample
                                                          dense=[f"numerical_{i}" for i in range(1, 64)]))
    assert report["rows"] == {"train": 80, "valid": 20, "test": 20}
    assert len(spec.sparse) == 16 and len(spec.dense) == 63


def test_paddlerec_sample_breaks_the_funnel_and_is_refused(tmp_path):
    d = DATA / "paddlerec-aitm-ali-ccp"
    columns = (d / "train.csv").read_text().splitlines()[0].split(",")
    train = tmp_path / "train.csv"
    (tmp_path / "train.csv").write_text((d / "train.csv").read_text())
    test_with_header = tmp_path / "test.csv"
    test_with_header.write_text(",".join(columns) + "\n" + (d / "test.csv").read_text())
    with pytest.raises(DataValidationError, match=r"train/part-00000.parquet: column 'purchase': 2 of \d+ rows have purchase=1 but click=0"):
        convert({"train": [str(train)], "test": [str(test_with_header)]}, tmp_path / "out",
                ConvertConfig(labels=["click", "purchase"], depends_on={"purchase": "click"}, split_fractions={"valid": 0.1}))


def test_nan_in_a_dense_column_names_file_column_and_count(tmp_path):
    df = pd.DataFrame({"u": [1, 2, 3, 4], "x": [0.5, np.nan, np.nan, 1.0], "click": [0, 1, 0, 1]})
    f = tmp_path / "log.csv"
    df.to_csv(f, index=False)
    cfg = ConvertConfig(labels=["click"], split_fractions={"valid": 0.25, "test": 0.25})
    with pytest.raises(DataValidationError, match=rf"{f}: column 'x': 2 of \d rows in split 'train'|{f}: column 'x': \d of \d rows"):
        convert({"train": [str(f)]}, tmp_path / "out", cfg)
    cfg.fill_dense_nan = 0.0
    _, report = convert({"train": [str(f)]}, tmp_path / "out2", cfg)
    assert sum(v for k, v in report["rewrites"].items() if k.endswith("x:nan_filled")) == 2


def test_unknown_label_is_a_clear_error(tmp_path):
    f = tmp_path / "log.csv"
    pd.DataFrame({"u": [1, 2], "click": [0, 1]}).to_csv(f, index=False)
    with pytest.raises(ValueError, match="label column 'buy' not in split 'train'"):
        convert({"train": [str(f)], "valid": [str(f)], "test": [str(f)]}, tmp_path / "o", ConvertConfig(labels=["buy"]))


def test_converted_ali_ccp_trains_end_to_end(ray_local, tmp_path):
    from pipeline.config import DataPaths, JobConfig, ModelConfig, TrainConfig
    from pipeline.job import run

    d = DATA / "ali-ccp"
    convert({"train": [str(d / "ali_ccp_train_sample.csv")], "valid": [str(d / "ali_ccp_val_sample.csv")],
             "test": [str(d / "ali_ccp_test_sample.csv")]}, tmp_path / "ali",
            ConvertConfig(labels=["click", "purchase"], depends_on={"purchase": "click"}))
    job = JobConfig(data=DataPaths(str(tmp_path / "ali"), str(tmp_path / "ali" / "spec.yaml")),
                    model=ModelConfig(name="esmm"), train=TrainConfig(epochs=1, batch_size=32, num_workers=2),
                    name="ali", output=str(tmp_path / "out"), storage_path=str(tmp_path / "store"))
    metrics = run(job)
    assert metrics["test"]["rows"] == 50 and np.isfinite(metrics["test"]["click"]["auc"])
