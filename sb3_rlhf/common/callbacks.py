"""Callbacks for RLHF runs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from stable_baselines3.common.callbacks import BaseCallback

from sb3_rlhf.common.evaluation import evaluate_policy
from sb3_rlhf.common.judge import BagOfWordsJudge
from sb3_rlhf.rewards.base import reward_wrappers

if TYPE_CHECKING:
    from sb3_rlhf.common.on_policy_algorithm import RLHFOnPolicyAlgorithm


class RolloutHistoryCallback(BaseCallback):
    """Keeps the ``rlhf/*`` metrics of every rollout (``self.history``, a list of dicts), e.g. to plot or
    compare the first and last rollouts of a run without reading TensorBoard files.

    :param prefix: which logger keys to keep.
    """

    def __init__(self, prefix: str = "rlhf/", verbose: int = 0) -> None:
        super().__init__(verbose)
        self.prefix = prefix
        self.history: list[dict[str, float]] = []

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        values = self.model.logger.name_to_value
        row = {k[len(self.prefix) :]: float(v) for k, v in values.items() if k.startswith(self.prefix)}
        row["timesteps"] = float(self.num_timesteps)
        self.history.append(row)


class HeldOutEvaluationCallback(BaseCallback):
    """Scores the policy on held-out prompts during training: the reward score and the KL to the reference,
    the two axes of the reward-versus-KL trade-off. Evaluates before the first update, every ``eval_freq``
    rollouts after that, and at the end; logs ``eval/score``, ``eval/kl``, ``eval/response_length``,
    ``eval/eos_fraction``, the text quality (``eval/distinct_1``, ``eval/distinct_2``, ``eval/repeated_2gram_rate``,
    ``eval/reference_perplexity``) and with a judge ``eval/judge_positive_share`` (see
    :func:`~sb3_rlhf.common.evaluation.evaluate_policy`), and keeps every evaluation in ``self.history`` with the
    compute spent so far (``timesteps``: generated training tokens, ``episodes``: sampled training responses,
    ``gradient_steps``).

    :param eval_env: a :class:`~sb3_rlhf.TokenGenerationEnv` over the held-out prompts under the task's reward
        wrappers (their sequence-level terms are the score).
    :param eval_freq: evaluate every this many rollouts.
    :param reference: the KL reference (a causal LM); default: the policy as it is when training starts
        (under LoRA, its adapter-disabled base).
    :param seed: sampling seed of every evaluation (the same prompts and draws each time).
    :param samples_per_prompt: responses sampled per held-out prompt (more: less noise).
    :param judge: a second judge of the responses (:class:`~sb3_rlhf.common.judge.BagOfWordsJudge`).
    """

    model: RLHFOnPolicyAlgorithm  # BaseCallback's BaseAlgorithm, narrowed: a TransformerActorCriticPolicy, n_steps

    def __init__(
        self,
        eval_env: Any,
        eval_freq: int = 1,
        reference: Any = None,
        seed: int = 0,
        samples_per_prompt: int = 1,
        judge: BagOfWordsJudge | None = None,
        verbose: int = 0,
    ) -> None:
        super().__init__(verbose)
        if eval_freq < 1:
            raise ValueError(f"eval_freq must be >= 1 rollout, got {eval_freq}")
        self.eval_env = eval_env
        self.eval_freq = eval_freq
        self.reference = reference
        self.seed = seed
        self.samples_per_prompt = samples_per_prompt
        self.judge = judge
        self.history: list[dict[str, float]] = []
        self.gradient_steps = 0
        self._rollouts = 0

    def _init_callback(self) -> None:
        if self.reference is None:
            self.reference = self.model.policy.make_reference_model()
        self._hook = self.model.policy.optimizer.register_step_post_hook(self._count_step)

    def _count_step(self, *args: Any) -> None:
        self.gradient_steps += 1

    def evaluate(self) -> dict[str, float]:
        """Evaluate now, log under ``eval/`` and append to :attr:`history`."""
        was_training = self.model.policy.training
        with self.model.policy.parallel.whole_weights():  # a sharded run's weights, gathered once
            metrics, _, _ = evaluate_policy(
                self.model.policy,
                self.reference,
                self.eval_env.unwrapped,
                reward_wrappers(self.eval_env),
                self.seed,
                samples_per_prompt=self.samples_per_prompt,
                judge=self.judge,
                engine=getattr(self.model, "rollout_engine", None),  # the training run's own (cache, compiled shape)
            )
        self.model.policy.set_training_mode(was_training)
        for key, value in metrics.items():
            self.logger.record(f"eval/{key}", value)
        row = {
            **metrics,
            "timesteps": float(self.num_timesteps),
            "episodes": float(self._rollouts * self.model.n_steps),
            "gradient_steps": float(self.gradient_steps),
        }
        self.history.append(row)
        return row

    def _on_rollout_start(self) -> None:
        # a rollout starts after the previous update: this is the policy that update produced
        if self._rollouts % self.eval_freq == 0:
            self.evaluate()
        self._rollouts += 1

    def _on_step(self) -> bool:
        return True

    def _on_training_end(self) -> None:
        self._hook.remove()
        if not self.history or self.history[-1]["gradient_steps"] != self.gradient_steps:
            self.evaluate()
            self.logger.dump(self.num_timesteps)  # SB3 dumped its last logs already: the final point is written
