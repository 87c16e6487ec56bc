"""Device memory: the error a run ends with when a device runs out, and the update's micro-batch token budget."""

from __future__ import annotations

import numpy as np
import torch as th

#: the share of the free device memory the update's activations may take under ``micro_batch_tokens="auto"`` (the
#: rest stays for the allocator's fragmentation, the optimizer's temporaries and the estimate's error)
AUTO_MEMORY_SHARE = 0.6


class DeviceMemoryError(th.OutOfMemoryError):
    """The device ran out of memory in the rollout or the update; the message names the setting to lower. It is a
    :class:`torch.OutOfMemoryError`, so code that catches that still catches it, and ``sb3-rlhf`` prints it in one
    line. Checkpoints are written atomically, so the last one written before the failure stays loadable."""


def local_bytes(tensor: th.Tensor) -> int:
    """The bytes of ``tensor`` this process holds: all of it, or its own shard of a DTensor (FSDP)."""
    local = getattr(tensor, "_local_tensor", tensor)
    return local.numel() * local.element_size()


def training_state_bytes(module: th.nn.Module, optimizer: th.optim.Optimizer) -> int:
    """The bytes of parameters, gradients and optimizer state this process holds for ``module`` (its shards under
    FSDP): what sharding divides."""
    total = sum(local_bytes(p) + (local_bytes(p.grad) if p.grad is not None else 0) for p in module.parameters())
    for state in optimizer.state.values():
        total += sum(local_bytes(v) for v in state.values() if isinstance(v, th.Tensor) and v.dim() > 0)
    return total


def activation_bytes_per_token(
    n_layers: int, hidden_size: int, vocab_size: int, dtype: th.dtype, intermediate_size: int | None = None
) -> int:
    """An estimate of the memory one token of a training forward keeps for its backward pass, in bytes.

    Per layer a transformer block keeps about ``16·h + 2·i`` activations per token (Korthikanti et al. 2022,
    without sequence parallelism or recomputation; ``i`` the MLP width, 4h by default), in the model's dtype; the
    head keeps the logits over the vocabulary in that dtype and once more in float32 (the log-softmax and its
    gradient).

    :param n_layers: transformer blocks; :param hidden_size: their width ``h``; :param vocab_size: the LM head's rows.
    """
    width = th.finfo(dtype).bits // 8 if dtype.is_floating_point else 4
    intermediate = intermediate_size or 4 * hidden_size
    per_layer = (16 * hidden_size + 2 * intermediate) * width
    head = vocab_size * (width + 2 * 4)
    return int(n_layers * per_layer + head)


def micro_batch_tokens_for(
    device: th.device, bytes_per_token: int, share: float = AUTO_MEMORY_SHARE, reserved_bytes: int = 0
) -> int | None:
    """The ``"auto"`` token budget of one micro-batch on ``device``: ``share`` of its free memory, less
    ``reserved_bytes`` still to be allocated (gradients and optimizer state before the first step), over
    :func:`activation_bytes_per_token`; ``None`` (no split) where free memory cannot be read (a CPU). Free memory
    counts what PyTorch's caching allocator holds without using (the rollout's leftovers), which it hands out
    again.
    """
    if device.type != "cuda":
        return None
    free, _ = th.cuda.mem_get_info(device)
    cached = th.cuda.memory_reserved(device) - th.cuda.memory_allocated(device)
    available = max(0, free + cached - reserved_bytes)
    return max(1, int(available * share / bytes_per_token))


def check_micro_batch_tokens(value: int | str | None) -> int | str | None:
    """``micro_batch_tokens`` itself (a positive integer, ``"auto"`` or ``None``), or a clear error."""
    if value is None or value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(
            f"micro_batch_tokens must be a positive integer, 'auto' (sized from the free GPU memory) or None (each "
            f"minibatch in one forward), got {value!r}"
        )
    return int(value)
