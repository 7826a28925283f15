"""Ray's own shutdown abort, without this project: a Ray Data split coordinator actor (``streaming_split``)
whose handles are all dropped exits gracefully ("the actor is dead because all references to the actor were
removed"), and now and then its process aborts at the very end, after "Core worker is destructed":
``std::terminate`` -> ``ray::TerminateHandler`` from ``CoreWorker::~CoreWorker`` in
``RunWorkerTaskExecutionLoop``, SIGABRT, ``Fatal Python error: Aborted`` in the actor's ``.err`` log. Ending
the actor with ``ray.kill`` instead takes Ray's forced exit (no destructors run) and leaves no abort.

    python bench/ray_shutdown_abort.py --rounds 10            # handles dropped: graceful exits
    python bench/ray_shutdown_abort.py --rounds 10 --kill     # ray.kill first: forced exits
    python bench/ray_shutdown_abort.py --rounds 60 --kill --at-once --head   # killed as soon as up, 2nd driver
    python bench/ray_shutdown_abort.py --rounds 60 --kill --at-once --head --plain  # a plain threaded actor
    python bench/ray_shutdown_abort.py --rounds 20 --owner-killed  # their owner actor killed, as a Tune trial is

``--at-once`` (which always kills) reads nothing and kills each coordinator as soon as it answers (the project's driver ends a
started split that no worker group can take that way, ~50 ms after it is up). ``--head`` starts a head with
``ray start`` and connects to it, as a job's driver does. ``--plain`` uses a plain actor with
``max_concurrency=4`` (as the coordinator has) instead of Ray Data's, to tell Ray Data's part from Ray core's.
``--owner-killed`` makes the splits in an actor (which reads one of them in a thread) and ``ray.kill``s that
actor: the raylet then SIGTERMs the coordinators it owned, as when Ctrl-C stops a Tune search and Tune kills a
trial actor whose run started its splits (the abort of the interrupted-search test, docs/NOTES.md).

Each round creates ``--splits`` coordinators (3 datasets' splits, as a training run has), reads one of them,
then ends them all; the script then scans its own Ray session's logs.
"""
from __future__ import annotations

import argparse
import gc
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from stress import end_leftovers  # kills only the processes that name this script's temp dir

MARKS = re.compile(r"SIGABRT|Fatal Python error|TerminateHandler")


def child(rounds: int, splits: int, kill: bool, at_once: bool, head: bool, plain: bool, owner_killed: bool) -> None:
    import ray
    import ray.data

    os.environ.pop("RAY_ADDRESS", None)
    if head:
        ray.init(address="auto", log_to_driver=False)  # the head in RAY_TMPDIR, as `ray job submit`'s driver finds it
    else:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False

    @ray.remote(num_cpus=0, max_concurrency=4)
    class SplitCoordinator:  # same class name, so the scan below finds its logs
        def stats(self):
            return os.getpid()

    @ray.remote(num_cpus=0)
    class Owner:  # a Tune trial's actor: it starts the splits and reads one while it is killed
        def start(self, splits: int) -> None:
            ray.data.DataContext.get_current().enable_progress_bars = False
            if plain:
                self.actors = [SplitCoordinator.remote() for _ in range(splits)]
            else:
                self.shards = [ray.data.range(100_000, override_num_blocks=20).streaming_split(2, equal=False)
                               for _ in range(splits)]
                self.actors = [ray_compat_coordinator(s) for s in self.shards]
                threading.Thread(target=lambda: [time.sleep(0.01) for _ in self.shards[0][0].iter_batches(batch_size=100)],
                                 daemon=True).start()
            ray.get([a.stats.remote() for a in self.actors])  # every coordinator is up

    for r in range(rounds):
        if owner_killed:
            owner = Owner.remote()
            ray.get(owner.start.remote(splits))
            time.sleep(0.5)
            ray.kill(owner, no_restart=True)  # the raylet SIGTERMs the coordinators' processes
            time.sleep(2)
            continue
        if at_once:
            if plain:
                actors = [SplitCoordinator.remote() for _ in range(splits)]
            else:
                actors = [ray_compat_coordinator(ray.data.range(10_000).streaming_split(1, equal=False))
                          for _ in range(splits)]
            ray.get([a.stats.remote() for a in actors])  # every coordinator is up
            for a in actors:
                ray.kill(a, no_restart=True)
            del actors
            time.sleep(0.5)
            continue
        shards = [ray.data.range(10_000, override_num_blocks=4).streaming_split(1, equal=False) for _ in range(splits)]
        for _ in shards[0][0].iter_batches(batch_size=1000):  # one split read through; the others never are
            pass
        ray.get([ray_compat_coordinator(s).stats.remote() for s in shards])  # every coordinator is up
        if kill:
            for s in shards:
                ray.kill(ray_compat_coordinator(s), no_restart=True)
        del shards
        gc.collect()
        time.sleep(3)  # the coordinators exit (gracefully, when their handles are gone)
    ray.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_compat_coordinator(shards):
    return shards[0]._coord_actor  # private: the split's coordinator actor


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--splits", type=int, default=3)
    p.add_argument("--kill", action="store_true", help="ray.kill the coordinators instead of dropping their handles")
    p.add_argument("--at-once", action="store_true", help="read nothing; ray.kill each coordinator as soon as it is up")
    p.add_argument("--head", action="store_true", help="start a head with `ray start` and connect as a second driver")
    p.add_argument("--plain", action="store_true", help="a plain threaded actor instead of Ray Data's coordinator")
    p.add_argument("--owner-killed", action="store_true", help="ray.kill the actor that made the splits, not the coordinators")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a.rounds, a.splits, a.kill, a.at_once, a.head, a.plain, a.owner_killed)
        return
    tmp = tempfile.mkdtemp(prefix="rsa-", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = os.environ | {"RAY_TMPDIR": tmp}
    flags = [f for f, on in (("--kill", a.kill), ("--at-once", a.at_once), ("--head", a.head), ("--plain", a.plain),
                                       ("--owner-killed", a.owner_killed)) if on]
    if a.head:
        port = free_port()
        subprocess.run(["ray", "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                        f"--temp-dir={tmp}"], env=env, check=True, capture_output=True)
    try:
        subprocess.run([sys.executable, __file__, "--child", "--rounds", str(a.rounds), "--splits", str(a.splits)]
                       + flags, env=env, timeout=1800)
    finally:
        if a.head:  # only the head this script started; `ray stop` would stop every Ray on the machine
            end_leftovers(Path(tmp))
    time.sleep(3)
    logs = [f for f in Path(tmp).rglob("logs/worker-*.err") if "SplitCoordinator" in f.read_text(errors="replace")]
    aborted = [f for f in logs if MARKS.search(f.read_text(errors="replace"))]
    how = "owner killed" if a.owner_killed else "ray.kill" if a.kill or a.at_once else "handles dropped"
    print(f"{how}: {len(aborted)} of {len(logs)} split coordinators aborted "
          f"at exit (logs in {tmp})" + "".join(f"\n    {f}" for f in aborted))


if __name__ == "__main__":
    main()
