"""The model zoo, by config name."""
from __future__ import annotations

from pipeline.config import DatasetSpec, ModelConfig
from pipeline.models.base import MultiTaskModel
from pipeline.models.mmoe import MMoE
from pipeline.models.ple import PLE

MODELS: dict[str, type[MultiTaskModel]] = {"mmoe": MMoE, "ple": PLE}


def build_model(spec: DatasetSpec, cfg: ModelConfig) -> MultiTaskModel:
    if cfg.name not in MODELS:
        raise ValueError(f"unknown model {cfg.name!r}; known: {sorted(MODELS)}")
    return MODELS[cfg.name](spec, cfg)
