"""Batch inference on Ray Data: score a Parquet log (no labels needed) with an exported model, or with a run
(exported first), into Parquet of the key columns, the per-task probabilities and the model version.

    python jobs/predict.py --run export/ple --data data/test --out scores/ --keys user_id item_id
    ray job submit --working-dir . -- python jobs/predict.py --run s3://bucket/export --data s3://bucket/log/day-2 ...
"""
import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without install

from pipeline.export import export_run  # noqa: E402
from pipeline.job import connect_ray  # noqa: E402
from pipeline.predict import predict  # noqa: E402

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="an export (jobs/export.py), a job's output or a checkpoint")
    p.add_argument("--data", required=True, help="Parquet files: a directory or a URI")
    p.add_argument("--out", required=True, help="where the scores go: a directory or a URI")
    p.add_argument("--keys", nargs="*", default=[], help="input columns copied to each output row (e.g. request_id)")
    p.add_argument("--on-bad-rows", choices=["fail", "null"], default="fail",
                   help="rows with bad values: refuse the data, naming file, column and count (default), or score them as nulls")
    p.add_argument("--actors", type=int, help="scoring actors (default: one per GPU, else one per CPU)")
    p.add_argument("--batch-rows", type=int, default=65_536)
    a = p.parse_args()
    connect_ray(progress=sys.stdout.isatty())  # the bars on a terminal; one line per operator update in logs
    with tempfile.TemporaryDirectory() as tmp:
        export = a.run
        if not (Path(a.run) / "manifest.json").exists():  # a run: export it first
            export_run(a.run, tmp, aoti=True)
            export = tmp
        s = predict(export, a.data, a.out, a.keys, a.on_bad_rows, a.actors, a.batch_rows)
    print(f"scored {s['rows_in']:,} rows -> {s['rows_out']:,} rows in {a.out} in {s['seconds']:.1f} s "
          f"({s['rows_per_s']:,.0f} rows/s, {s['actors']} {'GPU' if s['gpu'] else 'CPU'} actor(s), "
          f"model {s['model_version']}); scored as null: {s['scored_as_null']}")
