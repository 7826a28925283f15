"""A finished run -> a self-contained serving artifact (``jobs/export.py``), read by ``pipeline.serving``.

The artifact is a directory:
    model.pt2            the selected model (the best validation epoch's weights, the tables gathered into
                         plain tensors) as a ``torch.export`` program, fp32, portable across machines. Its inputs are one values and one
                         lengths tensor per id feature (``spec.id_keys`` order; values int64, lengths int32
                         [B]) and dense [B, D]; its outputs prob and cond_prob, each [B, T] (``MultiTaskModel``).
                         Every size is dynamic: any batch, any sequence lengths, a batch of one.
    model-cpu.aoti.pt2   optional (``aoti=True``): the same program compiled ahead of time for CPU by AOTInductor
                         (fused kernels, about 1.6x the rows/s of model.pt2 here); it runs only with the torch
                         version that compiled it (``manifest.json`` names it), on the compiling CPU's ISA family
    preprocessing/       the fit preprocessing state in its portable form (``pipeline.encoding``)
    spec.json            the dataset spec: the raw columns the model reads and how each is encoded
    manifest.json        format, model name, tasks and their parents, output columns, the run's metrics
"""
from __future__ import annotations

import hashlib
import json
import logging
import warnings
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from pipeline.checkpoint import PREPROCESSOR_FILE, STATE_FILE, load_state
from pipeline.config import DatasetSpec, ModelConfig, from_dict
from pipeline.models import MultiTaskModel, build_model

FORMAT = "mtrec-serving/1"


class ExportedHeads(torch.nn.Module):
    """The model with its ``KeyedJaggedTensor`` built inside from per-feature tensors. Each feature's length
    sum is its values' size, a dynamic dimension of the program, so ``torch.export`` keeps every size symbolic
    (built from one concatenated values tensor, the per-key sums would be data-dependent and specialised)."""

    def __init__(self, model: MultiTaskModel) -> None:
        super().__init__()
        self.model, self.keys = model, list(model.spec.id_keys)

    def forward(self, values: list[torch.Tensor], lengths: list[torch.Tensor], dense: torch.Tensor):
        from torchrec import KeyedJaggedTensor

        ids = KeyedJaggedTensor(keys=self.keys, values=torch.cat(values), lengths=torch.cat(lengths),
                                length_per_key=[v.size(0) for v in values], stride=dense.size(0))
        out = self.model({"ids": ids, "dense": dense})
        return out["prob"], out["cond_prob"]


def checkpoint_dir(run: str | Path) -> Path:
    """A checkpoint directory, or a job's output directory holding one (``<output>/checkpoint``)."""
    run = Path(run)
    for d in (run, run / "checkpoint"):
        if (d / STATE_FILE).exists():
            return d
    raise FileNotFoundError(f"{run}: neither a checkpoint ({STATE_FILE}) nor a job output with checkpoint/{STATE_FILE}")


def load_best_model(ckpt: Path) -> tuple[MultiTaskModel, DatasetSpec, dict[str, Any]]:
    """The run's selected model on the CPU, unsharded, in eval mode; its spec; its saved state."""
    state = load_state(ckpt)
    spec = from_dict(DatasetSpec, state["spec"])
    model = build_model(spec, from_dict(ModelConfig, state["job"]["model"]))
    model.load_state_dict(state["best_model"])
    return model.eval(), spec, state


def example_inputs(spec: DatasetSpec, rows: int = 8) -> tuple:
    """Valid inputs of ``ExportedHeads``: row 0 of each table; one id per row of a single-id feature, and for
    the k-th id list a long first row and an empty second one, so that no two lists' sizes coincide (the
    trace would take that for a rule)."""
    values, lengths, k = [], [], 0
    for key in spec.id_keys:
        n = torch.ones(rows, dtype=torch.int32)
        if spec.feature(key).kind != "id":
            n[0], n[1], k = 3 + k, 0, k + 1
        values.append(torch.zeros(int(n.sum()), dtype=torch.int64))
        lengths.append(n)
    return values, lengths, torch.zeros(rows, len(spec.dense))


def export_program(model: MultiTaskModel) -> torch.export.ExportedProgram:
    from torch.export import Dim

    spec, batch = model.spec, Dim("batch", min=1)
    dynamic = ([{0: batch if spec.feature(k).kind == "id" else Dim(f"ids_{i}", min=0)} for i, k in enumerate(spec.id_keys)],
               [{0: batch} for _ in spec.id_keys], {0: batch})
    model.last_gates = {}  # diagnostics only; export must not see them as state
    # TorchRec warns that a KJT's to_dict is slow to export: it is, a second or two, once
    slow = lambda record: "non-strict torch.export KJT to_dict" not in record.getMessage()  # noqa: E731
    logging.getLogger().addFilter(slow)
    try:
        with warnings.catch_warnings():  # an LSTM re-assigns its _flat_weights list on every call, and the
            # gates' diagnostics are kept per batch: neither is state of the program
            warnings.filterwarnings("ignore", message="The tensor attributes .* were assigned during export")
            return torch.export.export(ExportedHeads(model), example_inputs(spec), dynamic_shapes=dynamic, strict=False)
    finally:
        logging.getLogger().removeFilter(slow)


def output_columns(spec: DatasetSpec) -> dict[str, tuple[str, int]]:
    """Output column -> (prob or cond_prob, task index). ``p_<task>`` is the exposure-space probability
    (pCTR, and pCTCVR for a conversion below a click); ``p_<task>_given_<parent>`` a dependent task's
    conditional (pCVR)."""
    out = {}
    for j, t in enumerate(spec.tasks):
        out[f"p_{t.name}"] = ("prob", j)
        if t.depends_on:
            out[f"p_{t.name}_given_{t.depends_on}"] = ("cond_prob", j)
    return out


AOTI_CPU = "model-cpu.aoti.pt2"


def compile_for_cpu(program: torch.export.ExportedProgram, path: Path) -> None:
    """AOTInductor: the program as a compiled shared library in a package (needs a C++ compiler; ~30 s here)."""
    from torch._inductor import aoti_compile_and_package  # AOTInductor's documented entry point

    aoti_compile_and_package(program, package_path=str(path))


ServingPrecision = Literal["fp32", "bf16"]
BF16_PARITY = 1e-2  # the bound a bf16 program keeps to the fp32 one (max abs diff of a probability; 1.4e-3 measured)


def export_run(run: str | Path, out: str | Path, aoti: bool = False, precision: ServingPrecision = "fp32") -> dict[str, Any]:
    """Write the serving artifact of ``run`` (a job output or a checkpoint) to ``out``; returns its manifest.
    ``aoti``: also the program compiled for CPU by AOTInductor, which ``Scorer`` prefers on CPU.
    ``precision``: ``fp32`` gives the training job's own evaluation (1e-5); ``bf16`` runs the layers after the
    embedding lookups in bf16 (``MultiTaskModel.heads_in``): ~2.8x the rows/s on a CPU with native bf16,
    within ``BF16_PARITY`` of fp32."""
    import dataclasses

    from pipeline.data import Preprocessor

    ckpt = checkpoint_dir(run)
    model, spec, state = load_best_model(ckpt)
    if precision == "bf16":
        model.heads_in(torch.bfloat16)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    program = export_program(model)
    torch.export.save(program, out / "model.pt2")
    if aoti:
        compile_for_cpu(program, out / AOTI_CPU)
    pre = Preprocessor.load(ckpt / PREPROCESSOR_FILE, spec)
    pre.save(out / "preprocessing", pre.train_rows)
    (out / "spec.json").write_text(json.dumps(dataclasses.asdict(spec), indent=2))
    summary = json.loads((ckpt / "metrics.json").read_text()) if (ckpt / "metrics.json").exists() else {}
    digest = hashlib.sha1((out / "model.pt2").read_bytes()).hexdigest()[:12]
    manifest = {
        "format": FORMAT, "version": f"{state['job'].get('name')}-{digest}", "model": state["job"]["model"]["name"], "code_version": state.get("code_version"),
        "run": state["job"].get("name"), "tasks": spec.task_names,
        "parents": {t.name: t.depends_on for t in spec.tasks if t.depends_on},
        "outputs": output_columns(spec), "inputs": {"id_keys": spec.id_keys, "dense": [d.name for d in spec.dense]},
        "precision": precision, "compiled": {"cpu": {"file": AOTI_CPU, "torch": torch.__version__}} if aoti else {},
        "metrics": {k: v for k, v in summary.get("metrics", {}).items()
                                         if k.startswith(("valid/", "test/")) and "/gates/" not in k},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, default=float))
    return manifest


def main(argv: list[str] | None = None) -> None:
    """``jobs/export.py`` and ``mtrec-export``."""
    import argparse

    p = argparse.ArgumentParser(description="Export a finished run for serving (pipeline.serving.Scorer loads it).")
    p.add_argument("--run", required=True, help="a job's output directory, or a checkpoint directory")
    p.add_argument("--out", required=True, help="the artifact's directory")
    p.add_argument("--aoti", action=argparse.BooleanOptionalAction, default=True,
                   help="also compile the program for CPU with AOTInductor (default; needs a C++ compiler, ~30 s): "
                        "pipeline.serving runs it on CPU, ~1.3x the rows/s of the portable program")
    p.add_argument("--precision", choices=get_args(ServingPrecision), default="fp32",
                   help="fp32 (default: the training job's own probabilities, within 1e-5) or bf16 (the layers after "
                        f"the embedding lookups in bf16: ~2.8x the rows/s where the CPU has native bf16, within {BF16_PARITY})")
    a = p.parse_args(argv)
    manifest = export_run(a.run, a.out, aoti=a.aoti, precision=a.precision)
    print(f"exported {manifest['model']} ({', '.join(manifest['outputs'])}) to {a.out}")
