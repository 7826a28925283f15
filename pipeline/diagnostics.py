"""Gate diagnostics for gated models (OMoE, MMoE, PLE): per task, the mean weight each expert gets
and the gate entropy over a split, with flags for a gate that collapsed onto one expert and for tasks
whose gates are near-identical (the tasks then share one mixture: MMoE degenerates to Shared-Bottom)."""
from __future__ import annotations

import math

import numpy as np
import torch

COLLAPSE_WEIGHT = 0.9  # a gate is collapsed when one expert gets >= 90% of its mean weight
IDENTICAL_DISTANCE = 0.05  # total-variation distance under which two tasks' mean gates are "identical"


class GateStats:
    """Accumulates the model's ``last_gates`` ([B, T, E] per gate group) over the batches of a split."""

    def __init__(self) -> None:
        self.sums: dict[str, np.ndarray] = {}
        self.entropy: dict[str, np.ndarray] = {}
        self.rows = 0

    def update(self, gates: dict[str, torch.Tensor]) -> None:
        if not gates:
            return
        for key, g in gates.items():
            g = g.float()
            s = g.sum(0).cpu().numpy()
            h = -(g * g.clamp(min=1e-12).log()).sum(-1).sum(0).cpu().numpy()
            self.sums[key] = self.sums.get(key, 0) + s
            self.entropy[key] = self.entropy.get(key, 0) + h
        self.rows += next(iter(gates.values())).shape[0]

    def state(self) -> dict[str, np.ndarray]:
        out = {f"sum:{k}": v for k, v in self.sums.items()} | {f"entropy:{k}": v for k, v in self.entropy.items()}
        return out | {"rows": np.array(self.rows)}


def merge_states(states: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    merged: dict[str, np.ndarray] = {}
    for s in states:
        for k, v in s.items():
            merged[k] = merged.get(k, 0) + v
    return merged


def summarize(state: dict[str, np.ndarray], tasks: list[str]) -> dict[str, float]:
    """Flat metrics: gates/<group>/<task>/expert<e>, gates/<group>/<task>/entropy, and the flags
    gates/<group>/collapsed and (for gates over the same experts) gates/<group>/identical."""
    rows = float(state.get("rows", 0))
    out: dict[str, float] = {}
    if rows == 0:
        return out
    for key in [k.split(":", 1)[1] for k in state if k.startswith("sum:")]:
        mean = state[f"sum:{key}"] / rows  # [T, E]
        entropy = state[f"entropy:{key}"] / rows  # [T]
        for t, task in enumerate(tasks):
            for e, w in enumerate(mean[t]):
                out[f"gates/{key}/{task}/expert{e}"] = float(w)
            out[f"gates/{key}/{task}/entropy"] = float(entropy[t])
            out[f"gates/{key}/{task}/entropy_ratio"] = float(entropy[t] / math.log(mean.shape[1]))
        out[f"gates/{key}/collapsed"] = float((mean.max(axis=1) >= COLLAPSE_WEIGHT).any())
        if key == "experts" and len(tasks) > 1:  # MMoE: every task's gate mixes the same experts
            tv = max(0.5 * np.abs(mean[a] - mean[b]).sum() for a in range(len(tasks)) for b in range(a + 1, len(tasks)))
            out[f"gates/{key}/max_task_distance"] = float(tv)
            out[f"gates/{key}/identical"] = float(tv < IDENTICAL_DISTANCE)
    return out


def gate_matrix(metrics: dict[str, float], split: str, key: str, tasks: list[str]) -> np.ndarray:
    """The task x expert matrix of mean gate weights back out of flat metrics."""
    base = f"{split}/gates/{key}/"
    first = f"{base}{tasks[0]}/expert"
    experts = sorted(int(k[len(first):]) for k in metrics if k.startswith(first))
    return np.array([[metrics[f"{base}{t}/expert{e}"] for e in experts] for t in tasks])


def gate_groups(metrics: dict[str, float], split: str) -> list[str]:
    return sorted({k.split("/")[2] for k in metrics if k.startswith(f"{split}/gates/") and k.endswith("/collapsed")})
