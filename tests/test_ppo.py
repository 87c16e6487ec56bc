import copy
import glob
import io
import json
import os
import warnings
import zipfile

import numpy as np
import pytest
import torch as th
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback, CheckpointCallback
from stable_baselines3.common.vec_env import DummyVecEnv
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sb3_rlhf import RLHFPPO, TokenGenerationEnv, TransformerActorCriticPolicy
from sb3_rlhf.common.callbacks import RolloutHistoryCallback
from sb3_rlhf.rewards import KLPenaltyWrapper, RewardFunctionWrapper, RewardModelWrapper
from tests.helpers import make_model, make_prompts, rule_env, share_of_good, tiny_reward_model


def test_learning_raises_the_rule_reward_with_finite_kl(tokenizer, model_path):
    """reward = share of the word "good" in the completion: PPO must raise it clearly within a short run."""
    model = make_model(rule_env(tokenizer), model_path)
    history = RolloutHistoryCallback()
    model.learn(total_timesteps=4_000, callback=history)
    scores = [row["scores"] for row in history.history]
    kls = [row["kl"] for row in history.history]
    assert len(scores) >= 15
    first, last = np.mean(scores[:2]), np.mean(scores[-3:])
    assert first < 0.2, scores
    assert last > first + 0.5, scores
    assert all(np.isfinite(kls)) and max(kls) < 50
    assert history.history[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # the reference is the initial policy


def test_seeded_runs_repeat_exactly(tokenizer, model_path):
    runs = []
    for _ in range(2):
        model = make_model(rule_env(tokenizer), model_path)
        history = RolloutHistoryCallback()
        model.learn(total_timesteps=300, callback=history)
        runs.append((model, history.history))
    (model_a, hist_a), (model_b, hist_b) = runs
    assert hist_a == hist_b
    for (name, a), (_, b) in zip(model_a.policy.state_dict().items(), model_b.policy.state_dict().items()):
        assert th.equal(a, b), name
    different = make_model(rule_env(tokenizer), model_path, seed=1)
    history = RolloutHistoryCallback()
    different.learn(total_timesteps=300, callback=history)
    assert history.history != hist_a


def test_save_load_round_trip(tokenizer, model_path, tmp_path):
    env = rule_env(tokenizer)
    model = make_model(env, model_path)
    model.learn(total_timesteps=600)
    model.save(tmp_path / "ppo_lm.zip")

    # reference and reward models stay out of the zip: only the policy's own modules, models named by path
    with zipfile.ZipFile(tmp_path / "ppo_lm.zip") as archive:
        state = th.load(io.BytesIO(archive.read("policy.pth")), weights_only=True)
        data = json.loads(archive.read("data"))
    assert set(state) == set(model.policy.state_dict())
    assert {key.split(".")[0] for key in state} == {"actor", "value_head"}
    assert data["policy_kwargs"] == {"model_name_or_path": model_path}

    loaded = RLHFPPO.load(tmp_path / "ppo_lm.zip", env=env)
    for name, tensor in model.policy.state_dict().items():
        assert th.equal(tensor, loaded.policy.state_dict()[name]), name
    gen_env = env.unwrapped
    prompt_ids, prompt_mask = (th.as_tensor(a) for a in gen_env.prompt_batch(range(10)))
    outputs = []
    for m in (model, loaded):
        th.manual_seed(123)
        generated = m.rollout_engine.generate(
            m.policy, prompt_ids, prompt_mask, 6, gen_env.stop_token_ids, gen_env.pad_token_id
        )
        outputs.append(generated.responses)
    assert th.equal(outputs[0], outputs[1])
    obs, _ = gen_env.reset(seed=0)
    assert model.predict(obs, deterministic=True)[0] == loaded.predict(obs, deterministic=True)[0]
    # the KL reference after loading is still the initial model, not the trained one
    kl_wrapper = loaded.reward_wrappers[0]
    assert isinstance(kl_wrapper, KLPenaltyWrapper)
    initial = AutoCausal(model_path).state_dict()
    for name, tensor in kl_wrapper.ref_model.state_dict().items():
        assert th.equal(tensor, initial[name]), name
    loaded.learn(total_timesteps=200, reset_num_timesteps=False)
    assert loaded.num_timesteps > model.num_timesteps


def AutoCausal(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


class CountSteps(BaseCallback):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.episode_ends = 0
        self.rollouts = 0

    def _on_rollout_end(self) -> None:
        self.rollouts += 1

    def _on_step(self) -> bool:
        self.calls += 1
        assert self.num_timesteps == self.model.num_timesteps
        self.episode_ends += int(self.locals["dones"][0])
        if self.locals["dones"][0]:
            assert "completion" in self.locals["infos"][0]
        return True


def test_adaptive_kl_holds_its_target_and_the_proportional_term_damps_the_overshoot(tokenizer, model_path):
    """Issue 15: the measured KL tracks the target on a run long enough to settle. The rule reward pulls the
    policy far from its reference at β = 0.02; the controller must bring the rollouts' KL to the target and hold
    it there. Ziegler's law alone (gain 0) lets the KL run well past the target first; the proportional term
    answers sooner."""

    def rollout_kls(gain: float) -> np.ndarray:
        env = rule_env(tokenizer, kl_coef=0.02, target=2.0, horizon=100, proportional_gain=gain)
        history = RolloutHistoryCallback()
        make_model(env, model_path).learn(total_timesteps=20_000, callback=history)
        return np.array([row["kl"] for row in history.history])

    controlled, ziegler = rollout_kls(1.0), rollout_kls(0.0)
    settled = controlled[-len(controlled) // 3 :]
    assert abs(settled.mean() / 2.0 - 1.0) < 0.25, settled
    overshoot = [kls[np.argmax(kls >= 2.0) :].max() for kls in (controlled, ziegler)]
    assert overshoot[1] > 2 * 2.0 and overshoot[0] < 0.75 * overshoot[1], overshoot


def test_callbacks_progress_bar_and_schedule(tokenizer, model_path, tmp_path, monkeypatch):
    monkeypatch.setattr("sb3_rlhf.common.on_policy_algorithm.stdout_is_terminal", lambda: True)  # SB3's rich bar
    model = make_model(rule_env(tokenizer), model_path, learning_rate=lambda progress: 1e-3 * progress)
    counter = CountSteps()
    checkpoints = CheckpointCallback(save_freq=150, save_path=str(tmp_path / "ckpt"), name_prefix="lm")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of SB3's bar (tqdm.rich's "experimental" warning) reaches the user
        model.learn(total_timesteps=400, callback=[counter, checkpoints], progress_bar=True)
    assert counter.calls == model.num_timesteps >= 400
    assert counter.episode_ends == 32 * counter.rollouts > 0
    assert len(glob.glob(str(tmp_path / "ckpt" / "lm_*_steps.zip"))) >= 2
    # the schedule ran down to 0 (a rollout overshoots total_timesteps; the rate never goes negative)
    assert model.policy.optimizer.param_groups[0]["lr"] == 0.0
    model.learn(total_timesteps=1_000, reset_num_timesteps=True)
    lr = model.policy.optimizer.param_groups[0]["lr"]
    assert 0 <= lr < 1e-3
    assert lr == pytest.approx(1e-3 * model._current_progress_remaining)


def test_callback_can_stop_training(tokenizer, model_path):
    class StopAt(BaseCallback):
        def _on_step(self) -> bool:
            return self.num_timesteps < 50

    model = make_model(rule_env(tokenizer), model_path)
    model.learn(total_timesteps=10_000, callback=StopAt())
    assert model.num_timesteps == 50


def test_tensorboard_has_sb3_and_rlhf_keys_and_samples(tokenizer, model_path, tmp_path):
    model = make_model(rule_env(tokenizer, target=1.0, horizon=1000), model_path, tensorboard_log=str(tmp_path / "tb"))
    model.learn(total_timesteps=700)
    events = glob.glob(str(tmp_path / "tb" / "RLHFPPO_1" / "events.*"))
    assert len(events) == 1
    accumulator = EventAccumulator(events[0], size_guidance={"tensors": 0, "scalars": 0})
    accumulator.Reload()
    scalars = set(accumulator.Tags()["scalars"])
    expected = {
        "rollout/ep_rew_mean",
        "rollout/ep_len_mean",
        "train/approx_kl",
        "train/clip_fraction",
        "train/entropy_loss",
        "train/value_loss",
        "train/policy_gradient_loss",
        "train/explained_variance",
        "train/learning_rate",
        "time/fps",
        "rlhf/scores",
        "rlhf/kl",
        "rlhf/kl_coef",
        "rlhf/non_score_reward",
        "rlhf/rlhf_reward",
        "rlhf/entropy",
        "rlhf/response_length",
        "rlhf/eos_fraction",
        "rlhf/reward_terms/reward_fn",
        "rlhf/reward_terms/kl_penalty",
    }
    assert expected <= scalars, expected - scalars
    betas = [event.value for event in accumulator.Scalars("rlhf/kl_coef")]
    assert len(set(betas)) > 1  # the adaptive controller moved β
    texts = accumulator.Tensors("rlhf/samples/text_summary")
    table = texts[0].tensor_proto.string_val[0].decode()
    assert "| prompt | completion | score | reward |" in table


def test_generation_in_chunks(tokenizer, model_path):
    model = make_model(rule_env(tokenizer), model_path, n_episodes=24, generation_batch_size=8)
    history = RolloutHistoryCallback()
    model.learn(total_timesteps=150, callback=history)
    assert model.rollout_buffer.prompt_ids.shape[0] == 24
    assert len(model.ep_info_buffer) == 24 * len(history.history)


def test_token_budget_bounds_every_forward_of_the_update(tokenizer, model_path):
    """With ``max_batch_tokens`` no update forward holds more tokens than the budget; a budget that never
    binds leaves the run exactly as without one."""
    runs = {}
    for budget in (None, 10_000, 40):
        model = make_model(rule_env(tokenizer), model_path, n_epochs=2, max_batch_tokens=budget)
        sizes = []
        evaluate = model.policy.evaluate_sequences

        def recording(input_ids, *args, **kwargs):
            if th.is_grad_enabled():  # the update's forwards, not the rollout's
                sizes.append(input_ids.numel())
            return evaluate(input_ids, *args, **kwargs)

        model.policy.evaluate_sequences = recording
        model.learn(total_timesteps=300)
        runs[budget] = (sizes, model.policy.state_dict())
    (unbounded, state), (loose, loose_state), (tight, _) = runs[None], runs[10_000], runs[40]
    assert max(unbounded) > 40 and max(tight) <= 40
    assert len(tight) > len(unbounded)
    assert loose == unbounded
    for name, tensor in state.items():
        assert th.equal(tensor, loose_state[name]), name
    with pytest.raises(ValueError, match="max_batch_tokens must be a positive integer"):
        make_model(rule_env(tokenizer), model_path, max_batch_tokens=0)


def test_reward_model_end_to_end(tokenizer, model_path):
    """The score PPO logs for each rollout is the reward model's own score of that rollout's responses: each
    finished episode's prompt and completion, as the callbacks see them, scored here one text at a time."""
    reward_model = tiny_reward_model(len(tokenizer))
    env = TokenGenerationEnv(make_prompts(), tokenizer, max_prompt_tokens=8, max_new_tokens=6)
    env = KLPenaltyWrapper(RewardModelWrapper(env, reward_model, reward_tokenizer=tokenizer), coef=0.05)
    model = make_model(env, model_path, n_episodes=16)

    class ScoreFinishedEpisodes(RolloutHistoryCallback):
        def __init__(self) -> None:
            super().__init__()
            self.rollouts: list[list[float]] = [[]]

        def _on_step(self) -> bool:
            for info in self.locals["infos"]:
                if "completion" in info:  # the episode ended at this step
                    text = " ".join(part for part in (info["prompt"], info["completion"]) if part)
                    with th.no_grad():
                        logits = reward_model(**tokenizer(text, return_tensors="pt")).logits
                    self.rollouts[-1].append(logits[0, 0].item())
            return True

        def _on_rollout_end(self) -> None:
            super()._on_rollout_end()
            self.rollouts.append([])

    history = ScoreFinishedEpisodes()
    model.learn(total_timesteps=150, callback=history)
    assert len(history.history) >= 2
    for row, scores in zip(history.history, history.rollouts):
        assert len(scores) == 16
        assert row["reward_terms/reward_model"] == pytest.approx(np.mean(scores), abs=1e-5)
        assert row["scores"] == pytest.approx(np.mean(scores), abs=1e-5)  # the KL term is not part of the score
    assert np.std(history.rollouts[0]) > 1e-3  # the responses get different scores: the match is not trivial


def test_target_kl_stops_epochs_early(tokenizer, model_path):
    """One update of 4 epochs over 2 minibatches: with ``target_kl`` the epochs stop at the first minibatch whose
    approximate KL to the rollout policy (recomputed here from the rollout policy's own log-probs) exceeds
    1.5 × target_kl, without a step on it; a KL above target_kl but not above 1.5 × target_kl does not stop them;
    without ``target_kl`` every one of the 8 steps is taken."""

    def one_update(target_kl: float | None) -> tuple[list[tuple[str, float]], float]:
        """The minibatches evaluated (with their recomputed approx KL) and the steps taken, in order; the logged KL."""
        model = make_model(
            rule_env(tokenizer), model_path, learning_rate=0.05, n_epochs=4, n_episodes=16, target_kl=target_kl
        )
        rollout_policy = copy.deepcopy(model.policy).eval()  # the policy of the first (and only) rollout
        events: list[tuple[str, float]] = []
        evaluate, step = model.policy.evaluate_sequences, model.policy.optimizer.step

        def recording_evaluate(input_ids, attention_mask, response_length, *args, **kwargs):
            outputs = evaluate(input_ids, attention_mask, response_length, *args, **kwargs)
            if th.is_grad_enabled():  # a training minibatch (the rollout's own pass runs without gradients)
                with th.no_grad():
                    old = rollout_policy.evaluate_sequences(input_ids, attention_mask, response_length)[0]
                log_ratio = (outputs[0].detach() - old)[attention_mask[:, -response_length:].bool()]
                events.append(("minibatch", ((log_ratio.exp() - 1) - log_ratio).mean().item()))
            return outputs

        def counting_step(*args, **kwargs):
            events.append(("step", 0.0))
            return step(*args, **kwargs)

        model.policy.evaluate_sequences = recording_evaluate
        model.policy.optimizer.step = counting_step
        model.learn(total_timesteps=1)  # one rollout, one update
        return events, model.logger.name_to_value["train/approx_kl"]

    full, _ = one_update(None)
    assert [kind for kind, _ in full] == ["minibatch", "step"] * 4 * 2
    full_kls = [kl for kind, kl in full if kind == "minibatch"]
    assert full_kls[1] > 1e-3
    # the second minibatch's KL lies above target_kl but not above 1.5 × target_kl: the epochs must go on
    target_kl = full_kls[1] / 1.25
    stop = next(i for i, kl in enumerate(full_kls) if kl > 1.5 * target_kl)
    assert 1 < stop < 4 * 2

    events, logged_kl = one_update(target_kl)
    # the same seeded run up to the stop: every minibatch took its step until the first one over 1.5 × target_kl
    assert [kind for kind, _ in events] == ["minibatch", "step"] * stop + ["minibatch"]
    kls = [kl for kind, kl in events if kind == "minibatch"]
    assert kls == pytest.approx(full_kls[: stop + 1], rel=1e-4, abs=1e-6)
    assert kls[-1] > 1.5 * target_kl >= max(kls[:-1])
    # the logged approx KL is the mean over the minibatches evaluated, the stopping one included
    assert logged_kl == pytest.approx(np.mean(kls), rel=1e-3)


def test_stock_sb3_ppo_runs_on_the_env_through_step(tokenizer, model_path):
    """The env and policy are ordinary Gymnasium/SB3 pieces: SB3's own PPO trains them token by token."""
    env = TokenGenerationEnv(make_prompts(), tokenizer, max_prompt_tokens=8, max_new_tokens=4)
    env = RewardFunctionWrapper(env, fn=share_of_good)
    model = PPO(
        TransformerActorCriticPolicy,
        env,
        n_steps=16,
        batch_size=8,
        n_epochs=1,
        policy_kwargs=dict(model_name_or_path=model_path),
    )
    model.learn(total_timesteps=32)
    assert model.num_timesteps == 32


def test_algorithm_errors(tokenizer, model_path, prompts):
    bare = TokenGenerationEnv(prompts, tokenizer, max_prompt_tokens=8, max_new_tokens=4)
    with pytest.raises(ValueError, match="no reward"):
        make_model(bare, model_path)
    vec = DummyVecEnv([lambda: RewardFunctionWrapper(TokenGenerationEnv(prompts, tokenizer), fn=share_of_good)] * 2)
    with pytest.raises(ValueError, match="not a VecEnv"):
        make_model(vec, model_path)
    with pytest.raises(ValueError, match="n_episodes must be a positive integer"):
        make_model(rule_env(tokenizer), model_path, n_episodes=0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_model(rule_env(tokenizer), os.path.join(model_path, "missing"))


def test_cli_demo(tmp_path, capsys):
    from sb3_rlhf.cli import main

    assert main(["demo", "--out", str(tmp_path), "--timesteps", "1500", "--no-progress-bar"]) == 0
    out = capsys.readouterr().out
    assert "mean score" in out and "KL to the reference" in out
    assert (tmp_path / "ppo_tiny.zip").exists()
    assert (tmp_path / "policy" / "model.safetensors").exists()
    assert glob.glob(str(tmp_path / "tensorboard" / "*" / "events.*"))


def test_an_ordinary_sb3_callback_sees_each_tokens_action_and_reward(tokenizer, model_path):
    """SB3's rollout contract: one on_step() per timestep (generated token) with locals["actions"] the token and
    locals["rewards"] its reward (the KL penalty on every token, the score on the last), dones at the last."""

    class Recorder(BaseCallback):
        def __init__(self):
            super().__init__()
            self.steps = []

        def _on_step(self) -> bool:
            locals_ = self.locals
            self.steps.append(
                (
                    int(locals_["actions"][0]),
                    float(locals_["rewards"][0]),
                    bool(locals_["dones"][0]),
                    locals_["infos"][0],
                )
            )
            return True

    model = make_model(rule_env(tokenizer, kl_coef=0.05), model_path, n_episodes=4, batch_size=4)
    recorder = Recorder()
    model.learn(1, callback=recorder)
    buffer = model.rollout_buffer
    episodes, current = [], []
    for step in recorder.steps:
        current.append(step)
        if step[2]:
            episodes.append(current)
            current = []
    assert not current and len(episodes) == 4 and len(recorder.steps) == model.num_timesteps
    for i, steps in enumerate(episodes):
        actions = [a for a, _, _, _ in steps]
        rewards = np.array([r for _, r, _, _ in steps])
        assert actions == buffer.response_ids[i, : len(steps)].tolist()
        np.testing.assert_allclose(rewards, buffer.rewards[i, : len(steps)].numpy(), rtol=0, atol=0)
        assert rewards.sum() == pytest.approx(steps[-1][3]["episode"]["r"], abs=1e-5)
    assert any(steps[-1][1] != 0 for steps in episodes)  # the score, on the last token (not zeros throughout)
