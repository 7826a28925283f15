"""Write UCI Adult as train/ valid/ test/ Parquet splits plus spec.yaml, in the MMoE paper's protocol.

Tasks income > 50K and marital (never married); adult.test split 1:1 into valid and test (seeded). The
data is datasets/uci-adult/; the protocol is pipeline.adult.py.

    python jobs/prepare_adult.py --out data/uci-adult
    python jobs/train.py --model esmm --data data/uci-adult --spec datasets/uci-adult/spec.yaml
    python jobs/prepare_adult.py --out data/uci-adult --write-spec   # regenerate the committed spec
"""
import argparse
import shutil

from pipeline.convert import format_report
from pipeline.adult import SPEC_PATH, prepare_adult

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("--out", default="data/uci-adult", help="output directory (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the 1:1 valid/test split of adult.test")
    p.add_argument("--write-spec", action="store_true", help=f"copy the written spec.yaml to {SPEC_PATH}")
    a = p.parse_args()
    out, report = prepare_adult(a.out, seed=a.seed)
    print(format_report(report))
    if a.write_spec:
        shutil.copyfile(out / "spec.yaml", SPEC_PATH)
    print(f"wrote {out}/{{train,valid,test}}/ and {out}/spec.yaml")
