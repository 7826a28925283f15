"""Export a finished run for serving: the selected model as a torch.export program, its preprocessing state in
a portable form, and its spec (``pipeline.export``), plus the program compiled for CPU by AOTInductor; ``pipeline.serving.Scorer`` loads the directory.

    python jobs/export.py --run outputs/ple --out export/ple
    python jobs/export.py --run outputs/esmm/checkpoint --out export/esmm
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without install

from pipeline.export import export_run  # noqa: E402

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a job's output directory, or a checkpoint directory")
    p.add_argument("--out", required=True, help="the artifact's directory")
    p.add_argument("--aoti", action=argparse.BooleanOptionalAction, default=True,
                   help="also compile the program for CPU with AOTInductor (default; needs a C++ compiler, ~30 s): "
                        "pipeline.serving runs it on CPU, ~1.6x the rows/s of the portable program")
    a = p.parse_args()
    manifest = export_run(a.run, a.out, aoti=a.aoti)
    print(f"exported {manifest['model']} ({', '.join(manifest['outputs'])}) to {a.out}")
