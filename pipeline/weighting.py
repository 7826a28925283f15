"""Multi-task loss weighting strategies, selected by ``train.loss_weighting``.

- fixed: constant per-task weights (``train.loss_weights``; the knob Tune searches).
- decay: PLE's w_k(t) = w_k0 * gamma_k^t, t the epoch (``train.loss_weight_decay``).
- uncertainty: Kendall et al. (CVPR 2018): learnable s_k = log sigma_k^2, loss = sum exp(-s_k) L_k + s_k.
- gradnorm: Chen et al. (ICML 2018): learnable w_k, updated every step so that the tasks' gradient norms
  on the last shared layer, ||grad_W w_k L_k||, approach mean_norm * (r_k)^alpha, r_k the task's relative
  inverse training rate L_k(t)/L_k(0) over its mean; weights renormalised to sum to T.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from pipeline.config import TrainConfig



class LossWeighting(nn.Module):
    def __init__(self, tasks: list[str], cfg: TrainConfig) -> None:
        super().__init__()
        unknown = (set(cfg.loss_weights) | set(cfg.loss_weight_decay)) - set(tasks)
        if unknown:
            raise ValueError(f"loss weights name unknown tasks {sorted(unknown)}; tasks are {tasks}")
        self.tasks, self.strategy, self.cfg = tasks, cfg.loss_weighting, cfg
        self.register_buffer("base", torch.tensor([cfg.loss_weights.get(t, 1.0) for t in tasks]))
        self.register_buffer("gamma", torch.tensor([cfg.loss_weight_decay.get(t, 1.0) for t in tasks]))
        self.register_buffer("epoch", torch.zeros(()))
        self.log_var = nn.Parameter(torch.zeros(len(tasks)), requires_grad=self.strategy == "uncertainty")
        self.gradnorm_w = nn.Parameter(self.base.clone(), requires_grad=self.strategy == "gradnorm")
        self.register_buffer("initial_losses", torch.zeros(len(tasks)))

    def set_epoch(self, epoch: int) -> None:
        self.epoch.fill_(epoch)

    def weights(self) -> torch.Tensor:
        """The current effective weight of each task's loss (for logging and the fixed/decay sum)."""
        if self.strategy == "decay":
            return self.base * self.gamma ** self.epoch
        if self.strategy == "uncertainty":
            return torch.exp(-self.log_var.detach())
        if self.strategy == "gradnorm":
            return self.gradnorm_w.detach()
        return self.base

    def forward(self, task_losses: torch.Tensor, share: float = 1.0) -> torch.Tensor:
        """The weighted loss. ``share``: the fraction of the batch's rows these losses cover (a training step
        split into row ranges): the uncertainty strategy's ``s_k`` term, which is not per row, counts once
        over the ranges."""
        if self.strategy == "uncertainty":
            return (torch.exp(-self.log_var) * task_losses + share * self.log_var).sum()
        return (self.weights() * task_losses).sum()

    def gradnorm_step(self, task_losses: torch.Tensor, shared: torch.Tensor) -> None:
        """One GradNorm update of the task weights (call before the model's backward)."""
        if self.strategy != "gradnorm":
            return
        losses = task_losses.detach()
        if not self.initial_losses.any():
            self.initial_losses.copy_(losses)
        # ||grad_W (w_k L_k)|| = w_k ||grad_W L_k||: one plain gradient per task, no double backward
        unit_norms = torch.stack([_norm(torch.autograd.grad(task_losses[k], shared, retain_graph=True)[0])
                                  for k in range(len(self.tasks))])
        norms = self.gradnorm_w * unit_norms
        ratio = losses / self.initial_losses.clamp(min=1e-12)
        target = (norms.mean() * (ratio / ratio.mean()) ** self.cfg.gradnorm_alpha).detach()
        (grad,) = torch.autograd.grad((norms - target).abs().sum(), self.gradnorm_w)
        with torch.no_grad():
            if dist.is_initialized():  # keep every worker's weights identical
                dist.all_reduce(grad)
                grad /= dist.get_world_size()
            self.gradnorm_w -= self.cfg.gradnorm_lr * grad
            self.gradnorm_w.clamp_(min=1e-3)
            self.gradnorm_w *= len(self.tasks) / self.gradnorm_w.sum()

    def sync_grads(self) -> None:
        """The uncertainty parameters live outside DDP: average their gradients across workers."""
        if self.strategy == "uncertainty" and dist.is_initialized() and self.log_var.grad is not None:
            dist.all_reduce(self.log_var.grad)
            self.log_var.grad /= dist.get_world_size()

    def log(self) -> dict[str, float]:
        return {f"loss_weight/{t}": float(w) for t, w in zip(self.tasks, self.weights())}


def _norm(grad: torch.Tensor) -> torch.Tensor:
    """The gradient's norm; a sparse one (an embedding table's) sums its repeated rows first."""
    return (grad.coalesce().values() if grad.is_sparse else grad).norm()
