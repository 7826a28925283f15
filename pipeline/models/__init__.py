"""The model zoo, by config name."""
from __future__ import annotations

import dataclasses

from pipeline.config import DatasetSpec, ModelConfig, from_dict
from pipeline.models.aitm import AITM
from pipeline.models.base import MultiTaskModel, multitask_loss  # noqa: F401  (re-exported)
from pipeline.models.bottom import SharedBottom, SingleTask
from pipeline.models.esmm import ESMM
from pipeline.models.mmoe import MMoE, OMoE
from pipeline.models.ple import PLE

MODELS: dict[str, type[MultiTaskModel]] = {
    "single_task": SingleTask, "shared_bottom": SharedBottom, "omoe": OMoE, "mmoe": MMoE, "ple": PLE,
    "esmm": ESMM, "aitm": AITM,
}


def build_model(spec: DatasetSpec, cfg: ModelConfig, table_device=None) -> MultiTaskModel:
    if cfg.name not in MODELS:
        raise ValueError(f"unknown model {cfg.name!r}; known: {sorted(MODELS)}")
    if cfg.embedding_dim is not None:  # one dim for every table: rebuild the spec's tables with it
        raw = dataclasses.asdict(spec)
        for f in raw["sparse"] + raw["sequences"]:
            f["dim"] = cfg.embedding_dim
        spec = from_dict(DatasetSpec, raw)
    return MODELS[cfg.name](spec, cfg, table_device)
