"""Fault tolerance on a local 2-CPU Ray instance: a training worker killed mid-epoch is restarted from the
last checkpoint and the run ends as an uninterrupted one does; a run that fails keeps its last good
checkpoint and a rerun with the same name resumes from it; bad rows under ``on_bad_rows: drop`` are
counted, left out, and every epoch's rows read and trained add up."""
from __future__ import annotations

import json
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from ray.train import TrainingFailedError
from ray.util.state import list_actors

from pipeline.checkpoint import filesystem, load_state
from pipeline.config import DataPaths, JobConfig, ModelConfig, TrainConfig
from pipeline.job import run
from pipeline.synthetic import SPEC_PATH
from pipeline.validate import DataValidationError


def _job(data, tmp_path, name, max_failures=2, epochs=2, on_bad_rows="fail"):
    return JobConfig(
        data=DataPaths(path=str(data), spec=str(SPEC_PATH), on_bad_rows=on_bad_rows),
        model=ModelConfig(name="ple", expert_hidden=[32], tower_hidden=[16]),
        train=TrainConfig(epochs=epochs, batch_size=512, lr=3e-3, num_workers=2, patience=5, shuffle_buffer=5000,
                          max_failures=max_failures),
        name=name, storage_path=str(tmp_path / "results"), output=str(tmp_path / name))


def _registered_checkpoints(run_dir) -> list:
    """The checkpoints Ray Train has registered (a restarted worker group resumes from the latest), read from
    the run's directory: a local path or a URI such as s3://bucket/results/name."""
    fs, root = filesystem(str(run_dir))
    try:
        with fs.open_input_stream(f"{root}/checkpoint_manager_snapshot.json") as f:
            return json.loads(f.read())["checkpoint_results"]
    except (OSError, ValueError, KeyError):
        return []


@contextmanager
def _killing_a_worker_after_first_checkpoint(run_dir) -> Iterator[list]:
    """SIGKILL one Ray Train worker process as soon as the run's first checkpoint is registered, i.e. while
    the workers train the next epoch. Yields the list of (pid, checkpoints registered) killed; it stays
    empty if the run is over before its first checkpoint."""
    killed: list = []
    run_over = threading.Event()

    def kill():
        while not _registered_checkpoints(run_dir):
            if run_over.wait(0.2):
                return
        workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
        if workers:
            os.kill(workers[0].pid, signal.SIGKILL)
            killed.append((workers[0].pid, len(_registered_checkpoints(run_dir))))

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    try:
        yield killed
    finally:
        run_over.set()
        thread.join()


def test_worker_killed_mid_epoch_restarts_from_the_last_checkpoint(ray_local, small_log, tmp_path):
    uninterrupted = run(_job(small_log, tmp_path, "whole"))
    with _killing_a_worker_after_first_checkpoint(tmp_path / "results" / "killed") as killed:
        metrics = run(_job(small_log, tmp_path, "killed"))
    assert killed and killed[0][1] == 1, "the worker was not killed during the second epoch"
    assert metrics["resumes"] == 1  # the worker group restarted once, from the epoch-0 checkpoint
    # and the run says so: metrics.json (and the final table) name the failure, not only Ray's log
    assert uninterrupted["restarts"] == {"count": 0, "failures": []}
    assert metrics["restarts"]["count"] == 1, metrics["restarts"]
    [failure] = metrics["restarts"]["failures"]
    assert failure["errors"] and all(e["first_line"] for e in failure["errors"])
    assert json.loads((tmp_path / "killed" / "metrics.json").read_text())["restarts"] == metrics["restarts"]
    assert [h["epoch"] for h in metrics["history"]] == [0, 1]
    assert all(h["train/rows_read"] == h["train/rows_trained"] == 60_000 for h in metrics["history"])
    # within noise: the two runs see their rows in different random orders, and the standard error of a
    # 10k-row test AUC here (~800 clicks) is about 0.01
    for task in ("click", "convert"):
        assert metrics["test"][task]["auc"] == pytest.approx(uninterrupted["test"][task]["auc"], abs=0.02)


def test_a_failed_run_keeps_its_checkpoint_and_a_rerun_resumes(ray_local, small_log, tmp_path):
    run_dir = tmp_path / "results" / "fails"
    with _killing_a_worker_after_first_checkpoint(run_dir) as killed, pytest.raises(TrainingFailedError) as failed:
        run(_job(small_log, tmp_path, "fails", max_failures=0))
    assert killed, f"the run failed before the worker was killed: {failed.value!r}"
    saved = _registered_checkpoints(run_dir)
    assert len(saved) == 1 and (run_dir / saved[0]["checkpoint_dir_name"] / "config.json").exists()
    state = load_state(run_dir / saved[0]["checkpoint_dir_name"])  # weights_only: the checkpoint is intact and safe to load
    assert state["progress"]["epoch"] == 1 and state["code_version"]
    first_epoch = state["progress"]["history"][0]

    metrics = run(_job(small_log, tmp_path, "fails"))  # the same name: resumes instead of starting over
    assert metrics["resumes"] == 1
    assert metrics["history"][0] == first_epoch  # epoch 0 was not trained again
    assert [h["epoch"] for h in metrics["history"]] == [0, 1]
    assert metrics["test"]["click"]["auc"] > 0.6


def test_drop_policy_leaves_out_bad_rows_and_reports_them(ray_local, small_log, tmp_path):
    data = tmp_path / "dirty"
    shutil.copytree(small_log, data)
    train_file, valid_file = sorted((data / "train").glob("*.parquet"))[0], sorted((data / "valid").glob("*.parquet"))[0]
    t = pq.read_table(train_file)
    click = t["click"].to_numpy().copy()
    convert = t["convert"].to_numpy().copy()
    unclicked = np.flatnonzero(click == 0)
    convert[unclicked[unclicked >= 100][:25]] = 1  # 25 conversions without a click
    users = t["user_id"].to_numpy().copy()
    users[:10] = -1  # 10 negative ids; 25 + 10 bad rows in all
    t = t.set_column(t.schema.get_field_index("convert"), "convert", pa.array(convert))
    pq.write_table(t.set_column(t.schema.get_field_index("user_id"), "user_id", pa.array(users)), train_file)
    v = pq.read_table(valid_file)
    price = v["item_price"].to_numpy().copy()
    price[:7] = np.nan
    pq.write_table(v.set_column(v.schema.get_field_index("item_price"), "item_price", pa.array(price)), valid_file)

    with pytest.raises(DataValidationError, match=r"column 'user_id': 10 of 20000 rows have a negative id"):
        run(_job(data, tmp_path, "refused", epochs=1))
    metrics = run(_job(data, tmp_path, "dropped", epochs=1, on_bad_rows="drop"))
    dropped = 35
    assert metrics["data"]["train"] == {"rows": 60_000, "dropped": dropped,
                                        "bad": {"convert": {"funnel": 25}, "user_id": {"negative_id": 10}}}
    assert metrics["data"]["valid"] == {"rows": 10_000, "dropped": 7, "bad": {"item_price": {"not_finite": 7}}}
    epoch = metrics["history"][0]
    assert epoch["train/rows_read"] == 60_000 and epoch["train/rows_trained"] == 60_000 - dropped
    assert metrics["valid"]["rows_read"] == 10_000 and metrics["valid"]["rows"] == 10_000 - 7
    assert metrics["test"]["rows_read"] == metrics["test"]["rows"] == 10_000
    assert np.isfinite(metrics["valid"]["click"]["auc"]) and metrics["test"]["click"]["auc"] > 0.6
