"""Pre-training stage: the driver's peak RSS and the seconds from the job's start to its first training step
(validation, the preprocessing fit, and the start-up of Train's workers and the data pipeline), at N and 10 N
train rows, on a local Ray cluster (``ray.cluster_utils.Cluster``, all on loopback) of 1 and of 2 worker nodes
of 1 CPU each. The head node has 0 CPUs, so every task runs on a worker node, and the driver only reduces
results.

Each configuration is the default job (PLE, 2 workers, one epoch) in a fresh driver process (``--child``); the
job records its stage times in metrics.json (``pre_training``), and its peak RSS is the VmHWM of that
process alone, without Ray's daemons, the tasks or the workers. On this 2-core machine, 2 nodes of 1 CPU are
twice the CPUs of 1.

    python bench/pre_training.py                 # N = 1M -> bench/results/pre_training.md
    python bench/pre_training.py --rows 200000   # a quick look
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

from common import write_result

from pipeline.synthetic import SPEC_PATH


def child(data: str, nodes: int) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    from pipeline.config import DataPaths, JobConfig
    from pipeline.job import run

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(nodes):
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as out:
            metrics = run(JobConfig(data=DataPaths(path=data, spec=str(SPEC_PATH)), name="pre-training", output=out))
        tasks = stage_tasks()
    finally:
        ray.shutdown()
        cluster.shutdown()
    pre = metrics["pre_training"]
    return {"rows": sum(metrics["data"][s]["rows"] for s in ("train", "valid", "test")),
            "train rows": metrics["data"]["train"]["rows"], "validate s": pre["validate_seconds"],
            "fit s": pre["fit_seconds"], "to first step s": pre["seconds_to_first_step"],
            "restarts": metrics["restarts"]["count"],
            "driver peak RSS MiB": peak_rss_mib(), **tasks}


STAGE_TASKS = ("check_piece", "fit_piece", "top_counts")  # validation's and the fit's Ray tasks


def stage_tasks() -> dict:
    """Where the stage's seconds go, from Ray's task events (the state API): the tasks' own running seconds
    (summed, the work), the seconds each waited from submission to running (a worker process started for it,
    or a free CPU), and the first wait on each node (its cold worker start)."""
    from ray.util.state import list_tasks

    tasks = [t for name in STAGE_TASKS
             for t in list_tasks(filters=[("name", "=", name)], detail=True, limit=10_000, raise_on_missing_output=False)
             if t.start_time_ms and t.end_time_ms]
    if not tasks:
        return {}
    first: dict[str, float] = {}
    for t in sorted(tasks, key=lambda t: t.creation_time_ms):
        first.setdefault(t.node_id, (t.start_time_ms - t.creation_time_ms) / 1e3)
    span = (max(t.end_time_ms for t in tasks) - min(t.creation_time_ms for t in tasks)) / 1e3
    return {"stage tasks": len(tasks), "task nodes": len(first),
            "task run s (sum)": sum(t.end_time_ms - t.start_time_ms for t in tasks) / 1e3,
            "task wait s (mean)": sum(t.start_time_ms - t.creation_time_ms for t in tasks) / 1e3 / len(tasks),
            "first wait per node s (max)": max(first.values()), "tasks' span s": span}


def peak_rss_mib() -> float:
    """This process's peak RSS since its exec (VmHWM). Not ``ru_maxrss``: Linux carries that over exec from
    the forking parent, so a child started by a parent that had just generated the 10 N log reported the
    parent's 1.07 GiB as its own."""
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000, help="N: the stage runs at N and 10 N train rows")
    p.add_argument("--child", nargs=2, metavar=("DATA", "NODES"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], int(a.child[1]))))
        return
    from pipeline.job import default_synthetic_data

    results = []
    for rows in (a.rows, 10 * a.rows):
        data = default_synthetic_data({"train": rows, "valid": rows // 10, "test": rows // 10})  # generated first
        for nodes in (1, 2):
            out = subprocess.run([sys.executable, __file__, "--child", str(data), str(nodes)], check=True,
                                 capture_output=True, text=True).stdout.strip().splitlines()[-1]
            r = json.loads(out)
            r["validate+fit s per M rows"] = (r["validate s"] + r["fit s"]) / (r["rows"] / 1e6)
            results.append({"train rows": rows, "worker nodes": nodes, **r})
    by = {(r["train rows"], r["worker nodes"]): r for r in results}
    n, big = a.rows, 10 * a.rows
    results.append({"train rows": "10 N / N, 1 node", "driver peak RSS MiB":
                    by[big, 1]["driver peak RSS MiB"] / by[n, 1]["driver peak RSS MiB"],
                    "validate+fit s per M rows": by[big, 1]["validate+fit s per M rows"] / by[n, 1]["validate+fit s per M rows"]})
    for rows in (n, big):
        results.append({"train rows": f"2 nodes / 1 node, {'N' if rows == n else '10 N'}",
                        "validate+fit s per M rows": by[rows, 2]["validate+fit s per M rows"] / by[rows, 1]["validate+fit s per M rows"],
                        "to first step s": by[rows, 2]["to first step s"] / by[rows, 1]["to first step s"]})
    write_result("pre_training", f"Pre-training stage: validation and fit at N = {n:,} and 10 N train rows, "
                 "on 1 and 2 Ray worker nodes", results,
                 ["the default job (PLE, 2 workers, 1 epoch); 'to first step s' runs from the job's start to rank 0's "
                  "first training batch: validation, fit, Train's and the data pipeline's start-up",
                  "validation reads every split (train, valid, test: a tenth of train each); the fit reads train",
                  "each configuration in a fresh driver process; its peak RSS is that process alone",
                  "worker nodes of 1 CPU each, the head 0 CPUs: 2 nodes are twice the CPUs of 1",
                  "task columns, from Ray's task events for validation's and the fit's tasks (check_piece, fit_piece, "
                  "top_counts): run s (sum) is their own running time, the stage's work; wait is submission to running; "
                  "the first wait per node is the start of that node's first worker process; span is the first "
                  "submission to the last task's end"],
                 f"python bench/pre_training.py --rows {n}")


if __name__ == "__main__":
    main()
