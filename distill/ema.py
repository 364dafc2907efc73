"""An exponential moving average (EMA) of the trained model (distill.ema: the decay), as Polyak averaging
and DINO's teacher keep one: after every optimizer step each floating-point parameter and buffer
becomes

    ema <- decay * ema + (1 - decay) * current        (torch.lerp, so the same bits on every resume)

and every other buffer (integer counters) is copied. The average starts as a copy of the model before
its first step. It is validated beside the model, kept in checkpoints, and exported instead of the
trained weights with distill.export_ema.

Written by hand rather than with torch.optim.swa_utils.AveragedModel: that one starts from the weights
after the first step and averages integer buffers too, and its state_dict nests the model under
`module.`; this one is a plain copy of the model, so its state_dict is the model's.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


class EMA:
    """`model` holds the average, a frozen copy of the module given (same class, same state_dict keys)."""

    def __init__(self, module: nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay {decay} must be between 0 and 1 (e.g. 0.999)")
        self.decay = decay
        self.model = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        current = module.state_dict()
        for name, average in self.model.state_dict().items():
            if average.is_floating_point():
                average.lerp_(current[name].detach(), 1 - self.decay)
            else:
                average.copy_(current[name])

    def state_dict(self) -> dict[str, Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.model.load_state_dict(state)
