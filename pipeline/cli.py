"""Command-line front of the training jobs: parse flags into a JobConfig and call pipeline.job.run."""
from __future__ import annotations

import argparse
import sys
import typing

from pipeline.config import PRECISIONS, JobConfig, ModelConfig, merge_overrides
from pipeline.models import MODELS
from pipeline.synthetic import SPEC_PATH
from pipeline.weighting import STRATEGIES


def parse_args(model: str | None, argv: list[str] | None = None) -> JobConfig:
    p = argparse.ArgumentParser(description=f"Train a {(model or 'multi-task').upper()} model with Ray Train.")
    p.add_argument("--config", help="JobConfig YAML (e.g. a previous run's config.yaml); flags override it")
    p.add_argument("--model", default=None if model else "ple", help=f"one of {sorted(MODELS)}")
    p.add_argument("--data", help="dataset directory/URI with train/ valid/ test/ Parquet splits "
                                  "(default: the built-in synthetic log, generated into the cache)")
    p.add_argument("--spec", help="dataset spec YAML (default: the synthetic log's spec)")
    p.add_argument("--on-bad-rows", choices=["fail", "drop"],
                   help="rows with bad values: refuse the data (fail, the default) or leave them out and report the counts")
    p.add_argument("--workers", type=int, help="Ray Train workers")
    p.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None,
                   help="train on GPUs (default: when the cluster has them)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--loss-weighting", choices=STRATEGIES)
    p.add_argument("--precision", choices=PRECISIONS,
                   help="bf16 autocast; auto: where the GPU or CPU has native bf16 (default)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the experts, gates and towers (pays on epochs of millions of rows)")
    p.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=None,
                   help="glibc malloc keeps what a training step frees for the next (default; faster on CPU)")
    p.add_argument("--step-threads", type=int,
                   help="threads that share each step of a lone CPU worker, its batch split between them (0: auto, 2)")
    p.add_argument("--sharding", choices=typing.get_args(typing.get_type_hints(ModelConfig)["sharding"]),
                   help="how the embedding tables are sharded across the workers (default: auto, TorchRec's planner)")
    p.add_argument("--name", help="run name; rerunning with the same name resumes from its latest checkpoint")
    p.add_argument("--storage-path", help="checkpoints and results: a local directory or s3://...")
    p.add_argument("--output", help="where metrics.json, config.yaml and checkpoint/ are written")
    p.add_argument("--init-from", help="warm start from a previous run (its output or checkpoint directory): "
                                       "its weights, its vocabularies extended with this log's ids")
    p.add_argument("--train-rows", type=int, help="rows of the default synthetic log's train split")
    args = p.parse_args(argv)

    model = args.model or model
    job = JobConfig.load(args.config) if args.config else JobConfig(name=model, output=f"outputs/{model}")
    if not args.config or args.model:
        job.model.name = model
    if job.model.name not in MODELS:
        p.error(f"unknown model {job.model.name!r}; known: {sorted(MODELS)}")
    job = merge_overrides(job, {
        "data.path": args.data, "data.spec": args.spec, "data.on_bad_rows": args.on_bad_rows,
        "train.num_workers": args.workers, "train.use_gpu": args.gpu, "train.epochs": args.epochs,
        "train.batch_size": args.batch_size, "train.lr": args.lr, "train.seed": args.seed,
        "train.loss_weighting": args.loss_weighting, "train.precision": args.precision,
        "train.compile": args.compile, "train.keep_freed_memory": args.keep_freed_memory,
        "train.step_threads": args.step_threads, "model.sharding": args.sharding, "name": args.name,
        "storage_path": args.storage_path, "output": args.output, "init_from": args.init_from,
    })
    if not job.data.path:
        from pipeline.job import default_synthetic_data

        rows = None if args.train_rows is None else {
            "train": args.train_rows, "valid": max(args.train_rows // 10, 1000), "test": max(args.train_rows // 10, 1000)}
        job.data.path, job.data.spec = str(default_synthetic_data(rows)), job.data.spec or str(SPEC_PATH)
    elif not job.data.spec:
        sys.exit("--spec is required with --data (the dataset spec YAML of that log)")
    return job


def main(model: str | None, argv: list[str] | None = None) -> None:
    from pipeline.job import run

    run(parse_args(model, argv))
