"""Convert a CSV or Parquet impression log into train/ valid/ test/ Parquet splits plus a spec YAML.

    python jobs/convert.py --train ali_ccp_train.csv --valid ali_ccp_val.csv --test ali_ccp_test.csv \\
        --label click --label purchase --depends-on purchase:click --out data/ali-ccp
    python jobs/convert.py --train aliexpress_train.csv --test aliexpress_test.csv --split valid=0.1 \\
        --label click --label conversion --depends-on conversion:click --drop search_id --out data/aliexpress
    python jobs/train_ple.py --data data/ali-ccp --spec data/ali-ccp/spec.yaml
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without install

from pipeline.convert import ConvertConfig, convert  # noqa: E402

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--train", nargs="+", required=True, help="CSV or Parquet files")
    p.add_argument("--valid", nargs="+", default=[])
    p.add_argument("--test", nargs="+", default=[])
    p.add_argument("--out", required=True)
    p.add_argument("--label", action="append", required=True,
                   help="a 0/1 column, or NAME=COLUMN:VALUE1|VALUE2 (1 where COLUMN is one of the values)")
    p.add_argument("--depends-on", action="append", default=[], help="CHILD:PARENT (the funnel: purchase:click)")
    p.add_argument("--drop", action="append", default=[], help="a column that is not a feature")
    p.add_argument("--sparse", action="append", default=[])
    p.add_argument("--dense", action="append", default=[])
    p.add_argument("--dim", type=int, default=8)
    p.add_argument("--split", action="append", default=[], help="SPLIT=FRACTION of train when SPLIT has no files")
    p.add_argument("--split-test-into-valid", action="store_true", help="split the test files 1:1 into valid/test")
    p.add_argument("--fill-dense-nan", type=float)
    p.add_argument("--no-header", action="store_true")
    p.add_argument("--columns", help="comma-separated column names (CSV without header)")
    p.add_argument("--sep", default=",")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    cfg = ConvertConfig(
        labels=a.label, depends_on=dict(d.split(":", 1) for d in a.depends_on), drop=a.drop, sparse=a.sparse,
        dense=a.dense, dim=a.dim, split_fractions={k: float(v) for k, v in (s.split("=") for s in a.split)},
        split_test_into_valid=a.split_test_into_valid, fill_dense_nan=a.fill_dense_nan, seed=a.seed,
        csv_header=not a.no_header, csv_columns=a.columns.split(",") if a.columns else [], csv_sep=a.sep)
    spec, report = convert({"train": a.train, "valid": a.valid, "test": a.test}, a.out, cfg)
    print(json.dumps(report, indent=2))
    print(f"wrote {a.out}/{{train,valid,test}}/ and {a.out}/spec.yaml; "
          f"train with: python jobs/train_ple.py --data {a.out} --spec {a.out}/spec.yaml")
