"""Bad input, as a matrix: every public entry point given wrong types, empty or missing data, mismatched
tokenizers, out-of-vocabulary actions, wrong observations, unknown keys or missing paths answers with an error
raised by this library (not from deep inside torch) whose message names the problem and the fix. Then
property-based tests drive the env with random action sequences."""

import ast
import inspect
import os
import traceback

import gymnasium as gym
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sb3_rlhf import RLHFPPO, TokenGenerationEnv
from sb3_rlhf.cli import main
from sb3_rlhf.common.data import Demonstration, PreferencePair, load_preference_pairs, train_test_split
from sb3_rlhf.common.tiny import tiny_tokenizer
from sb3_rlhf.dpo import DPOTrainer
from sb3_rlhf.reward_modeling import RewardModelTrainer
from sb3_rlhf.rewards import KLPenaltyWrapper, RewardFunctionWrapper, RewardModelWrapper
from sb3_rlhf.sft import SFTTrainer
from tests.helpers import WORDS, make_prompts, rule_env, share_of_good

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_TASK = os.path.join(ROOT, "envs", "tiny_synthetic.toml")


def algorithm(tokenizer, model_path, **kwargs):
    settings = dict(n_episodes=8, batch_size=8, policy_kwargs=dict(model_name_or_path=model_path))
    settings.update(kwargs)
    return RLHFPPO("TransformerActorCriticPolicy", rule_env(tokenizer), **settings)


def stepped(env, action):
    env.reset(seed=0)
    return env.step(action)


def obs(n, value=3):
    return {"input_ids": np.full(n, value, dtype=np.int64), "attention_mask": np.ones(n, dtype=np.int64)}


def bad_inputs(tokenizer, model_path, tmp_path):
    """name -> (call, exception type, words the message must contain)."""
    bigger = tiny_tokenizer(WORDS + ["zebra", "lion", "tiger", "bear"])
    pair, demo = PreferencePair("the cat", " good", " bad"), Demonstration("the cat", " sat")
    no_rejected = tmp_path / "pairs.jsonl"
    no_rejected.write_text('{"prompt": "a", "chosen": "b"}\n')
    env = TokenGenerationEnv(["the cat"], tokenizer, max_prompt_tokens=8, max_new_tokens=6)
    return {
        # the env
        "env: empty prompt list": (lambda: TokenGenerationEnv([], tokenizer), ValueError, "prompts is empty"),
        "env: prompts as one string": (lambda: TokenGenerationEnv("the cat", tokenizer), TypeError, "list of strings"),
        "env: blank prompt": (lambda: TokenGenerationEnv(["a", " "], tokenizer), ValueError, "index [1]"),
        "env: tokenizer of wrong type": (lambda: TokenGenerationEnv(["a"], 3), TypeError, "AutoTokenizer"),
        "env: tokenizer path missing": (
            lambda: TokenGenerationEnv(["a"], "/no/tok"),
            FileNotFoundError,
            "does not exist",
        ),
        "env: max_new_tokens 0": (
            lambda: TokenGenerationEnv(["a"], tokenizer, max_new_tokens=0),
            ValueError,
            "positive integer",
        ),
        "env: out-of-vocabulary action": (lambda: stepped(env, len(tokenizer)), ValueError, "token id in [0"),
        "env: negative action": (lambda: stepped(env, -1), ValueError, "token id in [0"),
        "env: action of wrong type": (lambda: stepped(env, "cat"), ValueError, "one integer token id"),
        "env: float action": (lambda: stepped(env, 2.5), ValueError, "one integer token id"),
        "env: several actions": (lambda: stepped(env, np.array([3, 4])), ValueError, "one integer token id"),
        "env: step before reset": (lambda: TokenGenerationEnv(["a"], tokenizer).step(3), RuntimeError, "reset()"),
        "env: prompt index out of range": (lambda: env.reset(options={"prompt_index": 5}), IndexError, "out of range"),
        # the policy
        "policy: model path missing": (lambda: algorithm(tokenizer, "/no/model"), FileNotFoundError, "does not exist"),
        "policy: no model": (lambda: algorithm(tokenizer, model_path, policy_kwargs={}), ValueError, "exactly one of"),
        "policy: unknown policy_kwargs key": (
            lambda: algorithm(tokenizer, model_path, policy_kwargs=dict(model_name_or_path=model_path, lr=1)),
            ValueError,
            "unknown policy_kwargs key 'lr'",
        ),
        "policy: unknown dtype": (
            lambda: algorithm(tokenizer, model_path, policy_kwargs=dict(model_name_or_path=model_path, dtype="fp8")),
            ValueError,
            "unknown dtype",
        ),
        "policy: tokenizer bigger than the model": (
            lambda: RLHFPPO(
                "TransformerActorCriticPolicy", rule_env(bigger), policy_kwargs=dict(model_name_or_path=model_path)
            ),
            ValueError,
            "resize_token_embeddings",
        ),
        "policy: observation with foreign token ids": (
            lambda: algorithm(tokenizer, model_path).predict(obs(14, value=999)),
            ValueError,
            "outside the tokenizer",
        ),
        "policy: observation of the wrong shape": (
            lambda: algorithm(tokenizer, model_path).predict(obs(5)),
            ValueError,
            "Unexpected observation shape (5,)",
        ),
        "policy: observation without attention_mask": (
            lambda: algorithm(tokenizer, model_path).policy.get_distribution({"input_ids": obs(14)["input_ids"]}),
            ValueError,
            "'attention_mask'",
        ),
        # the algorithm
        "ppo: no env": (lambda: RLHFPPO("TransformerActorCriticPolicy", None), ValueError, "needs an env"),
        "ppo: env of another kind": (
            lambda: RLHFPPO(
                "TransformerActorCriticPolicy",
                gym.make("CartPole-v1"),
                policy_kwargs=dict(model_name_or_path=model_path),
            ),
            TypeError,
            "needs a TokenGenerationEnv",
        ),
        "ppo: env without a reward": (
            lambda: RLHFPPO("TransformerActorCriticPolicy", env, policy_kwargs=dict(model_name_or_path=model_path)),
            ValueError,
            "RewardFunctionWrapper",
        ),
        "ppo: batch_size 0": (lambda: algorithm(tokenizer, model_path, batch_size=0), ValueError, "positive integer"),
        "ppo: clip_range_vf 0": (
            lambda: algorithm(tokenizer, model_path, clip_range_vf=0.0),
            ValueError,
            "clip_range_vf must be > 0",
        ),
        "ppo: learning rate as text": (
            lambda: algorithm(tokenizer, model_path, learning_rate="1e-5"),
            TypeError,
            "schedule",
        ),
        "ppo: total_timesteps as text": (
            lambda: algorithm(tokenizer, model_path).learn("100"),
            ValueError,
            "integer >= 0",
        ),
        "ppo: missing zip": (lambda: RLHFPPO.load(str(tmp_path / "none.zip")), FileNotFoundError, "none.zip"),
        "ppo: resume without checkpoints": (
            lambda: RLHFPPO.load_checkpoint(str(tmp_path), env=rule_env(tokenizer)),
            FileNotFoundError,
            "no checkpoint in",
        ),
        # the reward wrappers
        "reward fn not callable": (lambda: RewardFunctionWrapper(env, fn="share_of_good"), TypeError, "callable"),
        "reward fn returns the wrong length": (
            lambda: RewardFunctionWrapper(env, fn=lambda p, c: [1.0, 2.0]).step_reward(
                None, 0, True, stepped(env, 1)[4]
            ),
            ValueError,
            "one float per completion",
        ),
        "reward model path missing": (lambda: RewardModelWrapper(env, "/no/rm"), FileNotFoundError, "does not exist"),
        "reward fn returns strings": (
            lambda: RewardFunctionWrapper(env, fn=lambda p, c: ["1.5"]).step_reward(None, 0, True, stepped(env, 1)[4]),
            TypeError,
            "must return numbers",
        ),
        "reward fn returns booleans": (
            lambda: RewardFunctionWrapper(env, fn=lambda p, c: [True]).step_reward(None, 0, True, stepped(env, 1)[4]),
            TypeError,
            "convert with float(...)",
        ),
        "reward model: a causal LM, no trained head": (
            lambda: RewardModelWrapper(env, model_path),
            ValueError,
            "no trained sequence-classification head",
        ),
        "algorithm: clip_range 0": (
            lambda: algorithm(tokenizer, model_path, clip_range=0.0),
            ValueError,
            "clip_range must be a finite number > 0",
        ),
        "algorithm: negative clip_range": (
            lambda: algorithm(tokenizer, model_path, clip_range=-0.2),
            ValueError,
            "clip_range must be",
        ),
        "algorithm: ent_coef NaN": (
            lambda: algorithm(tokenizer, model_path, ent_coef=float("nan")),
            ValueError,
            "ent_coef must be a finite number",
        ),
        "algorithm: gamma above 1": (
            lambda: algorithm(tokenizer, model_path, gamma=2.0),
            ValueError,
            "gamma must be a finite number >= 0.0 and <= 1.0",
        ),
        "algorithm: max_grad_norm 0": (
            lambda: algorithm(tokenizer, model_path, max_grad_norm=0),
            ValueError,
            "max_grad_norm must be",
        ),
        "algorithm: unknown device": (
            lambda: algorithm(tokenizer, model_path, device="tpu"),
            ValueError,
            "device must be 'auto', 'cpu', 'cuda'",
        ),
        "kl coef 0": (lambda: KLPenaltyWrapper(env, coef=0.0), ValueError, "leave the wrapper out"),
        "kl unknown estimator": (lambda: KLPenaltyWrapper(env, estimator="k9"), ValueError, "unknown KL estimator"),
        "kl reference path missing": (
            lambda: KLPenaltyWrapper(env, ref_model="/no/ref"),
            FileNotFoundError,
            "does not exist",
        ),
        "wrapper around another env": (
            lambda: RewardFunctionWrapper(gym.make("CartPole-v1"), fn=share_of_good),
            TypeError,
            "wraps a TokenGenerationEnv",
        ),
        # the trainers and the data
        "sft: empty demonstrations": (
            lambda: SFTTrainer(model_path, tokenizer, []),
            ValueError,
            "train_demos is empty",
        ),
        "sft: demonstrations of wrong type": (
            lambda: SFTTrainer(model_path, tokenizer, ["text"]),
            TypeError,
            "load_demonstrations",
        ),
        "sft: mismatched tokenizer": (
            lambda: SFTTrainer(model_path, bigger, [demo]),
            ValueError,
            "do not belong together",
        ),
        "reward model: empty pairs": (
            lambda: RewardModelTrainer(model_path, tokenizer, []),
            ValueError,
            "train_pairs is empty",
        ),
        "reward model: backbone missing": (
            lambda: RewardModelTrainer("/no/bb", tokenizer, [pair]),
            FileNotFoundError,
            "does not exist",
        ),
        "dpo: empty pairs": (lambda: DPOTrainer(model_path, tokenizer, []), ValueError, "train_pairs is empty"),
        "dpo: pairs as dicts": (
            lambda: DPOTrainer(model_path, tokenizer, [{"prompt": "a"}]),
            TypeError,
            "load_preference_pairs",
        ),
        "dpo: mismatched tokenizer": (
            lambda: DPOTrainer(model_path, bigger, [pair]),
            ValueError,
            "do not belong together",
        ),
        "data: missing column": (lambda: load_preference_pairs(str(no_rejected)), ValueError, "['rejected'] missing"),
        "data: missing file": (
            lambda: load_preference_pairs(str(tmp_path / "nope.jsonl")),
            FileNotFoundError,
            "does not exist",
        ),
        "data: split leaving nothing": (lambda: train_test_split([1, 2], 2), ValueError, "leaves no train"),
        "data: negative held-out share": (
            lambda: train_test_split([1, 2, 3], -0.5),
            ValueError,
            "test_size must be a share in (0, 1) or a whole number >= 1",
        ),
    }


def _case_names() -> list[str]:
    """The keys of the dict that :func:`bad_inputs` returns, read from its source (it needs fixtures to run)."""
    tree = ast.parse(inspect.getsource(bad_inputs))
    returned = next(node.value for node in ast.walk(tree) if isinstance(node, ast.Return))
    return [key.value for key in returned.keys]


@pytest.mark.parametrize("name", _case_names())
def test_bad_input_gets_a_clear_error_from_this_library(name, tokenizer, model_path, tmp_path):
    call, error, words = bad_inputs(tokenizer, model_path, tmp_path)[name]
    with pytest.raises(error) as raised:
        call()
    assert words in str(raised.value), str(raised.value)
    origin = traceback.extract_tb(raised.tb)[-1].filename
    assert f"{os.sep}sb3_rlhf{os.sep}" in origin or "stable_baselines3" in origin, f"raised from {origin}"
    assert f"{os.sep}torch{os.sep}" not in origin and f"{os.sep}transformers{os.sep}" not in origin


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["train", "missing.toml"], "does not exist"),
        (["train", TINY_TASK, "--set", "bogus.key=1"], "unknown section [bogus]"),
        (["train", TINY_TASK, "--set", "algorithm.bogus=1"], "unknown key algorithm.bogus"),
        (["train", TINY_TASK, "--set", "policy.tiny_size=1"], "unknown key policy.tiny_size"),
        (["train", TINY_TASK, "--set", "reward.function=no_such_module:fn"], "cannot import 'no_such_module'"),
        (["train", TINY_TASK, "--set", "checkpoint.every=0"], "checkpoint.every must be >= 1, got 0"),
        (["train", TINY_TASK, "--set", "algorithm.total_timesteps=-5"], "total_timesteps must be a positive whole"),
        (["train", TINY_TASK, "--set", "algorithm.total_timesteps=2e3"], "(2000, not 2e3 or -5), got 2000.0"),
        (["train", TINY_TASK, "--set", "task.device=tpu", "--dry-run"], "device must be 'auto'"),
        (["train", TINY_TASK, "--set", "prompts.test_size=-0.5", "--dry-run"], "prompts.test_size must be a share"),
        (["train", TINY_TASK, "--set", "prompts.test_size=-0.5"], "got -0.5"),
        # the dry run reads the schema and runs the algorithm's own checks, as the run does
        (["train", TINY_TASK, "--set", 'algorithm.total_timesteps="2000"', "--dry-run"], "got '2000'"),
        (["train", TINY_TASK, "--set", "algorithm.n_episodes=0", "--dry-run"], "n_episodes must be a positive"),
        (
            ["train", TINY_TASK, "--set", "algorithm.n_episodes=many", "--dry-run"],
            "algorithm.n_episodes must be a whole",
        ),
        (["train", TINY_TASK, "--set", "algorithm.clip_range=-0.2", "--dry-run"], "clip_range must be a finite number"),
        (["train", TINY_TASK, "--set", "algorithm.ent_coef=nan", "--dry-run"], "ent_coef must be a finite number"),
        (["train", TINY_TASK, "--set", "policy.temperature=hot", "--dry-run"], "policy.temperature must be a number"),
        (["train", TINY_TASK, "--set", "policy.top_p=1.5", "--dry-run"], "policy.top_p must be > 0 and <= 1, got 1.5"),
        (["train", TINY_TASK, "--set", "generation.max_new_tokens=0", "--dry-run"], "max_new_tokens must be >= 1"),
        (["train", TINY_TASK, "--set", "prompts.split=train", "--dry-run"], "prompts.split names a datasets"),
        (["train", TINY_TASK, "--algorithm", "dpo", "--set", "algorithm.dpo.beta=0", "--dry-run"], "beta must be > 0"),
        (
            ["train", TINY_TASK, "--algorithm", "dpo", "--set", "algorithm.learning_rate=-1", "--dry-run"],
            "learning_rate",
        ),
        (["train", TINY_TASK, "--resume", "--out", "{tmp}/fresh"], "no checkpoint in"),
        (["train", TINY_TASK, "--algorithm", "dpo", "--resume", "--out", "{tmp}/fresh"], "continues an online run"),
        (["evaluate", TINY_TASK, "--out", "{tmp}/never_trained"], "run `sb3-rlhf train`"),
        (
            ["generate", "--model", "{tmp}/no_model", "--prompt", "hi"],
            "does not exist as a local folder and is not a packaged model",
        ),
        (
            ["reward-model", "--data", "{tmp}/none.jsonl", "--model", "all-MiniLM-L6-v2", "--out", "{tmp}/rm"],
            "not found",
        ),
        (["sft", "--data", "{tmp}/none.jsonl", "--model", "{tmp}/no_model", "--out", "{tmp}/sft"], "does not exist"),
    ],
)
def test_cli_answers_bad_input_with_one_line_and_exit_code_2(argv, words, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"sb3-rlhf {argv[0]}: error:" in err and words in err, err
    assert "Traceback" not in err


def test_cuda_asked_for_without_cuda_is_an_error_not_a_cpu_run(tokenizer, model_path, monkeypatch):
    import torch as th

    monkeypatch.setattr(th.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA device is visible: use 'auto' or 'cpu'"):
        algorithm(tokenizer, model_path, device="cuda")


def test_another_algorithms_zip_is_refused_by_name(tokenizer, model_path, tmp_path):
    from sb3_rlhf import GRPO, RLOO

    algorithm(tokenizer, model_path).save(tmp_path / "ppo.zip")
    for other in (GRPO, RLOO):
        with pytest.raises(ValueError, match=f"saved by RLHFPPO, not {other.__name__}: load it with RLHFPPO.load"):
            other.load(tmp_path / "ppo.zip", env=rule_env(tokenizer))
    assert RLHFPPO.load(tmp_path / "ppo.zip", env=rule_env(tokenizer)).algorithm_class == "RLHFPPO"


def test_a_reward_model_put_on_cuda_without_cuda_is_an_error(tokenizer, monkeypatch):
    import torch as th

    from tests.helpers import tiny_reward_model

    monkeypatch.setattr(th.cuda, "is_available", lambda: False)
    env = TokenGenerationEnv(["the cat"], tokenizer, max_prompt_tokens=8, max_new_tokens=6)
    with pytest.raises(ValueError, match="no CUDA device is visible"):
        RewardModelWrapper(env, tiny_reward_model(len(tokenizer)), device="cuda")


def test_cli_one_liners_for_a_file_as_out_and_an_empty_prompt(tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    assert main(["train", TINY_TASK, "--out", str(tmp_path / "a_file")]) == 2
    assert "--out " in (err := capsys.readouterr().err) and "is a file: name a folder" in err
    assert main(["generate", "--model", "x", "--prompt", "hi", "--prompt", " "]) == 2
    assert "--prompt number 2 is empty" in capsys.readouterr().err


def test_ctrl_c_in_train_ends_with_one_line_naming_the_checkpoints(tmp_path, capsys, monkeypatch):
    import sb3_rlhf.tasks

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sb3_rlhf.tasks, "run_task", interrupted)
    assert main(["train", TINY_TASK, "--out", str(tmp_path / "run")]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sb3-rlhf train: interrupted; checkpoints written so far are in" in err
    assert f"continue with `sb3-rlhf train {TINY_TASK} --out {tmp_path / 'run'} --resume`" in err
    assert "Traceback" not in err
    # a run started with --overwrite is resumed without it (the two are refused together)
    assert main(["train", TINY_TASK, "--out", str(tmp_path / "run"), "--overwrite"]) == 130
    assert f"continue with `sb3-rlhf train {TINY_TASK} --out {tmp_path / 'run'} --resume`" in capsys.readouterr().err


def test_edge_values_that_are_valid_are_still_accepted(tokenizer, model_path, tmp_path):
    """The range checks refuse what is wrong, not what is unusual: no clipping (inf), a negative entropy
    coefficient, a schedule, NumPy numbers, a torch.device, gamma 0; a bfloat16 tensor of rewards; a zip saved
    before zips named their class."""
    import math

    import torch as th

    model = algorithm(
        tokenizer,
        model_path,
        max_grad_norm=math.inf,
        ent_coef=-0.01,
        learning_rate=lambda progress: 1e-4 * progress,
        clip_range=np.float64(0.2),
        gamma=0.0,
        device=th.device("cpu"),
    )
    env = TokenGenerationEnv(["the cat"], tokenizer, max_prompt_tokens=8, max_new_tokens=6)
    bf16 = RewardFunctionWrapper(env, fn=lambda p, c: th.tensor([0.5] * len(c), dtype=th.bfloat16))
    assert bf16.step_reward(None, 0, True, stepped(env, 1)[4]) == 0.5
    del model.algorithm_class  # as a zip of an earlier version holds nothing of it
    model.save(tmp_path / "old.zip")
    loaded = RLHFPPO.load(tmp_path / "old.zip", env=rule_env(tokenizer), trust_pickled_objects=True)
    assert loaded.n_epochs == model.n_epochs and loaded.max_grad_norm == math.inf


def test_nproc_below_one_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["train", TINY_TASK, "--nproc", "0"])
    assert exited.value.code == 2 and "--nproc: must be a whole number >= 1, got 0" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- property-based env tests
TOKENIZER = tiny_tokenizer(WORDS)
PROMPTS = make_prompts(12)
N_TOKENS = len(TOKENIZER)


@pytest.mark.filterwarnings("ignore:.*truncated from the left")  # short prompt windows are part of the draw
@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    max_new_tokens=st.integers(1, 8),
    max_prompt_tokens=st.integers(1, 6),
    actions=st.lists(st.integers(0, N_TOKENS - 1), min_size=8, max_size=8),
)
def test_random_action_sequences_keep_observations_in_space_and_every_episode_ends(
    seed, max_new_tokens, max_prompt_tokens, actions
):
    env = RewardFunctionWrapper(
        TokenGenerationEnv(PROMPTS, TOKENIZER, max_prompt_tokens=max_prompt_tokens, max_new_tokens=max_new_tokens),
        fn=share_of_good,
    )
    obs, info = env.reset(seed=seed)
    assert env.observation_space.contains(obs)
    stop = set(env.unwrapped.stop_token_ids)
    for step, action in enumerate(actions, start=1):
        obs, reward, terminated, truncated, info = env.step(action)
        assert env.observation_space.contains(obs)
        assert np.isfinite(reward)
        assert terminated == (action in stop)
        assert truncated == (not terminated and step == max_new_tokens)
        if terminated or truncated:
            break
    # every episode ends, at the first stop token or at max_new_tokens, whichever comes first
    assert terminated or truncated
    assert step <= max_new_tokens
    assert info["completion_ids"] == actions[:step]
    # the score it gets through step() is the reward function's score of the decoded texts
    assert reward == pytest.approx(share_of_good([info["prompt"]], [info["completion"]])[0])
    with pytest.raises(RuntimeError, match="reset"):
        env.step(actions[0])


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), action=st.one_of(st.integers(N_TOKENS, 10**6), st.integers(-(10**6), -1)))
def test_any_out_of_vocabulary_action_is_refused_and_leaves_the_episode_unchanged(seed, action):
    env = TokenGenerationEnv(PROMPTS, TOKENIZER, max_prompt_tokens=6, max_new_tokens=4)
    obs, _ = env.reset(seed=seed)
    with pytest.raises(ValueError, match="token id in"):
        env.step(action)
    assert all(np.array_equal(a, b) for a, b in zip(obs.values(), env._observation().values()))
    env.step(int(TOKENIZER.convert_tokens_to_ids("cat")))  # the episode carries on
