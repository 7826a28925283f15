"""The Train worker's start-up, many times per worker process: ``jobs/train_ple.py`` (Ray Data, Train V2, DDP
on gloo) whose training function runs ``pipeline.train.train_loop_per_worker`` ``--repeat`` times in a row,
each a fresh model, DDP wrapper, first-batch thread, epoch, evaluation and report, from scratch (no resume).
A default job starts once per worker process; this packs ~6 starts into a minute of a small log.

    python bench/stress.py --script bench/stress_startups.py --runs 1 -- --repeat 60 --data DIR --spec SPEC
Not in CI; docs/NOTES.md (ninth round) has what it showed.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_own = argparse.ArgumentParser(add_help=False)
_own.add_argument("--repeat", type=int, default=10)
_args, sys.argv[1:] = _own.parse_known_args()  # the rest goes to the job's own parser
REPEAT = _args.repeat


def repeated(loop_config: dict) -> None:
    import ray.train

    import pipeline.train

    ray.train.get_checkpoint = lambda: None  # each pass starts fresh, not as a resume of the previous pass
    rank = ray.train.get_context().get_world_rank()
    for i in range(REPEAT):
        t0 = time.time()
        pipeline.train.train_loop_per_worker(loop_config)
        print(f"start-up pass {i + 1}/{REPEAT} of rank {rank} done in {time.time() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    import pipeline.job
    from pipeline.cli import main

    pipeline.job.train_loop_per_worker = repeated  # the trainer's function (pickled by value from __main__)
    main("ple")
