import os
import signal
import subprocess
import sys
import time

import pytest
import torch as th

from sb3_rlhf import GRPO, NLPO, RLHFPPO, TokenGenerationEnv
from sb3_rlhf.common.callbacks import RolloutHistoryCallback
from sb3_rlhf.common.checkpoints import (
    STATE_FILE,
    TrainingCheckpointCallback,
    latest_checkpoint,
    list_checkpoints,
    save_checkpoint,
)
from sb3_rlhf.common.tiny import tiny_prompts
from sb3_rlhf.rewards import KLPenaltyWrapper, RewardFunctionWrapper
from tests.helpers import make_model, make_prompts, rule_env, share_of_good

TOTAL = 480


def adaptive_env(tokenizer, estimator: str = "k1"):
    # an adaptive β: the controller's state must survive the restart too
    return rule_env(tokenizer, kl_coef=0.1, target=0.5, horizon=200, estimator=estimator)


def assert_same_weights(a, b):
    for (name, x), (_, y) in zip(a.policy.state_dict().items(), b.policy.state_dict().items()):
        assert th.equal(x, y), name


@pytest.mark.parametrize("cls", [RLHFPPO, GRPO, NLPO])
def test_a_resumed_run_trains_exactly_as_the_uninterrupted_one(tokenizer, model_path, tmp_path, cls):
    estimator = "k3" if cls is GRPO else "k1"
    settings = {GRPO: dict(samples_per_prompt=4, n_epochs=2), NLPO: dict(mask_update_freq=3)}.get(cls, {})
    full = cls(
        "TransformerActorCriticPolicy",
        adaptive_env(tokenizer, estimator),
        learning_rate=1e-3,
        n_episodes=16,
        batch_size=8,
        seed=0,
        policy_kwargs=dict(model_name_or_path=model_path),
        **settings,
    )
    history = RolloutHistoryCallback()
    full.learn(TOTAL, callback=[TrainingCheckpointCallback(100, str(tmp_path), keep=None), history])
    checkpoints = list_checkpoints(str(tmp_path))
    assert len(checkpoints) >= 3
    assert latest_checkpoint(str(tmp_path)) == checkpoints[-1]

    # NLPO: the first checkpoint falls between two synchronisations of its masking copy, which then differs from
    # the policy; it must come back from the checkpoint, not from the policy
    middle = checkpoints[0] if cls is NLPO else checkpoints[1]
    resumed = cls.load_checkpoint(middle, env=adaptive_env(tokenizer, estimator))
    start = resumed.num_timesteps
    assert 0 < start < full.num_timesteps
    with pytest.raises(ValueError, match="reset_num_timesteps=False"):
        resumed.learn(TOTAL - start)
    resumed_history = RolloutHistoryCallback()
    updates_at_start = getattr(resumed, "n_mask_updates", 0)
    if cls is NLPO:
        pairs = resumed.masking_policy._trained().values()
        assert resumed.rollouts_since_mask_update > 0 and not all(th.equal(a, b) for a, b in pairs)
    resumed.learn(TOTAL - start, reset_num_timesteps=False, callback=resumed_history)
    # the same rollouts (scores, KL, β), the same counters and the same weights as the run that never stopped
    assert resumed.num_timesteps == full.num_timesteps
    assert resumed._n_updates == full._n_updates
    assert resumed_history.history == history.history[-len(resumed_history.history) :]
    assert resumed_history.history[0]["kl_coef"] != 0.1  # β had adapted before the checkpoint, and was restored
    assert_same_weights(full, resumed)
    if cls is NLPO:  # and the same masking copy, synchronised at the same rollouts, before and after the resume
        assert resumed.n_mask_updates == full.n_mask_updates > updates_at_start
        for name, value in full.masking_policy.state_dict().items():
            assert th.equal(resumed.masking_policy.state_dict()[name], value), name


def test_without_the_training_state_a_resume_drifts(tokenizer, model_path, tmp_path):
    """The control for the test above: loading the zip alone (weights, optimizer, counters) is not enough."""
    full = make_model(adaptive_env(tokenizer), model_path, n_episodes=16)
    full.learn(TOTAL, callback=TrainingCheckpointCallback(100, str(tmp_path), keep=None))
    middle = list_checkpoints(str(tmp_path))[1]
    plain = RLHFPPO.load(os.path.join(middle, "model.zip"), env=adaptive_env(tokenizer))
    plain.learn(TOTAL - plain.num_timesteps, reset_num_timesteps=False)
    assert any(not th.equal(x, y) for x, y in zip(full.policy.parameters(), plain.policy.parameters()))


def test_checkpoints_keep_the_newest_and_ignore_partial_saves(tokenizer, model_path, tmp_path):
    model = make_model(rule_env(tokenizer), model_path, n_episodes=16)
    model.learn(200, callback=TrainingCheckpointCallback(50, str(tmp_path), keep=2))
    kept = list_checkpoints(str(tmp_path))
    assert len(kept) == 2
    assert kept[-1].endswith(f"checkpoint_{model.num_timesteps:012d}")  # the end of training is saved too
    # a save killed half-way leaves only a hidden temporary folder, which is never picked up
    partial = tmp_path / ".checkpoint_000000999999.tmp-abc"
    partial.mkdir()
    (partial / STATE_FILE).write_text("{")
    (tmp_path / "checkpoint_000000999998").mkdir()  # no files: not complete
    assert latest_checkpoint(str(tmp_path)) == kept[-1]
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        latest_checkpoint(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="save_freq"):
        TrainingCheckpointCallback(0, str(tmp_path))


def test_resume_refuses_a_different_env_and_a_reference_it_cannot_rebuild(tokenizer, model_path, tmp_path):
    model = make_model(rule_env(tokenizer), model_path, n_episodes=16)
    model.learn(50)
    path = save_checkpoint(model, str(tmp_path / "a"))
    env = RewardFunctionWrapper(TokenGenerationEnv(make_prompts(), tokenizer, 8, 6), fn=share_of_good)
    resumed = RLHFPPO.load_checkpoint(path, env=env)
    with pytest.raises(ValueError, match="reward wrappers"):
        resumed.learn(50, reset_num_timesteps=False)

    from sb3_rlhf import TransformerActorCriticPolicy
    from sb3_rlhf.common.tiny import tiny_config

    config_model = RLHFPPO(
        TransformerActorCriticPolicy,
        rule_env(tokenizer),
        n_episodes=8,
        batch_size=8,
        seed=0,
        policy_kwargs=dict(model_config=tiny_config(len(tokenizer), "llama")),
    )
    config_model.learn(20)
    path = save_checkpoint(config_model, str(tmp_path / "b"))
    with pytest.raises(ValueError, match="ref_model=<the initial model>"):
        RLHFPPO.load_checkpoint(path, env=rule_env(tokenizer))


def test_a_loaded_model_keeps_the_initial_model_as_its_kl_reference(tokenizer, model_path, tmp_path):
    model = make_model(rule_env(tokenizer), model_path, learning_rate=1e-2, n_episodes=16)
    model.learn(200)
    model.save(tmp_path / "m.zip")
    loaded = RLHFPPO.load(tmp_path / "m.zip", env=rule_env(tokenizer))
    reference = loaded.reward_wrappers[0].ref_model
    initial = make_model(rule_env(tokenizer), model_path).policy.actor
    for (name, a), (_, b) in zip(reference.state_dict().items(), initial.state_dict().items()):
        assert th.equal(a, b), name
    assert any(not th.equal(a, b) for a, b in zip(loaded.policy.actor.parameters(), initial.parameters()))


def test_saves_are_atomic(tokenizer, model_path, tmp_path, monkeypatch):
    model = make_model(rule_env(tokenizer), model_path, n_episodes=8)
    model.save(tmp_path / "model")
    before = (tmp_path / "model.zip").read_bytes()

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("stable_baselines3.common.base_class.save_to_zip_file", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        model.save(tmp_path / "model.zip")
    assert (tmp_path / "model.zip").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["model.zip"]  # no temporary file left behind


def test_saved_files_follow_the_umask(tokenizer, model_path, tmp_path):
    """The zip and the exported folder get the modes open() and mkdir() would give, not the temporary names'."""
    model = make_model(rule_env(tokenizer), model_path, n_episodes=8)
    old = os.umask(0o027)
    try:
        model.save(tmp_path / "model.zip")
        model.policy.save_pretrained(str(tmp_path / "policy"))
    finally:
        os.umask(old)
    assert (tmp_path / "model.zip").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "policy").stat().st_mode & 0o777 == 0o750


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_training_process_killed_hard_resumes_from_its_last_checkpoint(tmp_path):
    """SIGKILL mid-run (no handler, no cleanup can run), then `sb3-rlhf train --resume`."""
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "sb3_rlhf.cli", "train", os.path.join(ROOT, "envs", "tiny_synthetic.toml"),
        "--out", str(out), "--no-progress-bar",
        "--set", "algorithm.total_timesteps=6000", "--set", "algorithm.n_episodes=16",
        "--set", "checkpoint.every=200", "--set", "checkpoint.keep=3",
    ]  # fmt: skip
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    try:
        while len(list_checkpoints(str(out / "checkpoints"))) < 2:
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (out / "ppo_model.zip").exists()  # it really died mid-run

    last = latest_checkpoint(str(out / "checkpoints"))
    stopped_at = int(os.path.basename(last).split("_")[1])
    assert 0 < stopped_at < 6000
    result = subprocess.run([*command, "--resume"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed_from = int(result.stderr.split("resuming from timestep ")[1].split()[0])  # a stage line
    assert resumed_from >= stopped_at  # a checkpoint may have landed between our look and the kill
    final = RLHFPPO.load(str(out / "ppo_model.zip"))
    assert final.num_timesteps >= 6000
    assert final._n_updates > 0
    assert (out / "report.md").exists()


@pytest.mark.parametrize(
    "name, cls, kl, buffer",
    [
        ("rlhfppo", RLHFPPO, {}, "SequenceRolloutBuffer"),
        ("grpo", GRPO, {"estimator": "k3"}, "GroupRolloutBuffer"),
    ],
)
def test_zips_saved_before_the_on_policy_base_load_and_train_on(name, cls, kl, buffer, tokenizer):
    # saved by the code of commit 313adcb, when RLHFPPO subclassed SB3's PPO and GRPO subclassed RLHFPPO: SB3
    # pickles the rollout buffer's class by its module path, so that path must still resolve
    path = os.path.join(os.path.dirname(__file__), "data", f"{name}_before_issue13.zip")
    env = TokenGenerationEnv(tiny_prompts(8), tokenizer, max_prompt_tokens=8, max_new_tokens=4)
    env = KLPenaltyWrapper(RewardFunctionWrapper(env, fn=share_of_good), coef=0.05, **kl)
    model = cls.load(path, env=env)
    assert type(model.rollout_buffer).__name__ == buffer
    assert model.num_timesteps > 0
    before = {k: v.clone() for k, v in model.policy.state_dict().items()}
    model.learn(8, reset_num_timesteps=False)
    assert any(not th.equal(before[k], v) for k, v in model.policy.state_dict().items())
