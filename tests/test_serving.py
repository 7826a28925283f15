"""Export and serving: a trained run exported (``jobs/export.py``) and scored on raw rows by
``pipeline.serving.Scorer`` gives the training code's own probabilities, and the job's own test AUC."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.metrics import roc_auc_score

from pipeline.checkpoint import PREPROCESSOR_FILE
from pipeline.config import DataPaths, JobConfig, ModelConfig, TrainConfig
from pipeline.data import Collate, Preprocessor
from pipeline.export import BF16_PARITY, checkpoint_dir, load_best_model
from pipeline.job import run
from pipeline.serving import Scorer
from pipeline.synthetic import SPEC_PATH
from pipeline.validate import split_files

ROOT = Path(__file__).resolve().parents[1]


def _raw(path, split="test") -> pa.Table:
    _, files = split_files(str(path), split)
    return pa.concat_tables(pq.read_table(f) for f in files)


def _training_probs(run_dir: Path, raw: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """What the training code computes for these rows: its preprocessing, its collate, its selected model."""
    ckpt = checkpoint_dir(run_dir)
    model, spec, _ = load_best_model(ckpt)
    pre = Preprocessor.load(ckpt / PREPROCESSOR_FILE, spec)
    with torch.no_grad():
        out = model(Collate(spec)(pre.transform(raw)))
    return out["prob"].numpy(), out["cond_prob"].numpy()


@pytest.fixture(scope="module", params=["ple", "esmm"])
def exported(request, ray_local, small_log, tmp_path_factory):
    name, tmp = request.param, tmp_path_factory.mktemp(f"serve-{request.param}")
    metrics = run(JobConfig(
        data=DataPaths(path=str(small_log), spec=str(SPEC_PATH)), model=ModelConfig(name=name),
        train=TrainConfig(epochs=1, batch_size=1024, num_workers=2, precision="fp32"),
        name=name, storage_path=str(tmp / "results"), output=str(tmp / "out")))
    subprocess.run([sys.executable, str(ROOT / "jobs" / "export.py"), "--run", str(tmp / "out"), "--out",
                    str(tmp / "export")], check=True)
    return name, tmp / "out", tmp / "export", metrics


def test_exported_model_scores_raw_rows_as_the_training_code_does(exported, small_log):
    name, run_dir, export_dir, metrics = exported
    scorer, portable = Scorer.load(export_dir), Scorer.load(export_dir, compiled=False)
    assert (scorer.runtime, portable.runtime) == ("aoti", "export")  # jobs/export.py compiles for CPU by default
    raw = _raw(small_log)
    scored = scorer.score(raw)
    assert scored.num_rows == raw.num_rows
    prob, cond = _training_probs(run_dir, raw)
    for out in (scored, portable.score(raw)):  # the AOTInductor program and the portable one
        assert np.abs(out["p_click"].to_numpy() - prob[:, 0]).max() <= 1e-5
        assert np.abs(out["p_convert"].to_numpy() - prob[:, 1]).max() <= 1e-5  # pCTCVR
        assert np.abs(out["p_convert_given_click"].to_numpy() - cond[:, 1]).max() <= 1e-5  # pCVR
    # the funnel: pCTCVR = pCTR x pCVR, never above pCTR
    np.testing.assert_allclose(scored["p_convert"].to_numpy(),
                               scored["p_click"].to_numpy() * scored["p_convert_given_click"].to_numpy(), rtol=1e-5)
    # ... and the job's own test evaluation (exact AUC over the split, on 2 workers with sharded tables)
    for task in ("click", "convert"):
        auc = roc_auc_score(raw[task].to_numpy(), scored[f"p_{task}"].to_numpy())
        assert auc == pytest.approx(metrics["test"][task]["auc"], abs=1e-5), task
    manifest = json.loads((export_dir / "manifest.json").read_text())
    assert manifest["model"] == name and manifest["parents"] == {"convert": "click"}


def test_a_bf16_export_stays_within_its_stated_bound(exported, small_log, tmp_path):
    """``--precision bf16``: the layers after the lookups in bf16, within BF16_PARITY of the training code's fp32
    probabilities, the same test AUC within 0.002; AOTInductor compiles it (the PLE case, ~25 s)."""
    name, run_dir, _, metrics = exported
    subprocess.run([sys.executable, str(ROOT / "jobs" / "export.py"), "--run", str(run_dir), "--out", str(tmp_path / "bf16"),
                    "--precision", "bf16", "--aoti" if name == "ple" else "--no-aoti"], check=True)
    scorer = Scorer.load(tmp_path / "bf16")
    assert scorer.runtime == ("aoti" if name == "ple" else "export")
    assert json.loads((tmp_path / "bf16" / "manifest.json").read_text())["precision"] == "bf16"
    raw = _raw(small_log)
    scored, (prob, cond) = scorer.score(raw), _training_probs(run_dir, raw)
    diffs = [np.abs(scored["p_click"].to_numpy() - prob[:, 0]).max(), np.abs(scored["p_convert"].to_numpy() - prob[:, 1]).max(),
             np.abs(scored["p_convert_given_click"].to_numpy() - cond[:, 1]).max()]
    assert 0 < max(diffs) <= BF16_PARITY, diffs  # not 0: the program did run in bf16
    for task in ("click", "convert"):
        auc = roc_auc_score(raw[task].to_numpy(), scored[f"p_{task}"].to_numpy())
        assert auc == pytest.approx(metrics["test"][task]["auc"], abs=2e-3), task


def test_unseen_ids_sequences_and_single_rows_score_as_in_training(exported, small_log):
    _, run_dir, export_dir, _ = exported
    scorer = Scorer.load(export_dir)
    raw = _raw(small_log).slice(0, 64)
    rows = raw.to_pylist()
    max_len = scorer.spec.feature("hist_category").max_len
    rows[0]["user_id"] = 10**12  # never seen in train: the out-of-vocabulary row
    rows[1]["item_id"] = 987_654_321  # a hashed id no row had
    rows[2]["hist_category"] = []  # an empty sequence pools to zeros
    rows[3]["hist_category"] = [r["item_category"] for r in rows]  # 64 known categories
    assert len(rows[3]["hist_category"]) > max_len  # over-long: its most recent max_len kept
    edited = pa.Table.from_pylist(rows, schema=raw.schema)
    scored = scorer.score(edited)
    prob, cond = _training_probs(run_dir, edited)
    assert np.abs(scored["p_click"].to_numpy() - prob[:, 0]).max() <= 1e-5
    assert np.abs(scored["p_convert_given_click"].to_numpy() - cond[:, 1]).max() <= 1e-5
    for i in range(4):  # a batch of one gives the row's probabilities in the batch
        one = scorer.score(edited.slice(i, 1))
        assert one.num_rows == 1
        assert one["p_click"][0].as_py() == pytest.approx(scored["p_click"][i].as_py(), abs=1e-6)
    # a pandas frame works as the Arrow table does
    assert scorer.score(edited.to_pandas())["p_click"].to_numpy() == pytest.approx(scored["p_click"].to_numpy(), abs=1e-7)


def test_bad_rows_are_refused_with_column_and_count_or_scored_as_null(exported, small_log):
    _, _, export_dir, _ = exported
    scorer = Scorer.load(export_dir)
    raw = _raw(small_log).slice(0, 100)
    users = raw["user_id"].to_pylist()
    users[5] = users[9] = None
    bad = raw.set_column(raw.schema.get_field_index("user_id"), "user_id", pa.array(users, raw.schema.field("user_id").type))
    with pytest.raises(ValueError, match=r"day-1\.parquet: column 'user_id': 2 row\(s\) are null"):
        scorer.score(bad, source="day-1.parquet")
    scored = scorer.score(bad, on_bad_rows="null")
    assert scored.num_rows == 100 and scored["p_click"].null_count == 2
    assert scored["p_click"][5].as_py() is None and scored["p_click"][4].as_py() is not None
    assert scorer.bad_rows == {("user_id", "null"): 2}
    with pytest.raises(ValueError, match="missing feature column"):
        scorer.score(raw.drop_columns(["item_brand"]))


def test_the_loader_needs_neither_ray_nor_torchrec(exported, small_log, tmp_path):
    _, _, export_dir, _ = exported
    pq.write_table(_raw(small_log).slice(0, 50), tmp_path / "rows.parquet")
    script = f"""
import sys; sys.path.insert(0, {str(ROOT)!r})
import pyarrow.parquet as pq
from pipeline.serving import Scorer
out = Scorer.load({str(export_dir)!r}).score(pq.read_table({str(tmp_path / 'rows.parquet')!r}))
assert out.num_rows == 50, out.num_rows
loaded = [m for m in ("ray", "torchrec", "fbgemm_gpu", "pipeline.data", "pipeline.train", "pipeline.models") if m in sys.modules]
assert not loaded, loaded
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.parametrize("exported", ["ple"], indirect=True)  # the Ray Data path is the model's own: one is enough
def test_batch_prediction_on_ray_data_writes_one_row_per_input_row(exported, small_log, tmp_path):
    from pipeline.predict import predict

    _, _, export_dir, _ = exported
    raw = _raw(small_log)
    summary = predict(str(export_dir), str(small_log / "test"), str(tmp_path / "scores"), ["user_id", "item_id"],
                      actors=2, batch_rows=4096)
    assert summary["rows_in"] == summary["rows_out"] == raw.num_rows and summary["scored_as_null"] == 0
    out = pq.read_table(tmp_path / "scores")
    assert out.num_rows == raw.num_rows
    assert set(out.column_names) == {"user_id", "item_id", "p_click", "p_convert", "p_convert_given_click", "model_version"}
    assert set(out["model_version"].to_pylist()) == {json.loads((export_dir / "manifest.json").read_text())["version"]}
    # the same probabilities as the loader in this process (the output's row order is Ray Data's)
    here = Scorer.load(export_dir).score(raw)
    np.testing.assert_allclose(np.sort(out["p_click"].to_numpy()), np.sort(here["p_click"].to_numpy()), atol=1e-6)
    assert sorted(out["user_id"].to_pylist()) == sorted(raw["user_id"].to_pylist())

    # a bad row is refused with its file, column and count
    bad = raw.slice(0, 1000)
    users = bad["user_id"].to_pylist()
    users[7] = None
    (tmp_path / "bad").mkdir()
    pq.write_table(bad.set_column(bad.schema.get_field_index("user_id"), "user_id",
                                  pa.array(users, bad.schema.field("user_id").type)), tmp_path / "bad" / "day-2.parquet")
    with pytest.raises(Exception, match=r"day-2\.parquet: column 'user_id': 1 row\(s\) are null"):
        predict(str(export_dir), str(tmp_path / "bad"), str(tmp_path / "bad-scores"), [], actors=1)
    summary = predict(str(export_dir), str(tmp_path / "bad"), str(tmp_path / "null-scores"), [], on_bad_rows="null", actors=1)
    assert summary["rows_out"] == 1000 and summary["scored_as_null"] == 1
