"""Train MMOE on an impression log with Ray Train; with no arguments, on the built-in synthetic log.

    python jobs/train_mmoe.py                       # local Ray, default data, writes outputs/mmoe/
    ray job submit --working-dir . -- python jobs/train_mmoe.py --workers 4 --gpu
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without install

from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    main("mmoe")
