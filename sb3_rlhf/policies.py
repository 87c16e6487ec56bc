"""TransformerActorCriticPolicy: a Hugging Face causal LM as the actor, with a value head, as an SB3 policy."""

from __future__ import annotations

import contextlib
import copy
from typing import TYPE_CHECKING, Any, cast

import torch as th
from gymnasium import spaces
from stable_baselines3.common.distributions import CategoricalDistribution
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.type_aliases import PyTorchObs, Schedule
from transformers import PretrainedConfig, PreTrainedModel

from sb3_rlhf.common.distributed import is_main_process
from sb3_rlhf.common.forward import (
    VARLEN_ATTENTION,
    attention_implementation,
    forward_last_positions,
    hidden_states_packed,
    packing_supported,
    response_logits,
)
from sb3_rlhf.common.io import atomic_directory
from sb3_rlhf.common.models import (
    causal_lm_from_config,
    disable_dropout,
    freeze,
    load_backbone,
    load_causal_lm,
    pinned_revision,
    resolve_model_path,
    with_lora,
)
from sb3_rlhf.common.progress import without_transformers_bars
from sb3_rlhf.common.sequences import (
    logprobs_and_entropy,
    logprobs_of_tokens,
    position_ids_from_mask,
    unpack_bool,
)
from sb3_rlhf.common.strategies import ParallelStrategy
from sb3_rlhf.common.tokenizers import check_vocabulary
from sb3_rlhf.common.truncation import check_truncation, truncate_logits

if TYPE_CHECKING:
    from sb3_rlhf.envs.masks import ActionMask


def _entropy_of_truncated(logits: th.Tensor) -> th.Tensor:
    """H = -sum_a p(a) log p(a) over the kept tokens of :func:`truncate_logits`' output: ``(..., vocab) -> (...)``.
    Written out because p·z of an excluded token is 0·(-inf) = NaN in the usual logsumexp form."""
    log_probs = th.log_softmax(logits, dim=-1)
    return -(log_probs.exp() * log_probs.masked_fill(th.isinf(logits), 0.0)).sum(-1)


#: ``value_head``: the actor's backbone shared with the value head, or a separate critic backbone.
VALUE_HEADS = ("shared", "separate")


class _AdapterDisabled(th.nn.Module):
    """The LoRA actor with its adapter switched off, i.e. the frozen base model: the KL reference under LoRA,
    without a second copy of the weights. It holds the actor without registering it, so it owns no parameters."""

    peft_model: Any  # peft's PeftModel, set past nn.Module's registration

    def __init__(self, peft_model: Any) -> None:
        super().__init__()
        object.__setattr__(self, "peft_model", peft_model)

    def forward(self, **kwargs: Any) -> Any:
        with self.peft_model.disable_adapter():
            return self.peft_model(**kwargs)

    def get_base_model(self) -> PreTrainedModel:
        return self.peft_model.get_base_model()

    def get_output_embeddings(self) -> th.nn.Module:
        return self.peft_model.get_output_embeddings()


class TransformerActorCriticPolicy(BasePolicy):
    """Actor-critic policy whose actor is a Hugging Face causal LM.

    The actor's next-token distribution at temperature ``temperature`` is the policy: ``predict()`` samples
    from it, log-probs and entropies are computed from it, and the algorithms' rollout engine
    (:class:`~sb3_rlhf.common.rollout_engine.RolloutEngine`) generates with it.
    The critic is a linear value head on the actor's last hidden state (``value_head="shared"``, one forward
    gives both) or on a separate copy of the backbone (``value_head="separate"``). Pretrained weights are
    used as loaded: no orthogonal initialisation. Dropout is switched off (LoRA's too) so that π/π_old is
    exactly 1 on the first PPO step. Models are named by path (or config), never pickled into the SB3 zip.

    Sampling is exactly the policy: the engine's ``generate()`` runs with a complete generation config of its own,
    in which every option that changes the next-token distribution or a response's length is neutral, so a
    checkpoint's ``generation_config.json`` (``repetition_penalty``, ``min_new_tokens``, ``suppress_tokens``,
    ``top_k``, ...), which the log-probs would never see, does not apply. ``top_k``/``top_p`` truncate the
    distribution identically in ``generate()``, in the teacher-forced log-probs, the per-step SB3 methods and the
    entropy (:func:`truncate_logits`). The KL reference stays the reference model's untruncated distribution at
    the same temperature (its support covers every token the policy can sample, so the KL stays finite).

    :param observation_space: the :class:`~sb3_rlhf.TokenGenerationEnv` observation space.
    :param action_space: ``Discrete(len(tokenizer))``.
    :param lr_schedule: learning-rate schedule (from the algorithm).
    :param model_name_or_path: a causal LM: a local folder (``save_pretrained`` layout), a packaged model name or
        a hub id (``"org/name"``, resolved through the Hugging Face cache; see
        :func:`~sb3_rlhf.common.models.resolve_model_path`). The SB3 zip records the name, not the weights.
    :param revision: branch, tag or commit of a hub id; the zip records the commit it resolved to, so ``load``
        gets the same weights even after the branch has moved.
    :param model_config: instead of a path, a config (``PretrainedConfig.to_dict()``) for a randomly initialised model.
    :param value_head: ``"shared"`` (head on the actor's backbone) or ``"separate"`` (its own backbone).
    :param critic_model_name_or_path: backbone for a separate critic; defaults to the actor's weights.
    :param temperature: sampling temperature; log-probs are computed at the same temperature.
    :param top_k: sample only from the ``top_k`` most probable tokens (0, the default: all); the policy's
        log-probs and entropy are those of the truncated, renormalised distribution.
    :param top_p: nucleus sampling: only the smallest set of most probable tokens (after ``top_k``) whose
        probability reaches ``top_p`` (1.0, the default: all); applied in the log-probs like ``top_k``.
    :param dtype: backbone dtype (``"float32"``, ``"bfloat16"``, ``"float16"``); the value head stays float32.
    :param mixed_precision: ``"bf16"``: keep float32 weights (the optimizer's master copy) and run the forward passes
        of the actor and a separate critic in bfloat16 under ``torch.autocast`` (``None``: as the weights are). The
        log-probs and entropy are still computed in float32; the old log-probs then come from a teacher-forced pass,
        since a KV-cached bf16 forward differs from it by more than float rounding.
    :param pack_sequences: run the teacher-forced passes (the update's, the rollout's) with the episodes packed into
        one row without their padding, the attention kept within each episode by the position ids. ``"auto"`` packs
        where the attention kernel takes packed sequences as they are (``flash_attention_2``/``3``, variable-length,
        no mask); ``True`` also elsewhere (sdpa and eager then build a block-diagonal mask: exact, but quadratic in
        the packed length); ``False`` never.
    :param attn_implementation: the attention of the actor, a separate critic and the reference built from
        ``model_name_or_path`` (transformers' ``attn_implementation``: ``"sdpa"``, ``"eager"``,
        ``"flash_attention_2"``, ...; ``None``: transformers' default).
    :param trust_remote_code: let transformers run the checkpoint's own code (off unless you trust it).
    :param gradient_checkpointing: trade compute for memory in the update.
    :param lora: LoRA through ``peft``: a dict of ``peft.LoraConfig`` arguments (defaults ``r=8``,
        ``lora_alpha=16``, ``lora_dropout=0``, ``target_modules="all-linear"``). Only the adapter and the value
        head train; the KL reference is the same backbone with the adapter disabled (no second copy), and
        :meth:`save_pretrained` exports the merged model.
    :param optimizer_class: optimizer (default AdamW).
    :param optimizer_kwargs: extra optimizer arguments.
    :param use_sde: must be False (SB3 passes it to every on-policy policy).
    """

    def __init__(
        self,
        observation_space: spaces.Dict,
        action_space: spaces.Discrete,
        lr_schedule: Schedule,
        model_name_or_path: str | None = None,
        model_config: PretrainedConfig | dict[str, Any] | None = None,
        revision: str | None = None,
        value_head: str = "shared",
        critic_model_name_or_path: str | None = None,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        dtype: str | None = None,
        mixed_precision: str | None = None,
        pack_sequences: bool | str = "auto",
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
        gradient_checkpointing: bool = False,
        lora: dict[str, Any] | None = None,
        optimizer_class: type[th.optim.Optimizer] = th.optim.AdamW,
        optimizer_kwargs: dict[str, Any] | None = None,
        use_sde: bool = False,
    ) -> None:
        # BasePolicy's by name: the maskable variant also derives from sb3-contrib's MaskableActorCriticPolicy,
        # whose __init__ builds an MLP policy
        BasePolicy.__init__(
            self,
            observation_space,
            action_space,
            optimizer_class=optimizer_class,
            optimizer_kwargs=optimizer_kwargs,
            normalize_images=False,
        )
        if use_sde:
            raise ValueError("use_sde=True is meaningless for token actions: leave it False")
        if not isinstance(action_space, spaces.Discrete):
            raise TypeError("TransformerActorCriticPolicy needs a Discrete token action space (TokenGenerationEnv)")
        if (model_name_or_path is None) == (model_config is None):
            raise ValueError(
                "pass exactly one of policy_kwargs['model_name_or_path'] (a local model folder) "
                "or policy_kwargs['model_config'] (a config dict for a random model)"
            )
        if value_head not in VALUE_HEADS:
            raise ValueError(f"value_head must be 'shared' or 'separate', got {value_head!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        check_truncation(top_k, top_p)
        if mixed_precision not in (None, "bf16"):
            raise ValueError(f"mixed_precision must be 'bf16' or None, got {mixed_precision!r}")
        if mixed_precision is not None and dtype not in (None, "float32"):
            raise ValueError(
                f"mixed_precision='bf16' keeps float32 master weights and computes in bfloat16: leave dtype unset "
                f"(float32), not {dtype!r} (dtype='bfloat16' alone trains the bf16 weights themselves)"
            )
        self.mixed_precision = mixed_precision
        if pack_sequences not in (True, False, "auto"):
            raise ValueError(f"pack_sequences must be True, False or 'auto', got {pack_sequences!r}")
        self.pack_sequences = pack_sequences
        self.attn_implementation = attn_implementation
        self.model_name_or_path = model_name_or_path
        self.revision = revision
        self.model_config = model_config.to_dict() if isinstance(model_config, PretrainedConfig) else model_config
        self.value_head_kind = value_head
        self.critic_model_name_or_path = critic_model_name_or_path
        self.temperature = float(temperature)
        self.top_k = int(top_k)
        self.top_p = float(top_p)
        self.dtype = dtype
        self.trust_remote_code = trust_remote_code
        self.gradient_checkpointing = gradient_checkpointing
        self.lora = lora
        self.n_actions = int(action_space.n)
        #: the fast path's action mask (:mod:`sb3_rlhf.envs.masks`), set by an algorithm that masks (NLPO): applied
        #: in generate(), in the teacher-forced log-probs and entropy; not a setting of the policy (not saved)
        self.action_mask: ActionMask | None = None
        #: the float32 size of one chunk of the update's log-probs and entropy (None: the library's default,
        #: :data:`~sb3_rlhf.common.sequences.LOGITS_CHUNK_BYTES`)
        self.logits_chunk_bytes: int | None = None

        path = None
        # a transformers causal LM, or under LoRA peft's PeftModel around one (which forwards the LM's attributes)
        self.actor: Any
        if model_name_or_path is not None:
            # resolved once (a hub id: one look-up) for the actor and a critic on the same weights
            path = resolve_model_path(model_name_or_path, revision, "policy model", trust_remote_code)
            self.actor = load_causal_lm(path, dtype=dtype, trust_remote_code=trust_remote_code, **self._attention())
            # a hub id is pinned to the commit it resolved to: the zip reloads (and the KL reference is) these weights
            self.revision = pinned_revision(model_name_or_path, revision, path)
        else:
            assert self.model_config is not None  # exactly one of the two, checked above
            self.actor = causal_lm_from_config(self.model_config, dtype=dtype, **self._attention())
        check_vocabulary(self.actor, self.n_actions, "the env's tokenizer")
        self.critic: PreTrainedModel | None = None
        if value_head == "separate":
            self.critic = load_backbone(
                critic_model_name_or_path or path,
                None if (critic_model_name_or_path or path) else self.model_config,
                dtype=dtype,
                trust_remote_code=trust_remote_code,
                **self._attention(),
            )
        for model in (self.actor, self.critic):
            if model is not None and gradient_checkpointing:
                # transformers 5 renamed it; the old name still works with a deprecation warning
                enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
                enable()
        if lora is not None:
            self.actor = with_lora(self.actor, lora)
        # after LoRA: peft adds an nn.Dropout per adapted layer when lora_dropout > 0
        for model in (self.actor, self.critic):
            if model is not None:
                disable_dropout(model)
        hidden_size = cast(th.nn.Embedding, (self.critic or self.actor).get_input_embeddings()).embedding_dim
        self.value_head = th.nn.Linear(hidden_size, 1)
        if pack_sequences is True:  # a model that would mix packed episodes is refused now, not at the first update
            for model in (self.actor, self.critic):
                if model is not None:
                    self.packs(model)
        #: how the policy is spread over the processes of a distributed run (set by the algorithm); one process: as is
        self.parallel = ParallelStrategy()
        trainable = [p for p in self.parameters() if p.requires_grad]
        # as SB3's ActorCriticPolicy: optimizer_class is any torch optimizer, whose base class takes no lr
        self.optimizer = self.optimizer_class(trainable, lr=lr_schedule(1), **self.optimizer_kwargs)  # type: ignore[call-arg]

    def use_fused_optimizer(self) -> bool:
        """Rebuild a fresh Adam or AdamW optimizer with ``fused=True`` (one kernel for every parameter's update
        instead of a loop of small ones), as the algorithms do on CUDA. Left alone: another optimizer class,
        ``optimizer_kwargs`` that set ``fused`` or ``foreach`` themselves, or an optimizer that has stepped.

        :return: whether the optimizer is now fused.
        """
        if self.optimizer_class not in (th.optim.Adam, th.optim.AdamW):
            return False
        if {"fused", "foreach"} & set(self.optimizer_kwargs) or self.optimizer.state:
            return bool(self.optimizer.defaults.get("fused"))
        groups = self.optimizer.param_groups
        params = [p for group in groups for p in group["params"]]
        self.optimizer = self.optimizer_class(params, lr=groups[0]["lr"], fused=True, **self.optimizer_kwargs)  # type: ignore[call-arg]
        return True

    def rebuild_optimizer(self, names: list[str]) -> None:
        """A fresh optimizer of the same class and settings over the parameters named ``names`` as the policy holds
        them now (FSDP replaces each parameter with its shard), before any step.

        :param names: the parameters' names, in the optimizer's order, read before they were replaced.
        """
        if self.optimizer.state:
            raise RuntimeError("rebuild_optimizer() would drop the optimizer's state: call it before the first step")
        params = dict(self.named_parameters())
        fused: dict[str, Any] = (
            {"fused": True} if self.optimizer.defaults.get("fused") and "fused" not in self.optimizer_kwargs else {}
        )
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer = self.optimizer_class([params[n] for n in names], lr=lr, **fused, **self.optimizer_kwargs)  # type: ignore[call-arg]

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = BasePolicy._get_constructor_parameters(self)  # by name, as __init__
        data.update(
            model_name_or_path=self.model_name_or_path,
            model_config=self.model_config,
            revision=self.revision,
            value_head=self.value_head_kind,
            critic_model_name_or_path=self.critic_model_name_or_path,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            dtype=self.dtype,
            mixed_precision=self.mixed_precision,
            pack_sequences=self.pack_sequences,
            attn_implementation=self.attn_implementation,
            trust_remote_code=self.trust_remote_code,
            gradient_checkpointing=self.gradient_checkpointing,
            lora=self.lora,
        )
        return data

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The context of the actor's and critic's forward passes: ``torch.autocast`` to bfloat16 under
        ``mixed_precision="bf16"``, else nothing."""
        if self.mixed_precision is None:
            return contextlib.nullcontext()
        return th.autocast(self.device.type, dtype=th.bfloat16)

    def packs(self, model: th.nn.Module) -> bool:
        """Whether the teacher-forced passes of ``model`` (the actor, a separate critic, the KL reference) run
        packed: as ``pack_sequences`` says, for a model that keeps packed rows apart
        (:func:`~sb3_rlhf.common.forward.packing_supported`); under ``"auto"`` also with a variable-length attention
        kernel only. ``pack_sequences=True`` with a model that mixes packed rows is an error."""
        if self.pack_sequences is False:
            return False
        if self.pack_sequences == "auto" and attention_implementation(model) not in VARLEN_ATTENTION:
            return False
        if packing_supported(model):
            return True
        if self.pack_sequences is True:
            raise ValueError(
                f"{type(model).__name__} ({attention_implementation(model)} attention) does not keep packed episodes "
                "apart by their position ids (its mask ignores them, or it carries a state from token to token): "
                "set pack_sequences=False"
            )
        return False

    def _attention(self) -> dict[str, Any]:
        """transformers' loading arguments for :attr:`attn_implementation` (none when it is left to transformers)."""
        return {} if self.attn_implementation is None else {"attn_implementation": self.attn_implementation}

    @property
    def packed(self) -> bool:
        """Whether the actor's teacher-forced passes run packed (:meth:`packs`)."""
        return self.packs(self.actor)

    # ------------------------------------------------------------------ values
    def _values_from_hidden(self, hidden: th.Tensor) -> th.Tensor:
        return self.value_head(hidden.float()).squeeze(-1)

    def _critic_hidden(
        self, input_ids: th.Tensor, attention_mask: th.Tensor, n_positions: int, packed: bool = False
    ) -> th.Tensor:
        assert self.critic is not None
        if packed:
            with self.autocast():
                return hidden_states_packed(self.critic, input_ids, attention_mask, n_positions)
        with self.autocast():
            out = self.critic(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask)
            )
        return out.last_hidden_state[:, -n_positions:]

    # ------------------------------------------------------------------ per-step SB3 API (one forward per token)
    def _step_outputs(
        self, obs: PyTorchObs, with_values: bool, actions: th.Tensor | None = None, allowed: th.Tensor | None = None
    ) -> tuple[th.Tensor, th.Tensor | None]:
        """The policy's logits ``(batch, n_actions)`` float32 (temperature, then the action mask ``allowed``
        (batch, n_actions) bool if given, then top-k/top-p, keeping ``actions`` (batch,) if given, see
        :func:`truncate_logits`) and, ``with_values``, the values ``(batch,)``."""
        input_ids, attention_mask = _obs_tensors(obs, self.n_actions)
        shared = with_values and self.critic is None
        with self.autocast():
            logits, hidden = forward_last_positions(
                self.actor, input_ids, attention_mask, 1, output_hidden_states=shared
            )
        logits = logits[:, -1, : self.n_actions].float() / self.temperature
        if allowed is not None:  # masked before the nucleus is taken, as generate() does
            logits = logits.masked_fill(~allowed, -float("inf"))
        logits = truncate_logits(logits, self.top_k, self.top_p, keep=actions)
        values = None
        if with_values:
            hidden = hidden if shared else self._critic_hidden(input_ids, attention_mask, 1)
            assert hidden is not None  # the actor's, asked for when shared
            values = self._values_from_hidden(hidden[:, -1])
        return logits, values

    def get_distribution(self, obs: PyTorchObs) -> CategoricalDistribution:
        logits, _ = self._step_outputs(obs, with_values=False)
        return CategoricalDistribution(self.n_actions).proba_distribution(action_logits=logits)

    def forward(self, obs: PyTorchObs, deterministic: bool = False) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        """:return: ``actions (batch,)``, ``values (batch, 1)``, ``log_prob (batch,)``, as SB3's ActorCriticPolicy."""
        logits, values = self._step_outputs(obs, with_values=True)
        assert values is not None
        distribution = CategoricalDistribution(self.n_actions).proba_distribution(action_logits=logits)
        actions = distribution.get_actions(deterministic=deterministic)
        return actions, values.unsqueeze(-1), distribution.log_prob(actions)

    def _predict(self, observation: PyTorchObs, deterministic: bool = False) -> th.Tensor:
        return self.get_distribution(observation).get_actions(deterministic=deterministic)

    def evaluate_actions(self, obs: PyTorchObs, actions: th.Tensor) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        """:return: ``values (batch, 1)``, ``log_prob (batch,)``, ``entropy (batch,)`` for SB3's PPO."""
        actions = actions.reshape(-1).long()
        logits, values = self._step_outputs(obs, with_values=True, actions=actions)
        assert values is not None
        distribution = CategoricalDistribution(self.n_actions).proba_distribution(action_logits=logits)
        return values.unsqueeze(-1), distribution.log_prob(actions), distribution.entropy()

    def predict_values(self, obs: PyTorchObs) -> th.Tensor:
        values = self._step_outputs(obs, with_values=True)[1]
        assert values is not None
        return values.unsqueeze(-1)

    def action_log_prob(self, obs: PyTorchObs, actions: th.Tensor) -> th.Tensor:
        """log π(action | obs) at the policy temperature (and top-k/top-p): ``(batch,)`` float32."""
        actions = actions.reshape(-1).long()
        logits, _ = self._step_outputs(obs, with_values=False, actions=actions)
        return logprobs_of_tokens(logits, actions)

    # ------------------------------------------------------------------ batched fast path
    def evaluate_sequences(
        self,
        input_ids: th.Tensor,
        attention_mask: th.Tensor,
        response_length: int,
        with_entropy: bool = True,
        entropy_grad: bool = True,
        with_values: bool = True,
        action_masks: th.Tensor | None = None,
    ) -> tuple[th.Tensor, th.Tensor | None, th.Tensor | None]:
        """One teacher-forced forward over ``[prompt (P) | response (T)]``.

        :param input_ids: ``(batch, P + T)`` int64.
        :param attention_mask: ``(batch, P + T)`` int64, 0 on padding (both sides).
        :param response_length: ``T``.
        :param with_entropy: compute the entropy of each position's distribution.
        :param entropy_grad: keep the entropy in the autograd graph (only an entropy bonus needs it; without, it
            is a logged statistic and its backward pass over the whole vocabulary is skipped).
        :param with_values: compute the values (the critic-free algorithms have no use for them: then neither the
            actor's hidden states are kept nor a separate critic runs).
        :param action_masks: ``(batch, T, ceil(n_actions / 8))`` uint8, the packed masks the responses were sampled
            under (``generate(output_action_masks=True)``); without them the policy's :attr:`action_mask` is asked
            for every step's mask in one teacher-forced pass.
        :return: ``logprobs (batch, T)`` float32 of the response tokens, ``values (batch, T + 1) | None`` float32 of
            the states s_0..s_T (``values[:, t]`` is V of the prompt plus ``t`` tokens), ``entropy (batch, T) | None``.
        """
        shared = with_values and self.critic is None
        tokens = input_ids[:, -response_length:]
        masked = action_masks is not None or self.action_mask is not None
        truncated = self.top_k > 0 or self.top_p < 1.0 or masked
        with self.autocast():
            logits, hidden = response_logits(
                self.actor,
                input_ids,
                attention_mask,
                response_length,
                self.temperature,
                self.n_actions,
                shared,
                scaled=truncated,  # the untruncated distribution is scaled in chunks below
                packed=self.packed,
            )
        values = None
        if with_values:
            if not shared:
                assert self.critic is not None  # not shared: a separate critic
                hidden = self._critic_hidden(input_ids, attention_mask, response_length + 1, self.packs(self.critic))
            assert hidden is not None  # the actor's, asked for when shared
            values = self._values_from_hidden(hidden)
        if not truncated:
            # π(a_t | s_t) = softmax(z_t / τ), in chunks of positions: no float32 (batch, T, vocab) copy
            logprobs, entropy = logprobs_and_entropy(
                logits, tokens, self.temperature, with_entropy, entropy_grad, self.logits_chunk_bytes
            )
            return logprobs, values, entropy
        if masked:
            with th.no_grad():
                if action_masks is not None:  # exactly the masks generate() sampled under
                    allowed = unpack_bool(action_masks.to(logits.device), self.n_actions)
                else:  # the action mask of every step, recomputed
                    assert self.action_mask is not None
                    allowed = self.action_mask.teacher_forced(input_ids, attention_mask, response_length)
                    allowed = allowed.to(logits.device)
                # the response token always kept: a padding token after a stop, or, recomputed, a token at a
                # nucleus' edge that float noise between this pass and generate()'s moved
                allowed.scatter_(-1, tokens.unsqueeze(-1), True)
            logits = logits.masked_fill(~allowed, -float("inf"))
        # π(a_t | s_t) = softmax(z_t / τ) renormalised over the mask and top-k/top-p (the response token always kept)
        logits = truncate_logits(logits, self.top_k, self.top_p, keep=tokens)
        logprobs = logprobs_of_tokens(logits, tokens)
        entropy = None
        if with_entropy:
            with th.set_grad_enabled(entropy_grad and th.is_grad_enabled()):
                entropy = _entropy_of_truncated(logits)
        return logprobs, values, entropy

    def critic_values(self, input_ids: th.Tensor, attention_mask: th.Tensor, response_length: int) -> th.Tensor:
        """V(s_0)..V(s_T) of ``[prompt (P) | response (T)]`` sequences from the separate critic alone (a shared
        head's values come with the actor's pass: :meth:`evaluate_sequences`).

        :param input_ids: ``(batch, P + T)`` int64; :param attention_mask: ``(batch, P + T)`` int64.
        :return: ``(batch, T + 1)`` float32.
        """
        if self.critic is None:
            raise ValueError(
                "critic_values() needs value_head='separate'; a shared head's values come from evaluate_sequences()"
            )
        return self._values_from_hidden(
            self._critic_hidden(input_ids, attention_mask, response_length + 1, self.packs(self.critic))
        )

    def make_reference_model(self) -> th.nn.Module:
        """The KL reference when none is given: the initial model, frozen. Under LoRA that is the actor with its
        adapter disabled (the untouched base weights, no copy); otherwise the model loaded again from
        ``model_name_or_path``, so that a policy loaded from a trained zip or a checkpoint still gets its initial
        weights as the reference. A policy built from ``model_config`` has no initial weights on disk: its
        reference is a frozen copy of the actor as it is now."""
        if self.lora is not None:
            return _AdapterDisabled(self.actor)
        if self.model_name_or_path is not None:
            reference = load_causal_lm(
                self.model_name_or_path,
                dtype=self.dtype,
                trust_remote_code=self.trust_remote_code,
                revision=self.revision,
                **self._attention(),
            )
            return freeze(reference).to(self.device)
        if self.parallel.sharded:  # a copy of the whole weights, gathered on every rank
            return freeze(self._whole_actor(self.parallel.full_actor_state_dict(everywhere=True)))
        return freeze(copy.deepcopy(self.actor))

    def _whole_actor(self, state: dict[str, Any]) -> Any:
        """A new, unsharded actor of this policy's architecture (with its LoRA adapter) holding ``state``."""
        actor: Any
        if self.model_name_or_path is not None:
            path = resolve_model_path(self.model_name_or_path, self.revision, "policy model", self.trust_remote_code)
            actor = load_causal_lm(
                path, dtype=self.dtype, trust_remote_code=self.trust_remote_code, **self._attention()
            )
        else:
            assert self.model_config is not None
            actor = causal_lm_from_config(self.model_config, dtype=self.dtype, **self._attention())
        if self.lora is not None:
            actor = with_lora(actor, self.lora)
        actor.load_state_dict(state)
        return actor.to(self.device)

    @without_transformers_bars
    def save_pretrained(self, path: str, tokenizer: Any = None, merge_lora: bool = True) -> None:
        """Export the actor (and ``tokenizer``) so that plain transformers loads it.

        Under LoRA the adapter is merged into a copy of the base weights (``merge_lora=False`` writes the peft
        adapter folder instead). The folder is written next to ``path`` first and renamed into place, so a
        crash never leaves a half-written export; an existing export at ``path`` is replaced.

        With several processes rank 0 writes; in a run sharded over them (``strategy="fsdp"``) every rank must call
        it, since the weights are gathered from every rank onto rank 0, which writes the files a one-process run
        writes.
        """
        actor = self.actor
        state = self.parallel.full_actor_state_dict() if self.parallel.sharded else None  # every rank takes part
        if not is_main_process():
            return  # rank 0 writes
        if state is not None:
            actor = self._whole_actor(state)
        if self.lora is not None and merge_lora:  # merged into a copy (the sharded path's actor is one already)
            actor = (actor if self.parallel.sharded else copy.deepcopy(actor)).merge_and_unload()
        with atomic_directory(path) as tmp:
            actor.save_pretrained(tmp, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)


def _obs_tensors(obs: PyTorchObs, n_tokens: int) -> tuple[th.Tensor, th.Tensor]:
    if not isinstance(obs, dict) or "input_ids" not in obs or "attention_mask" not in obs:
        raise ValueError(
            "observation must be a dict with 'input_ids' and 'attention_mask' (a TokenGenerationEnv observation)"
        )
    input_ids, attention_mask = obs["input_ids"].long(), obs["attention_mask"].long()
    if input_ids.dim() == 1:
        input_ids, attention_mask = input_ids.unsqueeze(0), attention_mask.unsqueeze(0)
    if input_ids.shape != attention_mask.shape:
        raise ValueError(
            f"observation input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
            "differ in shape: pass the env's observation unchanged"
        )
    if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= n_tokens):
        raise ValueError(
            f"observation input_ids hold token ids outside the tokenizer's [0, {n_tokens}): this policy was built "
            "for another tokenizer, or the observation is not one of its env's"
        )
    return input_ids, attention_mask
