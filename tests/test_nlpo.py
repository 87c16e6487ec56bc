"""NLPO: PPO on the nucleus of a synchronised masking policy, on the batched fast path."""

import numpy as np
import pytest
import torch as th
from stable_baselines3.common.callbacks import BaseCallback

from sb3_rlhf import NLPO, TokenGenerationEnv, TransformerActorCriticPolicy
from sb3_rlhf.common.callbacks import RolloutHistoryCallback
from sb3_rlhf.common.rollout_engine import RolloutEngine
from sb3_rlhf.common.sequences import response_mask_until_stop, unpack_bool
from sb3_rlhf.envs.masks import TopPMask, WordVocabulary
from sb3_rlhf.rewards import KLPenaltyWrapper, RewardFunctionWrapper
from tests.helpers import make_prompts, rule_env, share_of_good


def make_nlpo(env, model_path, **kwargs) -> NLPO:
    settings = dict(learning_rate=1e-3, n_episodes=32, batch_size=8, n_epochs=4, seed=0, mask_update_freq=2)
    settings.update(kwargs)
    policy_kwargs = settings.pop("policy_kwargs", {})
    return NLPO(
        TransformerActorCriticPolicy, env, policy_kwargs={"model_name_or_path": model_path, **policy_kwargs}, **settings
    )


def trained_parameters_equal(model: NLPO) -> bool:
    return all(th.equal(theirs, mine) for theirs, mine in model.masking_policy._trained().values())


class MaskSync(BaseCallback):
    """At each rollout's end (before its update): whether the masking copy equals the policy, and the update count."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[bool, int]] = []

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        self.rows.append((trained_parameters_equal(self.model), self.model.n_mask_updates))


def test_nlpo_learns_the_rule_reward_on_its_masked_distribution(tokenizer, model_path):
    model = make_nlpo(rule_env(tokenizer), model_path)
    history = RolloutHistoryCallback()
    model.learn(total_timesteps=4_000, callback=history)
    scores = [row["scores"] for row in history.history]
    first, last = np.mean(scores[:2]), np.mean(scores[-3:])
    assert first < 0.2 and last > first + 0.5, scores
    assert all(np.isfinite(row["kl"]) for row in history.history)
    assert model.n_mask_updates == (len(history.history) - 1) // 2

    # generate()'s scores: -inf on every masked token; the sampled tokens allowed; and the update's teacher-forced
    # log-probs (the masking model's one pass) equal the log-softmax of those scores at the sampled tokens
    policy, env = model.policy, model.generation_env
    prompt_ids, prompt_mask = (th.as_tensor(a) for a in env.prompt_batch(np.arange(16)))
    th.manual_seed(1)
    response, _, scores, _ = model.rollout_engine.generate(
        policy, prompt_ids, prompt_mask, env.max_new_tokens, env.stop_token_ids, env.pad_token_id, output_scores=True
    )
    input_ids = th.cat([prompt_ids, response], 1)
    real, _ = response_mask_until_stop(response, env.stop_token_ids)
    real = real.bool()
    attention_mask = th.cat([prompt_mask, real.long()], 1)
    allowed = policy.action_mask.teacher_forced(input_ids, attention_mask, response.shape[1])
    assert allowed.gather(-1, response[..., None]).squeeze(-1)[real].all()
    assert (scores[real] == -float("inf")).eq(~allowed[real]).all()  # exactly the masked tokens get probability 0
    assert float(allowed[real].sum(-1).float().mean()) < policy.n_actions / 2  # the trained nucleus is narrow
    with th.no_grad():
        logprobs, _, entropy = policy.evaluate_sequences(
            input_ids, attention_mask, response.shape[1], with_values=False
        )
    from_scores = th.log_softmax(scores, -1).gather(-1, response[..., None]).squeeze(-1)
    assert th.allclose(logprobs[real], from_scores[real], atol=1e-5)
    assert (entropy[real] <= th.log(allowed.sum(-1).float())[real] + 1e-5).all()


def test_the_masking_policy_is_synchronised_every_mask_update_freq_rollouts(tokenizer, model_path):
    model = make_nlpo(rule_env(tokenizer), model_path, n_episodes=8, n_epochs=1, mask_update_freq=3)
    sync = MaskSync()
    model.learn(total_timesteps=8 * 6 * 7, callback=sync)
    assert len(sync.rows) >= 7
    for rollout, (equal, updates) in enumerate(sync.rows):
        # rollouts 0-2 use the initial copy, 3-5 the one synced at rollout 3, ...: equal to the policy only where
        # the copy was made at that rollout's start, before any update since
        assert equal == (rollout % 3 == 0), sync.rows
        assert updates == rollout // 3, sync.rows


def test_the_update_uses_the_masks_the_rollout_sampled_under(tokenizer, model_path):
    """The rollout keeps every step's mask as generate() applied it; the update's log-probs are computed under those
    masks, whatever the masking model would say now, and the nucleus is the masking copy's, not the live policy's."""
    model = make_nlpo(rule_env(tokenizer), model_path, n_episodes=8, n_epochs=1, mask_top_p=0.5, mask_update_freq=99)
    model.learn(total_timesteps=8 * 6 * 4)  # several updates, no synchronisation: the policy has left its copy
    policy, env = model.policy, model.generation_env
    mask = policy.action_mask.sources[0]
    assert mask is model.masking_policy.mask and mask.model is model.masking_policy.model
    assert mask.model is not policy.actor
    batch, _ = RolloutEngine().sample_episodes(policy, env, np.arange(16), with_values=False)
    args = (batch.input_ids, batch.attention_mask, batch.response_length)
    real = batch.response_mask.bool()
    recorded = unpack_bool(batch.action_masks, policy.n_actions)
    assert th.equal(recorded[real], policy.action_mask.teacher_forced(*args)[real])
    live = TopPMask(policy.actor, top_p=0.5)
    live.bind(policy.n_actions)
    assert not th.equal(recorded[real], live.teacher_forced(*args)[real])  # the live policy's nucleus has moved
    # the masking model changes after the rollout: the recorded masks still give the rollout's log-probs
    with th.no_grad():
        for parameter in model.masking_policy.model.parameters():
            parameter.add_(th.randn_like(parameter))
    model.masking_policy.mask.reset()
    assert not th.equal(recorded[real], policy.action_mask.teacher_forced(*args)[real])
    with th.no_grad():
        kept, _, _ = policy.evaluate_sequences(*args, with_values=False, action_masks=batch.action_masks)
        recomputed, _, _ = policy.evaluate_sequences(*args, with_values=False)
    assert th.allclose(kept[real], batch.logprobs[real], atol=1e-5)
    assert not th.allclose(recomputed[real], batch.logprobs[real], atol=1e-3)
    # and every teacher-forced pass of a rollout and its update (old log-probs, then each minibatch) is given them
    passes = []
    evaluate = policy.evaluate_sequences

    def spy(input_ids, attention_mask, response_length, **kwargs):
        masks = kwargs.get("action_masks")
        passes.append(masks is not None and masks.shape[:2] == (input_ids.shape[0], response_length))
        return evaluate(input_ids, attention_mask, response_length, **kwargs)

    policy.evaluate_sequences = spy
    model.learn(total_timesteps=8 * 6, reset_num_timesteps=False)
    assert len(passes) >= 3 and all(passes)


def test_nlpo_intersects_its_nucleus_with_the_env_sources(tokenizer, model_path, tmp_path):
    env = TokenGenerationEnv(
        make_prompts(),
        tokenizer,
        max_prompt_tokens=8,
        max_new_tokens=6,
        mask_sources=WordVocabulary(["good", "cat", "bad"], tokenizer),
    )
    model = make_nlpo(KLPenaltyWrapper(RewardFunctionWrapper(env, fn=share_of_good), coef=0.02), model_path)
    model.learn(total_timesteps=200)
    vocabulary = {*tokenizer.convert_tokens_to_ids(["good", "cat", "bad"]), *env.stop_token_ids}
    assert model.mask_keep_token_ids == list(env.stop_token_ids)
    lengths = []
    for i in range(3):  # prompts of different lengths, left-padded: the vocabulary's state is the response's
        batch, _ = model.rollout_engine.sample_episodes(model.policy, env, np.arange(8 * i, 8 * i + 8))
        real = batch.response_mask.bool()
        assert set(batch.response_ids[real].tolist()) <= vocabulary
        recorded = unpack_bool(batch.action_masks, len(tokenizer))
        forced = model.policy.action_mask.teacher_forced(batch.input_ids, batch.attention_mask, batch.response_length)
        assert th.equal(recorded[real], forced[real])
        assert (recorded[real].sum(-1) <= len(vocabulary)).all()  # within the vocabulary (and EOS), at every step
        lengths += batch.lengths.tolist()
    assert np.mean(lengths) > 2  # words are written, not only EOS
    # loaded without an env it keeps the nucleus and the stop tokens (the env's own sources come back with the env)
    model.save(tmp_path / "nlpo")
    loaded = NLPO.load(tmp_path / "nlpo")
    assert loaded.policy.action_mask.keep_token_ids == list(env.stop_token_ids)
    assert loaded.policy.action_mask.sources == [loaded.masking_policy.mask]
    loaded.set_env(model.env)
    assert len(loaded.policy.action_mask.sources) == 2


def test_nlpo_saves_and_resumes_its_masking_policy(tokenizer, model_path, tmp_path):
    model = make_nlpo(rule_env(tokenizer), model_path, n_episodes=8, n_epochs=1, mask_update_freq=2)
    history = RolloutHistoryCallback()
    model.learn(total_timesteps=8 * 6 * 3, callback=history)  # at least 3 rollouts: synced once, trained since
    n = len(history.history)
    assert model.n_mask_updates == (n - 1) // 2 >= 1 and not trained_parameters_equal(model)
    model.save(tmp_path / "nlpo")
    loaded = NLPO.load(tmp_path / "nlpo", env=rule_env(tokenizer))
    for name, value in model.masking_policy.state_dict().items():
        assert th.equal(loaded.masking_policy.state_dict()[name], value), name
    assert (loaded.rollouts_since_mask_update, loaded.n_mask_updates) == ((n - 1) % 2 + 1, (n - 1) // 2)
    assert (loaded.mask_top_p, loaded.mask_update_freq) == (0.9, 2)
    # the same masks as the saved model's
    env = model.generation_env
    batch, _ = model.rollout_engine.sample_episodes(model.policy, env, np.arange(8))
    args = (batch.input_ids, batch.attention_mask, batch.response_length)
    assert th.equal(model.policy.action_mask.teacher_forced(*args), loaded.policy.action_mask.teacher_forced(*args))


def test_nlpo_under_lora_saves_only_the_adapter_of_its_masking_copy(tokenizer, model_path, tmp_path):
    model = make_nlpo(rule_env(tokenizer), model_path, n_episodes=8, n_epochs=1, policy_kwargs={"lora": {"r": 4}})
    model.learn(total_timesteps=8 * 6 * 3)
    saved = model.masking_policy.state_dict()
    assert saved and all("lora_" in name for name in saved)
    assert not trained_parameters_equal(model)  # the adapter was trained since the copy was made
    # the frozen base is the policy's own tensors, not a second model in memory
    mine, theirs = dict(model.masking_policy.model.named_parameters()), dict(model.policy.actor.named_parameters())
    assert all(mine[n] is p for n, p in theirs.items() if not p.requires_grad)
    model.save(tmp_path / "nlpo")
    loaded = NLPO.load(tmp_path / "nlpo", env=rule_env(tokenizer))
    mine, theirs = model.masking_policy.model.state_dict(), loaded.masking_policy.model.state_dict()
    assert list(mine) == list(theirs)
    for name, value in mine.items():
        assert th.equal(value, theirs[name]), name  # the adapter from the zip, the base from the policy
    with pytest.raises(ValueError, match="does not match the policy's trained parameters"):
        loaded.masking_policy.load_state_dict({"unexpected": th.zeros(1)})
    # the policy cast after the copy was made: the shared weights went with it, the copy's own follow at the next
    # rollout, and its masks come out as before
    env = loaded.generation_env
    batch, _ = loaded.rollout_engine.sample_episodes(loaded.policy, env, np.arange(4))
    args = (batch.input_ids, batch.attention_mask, batch.response_length)
    before = loaded.policy.action_mask.teacher_forced(*args)
    loaded.policy.to(th.float64)
    loaded.masking_policy.follow_policy()
    assert th.equal(loaded.policy.action_mask.teacher_forced(*args), before)
    # a frozen weight unfrozen later would train the masking copy too: refused at the next synchronisation
    next(p for p in loaded.policy.actor.parameters() if not p.requires_grad).requires_grad_(True)
    with pytest.raises(RuntimeError, match="were unfrozen after NLPO was built"):
        loaded.masking_policy.sync()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mask_top_p": 0.0}, "top_p must be a probability"),
        ({"mask_update_freq": 0}, "mask_update_freq must be a positive integer"),
        ({"mask_min_tokens_to_keep": 0}, "mask_min_tokens_to_keep must be a positive integer"),
    ],
)
def test_nlpo_refuses_bad_mask_settings(tokenizer, model_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_nlpo(rule_env(tokenizer), model_path, **kwargs)


@pytest.mark.real_model
def test_nlpo_runs_the_imdb_task_on_its_real_model(tmp_path):
    """``--algorithm nlpo`` on SmolLM2-135M-Instruct with LoRA, the schedule cut to a few steps: the zip holds the
    masking copy's adapter only."""
    import dataclasses
    import os
    import zipfile

    from sb3_rlhf.common.models import packaged_model_path
    from sb3_rlhf.tasks import load_task, run_task

    try:
        packaged_model_path("all-MiniLM-L6-v2")
        packaged_model_path("SmolLM2-135M-Instruct")
    except (ImportError, FileNotFoundError) as missing:
        pytest.skip(str(missing))
    short = [
        "algorithm.total_timesteps=16",
        "algorithm.n_episodes=4",
        "algorithm.batch_size=4",
        "reward.train.max_pairs=24",
        "reward.train.n_epochs=0",
        "reward.train.test_size=16",
        "prompts.max_prompts=200",
        "generation.max_new_tokens=4",
        "evaluation.n_prompts=4",
    ]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    task = load_task(os.path.join(root, "envs", "imdb_positive.toml"), short)
    results = run_task(dataclasses.replace(task, algorithm_name="nlpo"), str(tmp_path), progress_bar=False)
    assert results["algorithm"] == "nlpo" and np.isfinite(results["trained"]["kl"])
    with zipfile.ZipFile(tmp_path / "nlpo_model.zip") as archive:
        with archive.open("masking_policy.pth") as f:
            saved = th.load(f, weights_only=True)
    assert saved and all("lora_" in name for name in saved)
