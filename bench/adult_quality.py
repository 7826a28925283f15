"""Quality benchmark on UCI Adult (income > 50K, never married): every model of the zoo over several
seeds with 2 Ray Train workers; writes test AUC mean ± std per task beside the reference figures.

    python bench/adult_quality.py                     # -> bench/results/adult/quality.md
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.adult import SPEC_PATH, prepare_adult  # noqa: E402
from pipeline.models import MODELS  # noqa: E402
from pipeline.studies import quality_benchmark  # noqa: E402

# test AUC (%) income / marital from the notes this project started from
REFERENCE = {"esmm": (90.2, 96.2), "mmoe": (89.6, 96.1)}

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "adult"))
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args()
    out = Path(a.out)
    data = out / "data"
    if not data.exists():
        prepare_adult(data)
    quality_benchmark(str(data), str(SPEC_PATH), out, a.models, a.seeds, a.epochs, a.workers, REFERENCE)
