"""airbench's lookahead: a slow copy of the weights that the fast ones are pulled back to.

Every `every_steps` loader batches the slow copy moves toward the live weights by 1 - decay
and the live weights are set to it; decay grows over training as
`decay * (step / total_steps) ** exponent` (airbench94: every 5 steps, 0.95 ** 5, cubed), so
early on the weights move freely and late in training they average over many steps. At the
end (`finish`) the live weights become the slow copy. BatchNorm's running statistics, being
floating-point state, are averaged too; integer counters are not.

`training.lookahead` in the config (null: off); `train.py` steps it after each loader batch,
so a gated run follows full training's schedule, as the learning rate does.
"""
from __future__ import annotations

import torch


class Lookahead:
    def __init__(self, model: torch.nn.Module, total_steps: int, every_steps: int = 5,
                 decay: float = 0.95 ** 5, exponent: float = 3.0):
        self.total_steps, self.every_steps = total_steps, every_steps
        self.decay, self.exponent = decay, exponent
        self.live = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}  # share storage
        self.slow = {k: v.detach().clone() for k, v in self.live.items()}

    def decay_at(self, step: int) -> float:
        return self.decay * (step / self.total_steps) ** self.exponent

    @torch.no_grad()
    def pull(self, decay: float) -> None:
        """slow <- decay * slow + (1 - decay) * live, then live <- slow."""
        for name, slow in self.slow.items():
            slow.lerp_(self.live[name], 1.0 - decay)
            self.live[name].copy_(slow)

    def step(self, step: int) -> None:
        """After loader batch `step` (1-based, counted over the whole run)."""
        if step % self.every_steps == 0:
            self.pull(self.decay_at(min(step, self.total_steps)))

    def finish(self) -> None:
        """End of training: the live weights become the slow copy."""
        self.pull(1.0)

    def state_dict(self) -> dict:
        return {"slow": self.slow}

    def load_state_dict(self, state: dict) -> None:
        for name, slow in self.slow.items():
            slow.copy_(state["slow"][name])
