"""Train PLE on an impression log with Ray Train; with no arguments, on the built-in synthetic log.

    python jobs/train_ple.py                       # local Ray, default data, writes outputs/ple/
    ray job submit --working-dir . -- python jobs/train_ple.py --workers 4 --gpu
"""
from pipeline.cli import main

if __name__ == "__main__":
    main("ple")
