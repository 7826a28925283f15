"""Command-line front of the tune jobs: a search space file + data flags -> Ray Tune -> results."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from pipeline.config import DataPaths
from pipeline.tuning import TuneSpace, compare_with_default, tune_model, write_results


def main(default_space: str | None, argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="Search loss weights and expert/gate sizes with Ray Tune.")
    p.add_argument("--space", default=default_space, required=default_space is None, help="tune_spaces/*.yaml")
    p.add_argument("--data", help="dataset with train/ valid/ test/ (default: UCI Adult, prepared into the cache)")
    p.add_argument("--spec", help="dataset spec YAML (with --data)")
    p.add_argument("--name", default=None, help="search name; rerunning it resumes an interrupted search")
    p.add_argument("--storage-path", default=None, help="local directory or s3://... (default outputs/tune)")
    p.add_argument("--output", default=None, help="where results.csv/.md, pareto.png and best.yaml go")
    p.add_argument("--num-samples", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--trial-workers", type=int, default=1, help="Ray Train workers per trial")
    p.add_argument("--no-compare", action="store_true",
                   help="skip training the starting config and best.yaml once more to compare them on test")
    a = p.parse_args(argv)

    from pipeline.job import connect_ray

    space = TuneSpace.load(a.space)
    space.num_samples = a.num_samples or space.num_samples
    space.epochs = a.epochs or space.epochs
    name = a.name or f"tune-{Path(a.space).stem}"
    storage = a.storage_path or os.environ.get("MTREC_STORAGE_PATH") or str(Path("outputs/tune").resolve())
    out = Path(a.output or f"outputs/{name}")
    job = space.base_job()
    if a.data:
        job.data = DataPaths(a.data, a.spec)
    else:
        from pipeline.adult import SPEC_PATH, prepare_adult
        from pipeline.job import DEFAULT_CACHE

        path = DEFAULT_CACHE / "uci-adult-s0"
        if not path.exists():
            prepare_adult(path)
        job.data = DataPaths(str(path), str(SPEC_PATH))
    job.name, job.output = name, str(out)
    job.storage_path = storage
    connect_ray()
    results = tune_model(space, job, name, storage, trial_workers=a.trial_workers)
    summary = write_results(results, space, job, out)
    print(f"best trial {summary['best_trial']}: validation {space.objective} {summary['valid_objective']:.4f}; "
          f"{summary['trials']} trials ({summary['failed']} failed); wrote {out}/results.md, best.yaml, pareto.png")
    print(f"TensorBoard: tensorboard --logdir {storage}/{name}")
    if not a.no_compare:
        summary["test"] = compare_with_default(space, job, out)
    return summary


def console_main() -> None:
    """``mtrec-tune --space tune_spaces/ple.yaml``: the search space file is required."""
    main(None)
