"""Ray's own shutdown abort, without this project: a Ray Data split coordinator actor (``streaming_split``)
whose handles are all dropped exits gracefully ("the actor is dead because all references to the actor were
removed"), and now and then its process aborts at the very end, after "Core worker is destructed":
``std::terminate`` -> ``ray::TerminateHandler`` from ``CoreWorker::~CoreWorker`` in
``RunWorkerTaskExecutionLoop``, SIGABRT, ``Fatal Python error: Aborted`` in the actor's ``.err`` log. Ending
the actor with ``ray.kill`` instead takes Ray's forced exit (no destructors run) and leaves no abort.

    python bench/ray_shutdown_abort.py --rounds 10            # handles dropped: graceful exits
    python bench/ray_shutdown_abort.py --rounds 10 --kill     # ray.kill first: forced exits

Each round creates ``--splits`` coordinators (3 datasets' splits, as a training run has), reads one of them,
then ends them all; the script then scans its own Ray session's logs.
"""
from __future__ import annotations

import argparse
import gc
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MARKS = re.compile(r"SIGABRT|Fatal Python error|TerminateHandler")


def child(rounds: int, splits: int, kill: bool) -> None:
    import ray
    import ray.data

    os.environ.pop("RAY_ADDRESS", None)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    for r in range(rounds):
        shards = [ray.data.range(10_000, override_num_blocks=4).streaming_split(1, equal=False) for _ in range(splits)]
        for _ in shards[0][0].iter_batches(batch_size=1000):  # one split read through; the others never are
            pass
        ray.get([s[0]._coord_actor.stats.remote() for s in shards])  # every coordinator is up
        if kill:
            for s in shards:
                ray.kill(s[0]._coord_actor, no_restart=True)  # private: the split's coordinator actor
        del shards
        gc.collect()
        time.sleep(3)  # the coordinators exit (gracefully, when their handles are gone)
    ray.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--splits", type=int, default=3)
    p.add_argument("--kill", action="store_true", help="ray.kill the coordinators instead of dropping their handles")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a.rounds, a.splits, a.kill)
        return
    tmp = tempfile.mkdtemp(prefix="rsa-", dir="/tmp")  # short: Ray's socket paths have a length limit
    subprocess.run([sys.executable, __file__, "--child", "--rounds", str(a.rounds), "--splits", str(a.splits)]
                   + (["--kill"] if a.kill else []), env=os.environ | {"RAY_TMPDIR": tmp}, timeout=1800)
    time.sleep(3)
    logs = [f for f in Path(tmp).rglob("logs/worker-*.err") if "SplitCoordinator" in f.read_text(errors="replace")]
    aborted = [f for f in logs if MARKS.search(f.read_text(errors="replace"))]
    print(f"{'ray.kill' if a.kill else 'handles dropped'}: {len(aborted)} of {len(logs)} split coordinators aborted "
          f"at exit (logs in {tmp})" + "".join(f"\n    {f}" for f in aborted))


if __name__ == "__main__":
    main()
