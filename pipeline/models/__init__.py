"""The model zoo, by config name."""
from __future__ import annotations

import dataclasses
import typing
import warnings

from pipeline.config import ConfigError, DatasetSpec, ModelConfig, ModelName, from_dict
from pipeline.models.aitm import AITM
from pipeline.models.base import MultiTaskModel, multitask_loss  # noqa: F401  (re-exported)
from pipeline.models.bottom import SharedBottom, SingleTask
from pipeline.models.dupn import DUPN
from pipeline.models.esmm import ESMM
from pipeline.models.metaheac import MetaHeac
from pipeline.models.mmoe import MMoE, OMoE
from pipeline.models.mose import MoSE
from pipeline.models.ple import PLE

MODELS: dict[str, type[MultiTaskModel]] = {
    "single_task": SingleTask, "shared_bottom": SharedBottom, "omoe": OMoE, "mmoe": MMoE, "ple": PLE,
    "esmm": ESMM, "aitm": AITM, "dupn": DUPN, "mose": MoSE, "metaheac": MetaHeac,
}


def warn_without_funnel(spec: DatasetSpec, cfg: ModelConfig) -> None:
    """ESMM and AITM are funnel models: on a spec whose tasks have no ``depends_on`` they still train (the seed
    notes' UCI Adult benchmark runs them so), but as independent towers, so say what they need."""
    if MODELS[cfg.name].needs_funnel and not any(t.depends_on for t in spec.tasks):
        warnings.warn(f"model {cfg.name!r} needs a funnel: a task with depends_on its parent in the spec (e.g. convert "
                      f"depends_on click); no task of spec {spec.name!r} ({', '.join(spec.task_names)}) has one, so "
                      + ("each task gets an independent tower and nothing is chained"
                         if cfg.name == "esmm" else "no information is transferred between the tasks")
                      + ". Add depends_on to the spec, or pick a model such as ple or mmoe", UserWarning, stacklevel=2)


assert set(MODELS) == set(typing.get_args(ModelName)), "pipeline.config.ModelName lists the models by name"


def model_spec(spec: DatasetSpec, cfg: ModelConfig) -> DatasetSpec:
    """The spec as the model reads it: ``model.embedding_dim`` for every table, ``model.sequence_encoder`` for
    every sequence, and an LSTM's order for the sequences of a model that reads them itself (dupn, mose). The
    batches' ``KeyedJaggedTensor`` follows this spec's ``id_keys`` (an un-pooled table moves to the end), so
    the job builds its batches from it too. Applying it twice changes nothing."""
    reads = MODELS[cfg.name].reads_sequences
    if reads and not spec.sequences:
        raise ConfigError(f"model {cfg.name!r} reads behaviour sequences; spec {spec.name!r} has none "
                          f"(add an id list under sequences:, or pick another model)")
    if cfg.embedding_dim is None and cfg.sequence_encoder is None and not reads:
        return spec
    raw = dataclasses.asdict(spec)
    for f in raw["sparse"] + raw["sequences"]:
        f["dim"] = cfg.embedding_dim or f["dim"]
    for f in raw["sequences"]:
        f["encoder"] = "lstm" if reads else cfg.sequence_encoder or f["encoder"]
    return from_dict(DatasetSpec, raw)


def build_model(spec: DatasetSpec, cfg: ModelConfig, table_device=None) -> MultiTaskModel:
    return MODELS[cfg.name](model_spec(spec, cfg), cfg, table_device)
