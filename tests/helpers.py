"""Shared test builders: tiny vocabularies and prompts, rule-reward envs and PPO models, tiny reward models and
classifiers, toy comparisons and demonstrations, a policy built straight from an env, a generated batch, a
step-path replay, a hub cache laid out offline, a copy of the repository, the smallest task dictionary. Test modules
import these from here, never from each other."""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import torch as th
from transformers import BertConfig, BertForSequenceClassification, BertModel

from sb3_rlhf import RLHFPPO, TokenGenerationEnv, TransformerActorCriticPolicy
from sb3_rlhf.common.data import Demonstration, PreferencePair
from sb3_rlhf.common.generation import GenerationBatch
from sb3_rlhf.common.rollout_engine import RolloutEngine
from sb3_rlhf.common.tiny import TINY_WORDS, tiny_prompts
from sb3_rlhf.rewards import KLPenaltyWrapper, RewardFunctionWrapper
from sb3_rlhf.rewards.rules import share_of_good

WORDS = TINY_WORDS
SENTIMENT = {0: "NEGATIVE", 1: "POSITIVE"}


def make_prompts(n: int = 24, seed: int = 0) -> list[str]:
    return tiny_prompts(n, seed)


def rule_env(tokenizer, kl_coef: float = 0.02, **kl_kwargs):
    env = TokenGenerationEnv(make_prompts(), tokenizer, max_prompt_tokens=8, max_new_tokens=6)
    return KLPenaltyWrapper(RewardFunctionWrapper(env, fn=share_of_good), coef=kl_coef, **kl_kwargs)


def make_model(env, model_path, **kwargs) -> RLHFPPO:
    settings = dict(learning_rate=1e-3, n_episodes=32, batch_size=8, n_epochs=4, seed=0)
    settings.update(kwargs)
    return RLHFPPO(TransformerActorCriticPolicy, env, policy_kwargs=dict(model_name_or_path=model_path), **settings)


def tiny_classifier(vocab_size: int, labels: dict[int, str] = SENTIMENT, seed: int = 0, **config):
    """A tiny BERT sequence classifier with named labels, like a hub sentiment classifier."""
    th.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        id2label=dict(labels),
        label2id={name: i for i, name in labels.items()},
        **config,
    )
    return BertForSequenceClassification(config).eval()


def tiny_reward_model(vocab_size: int, seed: int = 0) -> BertForSequenceClassification:
    """A tiny one-output BERT reward model (a classifier with the single default label)."""
    return tiny_classifier(vocab_size, {0: "LABEL_0"}, seed)


def tiny_bert(vocab_size: int, seed: int = 0) -> BertModel:
    th.manual_seed(seed)
    return BertModel(
        BertConfig(
            vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
        )
    )


def toy_reward_pairs(n: int, seed: int = 0) -> list[PreferencePair]:
    """Separable comparisons: the chosen answer says "good", the rejected one "bad"."""
    rng = np.random.default_rng(seed)
    filler = [w for w in WORDS if w not in ("good", "bad")]
    pairs = []
    for _ in range(n):
        prompt = " ".join(rng.choice(filler, size=3)) + " "
        body = list(rng.choice(filler, size=4))
        position = int(rng.integers(0, 5))
        chosen = " ".join(body[:position] + ["good"] + body[position:])
        rejected = " ".join(body[:position] + ["bad"] + body[position:])
        pairs.append(PreferencePair(prompt, chosen, rejected))
    return pairs


def toy_dpo_pairs(n: int, seed: int = 0) -> list[PreferencePair]:
    """The preferred continuation says "good", the other "bad"."""
    rng = np.random.default_rng(seed)
    filler = [w for w in WORDS if w not in ("good", "bad")]
    pairs = []
    for _ in range(n):
        prompt, middle = " ".join(rng.choice(filler, size=3)), " ".join(rng.choice(filler, size=2))
        pairs.append(PreferencePair(prompt, f"{middle} good", f"{middle} bad"))
    return pairs


def toy_demos(n: int, seed: int = 0) -> list[Demonstration]:
    """Copy the prompt's first word, then say 'good': learnable by a tiny model."""
    rng = np.random.default_rng(seed)
    filler = [w for w in WORDS if w != "good"]
    demos = []
    for _ in range(n):
        words = list(rng.choice(filler, size=3))
        demos.append(Demonstration(" ".join(words), f"{words[0]} good"))
    return demos


def make_policy(env, model_path: str, **kwargs) -> TransformerActorCriticPolicy:
    return TransformerActorCriticPolicy(
        env.observation_space, env.action_space, lambda _: 1e-4, model_name_or_path=model_path, **kwargs
    )


def generate_batch(policy, env, indices, seed: int = 0) -> GenerationBatch:
    """Sample responses for ``indices`` and fill the old log-probs, as RLHFPPO's rollout does."""
    th.manual_seed(seed)
    return RolloutEngine().sample_episodes(policy, env.unwrapped, indices)[0]


def replay_through_step(env, batch: GenerationBatch) -> tuple[np.ndarray, list[dict]]:
    """Feed each episode's tokens to ``env.step`` and collect per-token rewards ``(batch, T)`` and final infos."""
    rewards = np.zeros(batch.response_mask.shape, dtype=np.float64)
    infos = []
    for row, (prompt_index, length) in enumerate(zip(batch.prompt_indices, batch.lengths.tolist())):
        env.reset(options={"prompt_index": int(prompt_index)})
        for t, token in enumerate(batch.response_ids[row, :length].tolist()):
            _, reward, terminated, truncated, info = env.step(token)
            rewards[row, t] = reward
            assert (terminated or truncated) == (t == length - 1)
        infos.append(info)
    return rewards, infos


def build_hub_cache(hf_home, repo_id: str, folder, revision: str = "main", repo_type: str = "model") -> str:
    """Lay out ``folder`` as the Hugging Face hub cache does after a download, offline:
    ``$HF_HOME/hub/<type>s--org--name/{blobs/<sha256>, snapshots/<commit>/<file> -> blob, refs/<revision>}``.

    :return: the commit hash (a fake but well-formed 40-hex id derived from the files).
    """
    import hashlib
    import os

    storage = os.path.join(os.fspath(hf_home), "hub", f"{repo_type}s--" + repo_id.replace("/", "--"))
    files = sorted(f for f in os.listdir(folder) if os.path.isfile(os.path.join(folder, f)))
    commit = hashlib.sha1()
    digests = {}
    for name in files:
        with open(os.path.join(folder, name), "rb") as f:
            data = f.read()
        digests[name] = hashlib.sha256(data).hexdigest()
        commit.update(name.encode() + digests[name].encode())
        os.makedirs(os.path.join(storage, "blobs"), exist_ok=True)
        with open(os.path.join(storage, "blobs", digests[name]), "wb") as f:
            f.write(data)
    commit_hash = commit.hexdigest()
    snapshot = os.path.join(storage, "snapshots", commit_hash)
    os.makedirs(snapshot, exist_ok=True)
    for name in files:
        os.symlink(os.path.join("..", "..", "blobs", digests[name]), os.path.join(snapshot, name))
    os.makedirs(os.path.join(storage, "refs"), exist_ok=True)
    with open(os.path.join(storage, "refs", revision), "w") as f:
        f.write(commit_hash)
    return commit_hash


def copy_of_repository(dest: str | os.PathLike) -> None:
    """The repository's files (committed, or new and not ignored) copied into ``dest``, links followed: a clone
    with nothing beside it and no build outputs."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for name in filter(None, listed):
        if os.path.isfile(os.path.join(root, name)):
            os.makedirs(os.path.join(dest, os.path.dirname(name)), exist_ok=True)
            shutil.copy2(os.path.join(root, name), os.path.join(dest, name))


def minimal_task() -> dict:
    """The smallest valid task dictionary: a tiny policy, one inline prompt, a rule reward, ten timesteps."""
    return {
        "task": {"name": "t"},
        "policy": {"model": "tiny", "tiny_words": ["a", "b"]},
        "prompts": {"source": "inline", "texts": ["a b"]},
        "reward": {"function": "sb3_rlhf.rewards.rules:share_of_good"},
        "algorithm": {"total_timesteps": 10, "n_episodes": 4},
    }
