"""Warm start (``--init-from``): the next day's run starts from the previous run's weights, its vocabularies
extended, old ids on their old embeddings."""
from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from pipeline.checkpoint import PREPROCESSOR_FILE, load_state
from pipeline.config import ConfigError, DataPaths, DatasetSpec, JobConfig, ModelConfig, TrainConfig
from pipeline.data import Preprocessor
from pipeline.encoding import extend_vocabulary
from pipeline.job import run
from pipeline.synthetic import SPEC_PATH, SyntheticConfig, generate
from pipeline.warm_start import table_weight_keys


def test_old_ids_keep_their_rows_new_ids_fill_free_rows_then_evict_the_least_frequent():
    old = pa.array([10, 11, 12, 13, 14])  # row i + 1, most frequent first
    vocab, source = extend_vocabulary(old, pa.array([12, 20, 10, 21]), capacity=7)
    assert vocab.to_pylist() == [10, 11, 12, 13, 14, 20, 21] and source.tolist() == [1, 2, 3, 4, 5, 0, 0]
    # full: today's new ids take the rows of the old ids missing from today's top, least frequent first
    vocab, source = extend_vocabulary(old, pa.array([12, 20, 10, 21, 22]), capacity=5)
    assert vocab.to_pylist() == [10, 22, 12, 21, 20] and source.tolist() == [1, 0, 3, 0, 0]
    # every id of today's top has a row; strings work alike
    vocab, _ = extend_vocabulary(pa.array(["a", "b"]), pa.array(["c", "a"]), capacity=2)
    assert sorted(vocab.to_pylist()) == ["a", "c"]


def _job(data, tmp, name, **train):
    return JobConfig(data=DataPaths(path=str(data), spec=str(SPEC_PATH)), model=ModelConfig(name="ple"),
                     train=TrainConfig(epochs=1, batch_size=1024, num_workers=2, precision="fp32", **train),
                     name=name, storage_path=str(tmp / "results"), output=str(tmp / name))


def test_a_warm_start_carries_the_weights_of_the_ids_it_keeps(ray_local, small_log, tmp_path):
    run(_job(small_log, tmp_path, "day1"))
    day2_log = generate(tmp_path / "day2", SyntheticConfig(rows={"train": 20_000, "valid": 5_000, "test": 5_000},
                                                           rows_per_file=10_000, num_users=8_000, num_items=10_000, seed=11))
    # lr 0 everywhere: the day-2 model is exactly what the warm start loaded
    job = _job(day2_log, tmp_path, "day2", lr=0.0, table_lr=0.0)
    job.init_from = str(tmp_path / "day1")
    day2 = run(job)
    old, new = load_state(tmp_path / "day1" / "checkpoint"), load_state(tmp_path / "day2" / "checkpoint")
    spec = DatasetSpec.load(SPEC_PATH)
    old_pre = Preprocessor.load(tmp_path / "day1" / "checkpoint" / PREPROCESSOR_FILE, spec)
    new_pre = Preprocessor.load(tmp_path / "day2" / "checkpoint" / PREPROCESSOR_FILE, spec)
    assert day2["warm_start"]["user_id"]["new"] > 0 and day2["warm_start"]["user_id"]["kept"] > 0
    for table, t in spec.tables.items():
        (key,) = table_weight_keys(new["best_model"], table)
        w_old, w_new = old["best_model"][key], new["best_model"][key]
        if t.encoding != "vocab":  # hashed and identity tables: every row carried
            assert torch.equal(w_old, w_new), table
            continue
        old_rows = {v: i + 1 for i, v in enumerate(old_pre.vocab[table].to_pylist())}
        new_vocab = new_pre.vocab[table].to_pylist()
        assert new_vocab[:len(old_rows)] == list(old_rows)[:len(new_vocab)]  # old ids keep their rows
        kept = [(i + 1, old_rows[v]) for i, v in enumerate(new_vocab) if v in old_rows]
        fresh = [i + 1 for i, v in enumerate(new_vocab) if v not in old_rows]
        assert torch.equal(w_new[[r for r, _ in kept]], w_old[[r for _, r in kept]]), table
        assert torch.equal(w_new[0], w_old[0])  # the out-of-vocabulary row too
        assert len(new_vocab) == len(old_rows) + len(fresh) == day2["warm_start"][table]["kept"] + day2["warm_start"][table]["new"]
    dense = [k for k in old["best_model"] if not k.startswith("front.")]
    assert dense and all(torch.equal(old["best_model"][k], new["best_model"][k]) for k in dense)
    # the dense statistics are the previous run's (the dense layers learned on them)
    assert (new_pre.dense_mean == old_pre.dense_mean).all() and (new_pre.dense_std == old_pre.dense_std).all()

    other = _job(day2_log, tmp_path, "day2-mmoe")
    other.model.name, other.init_from = "mmoe", str(tmp_path / "day1")
    with pytest.raises(ConfigError, match="a warm start needs the same model"):
        run(other)

