"""Train any model of the zoo by name with Ray Train; with no data flags, on the built-in synthetic log.

    python jobs/train.py --model mmoe
    python jobs/train.py --model esmm --data datasets-out/adult --spec datasets/uci-adult/spec.yaml
Models: single_task, shared_bottom, omoe, mmoe, ple, esmm, aitm.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without install

from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    main(None)
