"""MaskableTransformerActorCriticPolicy: the transformer actor-critic in sb3-contrib's masking protocol."""

from __future__ import annotations

import numpy as np
import torch as th
from sb3_contrib.common.maskable.distributions import MaskableCategoricalDistribution
from sb3_contrib.common.maskable.policies import MaskableActorCriticPolicy
from stable_baselines3.common.type_aliases import PyTorchObs

from sb3_rlhf.policies import TransformerActorCriticPolicy


class MaskableTransformerActorCriticPolicy(TransformerActorCriticPolicy, MaskableActorCriticPolicy):
    """:class:`~sb3_rlhf.TransformerActorCriticPolicy` for ``sb3_contrib.MaskablePPO``: the same actor, value head
    and settings, its next-token distribution a ``MaskableCategoricalDistribution`` to which the env's action
    masks (``TokenGenerationEnv.action_masks()``) are applied: masked tokens get probability zero in sampling,
    in the log-probs of the update and in the entropy.

        from sb3_contrib import MaskablePPO
        model = MaskablePPO(MaskableTransformerActorCriticPolicy, env, policy_kwargs=dict(model_name_or_path=path))

    Parameters: those of :class:`~sb3_rlhf.TransformerActorCriticPolicy`.
    """

    def _masked_outputs(
        self,
        obs: PyTorchObs,
        action_masks: np.ndarray | th.Tensor | None,
        with_values: bool,
        actions: th.Tensor | None = None,
    ) -> tuple[MaskableCategoricalDistribution, th.Tensor | None]:
        # the mask applies before top-k/top-p, as in generate(): the nucleus is taken among the allowed tokens
        allowed = None
        if action_masks is not None:
            allowed = th.as_tensor(action_masks, dtype=th.bool, device=self.device).reshape(-1, self.n_actions)
        logits, values = self._step_outputs(obs, with_values=with_values, actions=actions, allowed=allowed)
        return self._masked_distribution(logits), values

    @staticmethod
    def _masked_distribution(logits: th.Tensor) -> MaskableCategoricalDistribution:
        # the -inf logits (masked, or outside top-k/top-p) become sb3-contrib's mask: MaskableCategorical's entropy
        # multiplies logits by probabilities, which is NaN at -inf, and is zero at masked entries
        finite = th.isfinite(logits)
        distribution = MaskableCategoricalDistribution(logits.shape[-1])
        distribution.proba_distribution(action_logits=logits.masked_fill(~finite, 0.0))
        if not bool(finite.all()):
            distribution.apply_masking(finite)
        return distribution

    def forward(  # type: ignore[override]
        self, obs: PyTorchObs, deterministic: bool = False, action_masks: np.ndarray | None = None
    ) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        """:return: ``actions (batch,)``, ``values (batch, 1)``, ``log_prob (batch,)`` under the masked distribution."""
        distribution, values = self._masked_outputs(obs, action_masks, with_values=True)
        assert values is not None
        actions = distribution.get_actions(deterministic=deterministic)
        return actions, values.unsqueeze(-1), distribution.log_prob(actions)

    def get_distribution(  # type: ignore[override]
        self, obs: PyTorchObs, action_masks: np.ndarray | None = None
    ) -> MaskableCategoricalDistribution:
        return self._masked_outputs(obs, action_masks, with_values=False)[0]

    def _predict(  # type: ignore[override]
        self, observation: PyTorchObs, deterministic: bool = False, action_masks: np.ndarray | None = None
    ) -> th.Tensor:
        return self.get_distribution(observation, action_masks).get_actions(deterministic=deterministic)

    def evaluate_actions(  # type: ignore[override]
        self, obs: PyTorchObs, actions: th.Tensor, action_masks: th.Tensor | None = None
    ) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        """The masked distribution's values, log-probs and entropies, for MaskablePPO's update.

        :return: ``values (batch, 1)``, ``log_prob (batch,)``, ``entropy (batch,)``."""
        actions = actions.reshape(-1).long()
        distribution, values = self._masked_outputs(obs, action_masks, with_values=True, actions=actions)
        assert values is not None
        return values.unsqueeze(-1), distribution.log_prob(actions), distribution.entropy()
