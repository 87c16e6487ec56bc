from sb3_rlhf.ppo.ppo import RLHFPPO

__all__ = ["RLHFPPO"]
