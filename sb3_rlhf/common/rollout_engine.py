"""RolloutEngine: sampling responses from a policy with transformers' ``generate()``.

The policy supplies the model and its distribution (temperature, top-k/top-p, an action mask); the engine owns
how the responses are produced: the KV cache (dynamic, or static so that transformers compiles the decoding step
with CUDA graphs), the shapes that keep a compiled run from recompiling, and what is recorded along the way
(the log-prob of each sampled token, each step's action mask). The on-policy base calls
:meth:`RolloutEngine.sample_episodes` once per generation batch; ``sb3-rlhf generate`` and the evaluation sample
through the same engine.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch as th
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, PreTrainedModel

from sb3_rlhf.common.generation import GenerationBatch
from sb3_rlhf.common.memory import DeviceMemoryError
from sb3_rlhf.common.sequences import pack_bool, zero_padding
from sb3_rlhf.common.truncation import truncate_logits

if TYPE_CHECKING:
    from sb3_rlhf.envs.masks import ActionMask
    from sb3_rlhf.envs.token_generation import TokenGenerationEnv
    from sb3_rlhf.policies import TransformerActorCriticPolicy

#: the KV caches :class:`RolloutEngine` generates with: ``"auto"`` is ``"static"`` on CUDA (transformers compiles
#: the decoding step, CUDA graphs included) and ``"dynamic"`` elsewhere (a CPU gains nothing from a static cache);
#: ``"continuous"`` is transformers' continuous batching (``generate_batch``: a paged cache, each response leaves
#: the batch when it ends), for long or uneven responses on a GPU
GENERATION_CACHES = ("auto", "static", "dynamic", "continuous")


class Generation(NamedTuple):
    """What :meth:`RolloutEngine.generate` returns; the fields not asked for are ``None``.

    :param responses: ``(batch, T)`` int64, ``T <= max_new_tokens``, ``pad_token_id`` after a stop token.
    :param logprobs: ``(batch, T)`` float32 log-prob of each drawn token under the distribution it was drawn from
        (meaningless after a stop token: mask it).
    :param scores: ``(batch, T, n_actions)`` float32, the policy's logits each token was drawn from (-inf outside
        top-k/top-p and the action mask).
    :param action_masks: ``(batch, T, ceil(n_actions / 8))`` uint8, the policy's action mask of every step, packed
        one bit per token (:func:`~sb3_rlhf.common.sequences.unpack_bool` reads it).
    """

    responses: th.Tensor
    logprobs: th.Tensor | None = None
    scores: th.Tensor | None = None
    action_masks: th.Tensor | None = None


class _SuppressTokensFrom(LogitsProcessor):
    """Forbid ids >= n: models often pad their vocabulary beyond the tokenizer's tokens (the action space)."""

    def __init__(self, n_actions: int) -> None:
        self.n_actions = n_actions

    def __call__(self, input_ids: th.Tensor, scores: th.Tensor) -> th.Tensor:
        scores[:, self.n_actions :] = -float("inf")
        return scores


class _PolicyLogits(LogitsProcessor):
    """Turn the actor's raw next-token scores into the policy's logits inside ``generate()``: divide by the
    temperature, then :func:`truncate_logits`, on the first ``n_actions`` ids (the rest are suppressed by
    :class:`_SuppressTokensFrom`). Exactly what the teacher-forced pass computes, so sampling is from π."""

    def __init__(self, n_actions: int, temperature: float, top_k: int, top_p: float) -> None:
        self.n_actions, self.temperature, self.top_k, self.top_p = n_actions, temperature, top_k, top_p

    def __call__(self, input_ids: th.Tensor, scores: th.Tensor) -> th.Tensor:
        actions = scores[:, : self.n_actions].float() / self.temperature
        scores[:, : self.n_actions] = truncate_logits(actions, self.top_k, self.top_p)
        return scores


class _ActionMaskLogits(LogitsProcessor):
    """Apply an action mask (:mod:`sb3_rlhf.envs.masks`) inside ``generate()``: the tokens it does not allow get
    -inf before the policy's temperature and truncation, so sampling and the recorded log-probs are the masked
    policy's. The mask reads the sequences so far with the prompts' attention mask (generated tokens count as
    real; a finished row's padding is never sampled from). Each step's mask is kept, packed one bit per token
    (:meth:`finish`), so that the update can use exactly the masks the tokens were sampled under."""

    def __init__(self, mask: ActionMask, prompt_attention_mask: th.Tensor, n_actions: int) -> None:
        self.mask, self.prompt_attention_mask, self.n_actions = mask, prompt_attention_mask, n_actions
        self.steps: list[th.Tensor] = []

    def __call__(self, input_ids: th.Tensor, scores: th.Tensor) -> th.Tensor:
        prompt = self.prompt_attention_mask
        n_generated = input_ids.shape[1] - prompt.shape[1]
        attention_mask = th.cat([prompt, prompt.new_ones(prompt.shape[0], n_generated)], dim=1)
        allowed = self.mask(input_ids, attention_mask, n_generated).to(scores.device)
        self.steps.append(pack_bool(allowed))
        scores[:, : self.n_actions] = scores[:, : self.n_actions].masked_fill(~allowed, -float("inf"))
        return scores

    def finish(self, response: th.Tensor) -> th.Tensor:
        """:param response: ``(batch, T)`` the generated tokens. :return: ``(batch, T, ceil(n_actions / 8))``
        uint8, each step's mask packed (:func:`~sb3_rlhf.common.sequences.pack_bool`); a step past the end that
        transformers ran and dropped is cut, as in :class:`_SampledLogprobs`."""
        masks = th.stack(self.steps[: response.shape[1]], dim=1)
        self.steps = []
        return masks


class _SampledLogprobs(LogitsProcessor):
    """Record log π(a_t | s_t) of each sampled token inside ``generate()``, from the very scores it was drawn from
    (the last processor: after temperature and truncation). A call sees the scores of step t and, in
    ``input_ids``, the token drawn at step t - 1: it keeps only one ``(batch, n_actions)`` log-softmax alive and
    gathers the previous token from it, so no ``(batch, T, vocab)`` scores are stored; :meth:`finish` gathers the
    last token. This spares the rollout a teacher-forced pass where nothing else needs one (critic-free
    algorithms); the values of a critic still need it."""

    def __init__(self, n_actions: int) -> None:
        self.n_actions = n_actions
        self.last: th.Tensor | None = None
        self.logprobs: list[th.Tensor] = []

    def __call__(self, input_ids: th.Tensor, scores: th.Tensor) -> th.Tensor:
        if self.last is not None:
            # a finished row's pad may lie past the actions: clamped, and masked out later anyway
            self.logprobs.append(self.last.gather(-1, input_ids[:, -1:].clamp(max=self.n_actions - 1)).squeeze(-1))
        self.last = th.log_softmax(scores[:, : self.n_actions].float(), dim=-1)
        return scores

    def finish(self, response: th.Tensor) -> th.Tensor:
        """:param response: ``(batch, T)`` the generated tokens. :return: ``(batch, T)`` float32 log-probs (those
        after a stop token are of the padding and meaningless: mask them)."""
        assert self.last is not None and len(self.logprobs) >= response.shape[1] - 1
        last = self.last.gather(-1, response[:, -1:].clamp(max=self.n_actions - 1)).squeeze(-1)
        # transformers may run one step past the end and drop its token (DeferredStopCheck): that step's scores
        # were recorded too, and are cut here
        logprobs = th.stack([*self.logprobs, last], dim=1)[:, : response.shape[1]]
        self.last, self.logprobs = None, []
        return logprobs


@contextlib.contextmanager
def _generation_defaults(model: PreTrainedModel, config: GenerationConfig) -> Iterator[None]:
    """Make ``config`` the model's ``generation_config`` for one ``generate()`` call. transformers fills every
    option a call leaves unset (None) from ``model.generation_config`` (the checkpoint's generation_config.json),
    and options whose only neutral value is None (``forced_bos_token_id``, ``bad_words_ids``, ``sequence_bias``,
    ``watermarking_config``, ``max_time``, ...) cannot be neutralised in the call's own config. peft's
    ``generate`` assigns this attribute the same way."""
    checkpoint_config = model.generation_config
    model.generation_config = config
    try:
        yield
    finally:
        model.generation_config = checkpoint_config


@contextlib.contextmanager
def _eval_mode(model: th.nn.Module) -> Iterator[None]:
    """``model`` in eval mode for one generation, its training mode put back after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _is_compile_failure(error: BaseException) -> bool:
    """Whether ``error`` comes from torch.compile (TorchDynamo or Inductor) rather than from the model itself."""
    return any(cls.__module__.startswith(("torch._dynamo", "torch._inductor")) for cls in type(error).__mro__)


def _out_of_memory_within(error: BaseException) -> bool:
    """Whether a device out of memory caused ``error`` (torch.compile wraps one raised while it autotunes)."""
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, th.OutOfMemoryError):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


def left_pad(input_ids: th.Tensor, attention_mask: th.Tensor, width: int, pad_token_id: int) -> tuple[th.Tensor, ...]:
    """Left-pad ``(batch, P)`` prompts to ``(batch, width)``: the added columns are padding (mask 0), so positions
    (:func:`~sb3_rlhf.common.sequences.position_ids_from_mask`) and what the model attends to are unchanged."""
    extra = width - input_ids.shape[1]
    if extra <= 0:
        return input_ids, attention_mask
    return (
        th.nn.functional.pad(input_ids, (extra, 0), value=pad_token_id),
        th.nn.functional.pad(attention_mask, (extra, 0), value=0),
    )


class RolloutEngine:
    """Samples responses from a :class:`~sb3_rlhf.TransformerActorCriticPolicy` with one ``generate()`` call per
    batch, from exactly the policy's distribution (its own logits processors; nothing of a checkpoint's
    ``generation_config.json`` applies, see :meth:`generation_config`).

    With the static cache the shapes are bucketed so that a run compiles once: the prompts are left-padded to a
    multiple of ``prompt_multiple`` tokens (at most the env's ``max_prompt_tokens``) and a smaller batch is filled up to ``batch_size`` rows with copies of
    its first prompt (dropped afterwards). The extra columns are padding, which the model does not attend to, so
    the responses are those of the unpadded batch up to float rounding. transformers compiles the decoding step
    on CUDA by itself (``torch.compile`` with CUDA graphs); should compiling fail, the engine warns once and
    generates with the dynamic cache from then on. The continuous cache hands the prompts to transformers'
    ``generate_batch`` instead (see :meth:`check_policy` for the policies it can sample).

    :param cache: ``"auto"``, ``"static"``, ``"dynamic"`` or ``"continuous"`` (see :data:`GENERATION_CACHES`).
    :param batch_size: the rows of one ``generate()`` call under the static cache (``None``: as given).
    :param prompt_multiple: under the static cache, pad the prompts' width up to a multiple of this.
    """

    def __init__(self, cache: str = "auto", batch_size: int | None = None, prompt_multiple: int = 64) -> None:
        if cache not in GENERATION_CACHES:
            raise ValueError(f"generation_cache must be one of {GENERATION_CACHES}, got {cache!r}")
        for name, value in (("batch_size", batch_size), ("prompt_multiple", prompt_multiple)):
            if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
                raise ValueError(f"the rollout engine's {name} must be a positive integer, got {value!r}")
        self.cache = cache
        self.batch_size = batch_size
        self.prompt_multiple = int(prompt_multiple)
        #: set when compiling the static cache's decoding step failed: the dynamic cache is used from then on
        self.compile_failed = False

    def cache_for(self, device: th.device) -> str:
        """The cache a ``generate()`` on ``device`` uses: ``"static"``, ``"dynamic"`` or ``"continuous"``."""
        if self.compile_failed:
            return "dynamic"
        if self.cache == "auto":
            return "static" if device.type == "cuda" else "dynamic"
        return self.cache

    def check_policy(self, policy: TransformerActorCriticPolicy) -> None:
        """Refuse a policy this engine's cache cannot sample exactly: transformers' continuous batching applies the
        generation config's temperature and nothing else (no top-k/top-p of the policy's own semantics, no action
        mask, no suppression of a vocabulary wider than the tokenizer's) in a thread of its own (outside
        ``torch.autocast``)."""
        if self.cache != "continuous":
            return
        n_actions = policy.n_actions
        problems = [
            name
            for name, present in (
                ("top_k/top_p", policy.top_k > 0 or policy.top_p < 1.0),
                ("an action mask (NLPO, masked RLHFPPO)", policy.action_mask is not None),
                # autocast is per thread, and generate_batch samples in a thread of its own
                ("mixed_precision (its sampling thread runs outside the autocast)", policy.mixed_precision is not None),
                (
                    f"a model vocabulary wider than the tokenizer's {n_actions} tokens",
                    policy.actor.get_output_embeddings().weight.shape[0] > n_actions,
                ),
            )
            if present
        ]
        if problems:
            raise ValueError(
                f"generation_cache='continuous' samples with transformers' own temperature only, not with "
                f"{', '.join(problems)}: use generation_cache='static' or 'dynamic' for this policy"
            )

    @th.no_grad()
    def generate(
        self,
        policy: TransformerActorCriticPolicy,
        input_ids: th.Tensor,
        attention_mask: th.Tensor,
        max_new_tokens: int,
        stop_token_ids: Sequence[int],
        pad_token_id: int,
        deterministic: bool = False,
        output_scores: bool = False,
        output_logprobs: bool = False,
        output_action_masks: bool = False,
        max_prompt_width: int | None = None,
    ) -> Generation:
        """Sample responses of ``policy`` for left-padded prompts with one ``generate()`` call (KV cache).

        :param input_ids: ``(batch, P)`` int64 left-padded prompts.
        :param attention_mask: ``(batch, P)`` int64.
        :param max_new_tokens: the longest response.
        :param stop_token_ids: the tokens that end a response.
        :param pad_token_id: what follows a stop token.
        :param deterministic: greedy decoding (the most probable token) instead of sampling.
        :param output_scores: also return the logits each token was drawn from.
        :param output_logprobs: also return the log-prob of each drawn token, recorded during generation (no
            ``(batch, T, vocab)`` scores kept).
        :param output_action_masks: also return the policy's :attr:`action_mask` at every step (the policy must
            have one).
        :param max_prompt_width: the widest prompt the caller ever passes (the env's ``max_prompt_tokens``): the
            static cache's bucketed width never exceeds it.
        :return: a :class:`Generation`.
        """
        if output_scores and output_logprobs:
            raise ValueError("ask generate() for output_scores or output_logprobs, not both")
        if output_action_masks and policy.action_mask is None:
            raise ValueError("output_action_masks=True needs the policy's action_mask: set policy.action_mask")
        n_rows = input_ids.shape[0]
        cache = self.cache_for(input_ids.device)
        ids, mask = input_ids, attention_mask
        if cache == "static":
            ids, mask = self._bucketed(input_ids, attention_mask, pad_token_id, max_prompt_width)
        try:
            generation = self._generate(
                policy, ids, mask, max_new_tokens, stop_token_ids, pad_token_id, deterministic, output_scores,
                output_logprobs, cache,
            )  # fmt: skip
        except Exception as error:
            if _out_of_memory_within(error):
                raise DeviceMemoryError(
                    f"out of device memory generating {ids.shape[0]} responses of up to {max_new_tokens} tokens after "
                    f"{ids.shape[1]}-token prompts ({cache} cache): set generation_batch_size below {ids.shape[0]} "
                    "(or lower max_new_tokens, max_prompt_tokens); checkpoints already written stay loadable"
                ) from error
            if cache != "static" or not _is_compile_failure(error):
                raise
            warnings.warn(
                f"compiling the static cache's decoding step failed ({type(error).__name__}: {error}); generating "
                "with the dynamic cache from now on (set generation_cache='dynamic' to skip the attempt)",
                stacklevel=2,
            )
            self.compile_failed = True
            return self.generate(
                policy, input_ids, attention_mask, max_new_tokens, stop_token_ids, pad_token_id, deterministic,
                output_scores, output_logprobs, output_action_masks, max_prompt_width,
            )  # fmt: skip
        return Generation._make(None if x is None else x[:n_rows] for x in generation)

    def _bucketed(
        self, input_ids: th.Tensor, attention_mask: th.Tensor, pad_token_id: int, max_prompt_width: int | None
    ) -> tuple[th.Tensor, th.Tensor]:
        """The prompts padded to the static cache's shape: width up to a multiple of :attr:`prompt_multiple` (at
        most ``max_prompt_width``, when the prompts are not wider), rows up to :attr:`batch_size` (copies of the
        first prompt, dropped after generation)."""
        width = -(-input_ids.shape[1] // self.prompt_multiple) * self.prompt_multiple
        if max_prompt_width is not None:
            width = min(width, max(max_prompt_width, input_ids.shape[1]))
        input_ids, attention_mask = left_pad(input_ids, attention_mask, width, pad_token_id)
        missing = (self.batch_size or 0) - input_ids.shape[0]
        if missing > 0:
            input_ids = th.cat([input_ids, input_ids[:1].expand(missing, -1)])
            attention_mask = th.cat([attention_mask, attention_mask[:1].expand(missing, -1)])
        return input_ids, attention_mask

    def _generate(
        self,
        policy: TransformerActorCriticPolicy,
        input_ids: th.Tensor,
        attention_mask: th.Tensor,
        max_new_tokens: int,
        stop_token_ids: Sequence[int],
        pad_token_id: int,
        deterministic: bool,
        output_scores: bool,
        output_logprobs: bool,
        cache: str,
    ) -> Generation:
        if cache == "continuous":
            return self._generate_continuous(
                policy, input_ids, attention_mask, max_new_tokens, stop_token_ids, pad_token_id, deterministic,
                output_scores, output_logprobs,
            )  # fmt: skip
        config = self.generation_config(
            max_new_tokens, stop_token_ids, pad_token_id, deterministic, output_scores, cache
        )
        n_actions = policy.n_actions
        processors = LogitsProcessorList()
        if policy.actor.get_output_embeddings().weight.shape[0] > n_actions:
            processors.append(_SuppressTokensFrom(n_actions))
        masking = None
        if policy.action_mask is not None:
            masking = _ActionMaskLogits(policy.action_mask, attention_mask, n_actions)
            processors.append(masking)
        processors.append(_PolicyLogits(n_actions, policy.temperature, policy.top_k, policy.top_p))
        recorder = _SampledLogprobs(n_actions)
        if output_logprobs:
            processors.append(recorder)  # last: it must see the scores that sampling uses
        actor = policy.actor
        model = actor.get_base_model() if policy.lora is not None else actor  # peft generates with it
        try:
            with _eval_mode(actor), _generation_defaults(model, config), policy.autocast():
                out = actor.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    generation_config=config,
                    logits_processor=processors,
                    # transformers keeps the ranks of a sharded model in step (an all-reduce per token); with the
                    # weights gathered (the rollout) each rank generates alone
                    synced_gpus=not policy.parallel.holds_whole_weights,
                )
        finally:
            if policy.action_mask is not None:
                policy.action_mask.reset()  # a model-based source's KV cache is this generation's only
        sequences = out.sequences if output_scores else out
        responses = sequences[:, input_ids.shape[1] :]
        return Generation(
            responses=responses,
            logprobs=recorder.finish(responses) if output_logprobs else None,
            scores=th.stack(out.scores, dim=1)[:, :, :n_actions] if output_scores else None,
            action_masks=masking.finish(responses) if masking is not None else None,
        )

    def _generate_continuous(
        self,
        policy: TransformerActorCriticPolicy,
        input_ids: th.Tensor,
        attention_mask: th.Tensor,
        max_new_tokens: int,
        stop_token_ids: Sequence[int],
        pad_token_id: int,
        deterministic: bool,
        output_scores: bool,
        output_logprobs: bool,
    ) -> Generation:
        """One ``generate_batch()`` call (transformers' continuous batching) with the log-prob of every drawn token.

        Its sampling runs the generation config's own temperature and nothing else, so only a policy that is its
        softmax at that temperature (no top-k/top-p, no action mask, a vocabulary no wider than the tokenizer's)
        is sampled exactly; others are refused (:meth:`check_policy`). Its random stream is seeded from torch's,
        and torch's own streams are left as they were; which draw each response gets depends on how transformers'
        scheduler thread fills its batches, so a seeded run need not repeat token for token. The paged cache is
        sized for this batch, and the attention stays the model's own (no switch to flash-attention).
        """
        if output_scores or deterministic:
            raise ValueError(
                "generation_cache='continuous' samples (no greedy decoding) and returns no scores: use 'static' or "
                "'dynamic' for them"
            )
        self.check_policy(policy)
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        config = self.generation_config(max_new_tokens, stop_token_ids, pad_token_id)
        config.temperature = policy.temperature
        prompts = [row[mask].tolist() for row, mask in zip(input_ids.cpu(), attention_mask.cpu().bool())]
        longest = max(len(p) for p in prompts) + max_new_tokens
        page_size = 256
        batching = ContinuousBatchingConfig(
            return_logprobs=True,
            seed=int(th.randint(2**31 - 1, (), device="cpu")),  # from torch's stream
            # a cache for this batch (transformers would take most of the device's memory, or of the host's)
            page_size=page_size,
            num_blocks=len(prompts) * -(-longest // page_size) + 1,
            max_batch_tokens=max(len(prompts), min(2048, len(prompts) * longest)),
            # the attention the teacher-forced pass uses, not flash-attention where it is installed
            auto_switch_to_flash=False,
        )
        actor = policy.actor
        devices = [input_ids.device] if input_ids.device.type == "cuda" else []
        # transformers seeds torch's global generators with the batch's seed: fork_rng puts back the run's streams
        with _eval_mode(actor), th.random.fork_rng(devices=devices):
            results = actor.generate_batch(
                prompts,
                generation_config=config,
                continuous_batching_config=batching,
                max_new_tokens=max_new_tokens,
                warmup=input_ids.device.type == "cuda",  # CUDA graphs captured before the requests
            )
        outputs = list(results.values())
        failed = [out.error for out in outputs if out.error is not None]
        if any("out of memory" in str(error).lower() for error in failed):
            raise DeviceMemoryError(
                f"out of device memory generating {len(prompts)} responses with continuous batching: set "
                f"generation_batch_size below {len(prompts)}; checkpoints already written stay loadable"
            )
        if len(outputs) != len(prompts) or failed:
            raise RuntimeError(
                f"transformers' continuous batching returned {len(outputs)} of {len(prompts)} responses"
                + (f" ({failed[0]})" if failed else "")
                + ": use generation_cache='static' or 'dynamic'"
            )
        length = max(len(out.generated_tokens) for out in outputs)
        responses = th.full((len(outputs), length), pad_token_id, dtype=th.long)
        logprobs = th.zeros((len(outputs), length), dtype=th.float32)
        for row, out in enumerate(outputs):
            responses[row, : len(out.generated_tokens)] = th.as_tensor(out.generated_tokens)
            logprobs[row, : len(out.logprobs)] = th.as_tensor(out.logprobs)
        return Generation(responses.to(input_ids.device), logprobs.to(input_ids.device) if output_logprobs else None)

    @staticmethod
    def generation_config(
        max_new_tokens: int,
        stop_token_ids: Sequence[int],
        pad_token_id: int,
        deterministic: bool = False,
        output_scores: bool = False,
        cache: str = "dynamic",
    ) -> GenerationConfig:
        """The complete ``GenerationConfig`` of :meth:`generate`. Every transformers option that changes the
        next-token scores or a response's length is set to its neutral value, so that nothing of a checkpoint's
        ``generation_config.json`` applies (transformers fills each option a config leaves unset from it, and
        :meth:`generate` also makes this config the model's default for the call, for the options whose only
        neutral value is None). Temperature, top-k and top-p are the policy's processor's job, not these fields.

        :param max_new_tokens: the longest response.
        :param stop_token_ids: the tokens that end a response (EOS and the env's stop tokens).
        :param pad_token_id: what follows a stop token in a finished response.
        :param deterministic: greedy decoding instead of sampling.
        :param output_scores: make ``generate()`` return the processed scores too.
        :param cache: ``"static"`` or ``"dynamic"``.
        """
        return GenerationConfig(
            max_new_tokens=max_new_tokens,
            min_new_tokens=0,  # takes precedence over min_length
            eos_token_id=list(stop_token_ids),
            pad_token_id=pad_token_id,
            do_sample=not deterministic,
            num_beams=1,
            num_return_sequences=1,
            use_cache=True,
            cache_implementation="static" if cache == "static" else None,
            temperature=1.0,
            top_k=None if deterministic else 0,  # a sampling-only flag: transformers warns about it under greedy
            top_p=1.0,
            typical_p=1.0,
            epsilon_cutoff=0.0,
            eta_cutoff=0.0,
            repetition_penalty=1.0,
            encoder_repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            encoder_no_repeat_ngram_size=0,
            remove_invalid_values=False,
            renormalize_logits=False,
            output_scores=output_scores,
            return_dict_in_generate=output_scores,
        )

    @th.no_grad()
    def sample_episodes(
        self,
        policy: TransformerActorCriticPolicy,
        env: TokenGenerationEnv,
        prompt_indices: Sequence[int] | np.ndarray,
        with_values: bool = True,
    ) -> tuple[GenerationBatch, th.Tensor | None]:
        """Episodes of ``policy`` for ``env.prompts[prompt_indices]``: one ``generate()`` call, then one
        teacher-forced pass of the actor where it is needed, and of a separate critic for its values.

        A float32 actor's old log-probs are those ``generate()`` sampled with (TRL's PPO keeps its generation
        logits the same way): the actor's teacher-forced pass would give the same numbers up to float rounding
        (tested at 1e-5 on CPU, 1e-4 through the compiled static cache on CUDA) at the cost of a forward over the
        whole batch. It still runs for a shared value head,
        whose values come from it, and in half precision, TF32 or autocast, where the KV-cached and the
        teacher-forced forwards differ by more than that, which would bias the first epoch's ratios (so also under
        the policy's ``mixed_precision``). (With
        top-k/top-p, rounding can still move a token at the edge of the kept set in or out between the two passes;
        the update keeps the sampled token in its set, so its ratio stays finite, as TRL's.)

        :param with_values: also compute the values (``None`` without).
        :return: the :class:`~sb3_rlhf.common.generation.GenerationBatch` with ``logprobs`` (log π_old, 0 on
            padding) filled, and with the policy's :attr:`action_mask` its ``action_masks`` (every step's mask as
            the tokens were sampled under it, packed), and ``values (batch, T + 1)`` float32, V(s_0)..V(s_T).
        """
        if env.action_mask is not None and policy.action_mask is None:
            # refused rather than sampled unmasked: the batched path applies the policy's own mask only
            raise ValueError(
                "the env has mask_sources, which RLHFPPO, RLOO, GRPO and P3O do not apply on their own: set "
                "model.policy.action_mask = env.unwrapped.action_mask, train with NLPO (which intersects them with its "
                "nucleus), or with sb3_contrib.MaskablePPO and MaskableTransformerActorCriticPolicy"
            )
        prompt_ids, prompt_mask = (th.as_tensor(a, device=policy.device) for a in env.prompt_batch(prompt_indices))
        shared_values = with_values and policy.critic is None  # the actor's own pass gives them
        from_generation = (
            not shared_values
            and policy.actor.get_output_embeddings().weight.dtype == th.float32
            and th.get_float32_matmul_precision() == "highest"  # TF32 rounds far above 1e-5
            and not th.is_autocast_enabled()
            and policy.mixed_precision is None
            # paged attention kernels are not the teacher-forced pass's: its own log-probs are the old ones
            and self.cache_for(policy.device) != "continuous"
        )
        generated = self.generate(
            policy,
            prompt_ids,
            prompt_mask,
            env.max_new_tokens,
            env.stop_token_ids,
            env.pad_token_id,
            output_logprobs=from_generation,
            output_action_masks=policy.action_mask is not None,
            max_prompt_width=env.max_prompt_tokens,
        )
        batch = GenerationBatch.from_generation(env, prompt_indices, prompt_ids, prompt_mask, generated.responses)
        batch.action_masks = generated.action_masks
        logprobs, values = generated.logprobs, None
        try:
            if logprobs is None:
                logprobs, values, _ = policy.evaluate_sequences(
                    batch.input_ids,
                    batch.attention_mask,
                    batch.response_length,
                    with_entropy=False,
                    with_values=with_values,
                    action_masks=batch.action_masks,
                )
            elif with_values:  # a separate critic: its forward alone
                values = policy.critic_values(batch.input_ids, batch.attention_mask, batch.response_length)
        except th.OutOfMemoryError as error:
            raise DeviceMemoryError(
                f"out of device memory in the rollout's teacher-forced pass over {batch.batch_size} episodes × "
                f"{batch.input_ids.shape[1]} tokens: set generation_batch_size below {batch.batch_size} (or lower "
                "max_new_tokens); checkpoints already written stay loadable"
            ) from error
        batch.logprobs = zero_padding(logprobs, batch.response_mask)
        return batch, values


__all__ = ["GENERATION_CACHES", "Generation", "RolloutEngine", "left_pad"]
