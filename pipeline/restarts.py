"""Worker-group restarts, as the run's own outputs report them.

Ray Train restarts a failed worker group (a worker that raised, was killed or crashed) up to
``train.max_failures`` times, and a run that recovers ends with exit code 0: without this, only Ray's log
("Error count: 1 (max allowed: 2)") shows that it happened. ``RestartLog`` is a Train callback: Train calls it
on its controller, wherever that runs, after every poll of the workers that found errors. It writes one small
JSON file per failure into the run's storage (local or s3://, which the driver reads too), and the driver
reads them back after ``fit`` for the final table and metrics.json (``restarts``).
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pyarrow.fs as pafs
from ray.train import UserCallback

from pipeline.checkpoint import filesystem


class RestartLog(UserCallback):
    def __init__(self, storage: str, name: str) -> None:
        # a run's own id: a rerun of the same name (a resume) does not count its predecessor's failures
        self.dir = f"{storage.rstrip('/')}/{name}/restarts/{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        """One failure of the worker group: each failed rank and the first line of its error."""
        fs, path = filesystem(self.dir)
        fs.create_dir(path, recursive=True)
        errors = [{"rank": rank, "error": type(e).__name__, "first_line": _first_line(e)}
                  for rank, e in sorted(worker_exceptions.items())]
        record = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "errors": errors}
        with fs.open_output_stream(f"{path}/{time.time_ns()}.json") as f:
            f.write(json.dumps(record).encode())

    def read(self) -> dict[str, Any]:
        """{"count": failures, "failures": [{"time", "errors": [{"rank", "error", "first_line"}]}]} so far."""
        fs, path = filesystem(self.dir)
        files = sorted((f.path for f in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
                        if f.type == pafs.FileType.File), key=lambda p: int(p.rsplit("/", 1)[1].split(".")[0]))
        failures = []
        for p in files:
            with fs.open_input_stream(p) as f:
                failures.append(json.loads(f.read()))
        return {"count": len(failures), "failures": failures}


def describe(restarts: dict[str, Any]) -> list[str]:
    """The lines the final table ends with when the worker group was restarted."""
    if not restarts["count"]:
        return []
    lines = [f"WARNING: the worker group failed and was restarted {restarts['count']} time(s) during this run:"]
    for f in restarts["failures"]:
        lines += [f"  {f['time']} rank {e['rank']}: {e['error']}: {e['first_line']}" for e in f["errors"]]
    return lines


def _first_line(e: BaseException) -> str:
    """The error's first non-empty line, and its cause's (Train wraps a dead worker's error in a generic one:
    "A worker health check failed." <- "The actor died unexpectedly ... connection error code 2 ...")."""
    def first(x: BaseException) -> str:
        lines = [line.strip() for line in str(x).splitlines() if line.strip()]
        return lines[0] if lines else repr(x)

    text = first(e)
    if e.__cause__ is not None:
        text += f" <- {type(e.__cause__).__name__}: {first(e.__cause__)}"
    return text[:400]
