"""Training progress: on a terminal the driver draws a bar per epoch from what rank 0 posts to a Board;
elsewhere rank 0 prints a line every 10 s."""
from __future__ import annotations

import io
import time

import ray

from pipeline.progress import Board, DriverBar, EpochProgress


def test_the_driver_draws_a_bar_from_what_rank_0_posts(ray_local):
    board = Board.remote()
    assert ray.get(board.read.remote()) is None  # the actor is up (its process start is not what is tested)
    out = io.StringIO()
    with DriverBar(board, out, interval=0.05):
        shown = EpochProgress(0, 2, total_rows=10_000, world=2, board=board)
        shown.every = 0.0  # post every update
        for _ in range(5):
            shown.update(1_000)  # rank 0's rows; 2 workers: 2,000 rows an update
            time.sleep(0.15)
    drawn = out.getvalue()
    assert "epoch 1/2: 100%" in drawn and "10.0k/10.0k rows" in drawn and "samples/s, 0 s left" in drawn, drawn[-500:]


def test_without_a_terminal_rank_0_prints_a_line(capfd):
    shown = EpochProgress(1, 3, total_rows=8_000, world=2, board=None)
    shown.every = 0.0
    shown.update(1_000)
    line = capfd.readouterr().out
    assert "epoch 2/3: 2,000 rows (25%)" in line and "samples/s" in line and "s left" in line
    quiet = EpochProgress(1, 3, total_rows=8_000, world=2, board=None, enabled=False)  # the other ranks
    quiet.every = 0.0
    quiet.update(1_000)
    assert capfd.readouterr().out == ""
