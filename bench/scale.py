"""Scale: peak memory and training samples/s of the default job at N and 10 N train rows, measured side by
side in one run. Each job runs as its own process (``python jobs/train_ple.py --train-rows R``, which starts
its own local Ray); every ~0.5 s the proportional set size (PSS, so that shared memory such as Ray's
object store counts once) of all its processes -- driver, Ray's daemons, Train workers, Data tasks -- is
summed from /proc. Linux only.

    python bench/scale.py                       # N = 1M -> bench/results/scale.md
    python bench/scale.py --rows 100000         # a quick look
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import ROOT, write_result

from pipeline.job import default_synthetic_data


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(d))
    return tree


def tree_memory(root: int) -> tuple[int, int]:
    """(PSS, RSS) in bytes summed over ``root`` and all its descendants."""
    tree, todo, pss, rss = _children(), [root], 0, 0
    while todo:
        pid = todo.pop()
        todo += tree.get(pid, [])
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
                elif line.startswith("Rss:"):
                    rss += int(line.split()[1]) * 1024
        except OSError:
            pass  # it ended meanwhile
    return pss, rss


def run_job(rows: int, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cmd = [sys.executable, str(ROOT / "jobs" / "train_ple.py"), "--train-rows", str(rows), "--name", f"scale-{rows}",
           "--output", str(out / "run"), "--storage-path", str(out / "ray_results")]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, as on a fresh machine
    with open(out / "job.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        peak = {"pss": 0, "rss": 0}
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                pss, rss = tree_memory(proc.pid)
                peak["pss"], peak["rss"] = max(peak["pss"], pss), max(peak["rss"], rss)
                done.wait(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        t0 = time.time()
        sampler.start()
        code = proc.wait()
        done.set()
        sampler.join()
    if code != 0:
        raise RuntimeError(f"the job at {rows} rows failed; see {out / 'job.log'}")
    metrics = json.loads((out / "run" / "metrics.json").read_text())
    return {"train rows": rows, "peak PSS, all processes (GiB)": peak["pss"] / 2**30,
            "peak RSS sum (GiB)": peak["rss"] / 2**30,
            "training samples/s": metrics["history"][0]["train/samples_per_s"], "job wall time (s)": time.time() - t0,
            "test click AUC": metrics["test"]["click"]["auc"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000, help="N: the job runs at N and 10 N train rows")
    p.add_argument("--out", default="outputs/bench/scale")
    a = p.parse_args()
    sizes = [a.rows, 10 * a.rows]
    for rows in sizes:  # generated beforehand (into the cache the job uses), outside the measurement
        eval_rows = max(rows // 10, 1000)
        default_synthetic_data({"train": rows, "valid": eval_rows, "test": eval_rows})
    results = [run_job(rows, Path(a.out) / str(rows)) for rows in sizes]
    small, big = results
    results.append({"train rows": "10 N / N", "peak PSS, all processes (GiB)": big["peak PSS, all processes (GiB)"]
                    / small["peak PSS, all processes (GiB)"], "peak RSS sum (GiB)": big["peak RSS sum (GiB)"]
                    / small["peak RSS sum (GiB)"], "training samples/s": big["training samples/s"] / small["training samples/s"]})
    write_result("scale", f"Scale: the default PLE job at N = {a.rows:,} and 10 N train rows", results,
                 ["the default job (PLE, 2 Ray Train workers, 1 epoch) on the default synthetic log's generator "
                  "at each size (valid and test are a tenth of train); the log is generated beforehand",
                  "peak PSS: the most memory the job's processes held at once, shared pages counted once; the RSS sum "
                  "counts shared pages (the object store, libraries) once per process"],
                 f"python bench/scale.py --rows {a.rows}")


if __name__ == "__main__":
    main()
