"""Action masks on the token env (sb3-contrib's protocol) and MaskablePPO training a transformer policy with them."""

import numpy as np
import pytest
import torch as th
from gymnasium.utils.env_checker import check_env as gym_check_env
from sb3_contrib import MaskablePPO
from sb3_contrib.common.maskable.utils import get_action_masks
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_checker import check_env as sb3_check_env
from stable_baselines3.common.vec_env import DummyVecEnv
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from sb3_rlhf import TokenGenerationEnv, TransformerActorCriticPolicy
from sb3_rlhf.common.rollout_engine import RolloutEngine
from sb3_rlhf.common.tiny import tiny_causal_lm
from sb3_rlhf.envs.masks import ActionMask, AllowedTokens, BannedTokens, MaskSource, TopPMask, WordVocabulary
from sb3_rlhf.maskable import MaskableTransformerActorCriticPolicy
from sb3_rlhf.policies import truncate_logits
from sb3_rlhf.rewards import RewardFunctionWrapper
from sb3_rlhf.rewards.rules import share_of_good
from tests.helpers import make_prompts


def ids(tokenizer, *words: str) -> list[int]:
    return tokenizer.convert_tokens_to_ids(list(words))


def masked_env(tokenizer, sources, **kwargs) -> TokenGenerationEnv:
    settings = dict(max_prompt_tokens=8, max_new_tokens=6, mask_sources=sources)
    return TokenGenerationEnv(make_prompts(), tokenizer, **{**settings, **kwargs})


def allowed(env: TokenGenerationEnv, tokenizer) -> set[str]:
    return set(tokenizer.convert_ids_to_tokens(np.flatnonzero(env.action_masks()).tolist()))


def test_allowed_and_banned_tokens_intersect_and_keep_eos(tokenizer):
    env = masked_env(
        tokenizer, [AllowedTokens(ids(tokenizer, "good", "bad", "cat")), BannedTokens(ids(tokenizer, "bad"))]
    )
    env.reset(seed=0)
    mask = env.action_masks()
    assert mask.shape == (len(tokenizer),) and mask.dtype == bool
    assert allowed(env, tokenizer) == {"good", "cat", "<eos>"}  # EOS kept: a response can always end
    env.step(ids(tokenizer, "cat")[0])
    assert allowed(env, tokenizer) == {"good", "cat", "<eos>"}  # context-free sources: the same at every step
    # EOS masked on purpose, where EOS does not end responses
    env = masked_env(tokenizer, AllowedTokens(ids(tokenizer, "good")), mask_eos=True, stop_at_eos=False)
    env.reset(seed=0)
    assert allowed(env, tokenizer) == {"good"}
    # no sources: every token
    plain = TokenGenerationEnv(make_prompts(), tokenizer, 8, 6)
    plain.reset(seed=0)
    assert plain.action_masks().all()


def test_masked_env_passes_both_checkers_and_masks_reach_a_vec_env_through_wrappers(tokenizer):
    env = masked_env(tokenizer, [WordVocabulary(["good", "cat"], tokenizer), BannedTokens(ids(tokenizer, "<unk>"))])
    gym_check_env(env, skip_render_check=True)
    sb3_check_env(env, warn=True)
    vec = DummyVecEnv(
        [lambda: RewardFunctionWrapper(masked_env(tokenizer, AllowedTokens([5, 6])), fn=share_of_good)] * 2
    )
    vec.reset()
    masks = get_action_masks(vec)
    assert masks.shape == (2, len(tokenizer)) and {tuple(np.flatnonzero(m)) for m in masks} == {(1, 5, 6)}


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A small byte-level BPE: most words of the list split into several tokens, some shared between words."""
    text = ["the cat sat on the mat", "good happy dog", "a big small log"] * 20
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(text, trainer)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")


def test_word_vocabulary_lets_only_its_words_be_spelled_even_from_several_tokens():
    tokenizer = bpe_tokenizer()
    words = ["cathedral", "cat", "happiness", "dogmatic", "mat"]
    assert max(len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) for w in words) >= 3
    env = masked_env(tokenizer, WordVocabulary(words, tokenizer), max_new_tokens=12)
    rng, complete = np.random.default_rng(0), 0
    for episode in range(40):  # random walks inside the mask: every text is words of the list
        env.reset(seed=episode)
        done, response = False, []
        while not done:
            choices = np.flatnonzero(env.action_masks())
            token = int(rng.choice(choices))
            response.append(token)
            _, _, terminated, truncated, info = env.step(token)
            done = terminated or truncated
        pieces = info["completion"].split()
        # EOS is always allowed (ActionMask keeps it), so an ended or cut-off response may stop inside its last word
        assert all(p in words for p in pieces[:-1]), (pieces, response)
        assert not pieces or any(w.startswith(pieces[-1]) for w in words), pieces
        complete += max(len(pieces) - 1, 0)
    assert complete >= 10  # the walks do spell several words
    # after a complete word that is also a prefix ("cat" of "cathedral"), both continuing and a new word are allowed
    env.reset(seed=0)
    for token in tokenizer(" cat", add_special_tokens=False)["input_ids"]:
        env.step(token)
    mask = env.action_masks()
    rest = tokenizer(" cathedral", add_special_tokens=False)["input_ids"][len(tokenizer(" cat")["input_ids"])]
    starts = {tokenizer(" " + w, add_special_tokens=False)["input_ids"][0] for w in words}
    assert mask[rest] and all(mask[t] for t in starts) and mask[tokenizer.eos_token_id]


def test_top_p_mask_is_the_models_nucleus(tokenizer):
    model = tiny_causal_lm(len(tokenizer), "llama", seed=1)
    source = TopPMask(model, top_p=0.5)
    env = masked_env(tokenizer, source)
    obs, _ = env.reset(seed=0)
    with th.no_grad():
        logits = model(
            input_ids=th.as_tensor(obs["input_ids"])[None], attention_mask=th.as_tensor(obs["attention_mask"])[None]
        ).logits
    # the nucleus by hand: the most probable tokens until their mass reaches 0.5
    probs = th.softmax(logits[0, -1].float(), -1)
    order = th.argsort(probs, descending=True)
    n = int((th.cumsum(probs[order], 0) < 0.5).sum()) + 1
    expected = set(order[:n].tolist()) | {tokenizer.eos_token_id}
    assert set(np.flatnonzero(env.action_masks()).tolist()) == expected and n < len(tokenizer)
    assert th.equal(source.mask_of_logits(logits[:, -1]), th.isfinite(truncate_logits(logits[:, -1], 0, 0.5)))
    assert TopPMask(model, top_p=1.0)(th.as_tensor(obs["input_ids"])[None], th.ones(1, 14, dtype=th.long), 0).all()


class WrongShape(MaskSource):
    def __call__(self, input_ids, attention_mask, n_generated):
        return th.ones(input_ids.shape[0], 3, dtype=th.bool)


class WrongDtype(MaskSource):
    def __call__(self, input_ids, attention_mask, n_generated):
        return np.ones((input_ids.shape[0], 23))


def test_mask_errors_name_the_problem_and_the_fix(tokenizer):
    for source, message in ((WrongShape(), "shape"), (WrongDtype(), "ndarray")):
        env = masked_env(tokenizer, source)
        env.reset(seed=0)
        with pytest.raises(ValueError, match=f"returned .*{message}.*must return a torch.bool tensor of shape"):
            env.action_masks()
    # nothing left once EOS may be masked too: the error names the step
    env = masked_env(
        tokenizer,
        [AllowedTokens(ids(tokenizer, "good")), BannedTokens(ids(tokenizer, "good"))],
        mask_eos=True,
        stop_at_eos=False,
    )
    env.reset(seed=0)
    env.step(5)
    with pytest.raises(ValueError, match="allows no token at step 1 of the response"):
        env.action_masks()
    with pytest.raises(ValueError, match="runs to max_new_tokens=6 and is cut off.*stop_at_eos=False"):
        masked_env(tokenizer, AllowedTokens([5]), mask_eos=True)
    with pytest.raises(ValueError, match="without mask_sources"):
        TokenGenerationEnv(make_prompts(), tokenizer, mask_eos=True, stop_at_eos=False)
    with pytest.raises(ValueError, match="AllowedTokens got no token ids"):
        AllowedTokens([])
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 23\)"):
        masked_env(tokenizer, BannedTokens([99]))
    with pytest.raises(ValueError, match="bans all 23 tokens"):
        masked_env(tokenizer, BannedTokens(range(23)))
    with pytest.raises(ValueError, match="WordVocabulary got no words"):
        WordVocabulary([" ", ""], tokenizer)
    with pytest.raises(TypeError, match="non-empty list of mask sources"):
        masked_env(tokenizer, [])
    with pytest.raises(ValueError, match="top_p must be a probability"):
        TopPMask(None, top_p=0)


class MaskedActions(BaseCallback):
    """Every action MaskablePPO takes, with the mask it was taken under."""

    def __init__(self) -> None:
        super().__init__()
        self.checked = 0
        self.violations = 0

    def _on_step(self) -> bool:
        masks = get_action_masks(self.training_env)
        # the masks now are for the next step; the action just taken was under the previous masks
        if self.previous is not None:
            actions = self.locals["actions"]
            self.violations += int(sum(not m[a] for m, a in zip(self.previous, actions)))
            self.checked += len(actions)
        self.previous = masks
        return True

    def _on_rollout_start(self) -> None:
        self.previous = get_action_masks(self.training_env)


def test_maskable_ppo_learns_on_a_constrained_vocabulary_and_never_samples_a_masked_token(
    tokenizer, model_path, tmp_path
):
    words = ["good", "bad", "cat", "dog"]
    env = RewardFunctionWrapper(masked_env(tokenizer, WordVocabulary(words, tokenizer)), fn=share_of_good)
    model = MaskablePPO(
        MaskableTransformerActorCriticPolicy,
        env,
        n_steps=128,
        batch_size=32,
        n_epochs=4,
        learning_rate=1e-3,
        seed=0,
        policy_kwargs=dict(model_name_or_path=model_path),
    )
    checker = MaskedActions()
    model.learn(2_560, callback=checker)
    assert checker.checked >= 2_000 and checker.violations == 0
    returns = [info["r"] for info in model.ep_info_buffer]
    assert np.mean(returns[-20:]) > 0.8  # the share of "good" in a response; about 1/5 at first
    # the update's log-probs are the masked ones: under the mask, π sums to one over the allowed tokens only
    obs, _ = env.reset(seed=1)
    masks = env.unwrapped.action_masks()
    obs_tensor, _ = model.policy.obs_to_tensor(obs)
    with th.no_grad():
        probs = model.policy.get_distribution(obs_tensor, action_masks=masks[None]).distribution.probs[0]
    assert float(probs[~th.as_tensor(masks)].sum()) == 0.0 and float(probs.sum()) == pytest.approx(1.0)
    # saved and loaded as any SB3 model; predict() takes the mask
    model.save(tmp_path / "maskable")
    loaded = MaskablePPO.load(tmp_path / "maskable", env=env)
    assert isinstance(loaded.policy, MaskableTransformerActorCriticPolicy)
    for _ in range(10):
        action, _ = loaded.predict(obs, action_masks=masks)
        assert masks[int(action)]


def test_an_action_mask_on_the_fast_path_is_the_policy_in_generate_and_in_the_teacher_forced_pass(tokenizer):
    """The policy's action mask (what NLPO sets: a masking model's top-p nucleus) applies in generate(): every
    sampled token is allowed, and the log-probs recorded while sampling equal the teacher-forced masked ones."""
    env = TokenGenerationEnv(make_prompts(8), tokenizer, 8, 6)
    config = tiny_causal_lm(len(tokenizer), "llama", seed=0).config.to_dict()
    policy = TransformerActorCriticPolicy(env.observation_space, env.action_space, lambda _: 1e-3, model_config=config)
    policy.action_mask = ActionMask(
        [TopPMask(tiny_causal_lm(len(tokenizer), "llama", seed=3), 0.5)], len(tokenizer), [1]
    )
    th.manual_seed(0)
    batch, _ = RolloutEngine().sample_episodes(policy, env, np.arange(8), with_values=False)
    with th.no_grad():
        logprobs, _, entropy = policy.evaluate_sequences(
            batch.input_ids, batch.attention_mask, batch.response_length, with_values=False
        )
    real = batch.response_mask.bool()
    # the log-probs generate() records while sampling (the mask applied step by step, on its KV cache) equal the
    # teacher-forced masked ones
    th.manual_seed(0)
    prompt_ids, prompt_mask = (th.as_tensor(a) for a in env.prompt_batch(np.arange(8)))
    response, recorded, _, _ = RolloutEngine().generate(
        policy, prompt_ids, prompt_mask, env.max_new_tokens, env.stop_token_ids, env.pad_token_id, output_logprobs=True
    )
    assert th.equal(response, batch.input_ids[:, -batch.response_length :])
    assert policy.action_mask.sources[0]._past is None  # the masking model's KV cache is freed with the generation
    assert th.allclose(recorded[real], logprobs[real], atol=1e-5)
    assert th.allclose(batch.logprobs[real], logprobs[real], atol=1e-5)
    allowed = policy.action_mask.teacher_forced(batch.input_ids, batch.attention_mask, batch.response_length)
    tokens = batch.input_ids[:, -batch.response_length :]
    assert allowed.gather(-1, tokens[..., None]).squeeze(-1)[real].all()
    assert float(allowed.sum(-1).float().mean()) < len(tokenizer) / 2  # the nucleus does mask
    # the entropy is that of the masked distribution: at most log |allowed|
    assert (entropy[real] <= th.log(allowed.sum(-1).float())[real] + 1e-5).all()


def test_maskable_policy_takes_its_nucleus_among_the_allowed_tokens(tokenizer, model_path):
    """With top-k, the mask comes first (as in generate()): the k most probable *allowed* tokens, never a masked
    one, even when no allowed token is among the unmasked top k; the entropy stays finite."""
    env = masked_env(tokenizer, AllowedTokens([5, 6, 7]))
    policy = MaskableTransformerActorCriticPolicy(
        env.observation_space, env.action_space, lambda _: 1e-3, model_name_or_path=model_path, top_k=2
    )
    obs, _ = env.reset(seed=0)
    obs_tensor, _ = policy.obs_to_tensor(obs)
    with th.no_grad():
        top = set(policy.get_distribution(obs_tensor).distribution.probs[0].topk(2).indices.tolist())
        allowed = np.zeros((1, len(tokenizer)), dtype=bool)
        allowed[0, sorted({5, 6, 7, 1} - top)[:3]] = True  # allowed tokens outside the unmasked top 2
        distribution = policy.get_distribution(obs_tensor, action_masks=allowed)
        probs = distribution.distribution.probs[0]
    assert float(probs[~th.as_tensor(allowed[0])].sum()) == 0.0 and int((probs > 0).sum()) == 2
    assert th.isfinite(distribution.entropy()).all()


def test_the_batched_path_refuses_an_env_mask_it_would_not_apply(tokenizer, model_path):
    env = masked_env(tokenizer, AllowedTokens([5, 6]))
    policy = TransformerActorCriticPolicy(
        env.observation_space, env.action_space, lambda _: 1e-3, model_name_or_path=model_path
    )
    with pytest.raises(ValueError, match="mask_sources, which RLHFPPO, RLOO, GRPO and P3O do not apply on their own"):
        RolloutEngine().sample_episodes(policy, env, [0, 1])
    policy.action_mask = env.action_mask  # applied: every sampled token allowed
    batch, _ = RolloutEngine().sample_episodes(policy, env, [0, 1, 2, 3])
    tokens = batch.input_ids[:, -batch.response_length :][batch.response_mask.bool()]
    assert set(tokens.tolist()) <= {1, 5, 6}


def test_top_p_mask_step_by_step_on_its_kv_cache_equals_its_one_pass_masks(tokenizer):
    """Called for growing sequences (as in generate()), TopPMask runs only the new token on its KV cache; its
    masks equal the teacher-forced ones of one forward over whole sequences, with left-padded prompts of different
    lengths; a sequence that does not extend the cached one starts over."""
    model = tiny_causal_lm(len(tokenizer), "llama", seed=3)
    source = TopPMask(model, top_p=0.7, min_tokens_to_keep=3)
    source.bind(len(tokenizer))
    env = TokenGenerationEnv(make_prompts(6), tokenizer, 8, 5)
    prompt_ids, prompt_mask = (th.as_tensor(a) for a in env.prompt_batch(np.arange(6)))
    assert (prompt_mask == 0).any()  # prompts of different lengths
    generator = th.Generator().manual_seed(0)
    response = th.randint(3, len(tokenizer), (6, 5), generator=generator)
    input_ids = th.cat([prompt_ids, response], 1)
    attention_mask = th.cat([prompt_mask, th.ones_like(response)], 1)
    forwards = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: forwards.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        width = prompt_ids.shape[1]
        steps = [source(input_ids[:, : width + t], attention_mask[:, : width + t], t) for t in range(5)]
    finally:
        hook.remove()
    assert forwards == [width, 1, 1, 1, 1]  # the prompt once, then one token per step
    one_pass = source.teacher_forced(input_ids, attention_mask, 5)
    assert th.equal(th.stack(steps, 1), one_pass)
    assert (one_pass.sum(-1) >= 3).all() and (one_pass.sum(-1) < len(tokenizer)).any()  # min_tokens_to_keep, a mask
    # another batch: a full forward again, not the stale cache
    other = source(input_ids[:3, : width + 1], attention_mask[:3, : width + 1], 1)
    assert th.equal(other, one_pass[:3, 1])
    source.reset()
    assert th.equal(source(input_ids[:, : width + 1], attention_mask[:, : width + 1], 1), one_pass[:, 1])


def test_recorded_masks_survive_chunked_generation_and_a_group_buffer(tokenizer, model_path):
    """RLOO (the group buffer) under the env's mask, generating in chunks whose responses differ in length: the
    merged rollout's masks, padded along the response, are each step's mask at every real position."""
    from sb3_rlhf import RLOO
    from sb3_rlhf.common.sequences import unpack_bool
    from sb3_rlhf.rewards import KLPenaltyWrapper

    env = masked_env(tokenizer, WordVocabulary(["good", "cat", "bad"], tokenizer))
    model = RLOO(
        TransformerActorCriticPolicy,
        KLPenaltyWrapper(RewardFunctionWrapper(env, fn=share_of_good), coef=0.02),
        n_episodes=16,
        batch_size=8,
        samples_per_prompt=4,
        generation_batch_size=4,
        seed=0,
        policy_kwargs=dict(model_name_or_path=model_path),
    )
    model.policy.action_mask = env.action_mask
    model.learn(total_timesteps=1)  # one rollout and its update
    buffer = model.rollout_buffer
    assert len({chunk.shape[1] for chunk in buffer._chunks["action_masks"]}) > 1  # chunks of different lengths
    input_ids = th.cat([buffer.prompt_ids, buffer.response_ids], 1)
    attention_mask = th.cat([buffer.prompt_mask, buffer.response_mask.long()], 1)
    real = buffer.response_mask.bool()
    recorded = unpack_bool(buffer.action_masks, len(tokenizer))
    forced = env.action_mask.teacher_forced(input_ids, attention_mask, buffer.response_ids.shape[1])
    assert th.equal(recorded[real], forced[real])
    assert set(buffer.response_ids[real].tolist()) <= {*ids(tokenizer, "good", "cat", "bad"), *env.stop_token_ids}
