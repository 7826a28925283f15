"""Sequence models on a synthetic log where the behaviour sequence matters: MMoE with mean pooling, MMoE with
target attention, DUPN, MoSE and PLE with target attention, at two sequence effects; per-task test AUC, the gap
to the oracle, and samples/s.

    python jobs/sequence_study.py --out docs/results/sequence
"""
import argparse
from pathlib import Path

from pipeline.studies import SEQUENCE_EFFECTS, sequence_study

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs/results/sequence")
    p.add_argument("--train-rows", type=int, default=300_000)
    p.add_argument("--eval-rows", type=int, default=50_000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--effects", type=float, nargs="+", default=list(SEQUENCE_EFFECTS),
                   help="sequence effects to compare (mean-pooled MMoE also runs at 0, the floor)")
    p.add_argument("--batch-size", type=int, default=512)
    a = p.parse_args()
    sequence_study(Path(a.out), a.train_rows, a.eval_rows, a.epochs, a.workers, a.effects, batch_size=a.batch_size)
