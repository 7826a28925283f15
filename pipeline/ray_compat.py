"""Every use of Ray's private API in this project, in one place. Each says which public API is missing and
what it relies on; all were checked against Ray 2.60 (``CHECKED_WITH``). ``tests/test_ray_compat.py`` fails
loudly when a Ray upgrade moves or renames any of them."""
from __future__ import annotations

import logging

import ray
import ray.data

# private: Ray Data's execution callbacks have no public base class in 2.60 (DataContext takes the classes
# through its undocumented ``custom_execution_callback_classes`` list)
from ray.data._internal.execution.execution_callback import ExecutionCallback  # noqa: F401  (re-exported)

CHECKED_WITH = "2.60.0"


def add_execution_callback(ctx: ray.data.DataContext, cls: type) -> None:
    """Run ``cls`` on every streaming executor of this context. Private: no public hook into the executor's
    scheduling loop; ``custom_execution_callback_classes`` is an undocumented DataContext field."""
    if cls not in ctx.custom_execution_callback_classes:
        ctx.custom_execution_callback_classes.append(cls)


def executor_progress(executor) -> tuple:
    """What a streaming executor's operators have done so far (inputs received, task outputs generated,
    outputs taken, running tasks): the same tuple twice means a scheduling step did nothing. Private: the
    executor's ``_topology`` (operator -> state) and the operators' runtime metrics have no public reader
    during execution (``Dataset.stats()`` comes after it)."""
    return tuple((op.metrics.num_inputs_received, op.metrics.num_task_outputs_generated,
                  op.metrics.num_outputs_taken, op.num_active_tasks())
                 for op in (getattr(executor, "_topology", None) or {}))


def split_coordinator(shards: list) -> "ray.actor.ActorHandle":
    """The coordinator actor behind the iterators of one ``streaming_split``. Private: 2.60 has no public handle
    to end a split whose iterators will never be read (``StreamSplitDataIterator._coord_actor``)."""
    return shards[0]._coord_actor


def shard_locality(config: "ray.train.DataConfig") -> bool:
    """A DataConfig's ``enable_shard_locality`` argument. Private: DataConfig keeps its constructor arguments in
    private attributes, and a subclass that overrides ``configure`` must read them."""
    return config._enable_shard_locality


def datasets_to_split(config: "ray.train.DataConfig") -> set[str] | str:
    """A DataConfig's ``datasets_to_split`` argument ("all" or the names). Private: as ``shard_locality``."""
    return config._datasets_to_split


def execution_options(config: "ray.train.DataConfig", name: str) -> "ray.data.ExecutionOptions":
    """The execution options a DataConfig gives dataset ``name`` (its argument, or Train's defaults). Private:
    ``_resolve_execution_options`` is how DataConfig.configure resolves them, with no public counterpart."""
    return config._resolve_execution_options(name)


def quiet_train_reports() -> None:
    """Turn down Ray Train's INFO lines per report on every worker ("Reporting training result N:
    TrainingReport(...)" and "Checkpoint successfully created at: ..."; two long lines per worker per epoch).
    Private: Train V2 has no verbosity setting for them, and the first comes from a logger named by its
    module's file path."""
    from ray.train.v2._internal.execution import context, storage

    for name in (context.__file__, storage.__name__):
        logging.getLogger(name).setLevel(logging.WARNING)
