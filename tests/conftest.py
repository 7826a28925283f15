"""Shared fixtures: a small synthetic log (generated once per session) and one local Ray instance."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.config import DatasetSpec
from pipeline.synthetic import SPEC_PATH, SyntheticConfig, generate

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "0")


@pytest.fixture(scope="session")
def spec() -> DatasetSpec:
    return DatasetSpec.load(SPEC_PATH)


@pytest.fixture(scope="session")
def small_log(tmp_path_factory) -> Path:
    """60k/10k/10k rows, 20k-row files: big enough to learn from, small enough for a CPU test."""
    out = tmp_path_factory.mktemp("data") / "synthetic"
    cfg = SyntheticConfig(rows={"train": 60_000, "valid": 10_000, "test": 10_000}, rows_per_file=20_000,
                          num_users=5_000, num_items=10_000, seed=3)
    return generate(out, cfg)


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance (2 CPUs, like this machine) for the tests of one module, shut down after them:
    test_job_submit starts a head node of its own, and two instances on one machine get in each other's way."""
    import ray

    here = Path(__file__).resolve().parent
    # workers unpickle train loops defined in test modules, so they need tests/ on their path
    # the dashboard also serves the State API: Train V2's placement-group cleaner polls it, and without it
    # a Tune trial's trainer was seen to wait forever for the CPU of the previous trial's workers
    ray.init(num_cpus=2, include_dashboard=True, log_to_driver=False, ignore_reinit_error=True,
             runtime_env={"env_vars": {"PYTHONPATH": f"{here}:{here.parent}"}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
