"""A cluster of 1-CPU nodes: a Data task takes the whole CPU, so the Train workers must reserve none of it,
or the data pipeline never starts and the run hangs (bench/pre_training.py found it)."""
from __future__ import annotations

from pathlib import Path

import pytest
import ray

from pipeline.config import DataPaths, JobConfig, ModelConfig, TrainConfig
from pipeline.job import WORKER_MEMORY_RESERVED, run, scaling_for_cluster
from pipeline.synthetic import SPEC_PATH

pytestmark = pytest.mark.slow


def test_the_default_job_trains_on_a_node_of_one_cpu(small_log, tmp_path):
    from ray.cluster_utils import Cluster

    here = Path(__file__).resolve().parent
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    c.add_node(num_cpus=1, object_store_memory=300 * 2**20)
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": f"{here}:{here.parent}"}})
    try:
        job = JobConfig(data=DataPaths(path=str(small_log), spec=str(SPEC_PATH)), model=ModelConfig(name="ple"),
                        train=TrainConfig(epochs=1, batch_size=1024, num_workers=2),
                        name="one-cpu", storage_path=str(tmp_path / "results"), output=str(tmp_path / "out"))
        scaling, _ = scaling_for_cluster(job.train)
        assert scaling.resources_per_worker == {"CPU": 0.0, "memory": WORKER_MEMORY_RESERVED}
        metrics = run(job)
        assert metrics["history"][0]["train/rows_trained"] == 60_000 and metrics["restarts"]["count"] == 0
    finally:
        ray.shutdown()
        c.shutdown()
