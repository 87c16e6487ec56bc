"""Numerical faults: non-finite rewards, losses and gradients are skipped and counted, and a run that keeps
producing them stops with an error that says what went wrong and where."""

import numpy as np
import pytest
import torch as th

from sb3_rlhf import GRPO, TokenGenerationEnv
from sb3_rlhf.rewards import KLPenaltyWrapper, NonFiniteRewardError, RewardFunctionWrapper, RewardModelWrapper
from tests.helpers import make_model, make_prompts, share_of_good, tiny_reward_model


class FlakyReward:
    """share_of_good, but NaN for the episodes of the calls listed in ``bad_calls``."""

    def __init__(self, bad_calls):
        self.bad_calls = set(bad_calls)
        self.calls = 0

    def __call__(self, prompts, completions):
        self.calls += 1
        scores = share_of_good(prompts, completions)
        return [float("nan")] * len(scores) if self.calls in self.bad_calls else scores


def flaky_env(tokenizer, fn):
    env = TokenGenerationEnv(make_prompts(), tokenizer, max_prompt_tokens=8, max_new_tokens=6)
    return KLPenaltyWrapper(RewardFunctionWrapper(env, fn=fn), coef=0.02)


def weights(model):
    return [p.detach().clone() for p in model.policy.parameters()]


def test_a_rollout_with_a_nan_reward_is_skipped_counted_and_the_run_goes_on(tokenizer, model_path):
    fn = FlakyReward(bad_calls={2})
    model = make_model(flaky_env(tokenizer, fn), model_path, n_episodes=16)
    model.learn(16 * 6 * 3)
    assert model.n_skipped_updates == 1
    assert model.logger.name_to_value["train/skipped_updates"] == 1
    assert model._skips_in_a_row == 0  # the next good update reset the streak
    # the dropped rollout counts no timesteps: every counted token was trained on
    assert model.num_timesteps == sum(info["l"] for info in model.ep_info_buffer)


def test_nan_rewards_in_a_row_stop_the_run_naming_the_function(tokenizer, model_path):
    fn = FlakyReward(bad_calls=range(2, 100))
    model = make_model(flaky_env(tokenizer, fn), model_path, n_episodes=16, max_consecutive_skips=2)
    with pytest.raises(FloatingPointError, match=r"3 updates in a row .*reward_fn \(reward function .*FlakyReward"):
        model.learn(10_000)
    assert fn.calls == 4  # one good rollout, then three bad ones
    strict = make_model(flaky_env(tokenizer, FlakyReward(bad_calls={1})), model_path, max_consecutive_skips=0)
    with pytest.raises(FloatingPointError, match="1 updates in a row"):
        strict.learn(10_000)


def test_a_reward_model_that_returns_nan_names_itself(tokenizer, model_path, tmp_path):
    reward_model = tiny_reward_model(len(tokenizer))
    with th.no_grad():
        reward_model.classifier.bias.fill_(float("nan"))
    reward_model.save_pretrained(tmp_path / "broken_rm")
    env = TokenGenerationEnv(make_prompts(), tokenizer, max_prompt_tokens=8, max_new_tokens=6)
    env = RewardModelWrapper(env, str(tmp_path / "broken_rm"), reward_tokenizer=tokenizer)
    model = make_model(env, model_path, n_episodes=8, batch_size=8, max_consecutive_skips=0)
    with pytest.raises(FloatingPointError, match=r"reward_model \(reward model .*broken_rm\) returned a non-finite"):
        model.learn(1000)
    with pytest.raises(NonFiniteRewardError, match="broken_rm"):  # the env's own step() path says the same
        env.reset(seed=0)
        for _ in range(6):
            env.step(5)


def test_a_nan_loss_skips_the_step_and_leaves_weights_and_optimizer_untouched(tokenizer, model_path):
    model = make_model(flaky_env(tokenizer, share_of_good), model_path, n_episodes=16, batch_size=8, n_epochs=1)
    evaluate = model.policy.evaluate_sequences
    poisoned = {"on": False}

    def evaluate_with_nan(*args, **kwargs):
        logprobs, values, entropy = evaluate(*args, **kwargs)
        return (
            (logprobs * float("nan"), values, entropy)
            if poisoned["on"] and th.is_grad_enabled()
            else (logprobs, values, entropy)
        )

    model.policy.evaluate_sequences = evaluate_with_nan
    model.learn(1)  # one rollout, one healthy update: the optimizer has state
    before, state_before = (
        weights(model),
        {k: v.clone() for k, v in model.policy.optimizer.state_dict()["state"][0].items()},
    )
    poisoned["on"] = True
    model.learn(1, reset_num_timesteps=False)  # one rollout, poisoned
    assert model.n_skipped_updates == 2  # both minibatches of the update
    assert all(th.equal(a, b) for a, b in zip(before, weights(model)))
    state_after = model.policy.optimizer.state_dict()["state"][0]
    assert all(th.equal(state_before[k], state_after[k]) for k in state_before)
    assert np.isnan(model.logger.name_to_value["train/policy_gradient_loss"])  # nothing trained this update


def test_an_infinite_gradient_is_skipped_and_stops_the_run_when_it_persists(tokenizer, model_path):
    model = make_model(flaky_env(tokenizer, share_of_good), model_path, n_episodes=16, batch_size=8, n_epochs=1,
                       max_consecutive_skips=3)  # fmt: skip
    before = weights(model)
    # the loss stays finite; only the gradient of one weight blows up in the backward pass
    model.policy.value_head.weight.register_hook(lambda grad: grad * float("inf"))
    with pytest.raises(FloatingPointError, match="4 updates in a row.*gradient norm is (inf|nan)"):
        model.learn(10_000)
    assert model.n_skipped_updates == 4
    assert all(th.equal(a, b) for a, b in zip(before, weights(model)))


def test_group_algorithms_skip_the_same_way(tokenizer, model_path):
    env = TokenGenerationEnv(make_prompts(), tokenizer, max_prompt_tokens=8, max_new_tokens=6)
    env = KLPenaltyWrapper(RewardFunctionWrapper(env, fn=FlakyReward(bad_calls={1})), coef=0.02, estimator="k3")
    model = GRPO("TransformerActorCriticPolicy", env, n_episodes=16, samples_per_prompt=4, batch_size=8, seed=0,
                 policy_kwargs=dict(model_name_or_path=model_path))  # fmt: skip
    model.learn(16 * 6 * 2)
    assert model.n_skipped_updates == 1 and model.num_timesteps > 0
    with pytest.raises(ValueError, match="max_consecutive_skips must be an integer >= 0"):
        make_model(flaky_env(tokenizer, share_of_good), model_path, max_consecutive_skips=-1)
