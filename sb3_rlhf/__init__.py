"""sb3_rlhf: RLHF for language models in the Gymnasium + Stable-Baselines3 ecosystem."""

from sb3_rlhf.buffers import SequenceRolloutBuffer
from sb3_rlhf.common.tokenizers import add_pad_token, check_tokenizer
from sb3_rlhf.envs import TokenGenerationEnv
from sb3_rlhf.grpo import GRPO
from sb3_rlhf.nlpo import NLPO
from sb3_rlhf.p3o import P3O
from sb3_rlhf.policies import TransformerActorCriticPolicy
from sb3_rlhf.ppo import RLHFPPO
from sb3_rlhf.rloo import RLOO

__version__ = "0.1.0"

__all__ = [
    "GRPO",
    "NLPO",
    "P3O",
    "RLHFPPO",
    "RLOO",
    "SequenceRolloutBuffer",
    "TokenGenerationEnv",
    "TransformerActorCriticPolicy",
    "add_pad_token",
    "check_tokenizer",
]
