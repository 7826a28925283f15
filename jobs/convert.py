"""Convert CSV or Parquet impression logs into train/ valid/ test/ Parquet splits plus a dataset spec.

    # files per split; purchase is over the exposure space (purchase=1 implies click=1)
    python jobs/convert.py --train ali_ccp_train.csv --valid ali_ccp_val.csv --test ali_ccp_test.csv \\
        --label click --label purchase --depends-on purchase:click --out data/ali-ccp
    # 10 % of train drawn at random (seeded) for validation; quoted patterns select columns
    python jobs/convert.py --train aliexpress_train.csv --test aliexpress_test.csv --split valid=0.1 \\
        --label click --label conversion --depends-on conversion:click --drop search_id \\
        --dense 'numerical_*' --out data/aliexpress
    # a CSV without a header, labels derived from a string column, the test file split into valid/test
    python jobs/convert.py --train log.csv --test log_test.csv --split-test-into-valid \\
        --no-header --columns user,item,price,outcome --label buy=outcome:purchase --out data/mylog

Then: python jobs/train_ple.py --data OUT --spec OUT/spec.yaml   (docs/bring-your-own-data.md)
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without install

from pipeline.convert import ConvertConfig, convert, format_report  # noqa: E402


def pairs(values: list[str], sep: str, option: str) -> dict[str, str]:
    if bad := [v for v in values if sep not in v]:
        sys.exit(f"{option} {bad[0]!r}: expected KEY{sep}VALUE")
    return dict(v.split(sep, 1) for v in values)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--train", nargs="+", required=True, help="CSV (optionally .gz) or Parquet files or directories")
    p.add_argument("--valid", nargs="+", default=[])
    p.add_argument("--test", nargs="+", default=[])
    p.add_argument("--out", required=True, help="output directory: train/ valid/ test/ and spec.yaml")
    p.add_argument("--label", action="append", required=True,
                   help="a 0/1 column, or NAME=COLUMN:VALUE1|VALUE2 (1 where COLUMN is one of the values)")
    p.add_argument("--depends-on", action="append", default=[], metavar="CHILD:PARENT", help="the funnel, e.g. purchase:click")
    p.add_argument("--split", action="append", default=[], metavar="SPLIT=FRACTION",
                   help="draw a split without files from train at random, e.g. valid=0.1")
    p.add_argument("--split-test-into-valid", action="store_true", help="split the test files 1:1 at random into valid and test")
    p.add_argument("--drop", nargs="+", action="extend", default=[], metavar="COL", help="columns (fnmatch patterns) that are not features")
    p.add_argument("--sparse", nargs="+", action="extend", default=[], metavar="COL", help="force sparse ids")
    p.add_argument("--dense", nargs="+", action="extend", default=[], metavar="COL", help="force dense")
    p.add_argument("--normalize", nargs="+", action="extend", default=[], metavar="COL=METHOD",
                   help="dense normalisation: standard (default), log_standard or none")
    p.add_argument("--bucketize", action="append", default=[], metavar="COL=E1,E2,...",
                   help="add the sparse feature COL_bucket: the index of the dense COL among these edges")
    p.add_argument("--dim", type=int, default=8, help="embedding dim (default: %(default)s)")
    p.add_argument("--max-vocab-size", type=int, default=1_000_001, help="hash ids above this many (default: %(default)s)")
    p.add_argument("--fill-dense-nan", type=float, metavar="VALUE", help="fill NaN in dense columns (default: refuse them)")
    p.add_argument("--no-header", action="store_true", help="the CSV files have no header (give --columns)")
    p.add_argument("--columns", help="comma-separated CSV column names")
    p.add_argument("--sep", default=",", help="CSV separator (default: %(default)r)")
    p.add_argument("--comment", help="CSV: ignore the rest of a line after this character")
    p.add_argument("--name", help="spec name (default: the output directory's name)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    cfg = ConvertConfig(
        labels=a.label, depends_on=pairs(a.depends_on, ":", "--depends-on"), drop=a.drop, sparse=a.sparse, dense=a.dense,
        normalize=pairs(a.normalize, "=", "--normalize"),
        bucketize={k: [float(e) for e in v.split(",")] for k, v in pairs(a.bucketize, "=", "--bucketize").items()},
        dim=a.dim, max_vocab_size=a.max_vocab_size, fill_dense_nan=a.fill_dense_nan, seed=a.seed,
        split_fractions={k: float(v) for k, v in pairs(a.split, "=", "--split").items()},
        split_test_into_valid=a.split_test_into_valid, header=not a.no_header,
        columns=a.columns.split(",") if a.columns else [], sep=a.sep, comment=a.comment, name=a.name)
    _, report = convert({"train": a.train, "valid": a.valid, "test": a.test}, a.out, cfg)
    print(format_report(report))
    print(f"wrote {a.out}/{{train,valid,test}}/part-*.parquet and {a.out}/spec.yaml; train with:\n"
          f"  python jobs/train_ple.py --data {a.out} --spec {a.out}/spec.yaml")
    return report


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:  # bad input or options (ConvertError, DataValidationError, ConfigError): the message says what
        sys.exit(f"convert: {e}")
