"""sb3-contrib's action masking for token generation: a maskable transformer policy for ``MaskablePPO``."""

from sb3_rlhf.maskable.policies import MaskableTransformerActorCriticPolicy

__all__ = ["MaskableTransformerActorCriticPolicy"]
