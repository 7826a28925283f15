"""Storage over real HTTP, on a local S3-compatible server (moto in server mode, on loopback): the log is read
from s3://, the preprocessing state and the checkpoints are written to an s3:// storage path, and a run that
failed after its first checkpoint resumes from the bucket. Every Ray process finds the endpoint and the
credentials in its environment (AWS_ENDPOINT_URL, which pyarrow's S3 filesystem honours), as a cluster's
nodes would find theirs."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import ray
from ray.train import TrainingFailedError

from pipeline.checkpoint import STATE_FILE, copy_file, filesystem, load_state
from pipeline.config import DataPaths, JobConfig, ModelConfig, TrainConfig
from pipeline.job import run
from pipeline.synthetic import SPEC_PATH
from test_faults import _killing_a_worker_after_first_checkpoint, _registered_checkpoints

pytestmark = pytest.mark.slow
BUCKET = "mtrec"


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a free loopback port, with one bucket; yields the environment that reaches it."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    yield env
    for k, v in saved.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    server.stop()


@pytest.fixture(scope="module")
def ray_s3(s3):
    here = Path(__file__).resolve().parent
    ray.init(num_cpus=2, include_dashboard=True, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": f"{here}:{here.parent}", **s3}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


def test_a_run_on_s3_reads_the_log_writes_its_state_and_resumes_from_the_bucket(ray_s3, small_log, tmp_path):
    fs, _ = filesystem(f"s3://{BUCKET}")
    pafs.copy_files(str(small_log), f"{BUCKET}/log", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    storage = f"s3://{BUCKET}/results"

    def job(max_failures):
        return JobConfig(
            data=DataPaths(path=f"s3://{BUCKET}/log", spec=str(SPEC_PATH)),
            model=ModelConfig(name="ple", expert_hidden=[32], tower_hidden=[16]),
            train=TrainConfig(epochs=2, batch_size=512, lr=3e-3, num_workers=2, max_failures=max_failures),
            name="on-s3", storage_path=storage, output=str(tmp_path / "on-s3"))

    with _killing_a_worker_after_first_checkpoint(f"{storage}/on-s3") as killed, \
            pytest.raises(TrainingFailedError):
        run(job(max_failures=0))
    assert killed, "the run failed before its worker was killed"
    [saved] = _registered_checkpoints(f"{storage}/on-s3")
    files = {f.base_name for f in fs.get_file_info(pafs.FileSelector(f"{BUCKET}/results", recursive=True))}
    assert {"config.json", "preprocessor.pt"} <= files  # the checkpoint, with the encoding it was trained with
    assert any(f.path.startswith(f"{BUCKET}/results/preprocessors/") and f.path.endswith(".pt")
               for f in fs.get_file_info(pafs.FileSelector(f"{BUCKET}/results/preprocessors")))
    assert not (tmp_path / "on-s3" / "ray_results").exists()  # nothing went to local storage
    copy_file(f"{storage}/on-s3/{saved['checkpoint_dir_name']}/{STATE_FILE}", tmp_path / STATE_FILE)
    first_epoch = load_state(tmp_path)["progress"]["history"][0]

    metrics = run(job(max_failures=2))  # the same name: resumes from the bucket's checkpoint
    assert metrics["resumes"] == 1
    assert metrics["history"][0] == first_epoch  # epoch 0 was not trained again
    assert [h["epoch"] for h in metrics["history"]] == [0, 1]
    assert all(h["train/rows_read"] == h["train/rows_trained"] == 60_000 for h in metrics["history"])
    assert metrics["test"]["click"]["auc"] > 0.6
