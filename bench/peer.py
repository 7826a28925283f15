"""Training throughput against the peer libraries: our pipeline vs torch-rechub's and DeepCTR-Torch's PLE
and MMoE at the same config (experts, towers, embedding dims, batch size, optimiser, data), measured side by
side in one run, on two logs: the default synthetic log (large id tables) and UCI Adult (small tables, which
suit the peers' dense optimisers best), its train split tiled to ``--adult-rows`` rows so that an epoch is
long enough to time.

Ours: the full pipeline (Ray Data streaming the Parquet log -> preprocessing -> Ray Train, 1 worker), and
the same model in a tight in-memory loop. The peers: their own model classes, trained the way their examples
train (torch-rechub's ``MTLTrainer``, DeepCTR-Torch's ``fit``) over the same rows, preprocessed by our
preprocessing and held in memory (their native input), i.e. without any of the reading our pipeline pays for.

    pip install -e ".[bench]"
    python bench/peer.py                        # -> bench/results/peer.md
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import padded_arrays, preprocessed_rows, tight_loop, without_ray, write_result
from throughput import pipeline_samples_per_s

from pipeline import adult
from pipeline.config import DataPaths, DatasetSpec, JobConfig, ModelConfig, TrainConfig
from pipeline.job import connect_ray, default_synthetic_data, fit_or_load_preprocessor
from pipeline.synthetic import SPEC_PATH
from pipeline.step import uses_bf16


# the peers concatenate their sparse embeddings along a feature axis, so every table gets one dim; ours take
# the same (ModelConfig.embedding_dim)
DIM = 16


def peer_inputs(spec: DatasetSpec, rows) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The preprocessed rows as both peers take them: x, a column per feature (an id list padded with 0, the
    out-of-vocabulary row, which both mask), and y [N, T]."""
    tensors = padded_arrays(rows, spec)
    x = {f.name: tensors["sparse"][:, j] for j, f in enumerate(spec.sparse)}
    x |= {s.name: tensors[f"seq:{s.name}"] for s in spec.sequences}
    x |= {d.name: tensors["dense"][:, j] for j, d in enumerate(spec.dense)}
    return x, tensors["labels"]


def rechub_features(spec: DatasetSpec) -> list:
    """torch-rechub's feature objects for the spec (a shared table: ``shared_with`` its first feature)."""
    from torch_rechub.basic.features import DenseFeature, SequenceFeature, SparseFeature

    features, owner = [], {}
    for f in spec.sparse:
        table = spec.tables[f.table_name]
        features.append(SparseFeature(f.name, vocab_size=table.num_rows, embed_dim=DIM,
                                      shared_with=owner.get(table.name)))
        owner.setdefault(table.name, f.name)
    for s in spec.sequences:
        table = spec.tables[s.table_name]
        features.append(SequenceFeature(s.name, vocab_size=table.num_rows, embed_dim=DIM, pooling=s.pooling,
                                        shared_with=owner.get(table.name), padding_idx=0))
        owner.setdefault(table.name, s.name)
    return features + [DenseFeature(d.name) for d in spec.dense]


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
    features, (x, y) = rechub_features(spec), peer_inputs(spec, tensors)
    model = rechub_model(name, features, ModelConfig(name=name, embedding_dim=DIM), y.shape[1])
    with tempfile.TemporaryDirectory() as d:
        trainer = MTLTrainer(model, task_types=["classification"] * y.shape[1], n_epoch=1, device="cpu",
                             optimizer_params={"lr": lr, "weight_decay": 0.0}, model_path=d)
        loader, _, _ = DataGenerator(x, y).generate_dataloader(x, y, x, y, batch_size=batch_size)
        t0 = time.perf_counter()
        trainer.train_one_epoch(loader)
        return len(y) / (time.perf_counter() - t0)


def deepctr_features(spec: DatasetSpec) -> list:
    """DeepCTR-Torch's feature columns for the spec (a shared table: one ``embedding_name``)."""
    from deepctr_torch.inputs import DenseFeat, SparseFeat, VarLenSparseFeat

    def sparse(name: str, table_name: str) -> SparseFeat:
        table = spec.tables[table_name]
        return SparseFeat(name, table.num_rows, embedding_dim=DIM, embedding_name=table.name)

    return ([sparse(f.name, f.table_name) for f in spec.sparse]
            + [VarLenSparseFeat(sparse(s.name, s.table_name), maxlen=s.max_len, combiner=s.pooling) for s in spec.sequences]
            + [DenseFeat(d.name, 1) for d in spec.dense])


def deepctr_samples_per_s(name: str, spec: DatasetSpec, tensors, batch_size: int, lr: float) -> float:
    from deepctr_torch.models.multitask import MMOE, PLE

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count())
    features, (x, y) = deepctr_features(spec), peer_inputs(spec, tensors)
    cfg, tasks = ModelConfig(name=name, embedding_dim=DIM), y.shape[1]
    # linear gates and no L2 terms, as ours (its defaults: a 64-unit gate MLP, L2 on every embedding table)
    common = dict(expert_dnn_hidden_units=tuple(cfg.expert_hidden), gate_dnn_hidden_units=(),
                  tower_dnn_hidden_units=tuple(cfg.tower_hidden), l2_reg_linear=0, l2_reg_embedding=0, l2_reg_dnn=0,
                  task_types=("binary",) * tasks, task_names=tuple(spec.task_names), device="cpu")
    if name == "ple":
        model = PLE(features, shared_expert_num=cfg.num_shared_experts, specific_expert_num=cfg.num_task_experts,
                    num_levels=cfg.num_levels, **common)
    else:
        model = MMOE(features, num_experts=cfg.num_experts, **common)
    model.compile(torch.optim.Adam(model.parameters(), lr=lr), loss=["binary_crossentropy"] * tasks)
    t0 = time.perf_counter()
    model.fit(x, y, batch_size=batch_size, epochs=1, verbose=0)
    return len(y) / (time.perf_counter() - t0)


PEERS = {"torch-rechub 0.9.0 MTLTrainer": rechub_samples_per_s, "DeepCTR-Torch 0.3.0 fit": deepctr_samples_per_s}


def tiled_adult(out: Path, rows: int) -> Path:
    """UCI Adult's splits (``pipeline.adult``), the train split's file repeated to at least ``rows`` rows."""
    import pyarrow.parquet as pq

    base, tiled = out / "adult", out / "adult-tiled"
    adult.prepare_adult(base)
    shutil.rmtree(tiled, ignore_errors=True)
    (tiled / "train").mkdir(parents=True)
    train = sorted((base / "train").glob("*.parquet"))
    n = sum(pq.ParquetFile(f).metadata.num_rows for f in train)
    for k in range(math.ceil(rows / n)):
        for f in train:
            os.link(f, tiled / "train" / f"copy{k:03d}-{f.name}")
    for split in ("valid", "test"):
        shutil.copytree(base / split, tiled / split)
    return tiled


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["ple", "mmoe"])
    p.add_argument("--train-rows", type=int, default=1_000_000, help="rows of the default log's train split")
    p.add_argument("--adult-rows", type=int, default=500_000, help="rows of Adult's tiled train split")
    p.add_argument("--logs", nargs="+", default=["default log", "UCI Adult"], choices=["default log", "UCI Adult"])
    p.add_argument("--out", default="outputs/bench/peer")
    a = p.parse_args()
    connect_ray()
    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    logs = {"default log": lambda: (default_synthetic_data({"train": a.train_rows, "valid": 100_000, "test": 100_000}),
                                    SPEC_PATH),
            "UCI Adult": lambda: (tiled_adult(out, a.adult_rows), adult.SPEC_PATH)}
    default = TrainConfig()
    bf16 = uses_bf16(default.precision, torch.device("cpu"))
    rows = []
    for log in a.logs:
        data, spec_path = (str(x) for x in logs[log]())
        spec = DatasetSpec.load(spec_path)
        pre = fit_or_load_preprocessor(JobConfig(data=DataPaths(data, spec_path)), spec, f"{out}/ray_results")
        tensors = preprocessed_rows(data, spec, pre, 1 << 62)  # the whole train split: the pipeline's epoch
        for model in a.models:
            cfg = ModelConfig(name=model, embedding_dim=DIM)
            row = {"log": f"{log} ({tensors.num_rows:,} train rows)", "model": model.upper()}
            name = f"{log.split()[0].lower()}-{model}"
            row[f"ours: pipeline, 1 worker ({'bf16' if bf16 else 'fp32'})"] = ours = pipeline_samples_per_s(
                data, cfg, 1, str(out), f"{name}-1w", spec_path=spec_path)["epoch"]
            if bf16:  # the peers have no mixed precision: fp32 beside it
                row["ours: pipeline, 1 worker, fp32"] = pipeline_samples_per_s(
                    data, cfg, 1, str(out), f"{name}-1w-fp32", precision="fp32", spec_path=spec_path)["epoch"]
            row["ours: in-memory loop"] = without_ray(tight_loop, spec, cfg, tensors, default)
            for peer, fn in PEERS.items():
                row[peer] = without_ray(fn, model, spec, tensors, default.batch_size, default.lr)
            for peer in PEERS:
                row[f"pipeline / {peer.split()[0]}"] = ours / row[peer]
            rows.append(row)
    cfg = ModelConfig(embedding_dim=DIM)
    write_result(
        "peer", "Training throughput vs torch-rechub and DeepCTR-Torch (same experts, towers, embedding dims, batch, data)", rows,
        [f"config: experts {cfg.expert_hidden}, towers {cfg.tower_hidden}; PLE {cfg.num_levels} levels x "
         f"({cfg.num_shared_experts} shared + {cfg.num_task_experts} per task) experts; MMoE {cfg.num_experts} experts; "
         f"linear gates; every embedding table {DIM}-dim (the spec's tables, shared ones shared); batch {default.batch_size}; "
         f"Adam lr {default.lr}: ours fused Adam for the dense layers and the tables through TorchRec (FBGEMM's kernels, "
         f"{default.table_optimizer} lr {default.table_lr} fused into the backward; pipeline.sharding); the peers' Adam, "
         "dense, over everything; DeepCTR-Torch with its L2 terms off (ours has none)",
         f"precision: ours by default `train.precision: {default.precision}`, i.e. bf16 autocast where the CPU has native "
         f"bf16 ({'as this one does; fp32 in its own column' if bf16 else 'this one has not, so fp32'}); the peers' "
         "trainers have no mixed precision (fp32)",
         f"logs: the default synthetic log ({a.train_rows:,} train rows); UCI Adult's train split (pipeline.adult) "
         f"repeated to at least {a.adult_rows:,} rows. Our pipeline streams the train split from Parquet; the peers "
         "and the in-memory loop train the same rows, already preprocessed in memory",
         "torch-rechub's MLP layers carry BatchNorm (its design); the layer sizes are the same",
         "threads: all use this machine's cores; ours, a lone CPU worker, splits each step's batch across threads "
         "(train.step_threads auto, pipeline.step.BatchStep); the peers run each step in one thread with torch's "
         "intra-op parallelism"],
        "python bench/peer.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
