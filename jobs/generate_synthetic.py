"""Write a synthetic impression log (train/valid/test Parquet splits) with known oracle probabilities.

    python jobs/generate_synthetic.py --out data/synth-10m --train-rows 10000000
    python jobs/generate_synthetic.py --out data/day-2 --day 2   # the same world, two days of drift later
"""
import argparse

from pipeline.synthetic import SyntheticConfig, generate

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--train-rows", type=int, default=1_000_000)
    p.add_argument("--eval-rows", type=int, default=100_000, help="rows of valid and of test")
    p.add_argument("--task-correlation", type=float, default=0.8)
    p.add_argument("--num-users", type=int, default=100_000)
    p.add_argument("--num-items", type=int, default=200_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--day", type=int, default=0, help="a drifting log's day: new users/items, shifted popularity, "
                                                      "drifted ground truth (SyntheticConfig)")
    p.add_argument("--sequence-effect", type=float, default=0.0,
                   help="how much the history's recent entries in the candidate's category move click and conversion")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    cfg = SyntheticConfig(rows={"train": a.train_rows, "valid": a.eval_rows, "test": a.eval_rows},
                          task_correlation=a.task_correlation, num_users=a.num_users, num_items=a.num_items,
                          seed=a.seed, day=a.day, sequence_effect=a.sequence_effect)
    generate(a.out, cfg, workers=a.threads)
