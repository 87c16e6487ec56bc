"""KL coefficient controllers (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences")."""

from __future__ import annotations

import numpy as np


class FixedKLController:
    """β stays at ``coef``."""

    def __init__(self, coef: float) -> None:
        if coef < 0:
            raise ValueError(f"the KL coefficient must be >= 0, got {coef}")
        self.value = float(coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing to adapt."""


class AdaptiveKLController:
    """Proportional control of β towards a target KL.

    e_t = clip(KL_t / KL_target − 1, −0.2, 0.2);  β ← β · (1 + K_β · e_t),  K_β = n_steps / horizon.

    :param coef: initial β.
    :param target: the KL (summed over the response, in nats) to hold.
    :param horizon: how many episodes the controller takes to correct an error (larger is slower).
    """

    def __init__(self, coef: float, target: float, horizon: int) -> None:
        if coef < 0 or target <= 0 or horizon <= 0:
            raise ValueError(f"need coef >= 0, target > 0, horizon > 0; got {coef}, {target}, {horizon}")
        self.value = float(coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """:param current_kl: mean KL per episode measured on the last batch; :param n_steps: episodes in it."""
        proportional_error = float(np.clip(current_kl / self.target - 1.0, -0.2, 0.2))
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
