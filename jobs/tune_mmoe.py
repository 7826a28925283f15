"""Tune MMOE's loss weights and expert/gate sizes with Ray Tune (default: UCI Adult, tune_spaces/mmoe.yaml).

    python jobs/tune_mmoe.py --num-samples 8
    python jobs/tune_mmoe.py --data s3://bucket/log --spec log.yaml --storage-path s3://bucket/tune
    python jobs/train_ple.py --config outputs/tune-mmoe/best.yaml        # train the best config
"""
from pathlib import Path

from pipeline.tune_cli import main

if __name__ == "__main__":
    main(str(Path(__file__).resolve().parents[1] / "tune_spaces" / "mmoe.yaml"))
