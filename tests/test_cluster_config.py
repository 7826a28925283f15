"""cluster.yaml passes Ray's own cluster-config validation and keeps the deployment rules; the KubeRay
RayJob runs the same job."""
from __future__ import annotations

from pathlib import Path

import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_is_valid_for_the_ray_launcher():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(config))  # fills the launcher defaults, raises on a schema violation
    nodes = config["available_node_types"]
    assert nodes[config["head_node_type"]]["resources"] == {"CPU": 0}  # the head runs no training
    assert nodes["gpu_worker"]["min_workers"] == 0 and nodes["cpu_worker"]["min_workers"] == 0
    assert config["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-")
    assert any("--dashboard-host=127.0.0.1" in c for c in config["head_start_ray_commands"])
    assert any("s3://" in o for o in config["docker"]["run_options"])
    assert any("pip install" in c and "-e /home/ray/mtrec" in c for c in config["setup_commands"])
    text = (ROOT / "cluster.yaml").read_text().lower()
    for secret in ("aws_access_key_id", "aws_secret_access_key", "secret_key", "password", "0.0.0.0/0"):
        assert secret not in text


def test_rayjob_runs_the_training_job():
    job = yaml.safe_load((ROOT / "k8s" / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["spec"]["entrypoint"].startswith("python jobs/train_ple.py")
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == "1" and groups["gpu"]["minReplicas"] == 0
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert "outputs/" in runtime_env["excludes"]


def test_install_check_reads_metadata_so_a_fresh_machine_passes_it():
    """`pip install -e .` brings TorchRec's pure-Python dependencies, so its pre-build check must not import
    torchrec (which needs tensordict): on a fresh machine that import fails although the README's step ran."""
    import subprocess
    import sys

    from pipeline._build_backend import CHECK
    no_deps = "import sys; sys.modules['tensordict'] = None\n"  # as if tensordict were not installed yet
    assert subprocess.run([sys.executable, "-c", no_deps + CHECK]).returncode == 0
    missing = subprocess.run([sys.executable, "-c", CHECK.replace("'torchrec'", "'torchrec-absent'")],
                             capture_output=True, text=True)
    assert missing.returncode != 0 and "torchrec-absent is not installed" in missing.stderr
