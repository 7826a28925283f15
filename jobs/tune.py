"""Tune any model with a search space file: python jobs/tune.py --space tune_spaces/ple_multi_objective.yaml"""
from pipeline.tune_cli import main

if __name__ == "__main__":
    main(None)
