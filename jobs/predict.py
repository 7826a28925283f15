"""Batch inference on Ray Data: score a Parquet log (no labels needed) with an exported model, or with a run
(exported first), into Parquet of the key columns, the per-task probabilities and the model version.

    python jobs/predict.py --run export/ple --data data/test --out scores/ --keys user_id item_id
    ray job submit --working-dir . -- python jobs/predict.py --run s3://bucket/export --data s3://bucket/log/day-2 ...
"""
from pipeline.predict import main

if __name__ == "__main__":
    main()
