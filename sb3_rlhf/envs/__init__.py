"""Gymnasium environments for token generation; importing registers ``sb3_rlhf/TokenGeneration-v0``."""

import gymnasium as gym

from sb3_rlhf.envs.token_generation import TokenGenerationEnv

ENV_ID = "sb3_rlhf/TokenGeneration-v0"

if ENV_ID not in gym.registry:
    gym.register(id=ENV_ID, entry_point="sb3_rlhf.envs.token_generation:TokenGenerationEnv")

__all__ = ["ENV_ID", "TokenGenerationEnv"]
