from sb3_rlhf.nlpo.masking import MaskingPolicy
from sb3_rlhf.nlpo.nlpo import NLPO

__all__ = ["NLPO", "MaskingPolicy"]
