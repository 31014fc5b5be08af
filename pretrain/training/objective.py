"""The training objective of both loops: task loss weighting (fixed or Mod-Squad's uncertainty) + auxiliary losses.

The model returns, per forward, a dict of named loss terms for one task (detection returns torchvision's four
terms). `Objective` sums a task's terms, weights tasks and adds the weighted auxiliary losses (MoE balance/MI losses,
a decoder's balance loss). It is a child module of the model (`model.objective`), so its parameters are trained
and checkpointed with the model.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from pretrain.config.pretraining import MoEConfig, OptimConfig, TaskConfig, enabled_tasks

WEIGHTINGS = ("fixed", "uncertainty")


class Objective(nn.Module):
    """Combine per-task losses into the training objective.

    `mode="fixed"`: Σ_t w_t·L_t. `mode="uncertainty"` (Mod-Squad `AutomaticWeightedLoss`, σ learnable, init 1):
    Σ_t 0.5/σ_t²·L_t + log(1 + σ_t²). Its σ are parameters of the trained model, so they are optimised and
    checkpointed with it.
    """

    def __init__(self, *, tasks: list[str], weights: dict[str, float], mode: str, aux_weights: dict[str, float],
                 aux_start: dict[str, tuple[float, int]] | None = None):
        super().__init__()
        if mode not in WEIGHTINGS:
            raise ValueError(f"loss weighting mode must be one of {WEIGHTINGS}, got {mode!r}")
        self.tasks = list(tasks)
        self.mode = mode
        self.weights = dict(weights)
        self.aux_weights = {k: float(v) for k, v in aux_weights.items()}
        # key → (weight at step 0, steps of the cosine decay to aux_weights[key])
        self.aux_start = {k: (float(w), int(n)) for k, (w, n) in (aux_start or {}).items()}
        self.sigma = nn.Parameter(torch.ones(len(tasks))) if mode == "uncertainty" else None

    def task_term(self, task: str, loss: Tensor) -> Tensor:
        """The weighted contribution of one task's summed loss."""
        if self.sigma is None:
            return self.weights[task] * loss
        var = self.sigma[self.tasks.index(task)] ** 2
        return 0.5 / var * loss + torch.log1p(var)

    def aux_weight(self, key: str, step: int | None) -> float:
        """The weight of aux loss `key` at optimizer step `step` (0-based); None = the final weight."""
        final = self.aux_weights.get(key, 0.0)
        if step is None or key not in self.aux_start:
            return final
        start, steps = self.aux_start[key]
        if step >= steps:
            return final
        return final + (start - final) * 0.5 * (1 + math.cos(math.pi * step / steps))

    def forward(self, task_losses: dict[str, dict[str, Tensor]], aux: dict[str, Tensor],
                step: int | None = None) -> tuple[Tensor, dict]:
        """Args: task_losses {task: {term: scalar}}, aux {"mi"|"cv"|"switch"|"z": scalar} (unweighted), step the
        optimizer step (0-based) for scheduled aux weights (None: the final weights).

        Returns (total, parts) where parts holds detached scalars for logging: `loss/<task>`, `loss/<task>/<term>`,
        `aux/<key>` (unweighted) and `loss/total`. Aux keys without a weight are logged and not added.
        """
        total: Tensor | float = 0.0  # stays on the losses' device (no CPU zero tensor on GPU runs)
        parts: dict[str, Tensor] = {}
        for task, terms in task_losses.items():
            task_loss = sum(terms.values())
            total = total + self.task_term(task, task_loss)
            parts[f"loss/{task}"] = task_loss.detach()
            if len(terms) > 1:
                parts.update({f"loss/{task}/{k}": v.detach() for k, v in terms.items()})
        for key, value in aux.items():
            weight = self.aux_weight(key, step)
            if key in self.aux_start:
                parts[f"aux_weight/{key}"] = weight
            if weight:
                total = total + weight * value
            parts[f"aux/{key}"] = value.detach()
        if not isinstance(total, Tensor):
            raise ValueError("TaskLoss needs at least one task loss")
        parts["loss/total"] = total.detach()
        return total, parts


def build_objective(tasks: dict[str, TaskConfig], optim: OptimConfig, moe: MoEConfig,
                    extra_aux: dict[str, float] | None = None, order: tuple[str, ...] | None = None) -> Objective:
    """The objective for the enabled tasks of a `tasks` table (loss weights), `optim.loss_weighting` and the MoE
    auxiliary-loss weights (plus `extra_aux`, e.g. a decoder's balance-loss weight)."""
    names = enabled_tasks(tasks, order) if order else enabled_tasks(tasks)
    aux = {"mi": moe.w_mi, "cv": moe.w_cv, "switch": moe.w_switch, "z": moe.w_z, **(extra_aux or {})}
    start = {"mi": (moe.w_mi_start, moe.w_mi_decay_steps)} if moe.w_mi_start else None
    return Objective(tasks=names, weights={t: tasks[t].loss_weight for t in names}, mode=optim.loss_weighting,
                     aux_weights=aux, aux_start=start)
