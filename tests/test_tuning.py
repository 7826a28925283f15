"""Ray Tune: search spaces as data (parsing, validation), a tiny search that completes on CPU, its
outputs, resuming an interrupted search, and the exported best config training again."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipeline.config import ConfigError, DataPaths, JobConfig, from_dict
from pipeline.synthetic import SPEC_PATH
from pipeline.tuning import TuneSpace, portable_paths, tune_model, write_results

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["ple", "mmoe", "ple_multi_objective"])
def test_shipped_spaces_load(name):
    space = TuneSpace.load(ROOT / "tune_spaces" / f"{name}.yaml")
    assert set(space.param_space()) == set(space.space)


@pytest.mark.parametrize("entry, message", [
    ({"train.lr": {"gaussian": [0, 1]}}, "unknown distribution 'gaussian'"),
    ({"train.lr": {"loguniform": [0.1]}}, "expected 2 numbers"),
    ({"train.lr": {"uniform": [0.5, 0.1]}}, "lower bound 0.5 must be below upper 0.1"),
    ({"train.lr": {"loguniform": [0, 1]}}, "bounds must be > 0"),
    ({"model.num_levels": {"choice": ["two"]}}, "'two' is not a valid value"),
    ({"train.nope": {"choice": [1]}}, "unknown config key"),
    ({"train.lr": [0.1, 0.2]}, r"space.train.lr: expected a mapping"),
])
def test_bad_spaces_are_refused_with_the_key(tmp_path, entry, message):
    f = tmp_path / "space.yaml"
    f.write_text(yaml.safe_dump({"model": "ple", "space": entry}))
    with pytest.raises(ConfigError, match=message):
        TuneSpace.load(f)


def _space(num_samples=2):
    return TuneSpace(model="mmoe", num_samples=num_samples, epochs=1, space={
        "train.loss_weights.convert": {"loguniform": [0.5, 2.0]},
        "model.num_experts": {"choice": [2, 3]},
        "model.expert_hidden": {"choice": [[16], [32]]},
    }, base={"train": {"batch_size": 512, "lr": 3e-3, "shuffle_buffer": 4096}, "model": {"tower_hidden": [8]}})


def _job(small_log, tmp_path, name):
    job = _space().base_job()
    job.data = DataPaths(str(small_log), str(SPEC_PATH))
    job.name, job.output, job.storage_path = name, str(tmp_path / "out"), str(tmp_path / "tune")
    return job


def test_exported_paths_are_portable(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = JobConfig(data=DataPaths(str(tmp_path / "datasets" / "d"), str(Path.home() / ".cache" / "x" / "spec.yaml")),
                    storage_path="s3://bucket/tune", output=str(tmp_path / "out" / "best_run"))
    short = portable_paths(job)
    assert (short.data.path, short.data.spec) == ("datasets/d", "~/.cache/x/spec.yaml")
    assert (short.storage_path, short.output) == ("s3://bucket/tune", "out/best_run")
    assert from_dict(JobConfig, short.to_dict()).data.spec == str(Path.home() / ".cache" / "x" / "spec.yaml")


def test_tiny_search_completes_and_its_best_config_trains(ray_local, small_log, tmp_path):
    from pipeline.job import run

    space = _space()
    job = _job(small_log, tmp_path, "tiny")
    results = tune_model(space, job, "tiny", str(tmp_path / "tune"))
    assert len(results) == 2 and not results.errors
    summary = write_results(results, space, job, tmp_path / "out")
    table = pd.read_csv(tmp_path / "out" / "results.csv")
    assert len(table) == 2 and (table["status"] == "ok").all()
    assert table["valid_click_auc"].between(0.55, 1).all()
    assert table["pareto"].any()
    assert (tmp_path / "out" / "pareto.png").stat().st_size > 1000
    assert summary["valid_objective"] == table["valid_objective"].max()  # chosen on validation
    # per-trial TensorBoard event files under the storage path
    assert list((tmp_path / "tune" / "tiny").rglob("events.out.tfevents*"))
    # the exported YAML is a JobConfig that trains as it is
    best = JobConfig.load(tmp_path / "out" / "best.yaml")
    best_row = table.iloc[0]
    assert best.model.num_experts == best_row["model.num_experts"]
    best.output, best.storage_path = str(tmp_path / "best_run"), str(tmp_path / "best_store")
    metrics = run(best)
    assert metrics["test"]["click"]["auc"] > 0.55


def test_interrupted_search_resumes(ray_local, small_log, tmp_path):
    """A search interrupted mid-way (Ctrl-C on its driver) resumes from its storage path with
    Tuner.restore: the finished trials are kept, the rest run, none is lost."""
    address = ray_local.get_runtime_context().gcs_address
    script = f"""
import sys; sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(ROOT / 'tests')!r})
from pathlib import Path
from test_tuning import _space, _job
from pipeline.tuning import tune_model
import ray; ray.init(address={address!r})
tune_model(_space(3), _job(Path({str(small_log)!r}), Path({str(tmp_path)!r}), "resume"), "resume", {str(tmp_path / 'tune')!r})
"""
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "tune" / "resume"
    deadline = time.time() + 400
    try:  # wait until one trial has finished, then interrupt the driver as Ctrl-C does
        while time.time() < deadline and proc.poll() is None and not any(
                "TERMINATED" in p.read_text(errors="ignore") for p in state.glob("experiment_state*.json")):
            time.sleep(2)
        proc.send_signal(signal.SIGINT)  # Tune saves the experiment state and stops its trials
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    finished_before = max(p.read_text(errors="ignore").count('TERMINATED') for p in state.glob("experiment_state*.json"))
    assert 1 <= finished_before < 3, "the search was not interrupted mid-way"
    results = tune_model(_space(3), _job(small_log, tmp_path, "resume"), "resume", str(tmp_path / "tune"))
    assert len(results) == 3 and not results.errors
    assert all(r.metrics and "valid/click/auc" in r.metrics for r in results)
