"""sb3_rlhf: RLHF for language models in the Gymnasium + Stable-Baselines3 ecosystem."""

from sb3_rlhf.buffers import SequenceRolloutBuffer
from sb3_rlhf.common.tokenizers import add_pad_token, check_tokenizer
from sb3_rlhf.envs import TokenGenerationEnv
from sb3_rlhf.policies import TransformerActorCriticPolicy
from sb3_rlhf.ppo import RLHFPPO

__version__ = "0.1.0"

__all__ = [
    "RLHFPPO",
    "SequenceRolloutBuffer",
    "TokenGenerationEnv",
    "TransformerActorCriticPolicy",
    "add_pad_token",
    "check_tokenizer",
]
