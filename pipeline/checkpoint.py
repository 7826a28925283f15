"""Checkpoint files: one ``state.pt`` of tensors and plain Python values, never arbitrary pickles, beside
every worker's shards of the model (``torch.distributed.checkpoint``, ``sharded/``).

Loading uses ``torch.load(weights_only=True)``, which refuses any object that is not a tensor, a
primitive or a container of those, so a checkpoint from an untrusted store cannot run code. The
config, the dataset spec and the code version travel inside, and as ``config.json`` beside it.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch
import torch.distributed.checkpoint as dcp

STATE_FILE = "state.pt"
PREPROCESSOR_FILE = "preprocessor.pt"  # the run's preprocessing state, as fit_or_load_preprocessor saved it


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) of a local path or a URI such as s3://bucket/prefix."""
    return pafs.FileSystem.from_uri(uri) if "://" in uri else (pafs.LocalFileSystem(), uri)


def copy_file(uri: str, target: Path) -> None:
    """A file of the storage (local path or URI) to a local path."""
    fs, path = filesystem(uri)
    pafs.copy_files(path, str(target), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())


def save_state(directory: str | Path, state: dict[str, Any]) -> None:
    directory = Path(directory)
    tmp = directory / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, directory / STATE_FILE)  # a reader never sees a half-written file
    meta = {k: state[k] for k in ("job", "spec", "code_version") if k in state}
    (directory / "config.json").write_text(json.dumps(meta, indent=2))


def load_state(directory: str | Path) -> dict[str, Any]:
    return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)


def code_version() -> str:
    """The package version plus the git commit of the working tree when there is one."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("mtrec-pipeline")
    except PackageNotFoundError:
        v = "unknown"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{v}+{commit}" if commit else v


def snapshot(state: dict[str, Any]) -> dict[str, Any]:
    """A copy of a (sharded) state dict: this worker's shards and the dense tensors, cloned."""
    return copy.deepcopy(state)


SHARDED_DIR = "sharded"  # a checkpoint's torch.distributed.checkpoint files: every worker writes its shards


def sharded_state(model, best_model: dict[str, Any]) -> dict[str, Any]:
    """What every worker writes to, and reads from, a checkpoint's DCP files: its shards of the model, of the
    best model and of the tables' fused optimizer state. A worker that holds no table's optimizer state (all
    its tables replicated, or placed on other workers) leaves that entry out: DCP would save an empty
    container as an object under a key that no other worker has, and find it missing on load."""
    state = {"model": model.state_dict(), "best_model": best_model}
    tables = model.fused_optimizer.state_dict()
    return state | ({"tables": tables} if tables.get("state") else {})


def save_sharded(directory: str, model, best_model: dict[str, Any]) -> None:
    dcp.save(sharded_state(model, best_model), checkpoint_id=str(Path(directory) / SHARDED_DIR))


def load_sharded(directory: str, model, best_template: dict[str, Any]) -> dict[str, Any]:
    """Restore the model, the tables' fused optimizer state and the best model from a checkpoint's DCP files,
    resharded to this run's plan where it differs (DCP reads each shard's rows from whichever files hold
    them). Returns the best model (sharded)."""
    model.fused_optimizer.init_state()  # dcp.load fills existing state in place: without it the state is lost
    state = sharded_state(model, best_template)
    dcp.load(state, checkpoint_id=str(Path(directory) / SHARDED_DIR))
    model.load_state_dict(state["model"])
    if "tables" in state:
        model.fused_optimizer.load_state_dict(state["tables"])
    return state["best_model"]


def report(metrics: dict, rank: int, model, best_model: dict, state: dict, loop_config: dict, final: bool = False) -> None:
    """Every worker reports its part of the checkpoint: its shards of the model, of the tables' optimizer
    state and of the best model (torch.distributed.checkpoint, into one directory that Ray Train assembles
    from every worker's). Rank 0 adds ``state.pt`` (dense optimizer, loss weighting, progress, preprocessing
    state, config and code version; in the final one the best model gathered into plain tensors) and a
    human-readable metrics.json."""
    import ray.train

    with tempfile.TemporaryDirectory() as d:
        save_sharded(d, model, best_model)
        if rank == 0:
            save_state(d, {**state, "job": loop_config["job"], "spec": loop_config["spec"],
                           "code_version": loop_config["code_version"]})
            copy_file(loop_config["preprocessor"], Path(d) / PREPROCESSOR_FILE)
            summary = {"final": final, "metrics": metrics, "history": state["progress"]["history"]}
            (Path(d) / "metrics.json").write_text(json.dumps(summary, indent=2, default=float))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
