"""Bring your own data: CSV/Parquet logs -> Parquet splits + spec, on UCI Adult and the public Ali-CCP,
AliExpress and PaddleRec samples; bad input refused with the file, column and count. No Ray."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.config import DatasetSpec
from pipeline.convert import MISSING, ConvertConfig, ConvertError, convert
from pipeline.adult import SPEC_PATH as ADULT_SPEC, prepare_adult
from pipeline.data import parquet_pieces
from pipeline.validate import DataValidationError, split_files, validate_dataset

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
ALI_CCP_SPARSE = ("101,121,122,124,125,126,127,128,129,205,206,207,210,216,508,509,702,853,301,"
                  "109_14,110_14,127_14,150_14").split(",")


def cli(*argv: str) -> dict:
    """jobs/convert.py's main, in process (a script, not a package module)."""
    spec = importlib.util.spec_from_file_location("convert_job", ROOT / "jobs" / "convert.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def adult(tmp_path_factory) -> tuple[Path, dict]:
    return prepare_adult(tmp_path_factory.mktemp("adult") / "adult", seed=0)


def test_adult_protocol(adult):
    out, report = adult
    spec = DatasetSpec.load(out / "spec.yaml")
    assert spec == DatasetSpec.load(ADULT_SPEC)  # the committed spec is what the code generates
    rows = validate_dataset(str(out), spec).rows
    assert rows == report["rows"]
    assert rows["train"] == 32_561 and rows["valid"] + rows["test"] == 16_281 and abs(rows["valid"] - rows["test"]) <= 1
    assert report["positive_rate"]["train"]["income"] == pytest.approx(7_841 / 32_561, abs=1e-4)
    assert 0.3 < report["positive_rate"]["train"]["marital"] < 0.36
    assert {"marital_status", "income"}.isdisjoint(spec.feature_columns)
    assert spec.task_names == ["income", "marital"] and all(f.dim == 8 for f in spec.sparse)
    assert set(report["rewrites"]) == {"workclass", "occupation", "native_country"}  # the '?' values
    train = pd.read_parquet(out / "train")
    assert "marital_status" not in train and (train["workclass"] == MISSING).sum() == 1_836
    assert train["income"].dtype == np.int64
    # written for parallel reading: 8 row groups, so the one train file is read in 7 pieces for 2 workers
    assert report["layout"]["train"] == {"files": 1, "row_groups": 8, "row_group_rows": 4_096}
    fs, files = split_files(str(out), "train")
    assert [p.rows for p in parquet_pieces(fs, files, min_pieces=4)] == [4_096] * 6 + [7_985]


def test_large_splits_are_written_as_several_files(tmp_path, monkeypatch):
    import pipeline.convert

    monkeypatch.setattr(pipeline.convert, "FILE_ROWS", 40)
    d = DATA / "ali-ccp"
    report = cli("--train", d / "ali_ccp_train_sample.csv", "--split", "valid=0.2", "--split", "test=0.2",
                 "--label", "click", "--label", "purchase", "--depends-on", "purchase:click", "--out", tmp_path / "ali")
    assert report["rows"] == {"train": 60, "valid": 20, "test": 20}
    assert report["layout"]["train"] == {"files": 2, "row_groups": 2, "row_group_rows": 4_096}
    assert sorted(p.name for p in (tmp_path / "ali" / "train").iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    assert len(pd.read_parquet(tmp_path / "ali" / "train")) == 60


def test_ali_ccp_sample(tmp_path):
    d = DATA / "ali-ccp"
    report = cli("--train", d / "ali_ccp_train_sample.csv", "--valid", d / "ali_ccp_val_sample.csv",
                 "--test", d / "ali_ccp_test_sample.csv", "--label", "click", "--label", "purchase",
                 "--depends-on", "purchase:click", "--out", tmp_path / "ali")
    spec = DatasetSpec.load(tmp_path / "ali" / "spec.yaml")
    assert report["rows"] == {"train": 100, "valid": 50, "test": 50}
    assert [f.name for f in spec.sparse] == ALI_CCP_SPARSE
    assert len(spec.dense) == 8 and all(f.name.startswith("D") for f in spec.dense)
    assert spec.task("purchase").depends_on == "click" and spec.task("click").depends_on is None
    assert report["positive_rate"]["train"] == {"click": 0.07, "purchase": 0.01}
    validate_dataset(str(tmp_path / "ali"), spec)


def test_aliexpress_sample_train_split_at_random(tmp_path):
    d = DATA / "aliexpress"
    cfg = ConvertConfig(labels=["click", "conversion"], depends_on={"conversion": "click"}, drop=["search_id"],
                        dense=["numerical_*"],  # numerical_58..60 hold only integers in the sample
                        split_fractions={"valid": 0.2}, seed=1)
    inputs = {"train": [d / "aliexpress_train_sample.csv"], "test": [d / "aliexpress_test_sample.csv"]}
    spec, report = convert(inputs, tmp_path / "ae", cfg)
    assert report["rows"] == {"train": 80, "valid": 20, "test": 20}
    assert len(spec.sparse) == 16 and len(spec.dense) == 63 and spec.task_names == ["click", "conversion"]
    train, valid = pd.read_parquet(tmp_path / "ae" / "train"), pd.read_parquet(tmp_path / "ae" / "valid")
    full = pd.read_csv(d / "aliexpress_train_sample.csv")
    # a random (not head/tail) partition of the train file
    together = pd.concat([train, valid]).sort_values(list(train.columns), ignore_index=True)
    assert together.equals(full[train.columns].astype(together.dtypes).sort_values(list(train.columns), ignore_index=True))
    assert not valid["numerical_1"].equals(full["numerical_1"].tail(20).reset_index(drop=True))


def test_paddlerec_sample_breaks_the_funnel_and_is_refused(tmp_path):
    d = DATA / "paddlerec-aitm-ali-ccp"
    columns = (d / "train.csv").read_text().splitlines()[0]  # test.csv has no header; train.csv's is skipped
    with pytest.raises(DataValidationError,
                       match=r"train/part-00000\.parquet: column 'purchase': 2 of 48 rows have purchase=1 but click=0"):
        cli("--train", d / "train.csv", "--test", d / "test.csv", "--split-test-into-valid", "--no-header",
            "--columns", columns, "--label", "click", "--label", "purchase", "--depends-on", "purchase:click",
            "--out", tmp_path / "paddle")


def test_typing_rewrites_and_hashing(tmp_path):
    df = pd.DataFrame({
        "user": [10, 11, 12, 13, 14, 15],
        "city": [" a", "b ", "?", "", "a", None],  # stripped; '?', '' and null become <missing>
        "price": [1.0, 2.5, 3.0, 4.0, 5.0, 6.0],
        "hist": [[1, 2], [3], [], [2, 2], [5], [1]],
        "flag": [True, False, True, True, False, False],
        "buy": ["yes", "no", "yes.", "no", "no", "yes"],
        "click": [1, 1, 1, 0, 0, 1],
    })
    df.to_parquet(tmp_path / "log.parquet")
    cfg = ConvertConfig(labels=["click", "bought=buy:yes"], depends_on={"bought": "click"}, max_vocab_size=4,
                        split_fractions={"valid": 1 / 6, "test": 1 / 6})
    spec, report = convert({"train": [tmp_path / "log.parquet"]}, tmp_path / "out", cfg)
    assert report["features"] == {"sparse": ["user", "city", "flag"], "sequence": ["hist"], "dense": ["price"]}
    assert report["rewrites"] == {"city": {"stripped": 2, MISSING: 3}}
    sparse = {f.name: f for f in spec.sparse}
    assert sparse["user"].hash_buckets == 4 and sparse["user"].vocab_size is None  # 4 train users + row 0 > 4: hashed
    assert sparse["city"].vocab_size <= 4
    assert spec.sequences[0].max_len == 20 and spec.sequences[0].pooling == "mean"
    assert "buy" not in spec.feature_columns and spec.task("bought").depends_on == "click"
    written = pd.concat([pd.read_parquet(tmp_path / "out" / s) for s in ("train", "valid", "test")])
    assert sorted(written["bought"]) == [0, 0, 0, 1, 1, 1] and written["bought"].dtype == np.int64


def test_nan_in_a_dense_column_names_file_column_and_count(tmp_path):
    f = tmp_path / "log.csv"
    pd.DataFrame({"u": [1, 2, 3, 4], "x": [0.5, np.nan, np.nan, 1.0], "click": [0, 1, 0, 1]}).to_csv(f, index=False)
    cfg = ConvertConfig(labels=["click"], split_fractions={"valid": 0.25, "test": 0.25})
    with pytest.raises(DataValidationError, match=rf"{f}: column 'x': 2 of 4 rows are NaN.*--fill-dense-nan"):
        convert({"train": [f]}, tmp_path / "out", cfg)
    cfg.fill_dense_nan = 0.0
    _, report = convert({"train": [f]}, tmp_path / "out2", cfg)
    assert report["rewrites"] == {"x": {"nan_filled": 2}}


def test_unknown_columns_are_clear_errors(tmp_path):
    f = tmp_path / "log.csv"
    pd.DataFrame({"u": [1, 2], "click": [0, 1]}).to_csv(f, index=False)
    inputs = {"train": [f], "valid": [f], "test": [f]}
    with pytest.raises(ConvertError, match=r"label 'buy': column 'buy' not in the train file\(s\).*columns: \['u', 'click'\]"):
        convert(inputs, tmp_path / "o", ConvertConfig(labels=["buy"]))
    with pytest.raises(ConvertError, match=r"--drop 'usr' matches no column"):
        convert(inputs, tmp_path / "o", ConvertConfig(labels=["click"], drop=["usr"]))
    with pytest.raises(ConvertError, match=r"no data for split\(s\) \['valid', 'test'\]"):
        convert({"train": [f]}, tmp_path / "o", ConvertConfig(labels=["click"]))


def test_converted_ali_ccp_trains_end_to_end(ray_local, tmp_path):
    """No code from a CSV log to a trained model: the converter's output and spec train as they are."""
    from pipeline.config import DataPaths, JobConfig, ModelConfig, TrainConfig
    from pipeline.job import run

    d = DATA / "ali-ccp"
    cli("--train", d / "ali_ccp_train_sample.csv", "--valid", d / "ali_ccp_val_sample.csv", "--test",
        d / "ali_ccp_test_sample.csv", "--label", "click", "--label", "purchase", "--depends-on", "purchase:click",
        "--out", tmp_path / "ali")
    job = JobConfig(data=DataPaths(str(tmp_path / "ali"), str(tmp_path / "ali" / "spec.yaml")),
                    model=ModelConfig(name="esmm"), train=TrainConfig(epochs=1, batch_size=32, num_workers=2),
                    name="ali", output=str(tmp_path / "out"), storage_path=str(tmp_path / "store"))
    metrics = run(job)
    assert metrics["test"]["rows"] == 50 and np.isfinite(metrics["test"]["click"]["auc"])
    assert (tmp_path / "out" / "checkpoint" / "state.pt").exists()

