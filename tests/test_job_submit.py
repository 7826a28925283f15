"""Job submission for real: start a Ray head node on loopback (``ray start --head``), submit the training
job with ``ray job submit --working-dir``, wait for it, check its metrics file and logs and what was
uploaded, and stop the head node this test started (and nothing else). No other Ray instance runs
meanwhile: this module does not use the ``ray_local`` fixture."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
# Ray 2.60's token authentication, on for both sides: the head node's dashboard and job server refuse
# requests without the token (~/.ray/auth_token, generated when missing), and the CLI sends it
AUTH = {**os.environ, "RAY_AUTH_MODE": "token"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def head_node():
    """A 2-CPU head node on 127.0.0.1 with its own temp dir; ``--block`` keeps it in this process's hands,
    so SIGTERM to it stops exactly the processes it started."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rayjob", dir="/tmp"))  # short: Ray's socket paths have a length limit
    port, dashboard = _free_port(), _free_port()
    log = open(temp_dir / "head.log", "w")
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2", "--include-dashboard=true",
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=AUTH)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 120
        while True:  # the job server answers once the dashboard is up
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # it answers (401 when Ray's token authentication is on)
                break
            except OSError:
                if head.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"the head node did not start: {(temp_dir / 'head.log').read_text()[-3000:]}")
                time.sleep(1)
        yield address, temp_dir
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _repo_copy_with_junk(dest: Path) -> Path:
    """This checkout's files plus what a user's checkout accumulates and must never be uploaded."""
    shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(".git", "outputs", "data", ".venv", "ray_results",
                                                              "__pycache__", "*.egg-info", ".pytest_cache"))
    for junk in ("outputs/ple/checkpoint/state.pt", "data/synthetic/train/part-00000.parquet", ".venv/lib/site.py",
                 ".git/objects/pack/pack-1.pack", "bench/results/adult/ray_results/x/state.pt"):
        (dest / junk).parent.mkdir(parents=True, exist_ok=True)
        (dest / junk).write_bytes(b"\0" * 1_000_000)
    return dest


def test_ray_job_submit_runs_the_training_job(head_node, small_log, tmp_path):
    address, temp_dir = head_node
    repo = _repo_copy_with_junk(tmp_path / "repo")
    out = tmp_path / "out"
    cmd = [RAY, "job", "submit", "--address", address, "--working-dir", str(repo), "--",
           "python", "jobs/train_ple.py", "--data", str(small_log), "--spec", "pipeline/specs/synthetic.yaml", "--workers", "2", "--epochs", "1",
           "--batch-size", "512", "--lr", "0.003", "--name", "submitted", "--output", str(out), "--storage-path", str(tmp_path / "store")]
    job = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=AUTH)
    logs = job.stdout + job.stderr
    assert job.returncode == 0, logs[-5000:]
    assert "succeeded" in logs
    # the job's own output came back through the job logs: its table and where it wrote
    assert "test   click" in logs and f"wrote {out / 'metrics.json'}" in logs
    # a run you can read: one line per epoch from rank 0, and not Train's per-report dumps or Data's plans
    assert "epoch 1/1: train loss click" in logs and "| valid AUC click" in logs
    for noise in ("Reporting training result", "Checkpoint successfully created", "Execution plan of Dataset"):
        assert noise not in logs, noise
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["click"]["auc"] > 0.6 and metrics["test"]["rows"] == 10_000
    assert (out / "checkpoint" / "state.pt").exists()
    # what was uploaded: the code, not outputs, data, virtual environments, Ray results or .git
    uploaded = [p for p in temp_dir.glob("session_latest/runtime_resources/working_dir_files/_ray_pkg_*") if p.is_dir()]
    assert len(uploaded) == 1
    names = {str(p.relative_to(uploaded[0])) for p in uploaded[0].rglob("*")}
    assert "pipeline/train.py" in names and "jobs/train_ple.py" in names
    for junk in ("outputs", "data", ".venv", ".git", "bench/results/adult/ray_results"):
        assert junk not in names, f"{junk}/ was uploaded"
