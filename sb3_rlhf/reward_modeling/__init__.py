"""Reward modelling: a scalar reward model on a pretrained backbone, trained on human comparisons."""

from sb3_rlhf.reward_modeling.model import RewardModel, load_reward_model
from sb3_rlhf.reward_modeling.trainer import RewardModelTrainer, bradley_terry_loss

__all__ = ["RewardModel", "RewardModelTrainer", "bradley_terry_loss", "load_reward_model"]
