"""One teacher-forced forward pass of a causal LM over ``[prompt | response]`` sequences."""

from __future__ import annotations

import inspect

import torch as th

from sb3_rlhf.common.sequences import logprobs_of_tokens, position_ids_from_mask

_TAKES_LOGITS_TO_KEEP: dict[type, bool] = {}


def _base_model(model: th.nn.Module) -> th.nn.Module:
    """The transformers model inside a peft model (or the adapter-disabled LoRA reference); ``model`` otherwise."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def accepts_logits_to_keep(model: th.nn.Module) -> bool:
    """Whether ``model``'s forward takes ``logits_to_keep``. A peft model (and the adapter-disabled LoRA reference)
    passes its keyword arguments through to the transformers model inside, whose signature decides."""
    model_class = type(_base_model(model))
    # cached by class, not by model: a cache keyed by the model would keep every model it saw alive
    if model_class not in _TAKES_LOGITS_TO_KEEP:
        _TAKES_LOGITS_TO_KEEP[model_class] = "logits_to_keep" in inspect.signature(model_class.forward).parameters
    return _TAKES_LOGITS_TO_KEEP[model_class]


#: the attention implementations whose kernels take packed sequences as they are (variable-length, no mask), where
#: :func:`forward_last_positions`' ``packed="auto"`` packs; others (sdpa, eager) build a block-diagonal mask from the
#: position ids instead, correct but quadratic in the packed length, so they pack only when asked
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")


def attention_implementation(model: th.nn.Module) -> str | None:
    """The attention implementation of ``model`` (a transformers model, or peft's around one)."""
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None)


def packed_layout(attention_mask: th.Tensor, n_positions: int) -> tuple[th.Tensor, th.Tensor]:
    """Where the real tokens of left- and right-padded rows go when they are packed into one row without padding,
    and where the last ``n_positions`` columns of each row are in it.

    :param attention_mask: ``(batch, seq_len)`` 0/1.
    :return: ``positions (1, n_real)`` int64, each row's position ids (restarting at 0 for each row: how the model
        tells the packed sequences apart), and ``index (batch, n_positions)`` int64, the packed index of each of the
        last ``n_positions`` columns; a padding column after a row's last real token gets that token's index (its
        outputs are masked wherever they are read).
    """
    mask = attention_mask.bool()
    lengths = mask.sum(-1)
    offsets = lengths.cumsum(0) - lengths
    last_real = (mask.long().cumsum(-1) - 1).clamp(min=0)  # each column's last real token at or before it
    index = (offsets.unsqueeze(-1) + last_real)[:, -n_positions:]
    positions = position_ids_from_mask(attention_mask)[mask].unsqueeze(0)
    return positions, index


def _packed_inputs(
    input_ids: th.Tensor, attention_mask: th.Tensor, n_positions: int
) -> tuple[dict[str, th.Tensor | int | None], th.Tensor]:
    """The model inputs of the rows packed into one (:func:`packed_layout`), and the packed index of each row's last
    ``n_positions`` columns. Run them without a cache: transformers reads the packing off the position ids only
    when neither an attention mask nor a cache is passed."""
    positions, index = packed_layout(attention_mask, n_positions)
    inputs: dict[str, th.Tensor | int | None] = dict(
        input_ids=input_ids[attention_mask.bool()].unsqueeze(0), position_ids=positions, attention_mask=None
    )
    return inputs, index


def forward_last_positions(
    model: th.nn.Module,
    input_ids: th.Tensor,
    attention_mask: th.Tensor,
    n_positions: int,
    output_hidden_states: bool = False,
    packed: bool = False,
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
    :param packed: run the rows packed into one, without their padding (:func:`packed_layout`): the attention sees
        each row alone through its position ids (variable-length kernels, or a block-diagonal mask), and no compute
        goes to padding. The model must take ``logits_to_keep`` and keep packed rows apart
        (:func:`packing_supported`).
    :return: ``logits (batch, n_positions, vocab)`` and ``hidden (batch, n_positions, hidden) | None``.
    """
    index = None
    inputs: dict[str, th.Tensor | int | None]
    if packed:  # one row of every row's real tokens; the LM head at the kept positions only
        if not accepts_logits_to_keep(model):
            raise ValueError(
                f"{type(model).__name__} takes no logits_to_keep: it cannot run packed (pack_sequences=False)"
            )
        inputs, index = _packed_inputs(input_ids, attention_mask, n_positions)
        inputs["logits_to_keep"] = index.flatten()  # the duplicates (padding) are hidden-sized rows, not logits
    else:
        inputs = dict(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask)
        )
        if accepts_logits_to_keep(model):
            inputs["logits_to_keep"] = n_positions
    head_inputs: list[th.Tensor] = []
    hook = None
    if output_hidden_states:
        head = model.get_output_embeddings()  # type: ignore[operator]
        hook = head.register_forward_pre_hook(lambda module, args: head_inputs.append(args[0]))
    try:
        out = model(**inputs, use_cache=False)
    finally:
        if hook is not None:
            hook.remove()
    if index is not None:
        logits = out.logits.view(*index.shape, -1)
        hidden = head_inputs[-1].view(*index.shape, -1) if output_hidden_states else None
        return logits, hidden
    logits = out.logits
    if logits.shape[1] != n_positions:  # no logits_to_keep; a no-op slice would still cost its backward a
        logits = logits[:, -n_positions:]  # zero-filled copy of the whole (batch, n, vocab) gradient
    hidden = head_inputs[-1][:, -n_positions:] if output_hidden_states else None
    return logits, hidden


_PACKING_SUPPORTED: dict[tuple[type, str | None], bool] = {}


def packing_supported(model: th.nn.Module) -> bool:
    """Whether ``model`` keeps packed rows apart by their position ids alone, found once per model class and
    attention implementation: one row's outputs must not change with the row packed before it. Models that build
    their mask without the position ids (OPT, Falcon, Bloom, MPT, ...) or carry a state from token to token
    (Mamba, RWKV, hybrids) fail it."""
    base = _base_model(model)
    key = (type(base), attention_implementation(model))
    if key not in _PACKING_SUPPORTED:
        # a causal LM runs its head at the kept positions only; a backbone (a separate critic) has no head
        language_model = getattr(base, "get_output_embeddings", lambda: None)() is not None
        _PACKING_SUPPORTED[key] = (not language_model or accepts_logits_to_keep(model)) and _rows_stay_apart(model)
    return _PACKING_SUPPORTED[key]


@th.no_grad()
def _rows_stay_apart(model: th.nn.Module) -> bool:
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().weight.shape[0]  # type: ignore[operator]
    second = th.tensor([5, 7, 11], device=device) % vocab
    positions = th.tensor([[0, 1, 2, 0, 1, 2]], device=device)
    outputs = []
    for first in ([3, 4, 6], [9, 2, 8]):
        ids = th.cat([th.tensor(first, device=device) % vocab, second]).unsqueeze(0)
        out = model(input_ids=ids, position_ids=positions, attention_mask=None, use_cache=False)
        states = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
        outputs.append(states[0, 3:].float())
    # masked-out keys weigh exactly 0 in every kernel that keeps rows apart: the second row's outputs are the same
    return bool(th.allclose(outputs[0], outputs[1], rtol=1e-6, atol=1e-6))


def hidden_states_packed(
    model: th.nn.Module, input_ids: th.Tensor, attention_mask: th.Tensor, n_positions: int
) -> th.Tensor:
    """The last-layer hidden states of a backbone (a separate critic) at the last ``n_positions`` columns, run over
    the rows packed into one (:func:`packed_layout`): ``(batch, n_positions, hidden)``."""
    inputs, index = _packed_inputs(input_ids, attention_mask, n_positions)
    return model(**inputs, use_cache=False).last_hidden_state[0, index]


def response_logits(
    model: th.nn.Module,
    input_ids: th.Tensor,
    attention_mask: th.Tensor,
    response_length: int,
    temperature: float,
    n_actions: int,
    output_hidden_states: bool = False,
    scaled: bool = True,
    packed: bool = False,
) -> tuple[th.Tensor, th.Tensor | None]:
    """Temperature-scaled logits predicting each response token, and hidden states of the states s_0..s_T.

    With ``input_ids = [prompt (P) | response (T)]``, the token at position ``P + t`` is predicted from
    position ``P + t - 1``, and the state ``s_t`` (prompt + t tokens) ends at position ``P + t - 1``.

    :param scaled: ``False``: the model's own logits (its dtype, not divided by the temperature), for
        :func:`~sb3_rlhf.common.sequences.logprobs_and_entropy` to scale in chunks.
    :param packed: run the rows packed, without padding (:func:`forward_last_positions`).
    :return: ``logits (batch, T, n_actions)`` float32, ``hidden (batch, T + 1, hidden) | None``.
    """
    logits, hidden = forward_last_positions(
        model, input_ids, attention_mask, response_length + 1, output_hidden_states, packed
    )
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
    packed: bool = False,
) -> th.Tensor:
    """log π(response token | prefix) under ``model`` at ``temperature``: ``(batch, T)`` float32 (``packed``: run
    without padding, :func:`forward_last_positions`)."""
    logits, _ = response_logits(
        model, input_ids, attention_mask, response_length, temperature, n_actions, packed=packed
    )
    return logprobs_of_tokens(logits, input_ids[:, -response_length:])


def next_token_logits(
    model: th.nn.Module, input_ids: th.Tensor, attention_mask: th.Tensor, temperature: float, n_actions: int
) -> th.Tensor:
    """Temperature-scaled logits of the next token after a left-padded window: ``(batch, n_actions)``."""
    logits, _ = forward_last_positions(model, input_ids, attention_mask, 1)
    return logits[:, -1, :n_actions].float() / temperature
