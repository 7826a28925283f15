"""Training progress for the user. On the driver's terminal: a progress bar per epoch (tqdm), drawn by the
driver from what rank 0 posts to a small actor (``Board``), since a worker's own output reaches the
terminal as Ray's log lines, where a redrawn bar cannot live. Off a terminal (``ray job submit`` logs, CI,
a file) there is no bar, and rank 0 prints a line every 10 s instead (``EpochProgress``)."""
from __future__ import annotations

import shutil
import sys
import threading
import time
from typing import Any, TextIO

import ray


def say(line: str) -> None:
    """A line for the user from a worker. Train V2 patches ``print`` in its workers to log through the root
    logger and also to copy to stdout, so a plain print reached the driver's terminal twice; this writes to
    the process's own stdout, once."""
    print(line, file=sys.__stdout__, flush=True)


@ray.remote(num_cpus=0)
class Board:
    """The latest progress rank 0 posted: {epoch, epochs, rows, total, rate}."""

    def __init__(self) -> None:
        self.state: dict[str, Any] | None = None

    def post(self, state: dict[str, Any]) -> None:
        self.state = state

    def read(self) -> dict[str, Any] | None:
        return self.state


class EpochProgress:
    """Rank 0's progress within an epoch: the rows so far (this worker's times the workers), samples/s and
    the time left, posted to the driver's ``Board`` twice a second where there is one, else printed as a
    line every 10 s."""

    def __init__(self, epoch: int, epochs: int, total_rows: int, world: int, board=None, enabled: bool = True) -> None:
        self.epoch, self.epochs, self.total, self.world, self.board = epoch, epochs, total_rows, world, board
        self.enabled, self.every = enabled, 0.5 if board is not None else 10.0
        self.rows, self.started, self.pending = 0, time.time(), None
        self.last = self.started

    def update(self, rows: int) -> None:
        self.rows += rows
        now = time.time()
        if not self.enabled or now - self.last < self.every:
            return
        self.last, done = now, self.rows * self.world
        rate = done / max(now - self.started, 1e-9)
        if self.board is not None:
            # the call's result is kept until the next post: posts whose result was dropped at once never
            # reached the board (seen here with the handle Train passes through train_loop_config)
            self.pending = self.board.post.remote({"epoch": self.epoch, "epochs": self.epochs, "rows": done,
                                                   "total": self.total, "rate": rate})
            return
        left = f", {max(self.total - done, 0) / max(rate, 1e-9):.0f} s left" if self.total else ""
        share = f" ({min(done / self.total, 1.0):.0%})" if self.total else ""
        say(f"epoch {self.epoch + 1}/{self.epochs}: {done:,} rows{share}, {rate:,.0f} samples/s{left}")


class DriverBar:
    """While training runs, draws the board's progress as one tqdm bar per epoch on ``file``."""

    def __init__(self, board, file: TextIO, interval: float = 0.5) -> None:
        self.board, self.file, self.interval = board, file, interval
        self.stop, self.thread, self.bar, self.epoch = threading.Event(), None, None, None

    def __enter__(self) -> "DriverBar":
        self.thread = threading.Thread(target=self._draw, name="progress-bar", daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        if self.bar is not None:
            self.bar.close()

    def _draw(self) -> None:
        from tqdm import tqdm

        while not self.stop.wait(self.interval):
            try:
                state = ray.get(self.board.read.remote(), timeout=5)
            except ray.exceptions.RayActorError:  # the board went away with a failed run: nothing more to draw
                return
            except ray.exceptions.GetTimeoutError:  # a busy machine: try again at the next tick
                continue
            if state is None:
                continue
            if state["epoch"] != self.epoch:
                if self.bar is not None:
                    self.bar.close()
                self.epoch = state["epoch"]
                # the size from shutil, which falls back to 80 x 24 where a terminal reports 0 x 0 (a pty without
                # a size, as `script` makes): tqdm draws nothing on a terminal of 0 rows
                cols, rows = shutil.get_terminal_size()
                self.bar = tqdm(total=state["total"] or None, desc=f"epoch {state['epoch'] + 1}/{state['epochs']}",
                                unit=" rows", unit_scale=True, file=self.file, ncols=cols, nrows=rows, leave=False,
                                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} rows{postfix}")
            self.bar.n = min(state["rows"], state["total"] or state["rows"])
            left = max(state["total"] - state["rows"], 0) / max(state["rate"], 1e-9)  # rank 0's rate, not tqdm's
            self.bar.set_postfix_str(f"{state['rate']:,.0f} samples/s, {left:.0f} s left", refresh=False)
            self.bar.refresh()


def board_for_terminal(stream: TextIO = sys.stdout):
    """A Board when ``stream`` is a terminal (the bar is drawn), else None (rank 0 prints lines)."""
    return Board.remote() if stream.isatty() else None
