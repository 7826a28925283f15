"""Command-line front of the training jobs: parse flags into a JobConfig and call pipeline.job.run.

Each flag is one row of ``FLAGS`` (its config key and help); its type, choices or on/off form come from the
config field's type. Any other key is ``--set key=value`` (dotted, the value in YAML). Every value goes
through the config loader (``merge_overrides`` -> ``from_dict``), which checks it and names the key."""
from __future__ import annotations

import argparse
import sys
import types
import typing
from typing import Any

from pipeline.config import ConfigError, JobConfig, ModelName, merge_overrides
from pipeline.synthetic import SPEC_PATH

FLAGS = {  # flag -> (config key, help)
    "--data": ("data.path", "dataset directory/URI with train/ valid/ test/ Parquet splits "
                            "(default: the built-in synthetic log, generated into the cache)"),
    "--spec": ("data.spec", "dataset spec YAML (default: the synthetic log's spec)"),
    "--on-bad-rows": ("data.on_bad_rows", "rows with bad values: refuse the data (fail, the default) or leave "
                                          "them out and report the counts"),
    "--workers": ("train.num_workers", "Ray Train workers"),
    "--gpu": ("train.use_gpu", "train on GPUs (default: when the cluster has them)"),
    "--epochs": ("train.epochs", None),
    "--batch-size": ("train.batch_size", None),
    "--lr": ("train.lr", None),
    "--seed": ("train.seed", None),
    "--patience": ("train.patience", "early stopping: epochs without a better validation objective (default 1)"),
    "--loss-weighting": ("train.loss_weighting", None),
    "--precision": ("train.precision", "bf16 autocast; auto: where the GPU or CPU has native bf16 (default)"),
    "--compile": ("train.compile", "torch.compile the experts, gates and towers (pays on epochs of millions of rows)"),
    "--keep-freed-memory": ("train.keep_freed_memory", "glibc malloc keeps what a training step frees for the next "
                                                       "(default; faster on CPU)"),
    "--step-threads": ("train.step_threads", "threads that share each step of a lone CPU worker, its batch split "
                                             "between them (0: auto, 2)"),
    "--sharding": ("model.sharding", "how the embedding tables are sharded across the workers (default: auto, "
                                     "TorchRec's planner)"),
    "--name": ("name", "run name; rerunning with the same name resumes from its latest checkpoint"),
    "--storage-path": ("storage_path", "checkpoints and results: a local directory or s3://..."),
    "--output": ("output", "where metrics.json, config.yaml and checkpoint/ are written"),
    "--init-from": ("init_from", "warm start from a previous run (its output or checkpoint directory): its weights, "
                                 "its vocabularies extended with this log's ids"),
}


def field_type(key: str) -> Any:
    """The type of the JobConfig field at dotted ``key``."""
    tp: Any = JobConfig
    for part in key.split("."):
        tp = typing.get_type_hints(tp)[part]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) in (typing.Union, types.UnionType) else tp  # Optional[X] -> X


def add_flag(p: argparse.ArgumentParser, flag: str, key: str, help: str | None) -> None:
    tp = field_type(key)
    if typing.get_origin(tp) is typing.Literal:
        kind = {"choices": typing.get_args(tp)}
    elif tp is bool:
        kind = {"action": argparse.BooleanOptionalAction}
    else:
        kind = {"type": tp}
    p.add_argument(flag, dest=key, default=None, help=help, **kind)


def parse_args(model: str | None, argv: list[str] | None = None) -> JobConfig:
    p = argparse.ArgumentParser(description=f"Train a {(model or 'multi-task').upper()} model with Ray Train.")
    p.add_argument("--config", help="JobConfig YAML (e.g. a previous run's config.yaml); flags override it")
    p.add_argument("--model", default=None if model else "ple", help=f"one of {list(typing.get_args(ModelName))}")
    for flag, (key, help) in FLAGS.items():
        add_flag(p, flag, key, help)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other config key, dotted, its value in YAML (e.g. --set model.expert_hidden=[64,32]); "
                        "checked as a config file is; repeatable")
    p.add_argument("--train-rows", type=int, help="rows of the default synthetic log's train split")
    args = vars(p.parse_args(argv))

    model = args["model"] or model
    job = JobConfig.load(args["config"]) if args["config"] else JobConfig(name=model, output=f"outputs/{model}")
    overrides = {"model.name": model if not args["config"] or args["model"] else None}  # --model, or the job's
    overrides |= {key: args[key] for key, _ in FLAGS.values()} | dict(set_option(p, item) for item in args["set"])
    try:
        job = merge_overrides(job, overrides)
    except ConfigError as e:  # the key path and what it must be
        p.error(str(e))
    if not job.data.path:
        from pipeline.job import default_synthetic_data

        rows = args["train_rows"] and {"train": args["train_rows"], "valid": max(args["train_rows"] // 10, 1000),
                                       "test": max(args["train_rows"] // 10, 1000)}
        job.data.path, job.data.spec = str(default_synthetic_data(rows or None)), job.data.spec or str(SPEC_PATH)
    elif not job.data.spec:
        sys.exit("--spec is required with --data (the dataset spec YAML of that log)")
    return job


def set_option(p: argparse.ArgumentParser, item: str) -> tuple[str, Any]:
    """``--set key=value``: the dotted key and its value parsed as YAML (types are checked by the loader)."""
    import yaml

    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        p.error(f"--set {item!r}: expected KEY=VALUE, e.g. train.patience=3")
    return key.strip(), yaml.safe_load(value)


def main(model: str | None, argv: list[str] | None = None) -> None:
    from pipeline.job import run

    run(parse_args(model, argv))


def console_main() -> None:
    """``mtrec-train``: any model by ``--model`` (default ple)."""
    main(None)
