"""One teacher-forced forward pass of a causal LM over ``[prompt | response]`` sequences."""

from __future__ import annotations

import inspect

import torch as th

from sb3_rlhf.common.sequences import logprobs_of_tokens, position_ids_from_mask

_TAKES_LOGITS_TO_KEEP: dict[type, bool] = {}


def accepts_logits_to_keep(model: th.nn.Module) -> bool:
    """Whether ``model``'s forward takes ``logits_to_keep``. A peft model (and the adapter-disabled LoRA reference)
    passes its keyword arguments through to the transformers model inside, whose signature decides."""
    get_base_model = getattr(model, "get_base_model", None)
    base = get_base_model() if callable(get_base_model) else model
    model_class = type(base)
    # cached by class, not by model: a cache keyed by the model would keep every model it saw alive
    if model_class not in _TAKES_LOGITS_TO_KEEP:
        _TAKES_LOGITS_TO_KEEP[model_class] = "logits_to_keep" in inspect.signature(model_class.forward).parameters
    return _TAKES_LOGITS_TO_KEEP[model_class]


def forward_last_positions(
    model: th.nn.Module,
    input_ids: th.Tensor,
    attention_mask: th.Tensor,
    n_positions: int,
    output_hidden_states: bool = False,
) -> tuple[th.Tensor, th.Tensor | None]:
    """Logits (and last-layer hidden states) at the last ``n_positions`` positions.

    Position ids come from the attention mask, so left padding does not shift positions. Only the last
    ``n_positions`` logits are computed where the model supports ``logits_to_keep`` (the LM head over the
    prompt is wasted work).

    The last-layer hidden states are what the LM head reads, taken from its input by a hook: asking the model for
    ``output_hidden_states`` would keep every layer's ``(batch, seq_len, hidden)`` states alive until it returns.

    :param input_ids: ``(batch, seq_len)`` int64.
    :param attention_mask: ``(batch, seq_len)`` int64.
    :param output_hidden_states: also return the last-layer hidden states (for a value head on the actor).
    :return: ``logits (batch, n_positions, vocab)`` and ``hidden (batch, n_positions, hidden) | None``.
    """
    kwargs = {}
    if accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = n_positions
    head_inputs: list[th.Tensor] = []
    hook = None
    if output_hidden_states:
        head = model.get_output_embeddings()  # type: ignore[operator]
        hook = head.register_forward_pre_hook(lambda module, args: head_inputs.append(args[0]))
    try:
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
            **kwargs,
        )
    finally:
        if hook is not None:
            hook.remove()
    logits = out.logits
    if logits.shape[1] != n_positions:  # no logits_to_keep; a no-op slice would still cost its backward a
        logits = logits[:, -n_positions:]  # zero-filled copy of the whole (batch, n, vocab) gradient
    hidden = head_inputs[-1][:, -n_positions:] if output_hidden_states else None
    return logits, hidden


def response_logits(
    model: th.nn.Module,
    input_ids: th.Tensor,
    attention_mask: th.Tensor,
    response_length: int,
    temperature: float,
    n_actions: int,
    output_hidden_states: bool = False,
    scaled: bool = True,
) -> tuple[th.Tensor, th.Tensor | None]:
    """Temperature-scaled logits predicting each response token, and hidden states of the states s_0..s_T.

    With ``input_ids = [prompt (P) | response (T)]``, the token at position ``P + t`` is predicted from
    position ``P + t - 1``, and the state ``s_t`` (prompt + t tokens) ends at position ``P + t - 1``.

    :param scaled: ``False``: the model's own logits (its dtype, not divided by the temperature), for
        :func:`~sb3_rlhf.common.sequences.logprobs_and_entropy` to scale in chunks.
    :return: ``logits (batch, T, n_actions)`` float32, ``hidden (batch, T + 1, hidden) | None``.
    """
    logits, hidden = forward_last_positions(model, input_ids, attention_mask, response_length + 1, output_hidden_states)
    if not scaled:
        return logits[:, :-1, :n_actions], hidden
    # float32 before scaling: bf16 logits divided by a temperature lose the digits the PPO ratio needs
    logits = logits[:, :-1, :n_actions].float()
    # at temperature 1 no (batch, T, vocab) copy is made for the division
    return (logits if temperature == 1.0 else logits / temperature), hidden


def response_logprobs(
    model: th.nn.Module,
    input_ids: th.Tensor,
    attention_mask: th.Tensor,
    response_length: int,
    temperature: float,
    n_actions: int,
) -> th.Tensor:
    """log π(response token | prefix) under ``model`` at ``temperature``: ``(batch, T)`` float32."""
    logits, _ = response_logits(model, input_ids, attention_mask, response_length, temperature, n_actions)
    return logprobs_of_tokens(logits, input_ids[:, -response_length:])


def next_token_logits(
    model: th.nn.Module, input_ids: th.Tensor, attention_mask: th.Tensor, temperature: float, n_actions: int
) -> th.Tensor:
    """Temperature-scaled logits of the next token after a left-padded window: ``(batch, n_actions)``."""
    logits, _ = forward_last_positions(model, input_ids, attention_mask, 1)
    return logits[:, -1, :n_actions].float() / temperature
