"""MetaHeac (Zhu et al., KDD 2021): hybrid experts and critics, mixed per task by gates that read a learned
task embedding, trained by meta-learning across the tasks.

Experts (shared MLPs) are mixed per task by a gate over [input, task embedding]; critics (shared heads) score
each task's mixture and are mixed by a second gate over [mixture, task embedding] into the task's logit.

The meta step (training only): each batch is cut into a support part (its first ``model.meta_support`` share
of rows) and a query part. An inner step adapts the experts, critics, gates and task embeddings on the
support part's task losses, theta' = theta - meta_inner_lr * grad (a differentiable step, kept in the
graph); the query part is predicted with theta' (``torch.func.functional_call``) and the training loss is
the query part's task losses, so the gradient reaching theta is the second-order meta-gradient, and the
embedding tables get theirs through both parts' inputs. Under DDP each worker adapts on its own support
rows and DDP averages the workers' meta-gradients (the inner step's ``autograd.grad`` accumulates nothing,
so DDP's hooks fire once, in the outer backward). The sharded tables are not adapted in the inner step;
their fused optimizer applies the outer gradient in the backward. Evaluation, export and serving predict
with theta."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.func import functional_call

from pipeline.config import ConfigError, DatasetSpec, ModelConfig
from pipeline.layers import Experts, Gate, Tower
from pipeline.models.base import MultiTaskModel


class HybridExpertsCritics(nn.Module):
    """[B, in] -> task logits [B, T]."""

    def __init__(self, in_dim: int, num_tasks: int, cfg: ModelConfig) -> None:
        super().__init__()
        k = cfg.task_embedding_dim
        self.task_embedding = nn.Parameter(torch.randn(num_tasks, k) * 0.1)
        self.experts = Experts(in_dim, cfg.expert_hidden, cfg.num_experts, cfg.dropout)
        self.expert_gate = Gate(in_dim + k, cfg.num_experts, num_gates=num_tasks)
        self.critics = nn.ModuleList(Tower(self.experts.out_dim, cfg.tower_hidden, cfg.dropout) for _ in range(cfg.num_critics))
        self.critic_gate = Gate(self.experts.out_dim + k, cfg.num_critics, num_gates=num_tasks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tasks = self.task_embedding[None].expand(x.shape[0], -1, -1)  # [B, T, k]
        gates = self.expert_gate(torch.cat([x[:, None].expand(-1, tasks.shape[1], -1), tasks], dim=-1))  # [B, T, E]
        mixed = gates @ self.experts(x)  # [B, T, H]
        critics = torch.stack([critic(mixed) for critic in self.critics], dim=-1)  # [B, T, C]
        return (self.critic_gate(torch.cat([mixed, tasks], dim=-1)) * critics).sum(-1)


def adapted_logits(head: nn.Module, x: torch.Tensor, support: int, inner_loss: Callable[[torch.Tensor], torch.Tensor],
                   lr: float) -> torch.Tensor:
    """Logits [B, T]: rows [0, support) by ``head`` as it is, the rest by ``head`` after one differentiable
    gradient step of ``inner_loss`` (of the support rows' logits) on its parameters."""
    params = dict(head.named_parameters())
    support_logits = head(x[:support])
    grads = torch.autograd.grad(inner_loss(support_logits), list(params.values()), create_graph=True, allow_unused=True)
    adapted = {name: p if g is None else p - lr * g for (name, p), g in zip(params.items(), grads)}
    return torch.cat([support_logits, functional_call(head, adapted, (x[support:],))])


class MetaHeac(MultiTaskModel):
    splits_rows = False

    def __init__(self, spec: DatasetSpec, cfg: ModelConfig, table_device=None) -> None:
        if cfg.towers:
            raise ConfigError("metaheac's critics are shared by all tasks: model.towers does not apply (size them "
                              "with model.tower_hidden)")
        super().__init__(spec, cfg, table_device)
        self.head = HybridExpertsCritics(self.front.out_dim, len(spec.tasks), cfg)

    def task_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        x = self.front(batch["ids"], batch.get("dense"))
        rows = batch.get("rows", 0)
        if not self.training or "labels" not in batch or rows < 2:  # evaluation, export: theta
            return self.outputs(self.head(x), x)
        support = min(rows - 1, max(1, round(rows * self.cfg.meta_support)))
        labels = batch["labels"][:support]
        inner = lambda logits: super(MetaHeac, self).task_losses(self.outputs(logits, x[:support]), labels).sum()  # noqa: E731
        out = self.outputs(adapted_logits(self.head, x, support, inner, self.cfg.meta_inner_lr), x)
        out["query"] = torch.arange(x.shape[0], device=x.device) >= support
        return out

    def task_losses(self, out: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """The query part's task losses in training (the support part's were the inner step's); all rows' else."""
        if "query" in out:
            keep = out["query"]
            out, labels = {k: v[keep] for k, v in out.items() if k != "query"}, labels[keep]
        return super().task_losses(out, labels)
