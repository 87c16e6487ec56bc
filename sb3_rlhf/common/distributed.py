"""What the ranks of a distributed run reduce themselves: one process per device, launched by ``torchrun`` (or
``accelerate launch``, which runs torchrun), each rank generating its own share of the episodes.

The gradients are PyTorch's to reduce (DDP or FSDP2: :mod:`sb3_rlhf.common.strategies`). What else must agree
across ranks is reduced here, in one place: the token counts that weight each rank's loss, advantage-whitening
statistics, the KL controller's measurement, the timestep counter and every decision that changes control flow
(early stop, skipped updates). With one process every function is the identity, so single-process runs are
unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch as th
import torch.distributed as dist

from sb3_rlhf.common.sequences import masked_whiten, zero_padding


def init_distributed() -> bool:
    """Join the process group that ``torchrun`` describes in the environment (``WORLD_SIZE``, ``RANK``,
    ``MASTER_ADDR``, ...): NCCL with one GPU per local rank where CUDA is available, gloo on CPU.

    :return: whether this process is one of several.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if th.cuda.is_available():
        th.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main_process() -> bool:
    """Rank 0: the one that logs, checkpoints, saves and reports."""
    return rank() == 0


def _device() -> th.device:
    return th.device("cuda", th.cuda.current_device()) if dist.get_backend() == "nccl" else th.device("cpu")


def _reduce_over_ranks(values: Iterable[float], op: str) -> list[float]:
    """A few numbers reduced element-wise over every rank by ``op`` (a :class:`~torch.distributed.ReduceOp` name),
    in float64; one process: the numbers themselves."""
    values = list(values)
    if world_size() == 1:
        return values
    tensor = th.tensor(values, dtype=th.float64, device=_device())
    dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op))
    return tensor.tolist()


def sum_over_ranks(values: Iterable[float]) -> list[float]:
    """Element-wise sums of a few numbers over every rank (float64)."""
    return _reduce_over_ranks(values, "SUM")


def raise_on_every_rank(failed: BaseException | None, elsewhere: str) -> None:
    """Raise ``failed`` where it happened and an error saying ``elsewhere`` on every other rank (one all-reduce)."""
    (failures,) = sum_over_ranks([float(failed is not None)])
    if failed is not None:
        raise failed
    if failures:
        raise RuntimeError(elsewhere)


def max_over_ranks(values: Iterable[float]) -> list[float]:
    """Element-wise maxima of a few numbers over every rank (float64)."""
    return _reduce_over_ranks(values, "MAX")


def mean_over_ranks(value: float) -> float:
    return sum_over_ranks([value])[0] / world_size()


def masked_whiten_over_ranks(values: th.Tensor, mask: th.Tensor, eps: float = 1e-8) -> th.Tensor:
    """:func:`~sb3_rlhf.common.sequences.masked_whiten` with the mean and variance of every rank's masked values,
    so that whitened advantages mean the same on every rank as in one process holding the whole batch."""
    if world_size() == 1:
        return masked_whiten(values, mask, eps)
    total, count = sum_over_ranks([zero_padding(values, mask).sum().item(), mask.sum().item()])
    mean = total / max(count, 1.0)
    (squares,) = sum_over_ranks([zero_padding((values - mean) ** 2, mask).sum().item()])
    var = squares / max(count, 1.0)
    return th.where(mask.bool(), (values - mean) / (var + eps) ** 0.5, th.zeros_like(values))
