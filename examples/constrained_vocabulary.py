"""A policy that may only speak the words of a list, learning a rule reward: action masks on the token env.

    python examples/constrained_vocabulary.py                            # NLPO on the fast path, a tiny random model
    python examples/constrained_vocabulary.py --algorithm ppo            # RLHFPPO with the env's mask
    python examples/constrained_vocabulary.py --algorithm maskable-ppo   # sb3-contrib's MaskablePPO, token by token
    python examples/constrained_vocabulary.py --model path/to/lm         # your own causal LM folder

The env's ``mask_sources`` allow only the words of ``VOCABULARY``, each spelled with the tokenizer's own tokens
(``WordVocabulary``: a word of several tokens is allowed token by token), and never the unknown token (``BannedTokens``); EOS
stays allowed so that a response can end. ``env.action_masks()`` answers in sb3-contrib's protocol, which is what
``MaskablePPO`` reads; NLPO intersects the same sources with its masking policy's top-p nucleus, and RLHFPPO
applies them once they are the policy's ``action_mask``. The reward, a plain rule: the share of the response's
words that are an adjective directly followed by a noun ("good cat", "happy dog"), which the policy has to learn
as a two-word pattern.
"""

import argparse
import os

import numpy as np
from sb3_contrib import MaskablePPO
from transformers import AutoTokenizer

from sb3_rlhf import NLPO, RLHFPPO, TokenGenerationEnv, TransformerActorCriticPolicy
from sb3_rlhf.common.tiny import TINY_WORDS, save_tiny_model
from sb3_rlhf.envs.masks import BannedTokens, WordVocabulary
from sb3_rlhf.maskable import MaskableTransformerActorCriticPolicy
from sb3_rlhf.rewards import KLPenaltyWrapper, RewardFunctionWrapper

VOCABULARY = ["the", "a", "cat", "dog", "good", "happy", "sat"]
ADJECTIVES, NOUNS = {"good", "happy"}, {"cat", "dog"}

parser = argparse.ArgumentParser()
parser.add_argument("--algorithm", choices=["nlpo", "ppo", "maskable-ppo"], default="nlpo")
parser.add_argument("--model", help="a local causal LM folder; default: a tiny random model")
parser.add_argument("--out", default="runs/constrained_vocabulary")
parser.add_argument("--timesteps", type=int, default=8_000)
args = parser.parse_args()

if args.model is None:
    args.model = os.path.join(args.out, "tiny_model")
    save_tiny_model(args.model, TINY_WORDS, hidden_size=64)
tokenizer = AutoTokenizer.from_pretrained(args.model)


def described_nouns(prompts: list[str], completions: list[str]) -> list[float]:
    """The share of the words that belong to an adjective directly followed by a noun ("good cat")."""
    rewards = []
    for completion in completions:
        words = completion.split()
        pairs = sum(a in ADJECTIVES and b in NOUNS for a, b in zip(words, words[1:]))
        rewards.append(2 * pairs / max(1, len(words)))
    return rewards


prompts = ["the cat sat on", "a dog was", "then it", "the mat was", "a happy cat", "the sad dog and"]
sources = [WordVocabulary(VOCABULARY, tokenizer)]
if tokenizer.unk_token_id is not None:  # sources compose by intersection
    sources.append(BannedTokens([tokenizer.unk_token_id]))
env = TokenGenerationEnv(prompts, tokenizer, max_prompt_tokens=16, max_new_tokens=8, mask_sources=sources)
env = RewardFunctionWrapper(env, fn=described_nouns)

if args.algorithm == "maskable-ppo":
    # token by token through env.step(); the mask of every step comes from env.action_masks()
    model = MaskablePPO(
        MaskableTransformerActorCriticPolicy,
        env,
        n_steps=256,
        batch_size=64,
        n_epochs=4,
        learning_rate=1e-3,
        policy_kwargs=dict(model_name_or_path=args.model),
        tensorboard_log=args.out,
        seed=0,
        verbose=1,
    )
else:
    env = KLPenaltyWrapper(env, coef=0.02)  # per-token KL to the initial policy
    algorithm = NLPO if args.algorithm == "nlpo" else RLHFPPO
    extra = dict(mask_update_freq=5) if args.algorithm == "nlpo" else {}
    model = algorithm(
        TransformerActorCriticPolicy,
        env,
        learning_rate=1e-3,
        n_episodes=32,
        batch_size=8,
        policy_kwargs=dict(model_name_or_path=args.model),
        tensorboard_log=args.out,
        seed=0,
        verbose=1,
        **extra,
    )
    if args.algorithm == "ppo":
        model.policy.action_mask = env.unwrapped.action_mask  # NLPO does this itself, with its nucleus added


def sample() -> list[str]:
    """One response per prompt under the env's mask: MaskablePPO through env.step() and env.action_masks() (its
    predict() takes the mask), the fast-path algorithms with one generate() call that applies their action mask."""
    if args.algorithm != "maskable-ppo":
        batch, _ = model.rollout_engine.sample_episodes(
            model.policy, env.unwrapped, np.arange(len(prompts)), with_values=False
        )
        return [info["completion"] for info in batch.infos]
    texts = []
    for index in range(len(prompts)):
        obs, _ = env.reset(options={"prompt_index": index})
        done = False
        while not done:
            action, _ = model.predict(obs, action_masks=env.unwrapped.action_masks())
            obs, _, terminated, truncated, info = env.step(int(action))
            done = terminated or truncated
        texts.append(info["completion"])
    return texts


before = sample()
model.learn(total_timesteps=args.timesteps, progress_bar=True)
after = sample()
for name, texts in (("before", before), ("after", after)):
    for text in texts:  # the mask held: every word from the list (the last may be cut short by max_new_tokens)
        *words, last = text.split() or [""]
        assert set(words) <= set(VOCABULARY) and any(w.startswith(last) for w in VOCABULARY), text
    print(f"{name}: mean reward {np.mean(described_nouns(prompts, texts)):.2f}; e.g. {texts[:3]}")
model.save(os.path.join(args.out, f"{args.algorithm.replace('-', '_')}_model.zip"))
