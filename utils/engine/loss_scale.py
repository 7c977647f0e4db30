"""Dynamic loss scaling for fp16 training whose every decision stays on the GPU, so a step using it can be
captured as a CUDA graph.

fp16 gradients underflow unless the loss is multiplied by a large scale before backward. The scale is
halved after a step whose gradients overflowed (that step is skipped) and doubled after `interval`
clean steps in a row: the rule of torch.amp.GradScaler, whose `step` reads the overflow flag on the
host instead. Here the flag is a device tensor that the optimiser's step obeys (optim.step_optimizer).
The state dict has GradScaler's keys, so checkpoints load either way.
"""
from __future__ import annotations

import torch


class LossScaler:
    """scale(loss) -> backward -> unscale(grads) -> found_inf flag for the optimiser -> update()."""

    def __init__(self, device: torch.device, enabled: bool, init_scale: float = 2.0 ** 16, growth: float = 2.0,
                 backoff: float = 0.5, interval: int = 2000):
        self.enabled = enabled
        self.growth, self.backoff, self.interval = growth, backoff, interval
        self.scale = torch.full((), init_scale, dtype=torch.float32, device=device)
        self.found_inf = torch.zeros((), dtype=torch.float32, device=device)     # 1.0 after an overflow
        self.clean_steps = torch.zeros((), dtype=torch.int32, device=device)     # steps since the last overflow

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale if self.enabled else loss

    def unscale(self, grads: list[torch.Tensor]) -> torch.Tensor | None:
        """Divide the gradients by the scale in place; returns the overflow flag (None when scaling is off)."""
        if not self.enabled:
            return None
        self.found_inf.zero_()
        if grads:
            torch._amp_foreach_non_finite_check_and_unscale_(grads, self.found_inf, self.scale.reciprocal())
        return self.found_inf

    def update(self) -> None:
        """Halve the scale after an overflow, double it after `interval` clean steps (on the device)."""
        if self.enabled:
            torch._amp_update_scale_(self.scale, self.clean_steps, self.found_inf, self.growth, self.backoff,
                                     self.interval)

    def state_dict(self) -> dict:
        if not self.enabled:
            return {}
        return {"scale": self.scale.item(), "growth_factor": self.growth, "backoff_factor": self.backoff,
                "growth_interval": self.interval, "_growth_tracker": int(self.clean_steps.item())}

    def load_state_dict(self, state: dict) -> None:
        """Restore a state from state_dict() or torch.amp.GradScaler.state_dict()."""
        if not state:
            return
        self.scale.fill_(float(state["scale"]))
        self.clean_steps.fill_(int(state.get("_growth_tracker", 0)))
        self.growth = float(state.get("growth_factor", self.growth))
        self.backoff = float(state.get("backoff_factor", self.backoff))
        self.interval = int(state.get("growth_interval", self.interval))
