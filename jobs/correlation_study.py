"""Sweep the synthetic generator's task correlation and train Shared-Bottom, OMoE, MMoE and PLE on each
(the MMoE paper's synthetic experiment on our impression logs); writes a table (md, csv) and a plot.

    python jobs/correlation_study.py --out docs/results/correlation
"""
import argparse
from pathlib import Path

from pipeline.studies import CORRELATIONS, STUDY_MODELS, correlation_study

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs/results/correlation")
    p.add_argument("--train-rows", type=int, default=300_000)
    p.add_argument("--eval-rows", type=int, default=50_000)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--models", nargs="+", default=list(STUDY_MODELS))
    p.add_argument("--correlations", nargs="+", type=float, default=list(CORRELATIONS))
    a = p.parse_args()
    correlation_study(Path(a.out), a.train_rows, a.eval_rows, workers=a.workers, models=a.models,
                      correlations=a.correlations)
