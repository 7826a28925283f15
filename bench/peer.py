"""Training throughput against a peer library: our pipeline vs torch-rechub's PLE and MMoE at the same
config (experts, towers, embedding dims, batch size, optimiser, data), measured side by side in one run.

Ours: the full pipeline (Ray Data streaming the Parquet log -> preprocessing -> Ray Train, 1 worker), and
the same model in a tight in-memory loop. torch-rechub: its own model classes and ``MTLTrainer`` (the way
its examples train) over the same rows, preprocessed by our preprocessing and held in memory (its
DataLoader's native input), i.e. without any of the reading our pipeline pays for.

    pip install -e ".[bench]"
    python bench/peer.py                        # -> bench/results/peer.md
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np
import torch
from common import padded_arrays, preprocessed_rows, tight_loop, without_ray, write_result
from throughput import pipeline_samples_per_s

from pipeline.config import DataPaths, DatasetSpec, JobConfig, ModelConfig, TrainConfig
from pipeline.job import connect_ray, default_synthetic_data, fit_or_load_preprocessor
from pipeline.synthetic import SPEC_PATH
from pipeline.train import uses_bf16


# torch-rechub concatenates its sparse embeddings along a feature axis, so every table gets one dim; ours
# take the same (ModelConfig.embedding_dim)
DIM = 16


def rechub_inputs(spec: DatasetSpec, rows):
    """torch-rechub feature objects and its x dict / y array for the same preprocessed rows."""
    from torch_rechub.basic.features import DenseFeature, SequenceFeature, SparseFeature

    tensors = padded_arrays(rows, spec)
    features, x, owner = [], {}, {}
    for j, f in enumerate(spec.sparse):
        table = spec.tables[f.table_name]
        features.append(SparseFeature(f.name, vocab_size=table.num_rows, embed_dim=DIM,
                                      shared_with=owner.get(table.name)))
        owner.setdefault(table.name, f.name)
        x[f.name] = tensors["sparse"][:, j]
    for j, s in enumerate(spec.sequences):
        table = spec.tables[s.table_name]
        features.append(SequenceFeature(s.name, vocab_size=table.num_rows, embed_dim=DIM, pooling=s.pooling,
                                        shared_with=owner.get(table.name), padding_idx=0))
        owner.setdefault(table.name, s.name)
        x[s.name] = tensors[f"seq:{s.name}"]
    for j, d in enumerate(spec.dense):
        features.append(DenseFeature(d.name))
        x[d.name] = tensors["dense"][:, j]
    return features, x, tensors["labels"]


def rechub_model(name: str, features, cfg: ModelConfig, num_tasks: int):
    from torch_rechub.models.multi_task import MMOE, PLE

    expert = {"dims": cfg.expert_hidden}
    towers = [{"dims": cfg.tower_hidden} for _ in range(num_tasks)]
    types = ["classification"] * num_tasks
    if name == "ple":
        return PLE(features, types, n_level=cfg.num_levels, n_expert_specific=cfg.num_task_experts,
                   n_expert_shared=cfg.num_shared_experts, expert_params=expert, tower_params_list=towers)
    return MMOE(features, types, n_expert=cfg.num_experts, expert_params=expert, tower_params_list=towers)


def rechub_samples_per_s(name: str, spec: DatasetSpec, tensors: dict[str, np.ndarray], batch_size: int, lr: float) -> float:
    from torch_rechub.trainers import MTLTrainer
    from torch_rechub.utils.data import DataGenerator

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count())
    features, x, y = rechub_inputs(spec, tensors)
    model = rechub_model(name, features, ModelConfig(name=name, embedding_dim=DIM), y.shape[1])
    with tempfile.TemporaryDirectory() as d:
        trainer = MTLTrainer(model, task_types=["classification"] * y.shape[1], n_epoch=1, device="cpu",
                             optimizer_params={"lr": lr, "weight_decay": 0.0}, model_path=d)
        loader, _, _ = DataGenerator(x, y).generate_dataloader(x, y, x, y, batch_size=batch_size)
        t0 = time.perf_counter()
        trainer.train_one_epoch(loader)
        return len(y) / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["ple", "mmoe"])
    p.add_argument("--train-rows", type=int, default=1_000_000, help="rows of the log our pipeline trains on")
    p.add_argument("--peer-rows", type=int, default=None,
                   help="rows torch-rechub and the tight loop train on (default: the train rows, the pipeline's epoch)")
    p.add_argument("--out", default="outputs/bench/peer")
    a = p.parse_args()
    connect_ray()
    shutil.rmtree(a.out, ignore_errors=True)
    data = str(default_synthetic_data({"train": a.train_rows, "valid": 100_000, "test": 100_000}))
    spec = DatasetSpec.load(SPEC_PATH)
    default = TrainConfig()
    pre = fit_or_load_preprocessor(JobConfig(data=DataPaths(data, str(SPEC_PATH))), spec, f"{a.out}/ray_results")
    a.peer_rows = a.peer_rows or a.train_rows
    tensors = preprocessed_rows(data, spec, pre, a.peer_rows)
    bf16 = uses_bf16(default.precision, torch.device("cpu"))
    rows = []
    for model in a.models:
        cfg = ModelConfig(name=model, embedding_dim=DIM)
        ours = pipeline_samples_per_s(data, cfg, 1, a.out, f"{model}-1w")["epoch"]
        ours_fp32 = pipeline_samples_per_s(data, cfg, 1, a.out, f"{model}-1w-fp32", precision="fp32")["epoch"]
        limit = without_ray(tight_loop, spec, cfg, tensors, default)
        theirs = without_ray(rechub_samples_per_s, model, spec, tensors, default.batch_size, default.lr)
        rows.append({"model": model.upper(),
                     f"ours: pipeline, 1 worker, default ({'bf16' if bf16 else 'fp32'})": ours,
                     "ours: pipeline, 1 worker, fp32": ours_fp32,
                     "ours: in-memory loop, default": limit, "torch-rechub MTLTrainer, fp32": theirs,
                     "pipeline default / torch-rechub": ours / theirs, "pipeline fp32 / torch-rechub": ours_fp32 / theirs})
    cfg = ModelConfig(embedding_dim=DIM)
    write_result(
        "peer", "Training throughput vs torch-rechub 0.9.0 (same experts, towers, embedding dims, batch, data)", rows,
        [f"config: experts {cfg.expert_hidden}, towers {cfg.tower_hidden}; PLE {cfg.num_levels} levels x "
         f"({cfg.num_shared_experts} shared + {cfg.num_task_experts} per task) experts; MMoE {cfg.num_experts} experts; "
         f"every embedding table {DIM}-dim (the spec's tables, the category table shared); batch {default.batch_size}; "
         f"Adam lr {default.lr}: ours fused Adam for the dense layers and the tables through TorchRec (FBGEMM's kernels, "
         f"{default.table_optimizer} lr {default.table_lr} fused into the backward; pipeline.sharding); torch-rechub's default Adam, "
         "dense, over everything",
         f"precision: ours by default `train.precision: {default.precision}`, i.e. bf16 autocast where the CPU has native "
         f"bf16 ({'as this one does' if bf16 else 'this one has not'}), and forced to fp32 in its own column; "
         "torch-rechub's trainer has no mixed precision (fp32)",
         f"our pipeline trains {a.train_rows:,} rows streamed from Parquet; torch-rechub and the in-memory loop train "
         + ("the same rows" if a.peer_rows == a.train_rows else f"the first {a.peer_rows:,} of them")
         + ", already preprocessed in memory",
         "torch-rechub's MLP layers carry BatchNorm (its design); the layer sizes are the same",
         "threads: both use this machine's cores; ours, a lone CPU worker, splits each step's batch across 2 threads "
         "(train.step_threads auto, pipeline.train.BatchStep), torch-rechub runs each step in one thread with torch's "
         "intra-op parallelism"],
        "python bench/peer.py")


if __name__ == "__main__":
    main()
