"""Exponential moving average of a model's weights, kept in a separate fp32 copy."""

from __future__ import annotations

import copy

import torch


class EMA:
    """``shadow`` tracks ``model`` with decay ``min(max_decay, (1 + n) / (10 + n))`` after n updates.

    The warmup lets the average forget the random initialisation quickly in short runs.
    """

    def __init__(self, model: torch.nn.Module, max_decay: float):
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)
        self.max_decay = max_decay
        self.updates = 0
        self._pairs = [(s, p) for s, p in zip(self.shadow.parameters(), model.parameters())]

    def decay(self) -> float:
        return min(self.max_decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """Move the shadow weights a step towards the model's."""
        shadow = [s for s, _ in self._pairs]
        live = [p.detach() for _, p in self._pairs]
        torch._foreach_lerp_(shadow, live, 1.0 - self.decay())
        self.updates += 1
