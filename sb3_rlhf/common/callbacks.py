"""Callbacks for RLHF runs."""

from __future__ import annotations

from stable_baselines3.common.callbacks import BaseCallback


class RolloutHistoryCallback(BaseCallback):
    """Keeps the ``rlhf/*`` metrics of every rollout (``self.history``, a list of dicts), e.g. to plot or
    compare the first and last rollouts of a run without reading TensorBoard files.

    :param prefix: which logger keys to keep.
    """

    def __init__(self, prefix: str = "rlhf/", verbose: int = 0) -> None:
        super().__init__(verbose)
        self.prefix = prefix
        self.history: list[dict[str, float]] = []

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        values = self.model.logger.name_to_value
        row = {k[len(self.prefix) :]: float(v) for k, v in values.items() if k.startswith(self.prefix)}
        row["timesteps"] = float(self.num_timesteps)
        self.history.append(row)
