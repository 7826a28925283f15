"""Tune any model with a search space file: python jobs/tune.py --space tune_spaces/ple_multi_objective.yaml"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without install

from pipeline.tune_cli import main  # noqa: E402

if __name__ == "__main__":
    main(None)
