"""Shared test helpers: a policy built straight from an env, a generated batch, a step-path replay."""

from __future__ import annotations

import numpy as np
import torch as th

from sb3_rlhf import TransformerActorCriticPolicy
from sb3_rlhf.common.generation import GenerationBatch


def make_policy(env, model_path: str, **kwargs) -> TransformerActorCriticPolicy:
    return TransformerActorCriticPolicy(
        env.observation_space, env.action_space, lambda _: 1e-4, model_name_or_path=model_path, **kwargs
    )


def generate_batch(policy, env, indices, seed: int = 0) -> GenerationBatch:
    """Sample responses for ``indices`` and fill the old log-probs, as RLHFPPO's rollout does."""
    th.manual_seed(seed)
    return policy.sample_episodes(env.unwrapped, indices)[0]


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
