"""A PI controller that moves a gate's threshold so its activation rate tracks a target."""
from __future__ import annotations


class PIController:
    """Threshold = feed-forward + kp * error + ki * integral(error).

    The error is the EMA-smoothed achieved rate minus the target: too many samples
    selected raises the threshold. Anti-windup by conditional integration: while the
    threshold sits at a bound, the integral stops growing in the direction that pushes
    it further out, so it recovers at once when the score distribution comes back.
    """

    def __init__(self, target: float, kp: float = 1.0, ki: float = 0.1, ema: float = 0.2,
                 init_threshold: float = 0.0, min_threshold: float = -6.0, max_threshold: float = 6.0):
        if not 0.0 < target <= 1.0:
            raise ValueError(f"target rate must be in (0, 1], got {target}")
        self.target, self.kp, self.ki, self.ema = target, kp, ki, ema
        self.init_threshold = init_threshold
        self.min_threshold, self.max_threshold = min_threshold, max_threshold
        self.rate_ema = target
        self.integral = 0.0
        self.threshold = self.clamp(init_threshold)

    def clamp(self, threshold: float) -> float:
        return min(max(threshold, self.min_threshold), self.max_threshold)

    def update(self, achieved_rate: float) -> float:
        """Feed one batch's achieved rate; returns the threshold for the next batch."""
        self.rate_ema += self.ema * (achieved_rate - self.rate_ema)
        error = self.rate_ema - self.target
        integral = self.integral + error
        raw = self.init_threshold + self.kp * error + self.ki * integral
        clamped = self.clamp(raw)
        if raw == clamped:
            self.integral = integral  # integrate only while unsaturated
        self.threshold = clamped
        return self.threshold

    def state_dict(self) -> dict:
        return {"rate_ema": self.rate_ema, "integral": self.integral, "threshold": self.threshold}

    def load_state_dict(self, state: dict) -> None:
        self.rate_ema, self.integral = float(state["rate_ema"]), float(state["integral"])
        self.threshold = float(state["threshold"])

