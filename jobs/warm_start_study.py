"""Warm start on a drifting synthetic log: day 1, then day 2 three ways (the day-1 model as it is, a cold
start, a warm start from day 1 with the same budget); per-task test AUC against the oracle, and wall time.

    python jobs/warm_start_study.py --out docs/results/warm_start
"""
import argparse
from pathlib import Path

from pipeline.studies import warm_start_study

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs/results/warm_start")
    p.add_argument("--train-rows", type=int, default=500_000)
    p.add_argument("--eval-rows", type=int, default=50_000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--model", default="ple")
    a = p.parse_args()
    warm_start_study(Path(a.out), a.train_rows, a.eval_rows, a.epochs, a.workers, a.model)
