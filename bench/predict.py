"""Batch scoring: ``jobs/predict.py``'s rows/s (Ray Data, an actor pool, Parquet in and out) next to the
training samples/s of the same model on the same machine, and next to a single-process in-memory scoring loop
(``Scorer.score`` over the same rows, already read into memory: the ceiling without Ray Data's reads and
writes) - measured side by side in one run.

    python bench/predict.py                  # the default PLE job on the default log; scores its 1M train rows
    python bench/predict.py --rows 300000    # a quick look
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import write_result

from pipeline.synthetic import SPEC_PATH


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000, help="train rows of the log (the rows scored)")
    p.add_argument("--repeats", type=int, default=2, help="timed passes of each scorer (the best one counts)")
    a = p.parse_args()
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from pipeline.config import DataPaths, JobConfig
    from pipeline.export import export_run
    from pipeline.job import connect_ray, default_synthetic_data, run
    from pipeline.predict import predict
    from pipeline.serving import Scorer
    from pipeline.validate import split_files

    data = default_synthetic_data({"train": a.rows, "valid": a.rows // 10, "test": a.rows // 10})
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        connect_ray()
        metrics = run(JobConfig(data=DataPaths(path=str(data), spec=str(SPEC_PATH)), name="bench-predict",
                                output=str(tmp / "run"), storage_path=str(tmp / "results")))
        train_sps = metrics["history"][-1]["train/samples_per_s"]
        export_run(tmp / "run", tmp / "export", aoti=True)

        def timed(split: str) -> dict:  # the best of the repeats
            runs = [predict(str(tmp / "export"), str(data / split), str(tmp / f"scores-{split}-{i}"), ["user_id", "item_id"])
                    for i in range(a.repeats)]
            return min(runs, key=lambda r: r["seconds"])

        small, best = timed("valid"), timed("train")
        # the rate once the pipeline runs: the extra rows of train over valid by the extra seconds (the actors'
        # start-up and the first read, paid once per job, cancel out)
        steady = (best["rows_in"] - small["rows_in"]) / max(best["seconds"] - small["seconds"], 1e-9)
        ray.shutdown()  # the in-process loop runs alone, as a ranker's process would
        _, files = split_files(str(data), "train")
        raw = pa.concat_tables(pq.read_table(f) for f in files)
        loops = {}
        for compiled in (True, False):
            scorer, loops[compiled] = Scorer.load(tmp / "export", compiled=compiled), []
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                scorer.score(raw)
                loops[compiled].append(raw.num_rows / (time.perf_counter() - t0))
    loop = max(loops[True])
    rows = [{"measure": "jobs/predict.py, end to end (Ray Data, actor pool, Parquet in and out)", "rows/s": best["rows_per_s"],
             "actors": best["actors"], "rows": best["rows_in"], "seconds": best["seconds"]},
            {"measure": "jobs/predict.py, the same on the valid split", "rows/s": small["rows_per_s"],
             "actors": small["actors"], "rows": small["rows_in"], "seconds": small["seconds"]},
            {"measure": "jobs/predict.py, steady (extra rows / extra seconds, train over valid)", "rows/s": steady},
            {"measure": "Scorer.score in one process, rows in memory, AOTInductor program", "rows/s": loop, "rows": raw.num_rows},
            {"measure": "Scorer.score in one process, rows in memory, portable torch.export program", "rows/s": max(loops[False]),
             "rows": raw.num_rows},
            {"measure": "training (the same model, the default job)", "rows/s": train_sps, "rows": metrics["data"]["train"]["rows"]},
            {"measure": "predict end to end / training", "rows/s": best["rows_per_s"] / train_sps},
            {"measure": "predict steady / training", "rows/s": steady / train_sps},
            {"measure": "predict end to end / in-memory loop (AOTInductor)", "rows/s": best["rows_per_s"] / loop},
            {"measure": "predict steady / in-memory loop (AOTInductor)", "rows/s": steady / loop}]
    write_result("predict", f"Batch scoring: jobs/predict.py vs training and an in-memory loop ({a.rows:,} rows)", rows,
                 ["predict's time runs from the read's start to the last file written (actor start-up included), "
                  f"best of {a.repeats}; rows in = rows out checked from the Parquet footers",
                  "steady: (train rows - valid rows) / (train seconds - valid seconds), the rate with the fixed "
                  "start-up (actors loading the model, the first read) taken out",
                  "the in-memory loop: the same export through pipeline.serving.Scorer, one process, the raw rows "
                  "already read, no output written; best of the repeats",
                  "training: train/samples_per_s of the default job's epoch (2 workers, bf16 autocast where native)",
                  "predict and the loop run the AOTInductor-compiled fp32 program (jobs/export.py's default)"],
                 f"python bench/predict.py --rows {a.rows}")


if __name__ == "__main__":
    main()
