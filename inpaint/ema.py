"""An exponential moving average of the generator's weights (``model.ema_decay``).

GAN generators wander from step to step (the quality benchmark's curves swing by about 1 dB
between evaluations once the adversarial term is on); the average of the recent weights sits
near the middle of that wander and is what evaluation and inference use by default. After every
generator optimizer step each averaged parameter moves ``1 - decay`` of the way to the trained
one, ``ema = decay * ema + (1 - decay) * param``, in one fused in-place op on the device (no host
synchronisation). Buffers (BatchNorm running statistics) are copied, not averaged: they describe
the activations of the current weights, and the generator's BatchNorm layers run in eval mode
with them at inference.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class GeneratorEMA:
    """The averaged copy of a network; Stateful (``state_dict`` / ``load_state_dict``) for checkpoints."""

    def __init__(self, network: nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(network).eval()  # starts at the network's initial weights
        self.module.requires_grad_(False)

    @torch.no_grad()
    def update(self, network: nn.Module) -> None:
        """Move the average towards ``network`` (the plain module: no DDP or compile wrapper)."""
        averaged = [p for p in self.module.parameters()]
        trained = [p.detach() for p in network.parameters()]
        torch._foreach_lerp_(averaged, trained, 1.0 - self.decay)
        for mine, theirs in zip(self.module.buffers(), network.buffers()):
            mine.copy_(theirs)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
