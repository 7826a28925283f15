"""Checkpoint files: one ``state.pt`` of tensors and plain Python values, never arbitrary pickles.

Loading uses ``torch.load(weights_only=True)``, which refuses any object that is not a tensor, a
primitive or a container of those, so a checkpoint from an untrusted store cannot run code. The
config, the dataset spec and the code version travel inside, and as ``config.json`` beside it.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch

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
