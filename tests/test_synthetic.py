"""The synthetic generator: funnel invariant, label rates, determinism, oracle columns, realism."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from pipeline.synthetic import SyntheticConfig, _World, generate


@pytest.fixture(scope="module")
def sample():
    cfg = SyntheticConfig(seed=11)
    return _World(cfg).draw(np.random.default_rng(5), 200_000)


def test_convert_only_after_click(sample):
    assert np.all(sample["convert"] <= sample["click"])
    assert np.allclose(sample["p_convert"], sample["p_click"] * sample["p_cvr"], rtol=1e-5)


def test_label_rates_are_realistic(sample):
    ctr = sample["click"].mean()
    cvr = sample["convert"][sample["click"] == 1].mean()
    assert 0.02 <= ctr <= 0.10
    assert 0.05 <= cvr <= 0.20


def test_oracle_auc_is_realistic_not_a_toy(sample):
    oracle_ctr = roc_auc_score(sample["click"], sample["p_click"])
    assert 0.70 <= oracle_ctr <= 0.85
    # a popularity-only score is far below the oracle: the features matter
    assert roc_auc_score(sample["click"], -sample["position"]) < oracle_ctr - 0.05


def test_ids_are_zipf_and_many(sample):
    users, counts = np.unique(sample["user_id"], return_counts=True)
    assert len(users) > 20_000 and len(np.unique(sample["item_id"])) > 25_000
    top = np.sort(counts)[::-1]
    assert top[0] > 50 * np.median(counts)  # heavy head, long tail


def test_task_correlation_knob():
    def logit_corr(rho):
        d = _World(SyntheticConfig(task_correlation=rho, nonlinearity=0, seed=1)).draw(np.random.default_rng(0), 50_000, with_labels=False)
        return np.corrcoef(d["z_click"], d["z_cvr"])[0, 1]  # the tasks' scores before biases
    high, mid, low = logit_corr(1.0), logit_corr(0.5), logit_corr(0.0)
    assert high > 0.99 and 0.2 < mid < 0.8 and abs(low) < 0.3


def test_generation_is_deterministic_and_chunked(tmp_path):
    cfg = SyntheticConfig(rows={"train": 25_000, "valid": 5_000, "test": 5_000}, rows_per_file=10_000,
                          num_users=3_000, num_items=5_000, seed=4)
    a, b = generate(tmp_path / "a", cfg), generate(tmp_path / "b", cfg)
    files = sorted(p.relative_to(a) for p in a.rglob("*.parquet"))
    assert [str(f) for f in files] == ["test/part-00000.parquet", "train/part-00000.parquet",
                                       "train/part-00001.parquet", "train/part-00002.parquet",
                                       "valid/part-00000.parquet"]
    for f in files:
        assert pq.read_table(a / f).equals(pq.read_table(b / f))
    t = pq.read_table(a / "train/part-00002.parquet")
    assert t.num_rows == 5_000
    assert {"p_click", "p_cvr", "p_convert", "hist_category"} <= set(t.column_names)
    assert t.schema.field("hist_category").type.value_type == pa.int64()
    other = generate(tmp_path / "c", SyntheticConfig(**{**cfg.__dict__, "seed": 5}))
    assert not pq.read_table(other / files[1]).equals(pq.read_table(a / files[1]))


def test_a_day_of_drift_keeps_the_world_and_adds_users_items_and_shifts():
    cfg = dict(num_users=20_000, num_items=40_000, seed=2)
    day0, day1, day2 = (_World(SyntheticConfig(**cfg, day=d)) for d in (0, 1, 2))
    # the old users and items are the same people and things; the new ones are appended
    assert np.array_equal(day2.user_age[:20_000], day0.user_age) and np.array_equal(day2.item_category[:40_000], day0.item_category)
    assert np.array_equal(day2.latent["user_id"][:20_000], day0.latent["user_id"])
    assert len(day1.user_age) == 21_000 and len(day2.user_age) == 22_000 and len(day2.item_perm) == 44_000
    assert np.array_equal(day2.user_perm[:21_000], day1.user_perm)  # day 2 builds on day 1
    assert sorted(day2.item_perm) == list(range(44_000))  # raw ids stay unique
    # popularity shifts, and new users reach the head
    assert not np.array_equal(day1.user_rank[:1000], day0.user_rank[:1000])
    assert (day2.user_rank[:2000] >= 20_000).sum() > 50
    # the ground truth drifts a little, and is calibrated to the same rates
    cos = day1.w["click"] @ day0.w["click"] / np.linalg.norm(day1.w["click"]) / np.linalg.norm(day0.w["click"])
    assert 0.9 < cos < 0.999
    d0, d2 = (w.draw(np.random.default_rng(1), 100_000) for w in (day0, day2))
    assert abs(d0["click"].mean() - d2["click"].mean()) < 0.01
    new_users = np.isin(d2["user_id"], day2.user_perm[20_000:])
    assert new_users.mean() > 0.03  # a day-2 log holds the new users' rows
