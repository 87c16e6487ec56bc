"""Supervised fine-tuning on demonstrations: the first stage of RLHF."""

from sb3_rlhf.sft.trainer import SFTTrainer

__all__ = ["SFTTrainer"]
