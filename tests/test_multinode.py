"""The default job on a local Ray cluster of three nodes on loopback (``ray.cluster_utils.Cluster``): a head
node with no CPUs, where the driver runs, and two worker nodes of 2 CPUs, one Train worker each. The
pre-training stage's tasks and the Data tasks run on both worker nodes; the split coordinators the driver
starts for its own node are ended as soon as the worker group turns out to be elsewhere; a worker node killed
mid-epoch costs one restart from the last checkpoint, on the node left and a spare one, and no rows."""
from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import ray
from ray.util.state import list_actors, list_tasks

from pipeline.config import DataPaths, JobConfig, ModelConfig, TrainConfig
from pipeline.job import run
from pipeline.synthetic import SPEC_PATH
from test_faults import _registered_checkpoints

pytestmark = pytest.mark.slow
NODE = {"num_cpus": 2, "object_store_memory": 300 * 2**20}


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    here = Path(__file__).resolve().parent
    # a node whose raylet is killed is declared dead after 3 missed 1 s health checks (default 5 x 3 s)
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": True,
        "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}})
    for _ in range(2):
        c.add_node(**NODE)
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": f"{here}:{here.parent}"}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield c
    ray.shutdown()
    c.shutdown()


def _job(data, tmp_path, name):
    """The default PLE job (default model), 2 epochs on the small log, 2 workers."""
    return JobConfig(
        data=DataPaths(path=str(data), spec=str(SPEC_PATH)), model=ModelConfig(name="ple"),
        train=TrainConfig(epochs=2, batch_size=512, num_workers=2, max_failures=2),
        name=name, storage_path=str(tmp_path / "results"), output=str(tmp_path / name))


class Watch:
    """Samples the cluster's actors every 0.3 s while a run goes on; ``on_checkpoint`` runs once, as soon as
    the run's first checkpoint is registered (the workers then train the second epoch)."""

    def __init__(self, run_dir: Path, on_checkpoint=None):
        self.run_dir, self.on_checkpoint = run_dir, on_checkpoint
        self.coordinators_seen: set[str] = set()
        self.alive_after_checkpoint: list[int] = []  # alive split coordinators, per sample
        self.worker_nodes: set[str] = set()
        self.done, self.acted = threading.Event(), None
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()

    def _watch(self):
        while not self.done.wait(0.3):
            coordinators = list_actors(filters=[("class_name", "=", "SplitCoordinator"), ("state", "=", "ALIVE")])
            workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
            self.coordinators_seen |= {a.actor_id for a in coordinators}
            if _registered_checkpoints(self.run_dir) and self.acted is None:
                self.worker_nodes |= {a.node_id for a in workers}
                self.alive_after_checkpoint.append(len(coordinators))
                if self.on_checkpoint:
                    try:
                        self.acted = self.on_checkpoint(workers)
                    except Exception as e:  # noqa: BLE001 - reported by the test, not lost with the thread
                        self.acted = e
                    self.on_checkpoint = None


def _task_nodes() -> dict[str, Counter]:
    """Per kind of task of the pre-training stage and the Data pipeline: how many ran on each node."""
    kinds = {"check_piece": "validate", "fit_piece": "fit", "top_counts": "fit"}
    out: dict[str, Counter] = {}
    for t in list_tasks(limit=10_000, raise_on_missing_output=False):
        kind = kinds.get(t.name) or ("data" if "read_pieces" in t.name else None)
        if kind and t.node_id:
            out.setdefault(kind, Counter())[t.node_id] += 1
    return out


def test_two_nodes_train_the_default_job_with_the_stage_spread(cluster, small_log, tmp_path):
    worker_nodes = {n.node_id for n in cluster.worker_nodes}
    with Watch(tmp_path / "results" / "spread") as watch:
        metrics = run(_job(small_log, tmp_path, "spread"))
    assert watch.worker_nodes == worker_nodes  # one Train worker on each worker node
    tasks = _task_nodes()
    for kind in ("validate", "fit", "data"):
        assert set(tasks.get(kind, {})) == worker_nodes, (kind, tasks)
    assert metrics["restarts"]["count"] == 0 and metrics["resumes"] == 0
    for h in metrics["history"]:
        assert h["train/rows_read"] == h["train/rows_trained"] == 60_000
        assert h["train/worker_rows_min"] > 0.4 * 60_000 / 2
    assert metrics["test"]["click"]["auc"] > 0.6
    # (c) the driver started 3 coordinators (train, valid, test) for its own node; the worker group, on other
    # nodes, ended them and split anew: while it trained only its own 3 were alive, and after the run none
    assert len(watch.coordinators_seen) == 6, watch.coordinators_seen
    assert watch.alive_after_checkpoint and max(watch.alive_after_checkpoint) == 3, watch.alive_after_checkpoint
    for _ in range(50):  # the controller that owns the last 3 exits just after fit() returns
        if not list_actors(filters=[("class_name", "=", "SplitCoordinator"), ("state", "=", "ALIVE")]):
            break
        time.sleep(0.2)
    else:
        pytest.fail("split coordinators left alive after the run")


def test_a_worker_node_killed_mid_epoch_resumes_and_loses_no_rows(cluster, small_log, tmp_path):
    def kill_a_worker_node(workers):
        [node] = [n for n in cluster.worker_nodes if n.node_id == workers[0].node_id]
        cluster.remove_node(node, allow_graceful=False)  # SIGKILL: raylet, object store and its workers
        return node.node_id

    # a spare node, which the worker group moves to: Cluster.add_node starts processes with signal handlers,
    # so it cannot run in the watching thread, after the kill
    cluster.add_node(**NODE)
    cluster.wait_for_nodes()

    run_dir = tmp_path / "results" / "node-killed"
    with Watch(run_dir, on_checkpoint=kill_a_worker_node) as watch:
        metrics = run(_job(small_log, tmp_path, "node-killed"))
    assert watch.acted and not isinstance(watch.acted, Exception), f"no worker node was killed: {watch.acted!r}"
    assert len(_registered_checkpoints(run_dir)) >= 1
    assert metrics["resumes"] == 1 and metrics["restarts"]["count"] == 1, metrics["restarts"]
    assert [h["epoch"] for h in metrics["history"]] == [0, 1]
    assert all(h["train/rows_read"] == h["train/rows_trained"] == 60_000 for h in metrics["history"])
    assert metrics["test"]["click"]["auc"] > 0.6
