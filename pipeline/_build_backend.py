"""setuptools' build backend, behind a check that TorchRec and FBGEMM are installed.

TorchRec cannot be a plain dependency: its metadata requires ``fbgemm-gpu``, the CUDA build, which pip
would pull next to (or instead of) the CPU one. So the README's commands install the pinned pair first,
``fbgemm-gpu-cpu`` (or ``fbgemm-gpu`` on a GPU machine) and then ``torchrec`` with ``--no-deps``, and this
backend refuses ``pip install -e .`` where that step was skipped, naming the command. pip builds in an
isolated environment, so the check imports them in a child interpreter with pip's isolation removed."""
from __future__ import annotations

import os
import subprocess
import sys

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  (the PEP 517/660 hooks not wrapped below)

INSTALL = ('pip install torch==2.13.0 fbgemm-gpu-cpu==1.8.0 && pip install --no-deps torchrec==1.8.0   '
           '(GPU machine: fbgemm-gpu==1.8.0 instead of fbgemm-gpu-cpu)')
# Metadata only, not an import: importing torchrec needs its pure-Python dependencies (tensordict, ...),
# which this very install brings, so on a fresh machine an import would fail even after the right step.
CHECK = ("from importlib.metadata import version, PackageNotFoundError as Missing\n"
         "def v(*names):\n"
         "    for n in names:\n"
         "        try: return version(n)\n"
         "        except Missing: pass\n"
         "    raise SystemExit(f'{names[0]} is not installed')\n"
         "v('torchrec'); v('fbgemm-gpu-cpu', 'fbgemm-gpu')")


def _check() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONNOSITE")}
    done = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        raise SystemExit(f"mtrec-pipeline needs TorchRec 1.8.0 and FBGEMM 1.8.0, installed first ({last}). Run:\n"
                         f"    {INSTALL}\nthen pip install -e . again (README, 'Set-up').")


def build_wheel(*args, **kwargs):
    _check()
    return _setuptools.build_wheel(*args, **kwargs)


def build_editable(*args, **kwargs):
    _check()
    return _setuptools.build_editable(*args, **kwargs)
