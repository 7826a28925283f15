"""Ray's private API that ``pipeline.ray_compat`` relies on is still there, and does what it is used for: a Ray
upgrade that moves or renames any of it fails here, by name, not as a slow run or a hang elsewhere."""
from __future__ import annotations

import ray
import ray.data
from ray.train import DataConfig

from pipeline import ray_compat
from pipeline.data import BackpressureBackoff


def test_every_private_use_still_resolves(ray_local):
    ctx = ray.data.DataContext.get_current()
    assert isinstance(ctx.custom_execution_callback_classes, list)
    assert issubclass(ray_compat.ExecutionCallback, object) and hasattr(ray_compat.ExecutionCallback, "on_execution_step")

    config = DataConfig(datasets_to_split=["train"], enable_shard_locality=False)
    assert ray_compat.shard_locality(config) is False
    assert list(ray_compat.datasets_to_split(config)) == ["train"]
    assert isinstance(ray_compat.execution_options(config, "train"), ray.data.ExecutionOptions)

    shards = ray.data.range(100).streaming_split(2, equal=False)
    coordinator = ray_compat.split_coordinator(shards)
    assert isinstance(coordinator, ray.actor.ActorHandle)
    ray.kill(coordinator, no_restart=True)


class _SeenSteps(BackpressureBackoff):
    steps: list = []

    def on_execution_step(self, executor) -> None:
        super().on_execution_step(executor)
        _SeenSteps.steps.append(len(self.last))  # the operators the backoff saw


def test_ray_data_calls_the_backoff_with_the_executors_operators(ray_local):
    """The backoff reads the executor's operators through ``ray_compat.executor_progress`` (its private
    ``_topology``): this Ray must still have it (else the backoff would be a silent no-op), and connect_ray
    registers the backoff for every dataset."""
    from pipeline.job import connect_ray

    connect_ray()
    ctx = ray.data.DataContext.get_current()
    assert BackpressureBackoff in ctx.custom_execution_callback_classes
    ctx.custom_execution_callback_classes.append(_SeenSteps)
    try:
        rows = sum(len(b["id"]) for b in ray.data.range(1000, override_num_blocks=4).map_batches(lambda b: b).iter_batches())
    finally:
        ctx.custom_execution_callback_classes.remove(_SeenSteps)
    assert rows == 1000 and _SeenSteps.steps and max(_SeenSteps.steps) >= 2
