"""Batch scoring: ``jobs/predict.py``'s rows/s (Ray Data, an actor pool, Parquet in and out) next to the
training samples/s of the same model on the same machine, and next to a single-process in-memory scoring loop
(``Scorer.score`` over the same rows, already read into memory: the ceiling without Ray Data's reads and
writes) - measured side by side in one run.

    python bench/predict.py                  # the default PLE job on the default log; scores its 1M train rows
                                             # and them 10 times over, with the fp32 and the bf16 export
    python bench/predict.py --rows 300000 --copies 3   # a quick look
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
    p.add_argument("--copies", type=int, default=10, help="the large job scores the train split's files this many times")
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
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _, files = split_files(str(data), "train")
        large = tmp / "large"  # the train split's files, --copies times (links): a day-sized job
        large.mkdir()
        for i in range(a.copies):
            for f in files:
                (large / f"copy{i}-{Path(f).name}").symlink_to(f)
        connect_ray()
        metrics = run(JobConfig(data=DataPaths(path=str(data), spec=str(SPEC_PATH)), name="bench-predict",
                                output=str(tmp / "run"), storage_path=str(tmp / "results")))
        train_sps = metrics["history"][-1]["train/samples_per_s"]
        rows.append({"measure": "training (the same model, the default job)", "rows/s": train_sps,
                     "rows": metrics["data"]["train"]["rows"]})
        raw = pa.concat_tables(pq.read_table(f) for f in files)
        for precision in ("fp32", "bf16"):
            export = tmp / f"export-{precision}"
            export_run(tmp / "run", export, aoti=True, precision=precision)

            def timed(source: Path, repeats: int) -> dict:  # the best of the repeats
                runs = [predict(str(export), str(source), str(tmp / f"scores-{source.name}-{precision}-{i}"), ["user_id", "item_id"])
                        for i in range(repeats)]
                return min(runs, key=lambda r: r["seconds"])

            small, best, big = timed(data / "valid", a.repeats), timed(data / "train", a.repeats), timed(large, 1)
            # the rate once the pipeline runs: the extra rows of the large job over valid by the extra seconds
            # (the actors' start-up and the first read, paid once per job, cancel out)
            steady = (big["rows_in"] - small["rows_in"]) / max(big["seconds"] - small["seconds"], 1e-9)
            ray.shutdown()  # the in-process loop runs alone, as a ranker's process would
            scorer, loop = Scorer.load(export), []
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                scorer.score(raw)
                loop.append(raw.num_rows / (time.perf_counter() - t0))
            loop = max(loop)
            connect_ray()
            tag = f"{precision}, {scorer.runtime}"
            for name, r in ((f"{a.copies}x the train split", big), ("the train split", best), ("the valid split", small)):
                rows.append({"measure": f"jobs/predict.py end to end, {name} ({tag})", "rows/s": r["rows_per_s"],
                             "actors": r["actors"], "rows": r["rows_in"], "seconds": r["seconds"]})
            rows += [{"measure": f"jobs/predict.py steady ({tag})", "rows/s": steady},
                     {"measure": f"Scorer.score in one process, rows in memory ({tag})", "rows/s": loop, "rows": raw.num_rows},
                     {"measure": f"predict {a.copies}x end to end / training ({precision})", "rows/s": big["rows_per_s"] / train_sps},
                     {"measure": f"predict {a.copies}x end to end / in-memory loop ({precision})", "rows/s": big["rows_per_s"] / loop},
                     {"measure": f"predict 1x end to end / training ({precision})", "rows/s": best["rows_per_s"] / train_sps},
                     {"measure": f"predict 1x end to end / in-memory loop ({precision})", "rows/s": best["rows_per_s"] / loop},
                     {"measure": f"predict steady / in-memory loop ({precision})", "rows/s": steady / loop}]
        ray.shutdown()
    write_result("predict", f"Batch scoring: jobs/predict.py vs training and an in-memory loop ({a.rows:,} rows, and {a.copies}x)", rows,
                 ["predict's time runs from the read's start to the last file written (actor start-up included), "
                  f"best of {a.repeats} (one run of the {a.copies}x job); rows in = rows out checked from the Parquet footers",
                  f"{a.copies}x: the train split's files linked {a.copies} times into one input directory, a day-sized job "
                  "where the fixed start-up (a new Ray worker process per actor, the model's load: ~6 s) weighs less",
                  f"steady: ({a.copies}x rows - valid rows) / ({a.copies}x seconds - valid seconds), the rate with the fixed start-up "
                  "taken out",
                  "the in-memory loop: the same export through pipeline.serving.Scorer, one process (2 threads), the raw rows "
                  "already read, no output written; best of the repeats",
                  "training: train/samples_per_s of the default job's epoch (2 workers, bf16 autocast where native)",
                  "fp32: the AOTInductor program of jobs/export.py's default; bf16: `jobs/export.py --precision bf16` "
                  "(the layers after the lookups in bf16, within 1e-2 of fp32)"],
                 f"python bench/predict.py --rows {a.rows} --copies {a.copies}")


if __name__ == "__main__":
    main()
