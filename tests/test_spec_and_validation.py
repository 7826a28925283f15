"""Dataset spec loading and the validation of Parquet logs against it: bad input is refused with an error
that names the file, the column and the count."""
from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import ConfigError, DatasetSpec, JobConfig, from_dict
from pipeline.validate import DataValidationError, validate_dataset


def test_spec_derives_shared_tables(spec):
    assert spec.tables["category"].num_rows == 401
    assert spec.tables["item_id"].encoding == "hash"
    assert spec.sequences[0].table_name == "category"
    assert "category" in spec.tables and "hist_category" not in spec.tables
    assert spec.task("convert").depends_on == "click"


@pytest.mark.parametrize("raw, message", [
    ({"name": "x", "tasks": []}, "at least one task"),
    ({"name": "x", "tasks": [{"name": "a", "depends_on": "b"}]}, "unknown task 'b'"),
    ({"name": "x", "tasks": [{"name": "a"}], "sparse": [{"name": "u"}]}, "needs vocab_size, hash_buckets or num_ids"),
    ({"name": "x", "tasks": [{"name": "a"}], "sparse": [{"name": "u", "vocab_size": 9, "hash_buckets": 9}]}, "both"),
    ({"name": "x", "tasks": [{"name": "a"}], "sparse": [{"name": "u", "vocab_size": 9, "color": 1}]}, r"unknown keys \['color'\]"),
    ({"name": "x", "tasks": [{"name": "a"}], "sequences": [{"name": "s", "vocab_size": 9, "pooling": "median"}]}, "pooling"),
    ({"name": "x", "tasks": [{"name": "a"}], "sparse": [{"name": "u", "vocab_size": "many"}]}, "expected int"),
    ({"name": "x", "tasks": [{"name": "a"}], "sparse": [{"name": "u", "vocab_size": 5, "dim": 8, "table": "t"},
                                                        {"name": "v", "vocab_size": 6, "dim": 8, "table": "t"}]}, "defined differently"),
])
def test_bad_specs_are_refused(raw, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(DatasetSpec, raw)


def test_job_config_round_trips():
    job = from_dict(JobConfig, {"model": {"name": "mmoe", "expert_hidden": [64]}, "train": {"epochs": 1, "lr": 1}})
    assert job.model.expert_hidden == [64] and job.train.lr == 1.0
    assert from_dict(JobConfig, job.to_dict()) == job


@pytest.mark.parametrize("train, message", [({"precision": "fp16"}, r"train.precision: must be one of auto\|fp32\|bf16, got 'fp16'"),
                                            ({"data_buffer_mb": 0}, "train.data_buffer_mb must be positive")])
def test_bad_train_settings_are_refused(train, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(JobConfig, {"train": train})


def test_generated_log_is_valid(small_log, spec):
    report = validate_dataset(str(small_log), spec)
    assert report.rows == {"train": 60_000, "valid": 10_000, "test": 10_000}
    assert report.dropped == {"train": 0, "valid": 0, "test": 0}


def _corrupt(small_log, tmp_path, edit):
    """Copy the log and rewrite one train file through ``edit(table) -> table``."""
    bad = tmp_path / "bad"
    shutil.copytree(small_log, bad)
    f = sorted((bad / "train").glob("*.parquet"))[1]
    pq.write_table(edit(pq.read_table(f)), f)
    return bad, f


def _set(table, column, values):
    return table.set_column(table.schema.get_field_index(column), column, values)


def test_missing_column(small_log, spec, tmp_path):
    bad, f = _corrupt(small_log, tmp_path, lambda t: t.drop_columns(["item_brand"]))
    with pytest.raises(DataValidationError, match=rf"{f}: column 'item_brand': missing"):
        validate_dataset(str(bad), spec)


def test_wrong_type(small_log, spec, tmp_path):
    bad, f = _corrupt(small_log, tmp_path, lambda t: _set(t, "hour", t["hour"].cast(pa.float64())))
    with pytest.raises(DataValidationError, match=rf"{f}: column 'hour': type double is not an integer or string id"):
        validate_dataset(str(bad), spec)


def test_label_outside_01(small_log, spec, tmp_path):
    def edit(t):
        click = t["click"].to_numpy().copy()
        click[:7] = 2
        return _set(t, "click", pa.array(click))
    bad, f = _corrupt(small_log, tmp_path, edit)
    with pytest.raises(DataValidationError, match=rf"{f}: column 'click': 7 of 20000 rows have a label outside"):
        validate_dataset(str(bad), spec)


def test_conversion_without_click(small_log, spec, tmp_path):
    def edit(t):
        click, convert = t["click"].to_numpy(), t["convert"].to_numpy().copy()
        convert[np.flatnonzero(click == 0)[:5]] = 1
        return _set(t, "convert", pa.array(convert))
    bad, f = _corrupt(small_log, tmp_path, edit)
    with pytest.raises(DataValidationError, match=rf"{f}: column 'convert': 5 of 20000 rows have convert=1 but click=0"):
        validate_dataset(str(bad), spec)


def test_nulls_and_nan(small_log, spec, tmp_path):
    def edit(t):
        users = t["user_id"].to_pylist()
        users[3] = users[9] = None
        price = t["item_price"].to_numpy().copy()
        price[:4] = np.nan
        return _set(_set(t, "user_id", pa.array(users, pa.int64())), "item_price", pa.array(price))
    bad, f = _corrupt(small_log, tmp_path, edit)
    with pytest.raises(DataValidationError) as e:
        validate_dataset(str(bad), spec)
    assert f"{f}: " in str(e.value)
    assert "column 'user_id': 2 of 20000 rows are null" in str(e.value)
    assert "column 'item_price': 4 of 20000 rows are NaN or infinite" in str(e.value)


def test_truncated_file(small_log, spec, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(small_log, bad)
    f = sorted((bad / "valid").glob("*.parquet"))[0]
    f.write_bytes(f.read_bytes()[: 5000])
    with pytest.raises(DataValidationError, match=rf"{f}: not a readable Parquet file"):
        validate_dataset(str(bad), spec)


def test_empty_split(small_log, spec, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(small_log, bad)
    for f in (bad / "test").glob("*.parquet"):
        f.unlink()
    with pytest.raises(DataValidationError, match=r"no \.parquet files in split 'test'"):
        validate_dataset(str(bad), spec)


def test_negative_ids_in_sparse_and_sequence_columns(small_log, spec, tmp_path):
    def edit(t):
        users = t["user_id"].to_numpy().copy()
        users[:3] = -1
        hist = t["hist_category"].to_pylist()
        hist[10] = [5, -7, 2]  # one bad id makes its row bad
        hist[11] = [-1]
        return _set(_set(t, "user_id", pa.array(users)), "hist_category", pa.array(hist, pa.list_(pa.int64())))
    bad, f = _corrupt(small_log, tmp_path, edit)
    with pytest.raises(DataValidationError) as e:
        validate_dataset(str(bad), spec)
    assert f"{f}: column 'user_id': 3 of 20000 rows have a negative id; " \
           "column 'hist_category': 2 of 20000 rows have a negative id" in str(e.value)


def test_ids_outside_num_ids(small_log, spec, tmp_path):
    """An identity-encoded (pre-encoded) feature: ids must lie in [0, num_ids)."""
    raw = dataclasses.asdict(spec)
    raw["sparse"] = [f if f["name"] != "position" else {"name": "position", "num_ids": 20, "dim": 16}
                     for f in raw["sparse"]]
    identity = from_dict(DatasetSpec, raw)
    assert identity.tables["position"].encoding == "identity" and identity.tables["position"].num_rows == 21
    validate_dataset(str(small_log), identity)  # positions are 0..19

    def edit(t):
        pos = t["position"].to_numpy().copy()
        pos[[0, 5]] = 20
        pos[7] = -2
        return _set(t, "position", pa.array(pos))
    bad, f = _corrupt(small_log, tmp_path, edit)
    with pytest.raises(DataValidationError, match=rf"{f}: column 'position': 3 of 20000 rows have an id outside \[0, 20\)"):
        validate_dataset(str(bad), identity)
    bad_type, g = _corrupt(small_log, tmp_path / "t", lambda t: _set(t, "position", t["position"].cast(pa.string())))
    with pytest.raises(DataValidationError, match=rf"{g}: column 'position': type string is not an integer id"):
        validate_dataset(str(bad_type), identity)


def test_corrupt_file_and_empty_split(small_log, spec, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(small_log, bad)
    f = sorted((bad / "train").glob("*.parquet"))[2]
    f.write_bytes(b"PAR1" + bytes(range(256)) * 40 + b"PAR1")  # magic bytes, garbage inside
    with pytest.raises(DataValidationError, match=rf"{f}: not a readable Parquet file"):
        validate_dataset(str(bad), spec)
    empty = tmp_path / "empty"
    shutil.copytree(small_log, empty)
    for g in (empty / "test").glob("*.parquet"):
        pq.write_table(pq.read_table(g).slice(0, 0), g)  # valid files, no rows
    with pytest.raises(DataValidationError, match=r"split 'test' has 0 rows in 1 file\(s\)"):
        validate_dataset(str(empty), spec)


def _many_problems(t):
    """Problems on 7 rows of one file, rows 0 and 1 with two each: 9 problems, 7 bad rows."""
    click, convert = t["click"].to_numpy().copy(), t["convert"].to_numpy().copy()
    click[0], convert[0] = 3, 1                # row 0: a label outside {0, 1}, and so a convert without click
    unclicked = np.flatnonzero(click == 0)
    convert[unclicked[unclicked > 100][:2]] = 1  # 2 more rows: a conversion without a click
    price = t["item_price"].to_numpy().copy()
    price[[1, 50]] = [np.inf, np.nan]          # rows 1 and 50: not finite
    users = t["user_id"].to_numpy().copy()
    users[[1, 60]] = -5                        # rows 1 and 60: a negative id
    device = t["device"].to_pylist()
    device[70] = None                          # row 70: null
    for name, values in (("click", click), ("convert", convert), ("item_price", price), ("user_id", users)):
        t = _set(t, name, pa.array(values))
    return _set(t, "device", pa.array(device, pa.int64()))


def test_drop_policy_counts_every_bad_row_once(small_log, spec, tmp_path):
    bad, f = _corrupt(small_log, tmp_path, _many_problems)
    with pytest.raises(DataValidationError, match=rf"{f}: column 'user_id': 2 of 20000 rows have a negative id"):
        validate_dataset(str(bad), spec)  # fail is the default
    report = validate_dataset(str(bad), spec, on_bad_rows="drop")
    assert report.bad_rows["train"] == {"user_id/negative_id": 2, "device/null": 1, "click/not_binary": 1,
                                        "convert/funnel": 3, "item_price/not_finite": 2}
    assert report.dropped == {"train": 7, "valid": 0, "test": 0}
    assert report.rows == {"train": 60_000, "valid": 10_000, "test": 10_000}
    assert report.metrics()["data/train/bad/convert/funnel"] == 3 and report.metrics()["data/train/dropped"] == 7


def test_validation_in_ray_tasks_counts_per_file_over_its_pieces(small_log, spec, tmp_path, ray_local):
    """With Ray running, the rows are checked in Ray tasks, one per piece of row groups; a file's problems,
    found in several pieces, are summed into one message with the file, the column and the count."""
    bad, f = _corrupt(small_log, tmp_path, _many_problems)
    pq.write_table(pq.read_table(f), f, row_group_size=25)  # the bad rows 1, 50, 60, 70 in separate pieces
    with pytest.raises(DataValidationError, match=rf"{f}: column 'user_id': 2 of 20000 rows have a negative id"):
        validate_dataset(str(bad), spec)
    report = validate_dataset(str(bad), spec, on_bad_rows="drop")
    assert report.bad_rows["train"] == {"user_id/negative_id": 2, "device/null": 1, "click/not_binary": 1,
                                        "convert/funnel": 3, "item_price/not_finite": 2}
    assert report.dropped["train"] == 7 and report.rows["train"] == 60_000


def test_fit_in_ray_tasks_equals_value_counts_of_the_whole_split(small_log, spec, ray_local):
    """The fit's per-piece counts, hash-partitioned and reduced to per-part top-K lists, give exactly the
    vocabulary of the whole split's value counts (count descending, then value), and its dense moments."""
    import pandas as pd

    from pipeline.data import Preprocessor

    import yaml

    from pipeline.synthetic import SPEC_PATH

    raw = yaml.safe_load(SPEC_PATH.read_text())
    raw["sparse"][0]["vocab_size"] = 101  # user_id: the top 100 of 5,000 users, with ties at the cut
    cut = from_dict(DatasetSpec, raw)
    train = pd.read_parquet(small_log / "train")
    for spec in (spec, cut):
        check_fit(Preprocessor.fit(str(small_log), spec), spec, train)


def check_fit(pre, spec, train):
    import pandas as pd

    assert pre.train_rows == len(train) == 60_000
    for name, table in spec.tables.items():
        if table.encoding != "vocab":
            continue
        raw = pd.concat([train[f.name].explode() if f.kind == "id_list" else train[f.name]
                         for f in spec.id_features if f.table_name == name]).dropna().astype(np.int64)
        counts = raw.value_counts().rename("n").reset_index()
        expected = counts.sort_values(["n", counts.columns[0]], ascending=[False, True])[counts.columns[0]]
        assert pre.vocab[name].to_pylist() == expected.tolist()[: table.num_rows - 1], name
    dense = np.stack([d.values(pa.chunked_array([pa.array(train[d.name])])) for d in spec.dense])
    np.testing.assert_allclose(pre.dense_mean, dense.mean(axis=1), rtol=1e-5)
    np.testing.assert_allclose(pre.dense_std, dense.std(axis=1), rtol=1e-4)
