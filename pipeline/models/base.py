"""What every multi-task model shares: the embedding front, the funnel composition of task
probabilities, and the per-task losses. A model defines ``task_logits`` (and may add a regulariser)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import DatasetSpec, ModelConfig
from pipeline.layers import EmbeddingFront, Logit


def task_parents(spec: DatasetSpec) -> list[int]:
    """Index of each task's parent task (-1 for a root). Parents must come before their children."""
    names = spec.task_names
    parents = [names.index(t.depends_on) if t.depends_on else -1 for t in spec.tasks]
    for j, p in enumerate(parents):
        if p >= j:
            raise ValueError(f"task {names[j]!r} is listed before the task it depends on ({names[p]!r})")
    return parents


class MultiTaskModel(nn.Module):
    """forward(batch) -> {"logits", "cond_prob", "prob", "log_prob"}, each [B, T] in spec.tasks order.

    ``prob`` is P(task label = 1 | exposure). ``cond_prob`` is P(task | parent positive) for a dependent
    task (the head's own probability for a root). By default a dependent task's head predicts the
    conditional and ``prob`` is chained down the funnel (ESMM): P(convert) = P(click) * P(convert | click),
    for chains of any depth (click -> cart -> purchase). A model whose heads predict exposure-space
    probabilities directly (AITM) sets ``chains_probabilities = False``."""

    chains_probabilities = True
    needs_funnel = False  # a funnel model (ESMM, AITM): warned about on a spec without depends_on
    # a model that reads the behaviour sequences itself (DUPN, MoSE): task_logits(x, sequences), the sequences
    # padded (``EmbeddingFront.embed``); and needs them in order (an LSTM): ``model_spec`` un-pools them
    reads_sequences = False
    # its step can be split into row ranges after the front (``BatchStep``: heads_from(x) on each range)
    splits_rows = True

    def __init__(self, spec: DatasetSpec, cfg: ModelConfig, table_device=None) -> None:
        super().__init__()
        self.spec, self.cfg = spec, cfg
        self.parents = task_parents(spec)
        # "meta": DistributedModelParallel materialises shards
        self.front = EmbeddingFront(spec, device=table_device, attention_hidden=cfg.attention_hidden,
                                    sequence_hidden=cfg.sequence_hidden, raw_sequences=self.reads_sequences)
        self.last_gates: dict[str, torch.Tensor] = {}  # gate weights [B, T, E] of the last batch, for diagnostics
        self.heads_dtype: torch.dtype | None = None  # set by heads_in (a bf16 serving program)

    def task_logits(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def tower_hidden(self, task: str) -> list[int]:
        return self.cfg.towers.get(task, self.cfg.tower_hidden)

    def heads_in(self, dtype: torch.dtype) -> "MultiTaskModel":
        """Everything after the embedding front in ``dtype`` (``jobs/export.py --precision bf16``): the tables'
        lookups and the logits stay fp32, the experts, gates and towers take the front's output cast once.
        Not for training: autocast does that."""
        self.to(dtype)
        self.front.float()
        for m in self.modules():
            if isinstance(m, Logit):
                m.float()
        self.heads_dtype = dtype
        return self

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        x, sequences = self.front.embed(batch["ids"], batch.get("dense"))
        if self.heads_dtype is not None:
            x = x.to(self.heads_dtype)
            sequences = [(padded.to(self.heads_dtype), mask) for padded, mask in sequences]  # [B, L, D], [B, L]
        return self.outputs(self.task_logits(x, sequences) if self.reads_sequences else self.task_logits(x), x)

    def heads_from(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Everything after the embedding front, from its output ``x`` [B, front.out_dim]."""
        return self.outputs(self.task_logits(x), x)

    def outputs(self, logits: torch.Tensor, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The task logits [B, T] composed down the funnel; ``x`` is kept as ``features`` (the representation
        every task shares)."""
        log_head = F.logsigmoid(logits)
        if self.chains_probabilities:
            log_prob = []
            for j, p in enumerate(self.parents):  # a handful of tasks: chain in log space for stability
                log_prob.append(log_head[:, j] if p < 0 else log_prob[p] + log_head[:, j])
            log_prob = torch.stack(log_prob, dim=1)
            log_cond = log_head
        else:
            log_prob = log_head
            parent_log = torch.stack([log_prob[:, p] if p >= 0 else torch.zeros_like(log_prob[:, j])
                                      for j, p in enumerate(self.parents)], dim=1)
            log_cond = (log_prob - parent_log).clamp(max=0.0)
        return {"logits": logits, "cond_prob": log_cond.exp(), "prob": log_prob.exp(), "log_prob": log_prob, "features": x}

    def task_losses(self, out: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """Unweighted binary cross-entropy per task, [T] (see ``per_task_losses``)."""
        return per_task_losses(out, labels, self.parents, self.cfg.dependent_loss, self.chains_probabilities)

    def task_loss_rows(self, labels: torch.Tensor) -> torch.Tensor:
        """How many rows each task's loss averages over, [T] (see ``per_task_losses``): all of them, or the
        parent-positive ones for a masked dependent task. A training step split into row ranges weights each
        range's losses by its share of these, so that the ranges' gradients sum to the whole batch's."""
        rows = [labels[:, p].sum() if p >= 0 and self.chains_probabilities and self.cfg.dependent_loss == "masked"
                else labels.new_tensor(float(labels.shape[0])) for p in self.parents]
        return torch.stack(rows)

    def regularizer(self, out: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """An extra loss term outside the task weighting, a mean over the batch's rows (AITM's label
        constraint); none by default."""
        return out["logits"].new_zeros(())

    def shared_parameter(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """What all tasks share, where GradNorm balances the tasks' gradient norms: by default the embedding
        front's output (its tables are updated inside the backward, so their gradients never materialise)."""
        return out["features"]


def per_task_losses(out: dict[str, torch.Tensor], labels: torch.Tensor, parents: list[int], dependent_loss: str,
                    chains_probabilities: bool = True) -> torch.Tensor:
    """Unweighted binary cross-entropy per task, [T].

    A root task, or any task of a non-chaining model: BCE of its head over all exposures. A dependent
    task with ``dependent_loss: esmm``: BCE of the chained P(task) against its exposure-space label over
    all rows (ESMM's CTCVR loss: no sample selection bias). With ``masked``: BCE of its own head on the
    rows whose parent label is 1 only (the classic CVR model, trained on clicks)."""
    losses = []
    for j, p in enumerate(parents):
        y = labels[:, j]
        if p < 0 or not chains_probabilities:
            losses.append(F.binary_cross_entropy_with_logits(out["logits"][:, j], y))
        elif dependent_loss == "esmm":
            # in log space when the model gives it: a clamped prob would have no gradient below 1e-7
            log_p = out["log_prob"][:, j] if "log_prob" in out else out["prob"][:, j].clamp(min=1e-7).log()
            log_p = log_p.clamp(max=-1e-7)  # P <= 1 - 1e-7
            log_not_p = torch.log(-torch.expm1(log_p))  # log(1 - p), exact for p near 0 and near 1
            losses.append(-(y * log_p + (1 - y) * log_not_p).mean())
        else:
            mask = labels[:, p]
            bce = F.binary_cross_entropy_with_logits(out["logits"][:, j], y, reduction="none")
            # no parent-positive row: 0, but still a function of the logits (the graph stays connected)
            losses.append((bce * mask).sum() / mask.sum().clamp(min=1))
    return torch.stack(losses)


def multitask_loss(out: dict[str, torch.Tensor], labels: torch.Tensor, spec: DatasetSpec, model_cfg: ModelConfig,
                   weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of weights * per-task losses, per-task losses [T]) for a model that chains the funnel."""
    per_task = per_task_losses(out, labels, task_parents(spec), model_cfg.dependent_loss)
    return (weights.to(per_task) * per_task).sum(), per_task
