"""KL coefficient controllers (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences")."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


class FixedKLController:
    """β stays at ``coef``."""

    def __init__(self, coef: float) -> None:
        if coef < 0:
            raise ValueError(f"the KL coefficient must be >= 0, got {coef}")
        self.value = float(coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing to adapt."""

    def state_dict(self) -> dict[str, Any]:
        return {"coef": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["coef"])


class AdaptiveKLController:
    """Control of β towards a target KL: Ziegler et al.'s integral law, with an optional proportional term.

    e_t = KL_t / KL_target − 1
    β^I ← β^I · (1 + K_β · clip(e_t, −0.2, 0.2)),  K_β = n_steps / horizon        (Ziegler et al.)
    β_t = β^I · exp(K_p · clip(e_t, −1, 1))                                       (K_p = 0: Ziegler's β exactly)

    Ziegler's law changes β by at most 0.2·n_steps/horizon per batch. While the policy is still moving towards the
    target its KL is below it, so β^I falls the whole time (integral windup); when the KL then rises past the
    target, β^I needs as many batches again to climb back, and the KL overshoots. That is what the main job saw
    (KL 14–17 nats against a target of 10, β having fallen from 0.2 to 0.12). The proportional term answers the
    error of the batch at hand at once, as in PID Lagrangian control of a constrained RL cost (Stooke et al. 2020,
    "Responsive Safety in Reinforcement Learning by PID Lagrangian Methods"): a KL twice the target multiplies β by
    e^{K_p} in the next batch, and β^I alone keeps the long-run level. While the KL is still near 0 the error is
    −1, so from the second batch on β starts near ``coef``·e^{−K_p} and rises towards β^I as the KL nears the
    target. Each update sees one batch's mean KL: in the per-episode ``step()`` path of
    :class:`~sb3_rlhf.rewards.KLPenaltyWrapper` that is one episode's, so β follows single episodes there; keep
    the gain small (or 0) on that path.

    :param coef: β (and β^I) until the first update.
    :param target: the KL (summed over the response, in nats) to hold.
    :param horizon: how many episodes the integral takes to correct an error (larger is slower).
    :param proportional_gain: K_p; 0 (default) is Ziegler et al.'s controller.
    """

    def __init__(self, coef: float, target: float, horizon: int, proportional_gain: float = 0.0) -> None:
        if coef < 0 or target <= 0 or horizon <= 0 or proportional_gain < 0:
            raise ValueError(
                "need coef >= 0, target > 0, horizon > 0, proportional_gain >= 0; got "
                f"{coef}, {target}, {horizon}, {proportional_gain}"
            )
        self.value = float(coef)
        self.integral = float(coef)
        self.target = float(target)
        self.horizon = int(horizon)
        self.proportional_gain = float(proportional_gain)

    def update(self, current_kl: float, n_steps: int) -> None:
        """:param current_kl: mean KL per episode measured on the last batch; :param n_steps: episodes in it."""
        error = current_kl / self.target - 1.0
        self.integral *= 1.0 + float(np.clip(error, -0.2, 0.2)) * n_steps / self.horizon
        self.value = self.integral * math.exp(self.proportional_gain * float(np.clip(error, -1.0, 1.0)))

    def state_dict(self) -> dict[str, Any]:
        return {"coef": self.value, "integral": self.integral}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["coef"])
        self.integral = float(state.get("integral", state["coef"]))  # checkpoints before the proportional term
