"""RLOO, GRPO and P3O: they learn, they keep groups whole, they take the KL where they should, they save."""

import numpy as np
import pytest
import torch as th
from stable_baselines3.common.logger import KVWriter, Logger

from sb3_rlhf import TokenGenerationEnv, TransformerActorCriticPolicy
from sb3_rlhf.common.callbacks import RolloutHistoryCallback
from sb3_rlhf.grpo import GRPO
from sb3_rlhf.p3o import P3O
from sb3_rlhf.ppo import RLHFPPO
from sb3_rlhf.rewards import KLPenaltyWrapper, RewardFunctionWrapper
from sb3_rlhf.rloo import RLOO
from tests.helpers import make_prompts, share_of_good

ALGORITHMS = [
    (RLOO, {"samples_per_prompt": 4}, "k1"),
    (GRPO, {"samples_per_prompt": 4}, "k3"),
    (P3O, {"clipping": "separate"}, "k1"),
    (P3O, {"clipping": "joint"}, "k1"),
]


def rule_env(tokenizer, fn=share_of_good, estimator="k1", **kl_kwargs):
    env = TokenGenerationEnv(make_prompts(), tokenizer, max_prompt_tokens=8, max_new_tokens=6)
    return KLPenaltyWrapper(RewardFunctionWrapper(env, fn=fn), coef=0.02, estimator=estimator, **kl_kwargs)


def make(cls, env, model_path, **kwargs):
    settings = dict(learning_rate=1e-3, n_episodes=32, batch_size=8, n_epochs=2, seed=0)
    settings.update(kwargs)
    return cls(TransformerActorCriticPolicy, env, policy_kwargs=dict(model_name_or_path=model_path), **settings)


@pytest.mark.parametrize("cls,kwargs,estimator", ALGORITHMS, ids=["rloo", "grpo", "p3o-separate", "p3o-joint"])
def test_each_algorithm_raises_the_rule_reward(tokenizer, model_path, cls, kwargs, estimator):
    model = make(cls, rule_env(tokenizer, estimator=estimator), model_path, **kwargs)
    history = RolloutHistoryCallback()
    model.learn(total_timesteps=4_000, callback=history)
    scores = [row["scores"] for row in history.history]
    first, last = np.mean(scores[:2]), np.mean(scores[-3:])
    assert first < 0.2, scores
    assert last > first + 0.4, scores
    assert history.history[0]["kl"] == pytest.approx(0.0, abs=1e-4)
    assert all(np.isfinite(row["kl"]) for row in history.history)
    logged = model.logger.name_to_value
    for key in ("train/policy_gradient_loss", "train/approx_kl", "train/clip_fraction", "train/loss"):
        assert np.isfinite(logged[key]), key


def test_rollouts_hold_whole_groups_of_one_prompt(tokenizer, model_path):
    model = make(RLOO, rule_env(tokenizer), model_path, samples_per_prompt=4)
    model.learn(total_timesteps=100)
    buffer = model.rollout_buffer
    prompts = buffer.prompt_ids.view(-1, 4, buffer.prompt_ids.shape[1])
    assert (prompts == prompts[:, :1]).all()  # every group shares its prompt
    assert len({tuple(p[0].tolist()) for p in prompts}) > 1
    # the advantages are the leave-one-out ones of the sequence returns, not whitened (the paper's default)
    assert model.normalize_advantage is False
    returns = buffer.sequence_returns.view(-1, 4)
    loo = returns - (returns.sum(-1, keepdim=True) - returns) / 3
    assert loo.abs().sum() > 0
    assert th.allclose(buffer.sequence_advantages, loo.flatten(), atol=1e-6)
    order = buffer._episode_order()
    assert (order.view(-1, 4) // 4 == (order.view(-1, 4) // 4)[:, :1]).all()  # minibatches keep groups whole


def test_rloo_with_one_step_per_rollout_is_the_reinforce_leave_one_out_step(tokenizer, model_path):
    import copy

    # n_epochs=1 and batch_size=n_episodes: one gradient step per rollout, at the rollout policy (ratio 1)
    lr = 0.05
    model = RLOO(
        TransformerActorCriticPolicy,
        rule_env(tokenizer),
        samples_per_prompt=4,
        n_episodes=8,
        batch_size=8,
        n_epochs=1,
        learning_rate=lr,
        max_grad_norm=1e9,  # no gradient clipping, so the step is −lr·∇L exactly
        seed=0,
        policy_kwargs=dict(model_name_or_path=model_path, optimizer_class=th.optim.SGD),
    )
    start = copy.deepcopy(model.policy)
    model.learn(total_timesteps=1)  # one rollout, one update
    buffer = model.rollout_buffer
    assert model.logger.name_to_value["train/clip_fraction"] == 0.0

    # REINFORCE with the leave-one-out baseline, by hand, at the rollout's parameters:
    #   L = −Σ_i Σ_t A_i · log π(a_it|s_it) / Σ_i |y_i|,   A_i = R_i − 1/(k−1) Σ_{j≠i} R_j
    returns = buffer.sequence_returns.view(-1, 4)
    advantages = (returns - (returns.sum(-1, keepdim=True) - returns) / 3).reshape(-1, 1)
    assert advantages.abs().sum() > 0
    mask = buffer.response_mask
    input_ids = th.cat([buffer.prompt_ids, buffer.response_ids], dim=1)
    attention_mask = th.cat([buffer.prompt_mask, mask.long()], dim=1)
    start.set_training_mode(True)
    logprobs, _, _ = start.evaluate_sequences(input_ids, attention_mask, mask.shape[1], with_entropy=False)
    loss = -(advantages * logprobs * mask).sum() / mask.sum()
    start.optimizer.zero_grad()
    loss.backward()
    moved = 0
    for (name, before), after in zip(start.named_parameters(), model.policy.parameters()):
        expected = before.detach() if before.grad is None else before.detach() - lr * before.grad
        th.testing.assert_close(after.detach(), expected, atol=1e-6, rtol=1e-4, msg=name)
        moved += before.grad is not None and bool(before.grad.abs().sum() > 0)
    assert moved > 0


def test_p3o_advantages_ignore_a_per_prompt_reward_shift_and_ppo_does_not(tokenizer, model_path):
    def shifted(prompts, completions):
        # a different constant for every prompt, as a Bradley–Terry reward model is free to add
        return [s + 3.0 * (len(p) % 5) for s, p in zip(share_of_good(prompts, completions), prompts)]

    def first_rollout(cls, fn, **kwargs):
        model = make(cls, rule_env(tokenizer, fn=fn), model_path, **kwargs)
        model.learn(total_timesteps=1)  # one rollout, then one update
        return model.rollout_buffer

    plain, moved = first_rollout(P3O, share_of_good), first_rollout(P3O, shifted)
    assert th.equal(plain.response_ids, moved.response_ids)  # same seed, same samples
    assert not th.allclose(plain.sequence_returns, moved.sequence_returns)
    assert th.allclose(plain.sequence_advantages, moved.sequence_advantages, atol=1e-5)
    ppo_plain, ppo_moved = first_rollout(RLHFPPO, share_of_good), first_rollout(RLHFPPO, shifted)
    assert not th.allclose(ppo_plain.advantages, ppo_moved.advantages, atol=1e-2)


def test_grpo_puts_the_kl_in_the_loss_not_in_the_reward(tokenizer, model_path):
    env = rule_env(tokenizer, estimator="k3", target=0.05, horizon=320)
    model = make(GRPO, env, model_path, samples_per_prompt=4)
    history = RolloutHistoryCallback()
    model.learn(total_timesteps=1_500, callback=history)
    buffer = model.rollout_buffer
    assert buffer.ref_logprobs is not None
    # the reward holds only the rule score: the KL is not part of the return
    assert th.all(buffer.sequence_returns >= 0) and th.all(buffer.sequence_returns <= 1)
    # the adaptive controller followed the KL measured in every rollout, as for PPO
    coef = 0.02
    for row in history.history:
        coef *= 1 + np.clip(row["kl"] / 0.05 - 1, -0.2, 0.2) * 32 / 320
    assert env.coef == pytest.approx(coef, rel=1e-6) and env.coef != pytest.approx(0.02)
    assert np.isfinite(model.logger.name_to_value["train/kl_loss"])


def test_seeded_group_runs_repeat_and_save_load_round_trip(tokenizer, model_path, tmp_path):
    runs = []
    for _ in range(2):
        model = make(P3O, rule_env(tokenizer), model_path, clipping="joint", weight_clip=3.0)
        history = RolloutHistoryCallback()
        model.learn(total_timesteps=300, callback=history)
        runs.append((model, history.history))
    assert runs[0][1] == runs[1][1]
    model = runs[0][0]
    model.save(tmp_path / "p3o.zip")
    loaded = P3O.load(tmp_path / "p3o.zip", env=rule_env(tokenizer))
    assert (loaded.clipping, loaded.weight_clip, loaded.samples_per_prompt) == ("joint", 3.0, 2)
    for name, tensor in model.policy.state_dict().items():
        assert th.equal(tensor, loaded.policy.state_dict()[name]), name
    loaded.learn(total_timesteps=100, reset_num_timesteps=False)
    assert loaded.num_timesteps > model.num_timesteps


def test_bad_settings_get_clear_errors(tokenizer, model_path):
    env = rule_env(tokenizer)
    for cls in (RLOO, P3O, GRPO):
        with pytest.raises(ValueError, match="samples_per_prompt must be an integer >= 2"):
            make(cls, env, model_path, samples_per_prompt=1)
    with pytest.raises(ValueError, match="must be even"):
        make(P3O, env, model_path, samples_per_prompt=3, n_episodes=30, batch_size=6)
    with pytest.raises(ValueError, match="multiple of samples_per_prompt"):
        make(RLOO, env, model_path, samples_per_prompt=4, n_episodes=30)
    with pytest.raises(ValueError, match="multiple of samples_per_prompt"):
        make(RLOO, env, model_path, samples_per_prompt=4, batch_size=6)
    with pytest.raises(ValueError, match="weight_clip"):
        make(P3O, env, model_path, weight_clip=1.0)
    with pytest.raises(ValueError, match="estimator='k3'"):
        make(GRPO, env, model_path, samples_per_prompt=4)  # the env's KL wrapper uses k1
    for coef in (0.0, -0.1):
        with pytest.raises(ValueError, match="β must be > 0"):
            KLPenaltyWrapper(TokenGenerationEnv(["a"], tokenizer, 4, 2), coef=coef)


def test_held_out_evaluation_tracks_reward_kl_and_compute_without_changing_training(tokenizer, model_path):
    from sb3_rlhf.common.callbacks import HeldOutEvaluationCallback

    def run(with_evaluation: bool):
        model = make(P3O, rule_env(tokenizer), model_path, n_epochs=1)
        history = RolloutHistoryCallback()
        callbacks = [history]
        if with_evaluation:
            eval_env = KLPenaltyWrapper(
                RewardFunctionWrapper(
                    TokenGenerationEnv(make_prompts(6, seed=3), tokenizer, max_prompt_tokens=8, max_new_tokens=6),
                    fn=share_of_good,
                ),
                coef=0.02,
            )
            callbacks.append(HeldOutEvaluationCallback(eval_env, eval_freq=2, samples_per_prompt=3))
        # what the logger writes, as TensorBoard would receive it
        written: list[dict] = []
        writer = type(
            "Recorder", (KVWriter,), {"write": lambda self, values, excluded, step=0: written.append(dict(values))}
        )()
        model.set_logger(Logger(None, [writer]))
        model.learn(total_timesteps=900, callback=callbacks)
        return model, history.history, callbacks[-1], written

    model, plain, _, _ = run(False)
    evaluated_model, evaluated, evaluation, written = run(True)
    assert plain == evaluated  # evaluating does not touch the training RNG
    n_rollouts = len(plain)
    rows = evaluation.history
    assert len(rows) == (n_rollouts + 1) // 2 + 1  # before the first update, every 2nd rollout, at the end
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-5) and rows[0]["gradient_steps"] == 0
    assert rows[-1]["gradient_steps"] == n_rollouts * 32 // 8  # minibatches per rollout × 1 epoch
    assert rows[-1]["episodes"] == n_rollouts * 32 and rows[-1]["timesteps"] == evaluated_model.num_timesteps
    assert rows[-1]["kl"] > 0
    logged = [values["eval/score"] for values in written if "eval/score" in values]
    assert logged == [row["score"] for row in rows]  # every evaluation written, the final one too


@pytest.mark.parametrize("cls,kwargs,estimator", ALGORITHMS, ids=["rloo", "grpo", "p3o-separate", "p3o-joint"])
def test_critic_free_algorithms_compute_no_values(tokenizer, model_path, cls, kwargs, estimator, monkeypatch):
    model = make(cls, rule_env(tokenizer, estimator=estimator), model_path, n_episodes=8, **kwargs)

    def no_values(*args, **kwargs):
        raise AssertionError("a critic-free algorithm computed values")

    monkeypatch.setattr(model.policy, "_values_from_hidden", no_values)
    monkeypatch.setattr(model.policy, "_critic_hidden", no_values)
    model.learn(total_timesteps=60)  # a rollout and an update
    assert model.rollout_buffer.values is None and model._n_updates > 0
    with pytest.raises(ValueError, match="learns no value function"):
        cls(
            TransformerActorCriticPolicy,
            rule_env(tokenizer, estimator=estimator),
            policy_kwargs=dict(model_name_or_path=model_path, value_head="separate"),
            **kwargs,
        )
    # PPO does compute them: the patch above is what would catch a critic-free algorithm doing so
    ppo = make(RLHFPPO, rule_env(tokenizer), model_path, n_episodes=8)
    monkeypatch.setattr(ppo.policy, "_values_from_hidden", no_values)
    with pytest.raises(AssertionError, match="computed values"):
        ppo.learn(total_timesteps=60)
