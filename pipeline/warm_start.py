"""Warm start (``--init-from``): train on a new log starting from a previous run's selected weights.

The previous run's model and spec must be this run's (the sharding plan aside); its vocabularies are extended
with this log's frequent ids (``pipeline.encoding.extend_vocabulary``: old ids keep their rows, new ids take
free rows, then the rows of the old ids that fell out of this log's top, least frequent first). Hashed and
identity tables keep every row. The dense statistics are the previous run's, kept: the dense layers learned
on inputs standardised with them (refitting would shift every input the model was trained on). The optimizer
state is not carried over: the dense Adam and the tables' fused optimizer start afresh.

The driver writes one init file: the previous selected weights (plain tensors) and, per table weight, the
row each new row comes from (-1: a new id's row, left as the new model initialised it). Each worker copies
its own shards from it (``pipeline.sharding.load_plain``).
"""
from __future__ import annotations

import dataclasses
import io

import numpy as np
import torch

from pipeline.checkpoint import PREPROCESSOR_FILE, filesystem, load_state
from pipeline.config import ConfigError, DatasetSpec, JobConfig, from_dict
from pipeline.data import Preprocessor
from pipeline.encoding import extend_vocabulary
from pipeline.export import checkpoint_dir
from pipeline.sharding import load_plain


def table_weight_keys(state: dict, table: str) -> list[str]:
    """The embedding front's weight(s) of ``table`` in a plain model state dict."""
    return [k for k in state if k.startswith("front.") and k.endswith(f".{table}.weight")]


def prepare(job: JobConfig, spec: DatasetSpec, fitted: Preprocessor, storage: str) -> tuple[Preprocessor, str, dict]:
    """The extended preprocessor, the URI of the init file the workers load, and what was done (for metrics)."""
    ckpt = checkpoint_dir(job.init_from)
    old = load_state(ckpt)
    for key in ("model",):
        before = {k: v for k, v in old["job"][key].items() if k != "sharding"}
        now = {k: v for k, v in dataclasses.asdict(job)[key].items() if k != "sharding"}
        if before != now:
            raise ConfigError(f"--init-from {job.init_from}: its {key} is {before}, this run's {now}; "
                              "a warm start needs the same model")
    old_tables = {n: (t.dim, t.num_rows, t.encoding) for n, t in from_dict(DatasetSpec, old["spec"]).tables.items()}
    new_tables = {n: (t.dim, t.num_rows, t.encoding) for n, t in spec.tables.items()}
    if old_tables != new_tables:
        raise ConfigError(f"--init-from {job.init_from}: its tables {old_tables} differ from this spec's {new_tables}")
    previous = Preprocessor.load(ckpt / PREPROCESSOR_FILE, spec)
    vocab, rows, report = {}, {}, {}
    for name, t in spec.tables.items():
        if t.encoding != "vocab":
            continue
        vocab[name], source = extend_vocabulary(previous.vocab[name], fitted.vocab[name], t.num_rows - 1)
        # row 0 (out of vocabulary) keeps its row; a new id's row is marked -1
        rows_from = torch.from_numpy(np.concatenate([[0], np.where(source > 0, source, -1)]))
        for key in table_weight_keys(old["best_model"], name):
            rows_from_padded = torch.full((t.num_rows,), -1, dtype=torch.int64)
            rows_from_padded[:len(rows_from)] = rows_from
            rows[key] = rows_from_padded
        report[f"warm_start/{name}/kept"] = int((source > 0).sum())
        report[f"warm_start/{name}/new"] = int((source == 0).sum())
        report[f"warm_start/{name}/evicted"] = int(len(previous.vocab[name]) - (source > 0).sum())
    pre = Preprocessor(spec, vocab, previous.dense_mean, previous.dense_std, fitted.train_rows, fitted.drop_bad_rows)
    fs, root = filesystem(storage)
    fs.create_dir(f"{root}/init", recursive=True)
    buf = io.BytesIO()
    torch.save({"model": old["best_model"], "rows": rows}, buf)
    with fs.open_output_stream(f"{root}/init/{job.name}.pt") as f:
        f.write(buf.getvalue())
    return pre, f"{storage.rstrip('/')}/init/{job.name}.pt", report


def load_into(module: torch.nn.Module, uri: str) -> None:
    """A worker: copy its shards of the init file's weights into the (sharded) model."""
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        init = torch.load(io.BytesIO(f.read()), weights_only=True)
    load_plain(module, init["model"], init["rows"])
