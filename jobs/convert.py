"""Convert CSV or Parquet impression logs into train/ valid/ test/ Parquet splits plus a dataset spec.

    python jobs/convert.py --help        # the options, with examples (Ali-CCP, AliExpress, a headerless CSV)
    python jobs/convert.py --train log.csv --test log_test.csv --split valid=0.1 --label click --out data/mylog
"""
from pipeline.convert import console_main, main  # noqa: F401  (main: tests call it in process)

if __name__ == "__main__":
    console_main()
