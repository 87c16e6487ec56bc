"""RewardModelWrapper: a learned scalar reward model scores each finished response."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import torch as th
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from sb3_rlhf.common.generation import GenerationBatch
from sb3_rlhf.common.models import freeze
from sb3_rlhf.common.tokenizers import encode_keep_end, pad_right
from sb3_rlhf.reward_modeling.model import load_reward_model
from sb3_rlhf.rewards.base import SequenceRewardWrapper

if TYPE_CHECKING:
    from sb3_rlhf.policies import TransformerActorCriticPolicy


class RewardModelWrapper(SequenceRewardWrapper):
    """Score ``prompt + completion`` with a frozen model that outputs one scalar (e.g.
    ``AutoModelForSequenceClassification`` with ``num_labels=1``); the score lands on the last real token.

    Two ways to feed it:

    * ``reward_tokenizer`` given (or found beside a model path): each episode decoded as one text (prompt
      and response) is re-tokenized with the reward model's own tokenizer, cut from the left to ``max_length``
      (as the reward-model trainer does: the answer at the end is what is judged).
    * ``reward_tokenizer=None`` with a model object: the reward model shares the policy's vocabulary and reads
      the policy's token ids directly (no decode/re-encode).

    :param env: the environment to wrap.
    :param reward_model: a model (``PreTrainedModel`` with one label, or a
        :class:`~sb3_rlhf.reward_modeling.RewardModel`) or the local folder of one; frozen, never trained.
    :param reward_tokenizer: its tokenizer (object or folder); ``None`` shares the policy's token ids.
    :param max_length: longest reward-model input in tokens (text path).
    :param batch_size: episodes scored per forward pass.
    :param device: where the reward model runs. ``None`` (default): where it already is, which must be the
        policy's device (checked when the algorithm binds). Given: the model is moved there and inputs follow.
    :param name: key of the term in ``info["reward_terms"]`` and the logs.
    """

    def __init__(
        self,
        env: gym.Env,
        reward_model: PreTrainedModel | str,
        reward_tokenizer: PreTrainedTokenizerBase | str | None = None,
        max_length: int = 512,
        batch_size: int = 32,
        device: th.device | str | None = None,
        name: str = "reward_model",
    ) -> None:
        super().__init__(env, name)
        path = None
        if isinstance(reward_model, (str, os.PathLike)):
            if not os.path.isdir(reward_model):
                raise FileNotFoundError(
                    f"reward model path {str(reward_model)!r} does not exist: pass a local folder written by save_pretrained()"
                )
            path = reward_model
            reward_model = load_reward_model(path)
            if reward_tokenizer is None and os.path.exists(os.path.join(path, "tokenizer_config.json")):
                reward_tokenizer = path
        if not isinstance(reward_model, th.nn.Module):
            raise TypeError(f"reward_model must be a transformers model or a path, got {type(reward_model).__name__}")
        if isinstance(reward_tokenizer, (str, os.PathLike)):
            reward_tokenizer = AutoTokenizer.from_pretrained(reward_tokenizer, local_files_only=True)
        num_labels = reward_model.config.num_labels if isinstance(reward_model, PreTrainedModel) else 1
        if num_labels != 1:
            raise ValueError(f"the reward model must output one score (num_labels=1), it has num_labels={num_labels}")
        self.source = (
            f"reward model {path}"
            if isinstance(path, (str, os.PathLike))
            else f"reward model {type(reward_model).__name__}"
        )
        self.reward_model = freeze(reward_model)
        self.reward_tokenizer = reward_tokenizer
        if reward_tokenizer is not None and reward_tokenizer.pad_token is None:
            raise ValueError("the reward tokenizer has no pad token: set reward_tokenizer.pad_token before wrapping")
        if reward_tokenizer is not None and getattr(self.reward_model.config, "pad_token_id", None) is None:
            # Decoder reward models find the last token through pad_token_id.
            self.reward_model.config.pad_token_id = reward_tokenizer.pad_token_id
        if reward_tokenizer is None:
            vocab = self.reward_model.get_input_embeddings().num_embeddings
            if vocab < self.generation_env.n_actions:
                raise ValueError(
                    f"the reward model's vocabulary ({vocab}) is smaller than the policy tokenizer's "
                    f"({self.generation_env.n_actions}): pass reward_tokenizer= to score decoded text instead"
                )
            if getattr(self.reward_model.config, "pad_token_id", None) is None:
                self.reward_model.config.pad_token_id = self.generation_env.pad_token_id
        self.max_length = int(max_length)
        self.batch_size = int(batch_size)
        self.explicit_device = device is not None
        if device is not None:
            self.reward_model.to(device)

    @property
    def device(self) -> th.device:
        return next(self.reward_model.parameters()).device

    def bind(self, policy: TransformerActorCriticPolicy) -> None:
        if not self.explicit_device and self.device != policy.device:
            raise ValueError(
                f"the reward model is on {self.device} but the policy runs on {policy.device}: move it with "
                f"reward_model.to('{policy.device}') or pass device='{self.device}' to RewardModelWrapper to keep it there"
            )

    def _model_inputs(self, batch: GenerationBatch) -> dict[str, Any]:
        if self.reward_tokenizer is None:
            # Same vocabulary: read the policy's ids, right-padded (encoders read the first token, decoders the last).
            input_ids, attention_mask = batch.right_padded()
            return {"input_ids": input_ids, "attention_mask": attention_mask}
        rows = encode_keep_end(self.reward_tokenizer, batch.texts, self.max_length)
        input_ids, attention_mask = pad_right(rows, self.reward_tokenizer.pad_token_id)
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    @th.no_grad()
    def score(self, batch: GenerationBatch) -> th.Tensor:
        inputs = self._model_inputs(batch)
        scores = []
        for start in range(0, batch.batch_size, self.batch_size):
            chunk = {k: v[start : start + self.batch_size].to(self.device) for k, v in inputs.items()}
            logits = self.reward_model(**chunk).logits
            scores.append(logits.reshape(logits.shape[0], -1)[:, 0].float())
        return th.cat(scores).to(batch.device)
