"""Reward wrappers: stack them on a TokenGenerationEnv; their terms add up."""

from sb3_rlhf.rewards.base import NonFiniteRewardError, RewardWrapper, SequenceRewardWrapper, reward_wrappers
from sb3_rlhf.rewards.function import RewardFunctionWrapper
from sb3_rlhf.rewards.kl import KLPenaltyWrapper, kl_estimate
from sb3_rlhf.rewards.reward_model import RewardModelWrapper

__all__ = [
    "KLPenaltyWrapper",
    "NonFiniteRewardError",
    "RewardFunctionWrapper",
    "RewardModelWrapper",
    "RewardWrapper",
    "SequenceRewardWrapper",
    "kl_estimate",
    "reward_wrappers",
]
