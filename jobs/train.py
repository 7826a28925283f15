"""Train any model of the zoo by name with Ray Train; with no data flags, on the built-in synthetic log.

    python jobs/train.py --model mmoe
    python jobs/train.py --model esmm --data datasets-out/adult --spec datasets/uci-adult/spec.yaml
Models: single_task, shared_bottom, omoe, mmoe, ple, esmm, aitm.
"""
from pipeline.cli import main

if __name__ == "__main__":
    main(None)
