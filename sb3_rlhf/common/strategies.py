"""How the policy is spread over the processes of a distributed run, on PyTorch's own engines.

* ``"ddp"``: :class:`~torch.nn.parallel.DistributedDataParallel`. Every rank holds the whole policy; DDP
  broadcasts rank 0's weights when it wraps, and all-reduces the gradients in buckets during the backward pass.
* ``"fsdp"``: FSDP2's :func:`~torch.distributed.fsdp.fully_shard`, per transformer block and at the root of the
  actor and of a separate critic, the value head at the root of the update's forward. Each rank holds ``1/W`` of
  the weights, gradients and optimizer state; a block's weights are gathered for its forward and backward, its
  gradients reduce-scattered. For the rollout the weights are gathered once (:meth:`ParallelStrategy.whole_weights`),
  not for every generated token. Frozen models (the KL reference, a reward model) are sharded too, without an
  optimizer, or replicated (``shard_frozen_models=False``).

With one process :class:`ParallelStrategy` itself is used: nothing is wrapped and every method is the plain
single-device one. What the library reduces itself (token counts, whitening, the KL controller's measurement,
control-flow decisions) stays in :mod:`sb3_rlhf.common.distributed`.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Iterator, Mapping
from typing import Any, cast

import torch as th
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from sb3_rlhf.common.distributed import world_size

#: the values of the algorithms' ``strategy`` setting
STRATEGIES = ("ddp", "fsdp")

#: gathered whole onto CPU memory (rank 0's copy), as a single-process run's state dicts are
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def check_strategy(strategy: str) -> str:
    """``strategy`` itself, or a clear error."""
    if strategy not in STRATEGIES:
        raise ValueError(
            f"strategy must be one of {STRATEGIES} ('ddp': a whole replica per process; 'fsdp': the weights, "
            f"gradients and optimizer state sharded over the processes), got {strategy!r}"
        )
    return strategy


def make_strategy(strategy: str, shard_frozen_models: bool = True) -> ParallelStrategy:
    """The strategy of this process: the named one when several processes run, the single-device one otherwise."""
    check_strategy(strategy)
    if not isinstance(shard_frozen_models, bool):
        raise TypeError(f"shard_frozen_models must be True or False, got {shard_frozen_models!r}")
    if world_size() == 1:
        return ParallelStrategy()
    check_launcher_settings(strategy)
    return DDPStrategy() if strategy == "ddp" else FSDPStrategy(shard_frozen_models)


def check_launcher_settings(strategy: str, environ: Mapping[str, str] = os.environ) -> None:
    """Refuse what ``accelerate launch`` was told and the library would ignore: it only starts the processes here,
    and the sharding and precision are the library's own settings."""
    if environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise ValueError("DeepSpeed is not supported: launch without --use_deepspeed and set strategy='fsdp' to shard")
    if environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise ValueError(
            f"accelerate was told to use FSDP, whose settings the library does not read (strategy is {strategy!r}): "
            "launch without --use_fsdp and set the algorithm's strategy='fsdp' (task file: algorithm.strategy, "
            "CLI: --strategy fsdp) instead"
        )
    if environ.get("ACCELERATE_MIXED_PRECISION", "no") not in ("no", ""):
        raise ValueError(
            f"accelerate was told mixed_precision={environ['ACCELERATE_MIXED_PRECISION']}, which the library does "
            "not read from it: launch with --mixed_precision no and set the policy's mixed_precision='bf16' "
            "(policy_kwargs) instead"
        )


def transformer_blocks(model: th.nn.Module) -> list[th.nn.Module]:
    """The repeated blocks of the transformers models in ``model`` (the classes each names in
    ``_no_split_modules``, as Accelerate's FSDP auto-wrap reads them): the units FSDP shards one by one."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names and m is not model]


class UpdateForward(th.nn.Module):
    """The policy's update forward (``evaluate_sequences``) as a module's ``forward``, so that DDP's and FSDP's
    hooks run around the pass whose backward they reduce."""

    def __init__(self, policy: Any) -> None:
        super().__init__()
        self.policy = policy

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # (batch, T)-sized copies, not views: the hooks FSDP puts on a module's outputs do not survive an in-place
        # op on a view, and a loss is free to make one
        return tuple(None if t is None else t.clone() for t in self.policy.evaluate_sequences(*args, **kwargs))


def _fqn_keyed_to_indexed(state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state dict keyed by parameter names (``torch.distributed.checkpoint``'s) in the layout of
    ``Optimizer.state_dict()`` (parameters numbered in the order of the param groups), and back
    (:func:`_indexed_to_fqn_keyed`), so that a sharded run writes the zip a single-process run writes."""
    names = [name for group in state["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(names)}
    groups = [{**group, "params": [index[n] for n in group["params"]]} for group in state["param_groups"]]
    return {"state": {index[name]: value for name, value in state["state"].items()}, "param_groups": groups}


def optimizer_parameter_names(policy: Any) -> list[str]:
    """The names of the parameters the policy's optimizer updates, in its order."""
    names = {id(p): n for n, p in policy.named_parameters()}
    return [names[id(p)] for group in policy.optimizer.param_groups for p in group["params"]]


def _indexed_to_fqn_keyed(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    groups, offset = [], 0
    for group in state["param_groups"]:
        n = len(group["params"])
        groups.append({**group, "params": names[offset : offset + n]})
        offset += n
    return {"state": {names[int(i)]: value for i, value in state["state"].items()}, "param_groups": groups}


class ParallelStrategy:
    """One process: the policy as it is. The base of the distributed strategies, whose methods every rank calls
    together."""

    #: whether ranks hold shards of the weights (then saving and loading gather or scatter them)
    sharded = False

    @property
    def holds_whole_weights(self) -> bool:
        """Whether every rank holds the policy's whole weights now (a forward needs no other rank)."""
        return True

    def prepare(self, policy: Any) -> None:
        """Wrap or shard the policy's trainable modules and rebuild its optimizer over what the ranks now hold.

        :param policy: a :class:`~sb3_rlhf.TransformerActorCriticPolicy`, fresh (before any step).
        """
        self.policy = policy
        self.optimizer_names = optimizer_parameter_names(policy)

    def update_forward(self, *args: Any, **kwargs: Any) -> Any:
        """The policy's ``evaluate_sequences`` for the update, through the strategy's wrapper (whose hooks reduce
        the gradients in the backward pass)."""
        return self.policy.evaluate_sequences(*args, **kwargs)

    def prepare_frozen(self, model: th.nn.Module) -> None:
        """Place a frozen model (the KL reference, a reward model): replicated, or sharded under ``fsdp``."""

    @contextlib.contextmanager
    def whole_weights(self) -> Iterator[None]:
        """Inside, every rank holds the policy's whole weights (the rollout: ``generate()`` reads them once per
        token)."""
        yield

    @contextlib.contextmanager
    def gradient_sync(self, enabled: bool) -> Iterator[None]:
        """``enabled=False``: the backward passes inside accumulate their gradients on each rank unreduced (the
        micro-batches before the last; under ``ddp`` only: FSDP reduce-scatters each micro-batch's gradients, so
        that no rank holds whole ones)."""
        yield

    def clip_grad_norm(self, max_norm: float) -> th.Tensor:
        """Clip the gradients of the policy at ``max_norm`` (their norm over every rank's shard) and return the
        norm before clipping, a plain 0-d tensor."""
        return th.nn.utils.clip_grad_norm_(self.policy.parameters(), max_norm)

    def full_state_dicts(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The policy's and its optimizer's state dicts as a single process has them (every rank calls it; rank 0
        gets them whole, others may get them empty)."""
        return self.policy.state_dict(), self.policy.optimizer.state_dict()

    def _optimizer_stepped(self) -> bool:
        # torch.distributed.checkpoint fills an optimizer without state by a step at learning rate 0, which would
        # count as Adam's first step: an optimizer that has not stepped is saved as it is
        return bool(self.policy.optimizer.state)

    def load_full_state_dicts(
        self, policy_state: dict[str, Any] | None, optimizer_state: dict[str, Any] | None, strict: bool = True
    ) -> None:
        """Load state dicts of :meth:`full_state_dicts`'s layout (a zip's) into what the ranks hold."""
        if policy_state is not None:
            self.policy.load_state_dict(policy_state, strict=strict)
        if optimizer_state is not None:
            self.policy.optimizer.load_state_dict(optimizer_state)

    def full_actor_state_dict(self, everywhere: bool = False) -> dict[str, Any]:
        """The actor's whole state dict (every rank calls it; rank 0 gets it, or every rank with ``everywhere``)."""
        return self.policy.actor.state_dict()

    def save_sharded(self, folder: str) -> None:
        """Write the policy and optimizer with :mod:`torch.distributed.checkpoint`, each rank its own shard."""
        import torch.distributed.checkpoint as dcp

        state: dict[str, Any] = {"model": get_model_state_dict(self.policy)}
        if self._optimizer_stepped():
            state["optimizer"] = get_state_dict(self.policy, self.policy.optimizer)[1]
        dcp.save(state, checkpoint_id=folder)

    def load_sharded(self, folder: str) -> None:
        """Read what :meth:`save_sharded` wrote into the policy and its optimizer (each rank its shard)."""
        import torch.distributed.checkpoint as dcp

        saved = dcp.FileSystemReader(folder).read_metadata().state_dict_metadata
        state: dict[str, Any] = {"model": get_model_state_dict(self.policy)}
        if any(key.startswith("optimizer.") for key in saved):  # written after the optimizer's first step
            state["optimizer"] = get_state_dict(self.policy, self.policy.optimizer)[1]
        dcp.load(state, checkpoint_id=folder)
        set_model_state_dict(self.policy, state["model"])
        if "optimizer" in state:
            set_optimizer_state_dict(self.policy, self.policy.optimizer, state["optimizer"])


class DDPStrategy(ParallelStrategy):
    """A whole replica per rank; the update's forward runs through
    :class:`~torch.nn.parallel.DistributedDataParallel`, which broadcasts rank 0's weights when it wraps (a fresh
    value head is random) and all-reduces the gradients, averaged, in buckets during the backward pass."""

    def prepare(self, policy: Any) -> None:
        super().prepare(policy)
        device = policy.device
        ddp = th.nn.parallel.DistributedDataParallel
        # no batch statistics in a transformer: no buffer to send again before each forward (the name by version)
        newer = "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters
        no_buffer_sync: dict[str, Any] = {"forward_sync_buffers": False} if newer else {"broadcast_buffers": False}
        self.ddp = ddp(UpdateForward(policy), device_ids=[device] if device.type == "cuda" else None, **no_buffer_sync)

    def update_forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.ddp(*args, **kwargs)

    @contextlib.contextmanager
    def gradient_sync(self, enabled: bool) -> Iterator[None]:
        with contextlib.nullcontext() if enabled else self.ddp.no_sync():
            yield


class FSDPStrategy(ParallelStrategy):
    """FSDP2 (:func:`~torch.distributed.fsdp.fully_shard`) over a one-dimensional mesh of every rank.

    :param shard_frozen_models: shard the KL reference and reward models too (eval-only, no optimizer: each of
        their forwards gathers one block at a time); ``False``: each rank holds them whole.
    """

    sharded = True

    def __init__(self, shard_frozen_models: bool = True) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        self.shard_frozen_models = shard_frozen_models
        device_type = "cuda" if th.cuda.is_available() else "cpu"
        self.mesh = init_device_mesh(device_type, (world_size(),))
        self._gathered = 0

    def _shard(self, model: th.nn.Module, frozen: bool = False) -> None:
        from torch.distributed.fsdp import fully_shard

        for block in transformer_blocks(model):
            fully_shard(block, mesh=self.mesh)
        # a frozen model's root too gives its weights back after each forward: no backward follows to do it
        root_settings: dict[str, Any] = {"reshard_after_forward": True} if frozen else {}
        fully_shard(model, mesh=self.mesh, **root_settings)

    def prepare(self, policy: Any) -> None:
        from sb3_rlhf.common.distributed import rank

        super().prepare(policy)
        # rank 0's weights on every rank (a fresh value head is random), scattered as the shards are made
        whole = policy.state_dict() if rank() == 0 else {}
        for model in (policy.actor, policy.critic):
            if model is not None:
                self._shard(model)
        from torch.distributed.fsdp import fully_shard

        # the root: the value head, and the update's forward, whose backward the root's hooks finish
        self.root: Any = cast(Any, fully_shard(UpdateForward(policy), mesh=self.mesh))
        set_model_state_dict(policy, whole, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        # FSDP takes the first module to run forward for the root: one token through the update's forward now,
        # before generate() runs the actor's own hooks
        with th.no_grad():
            one = th.ones((1, 2), dtype=th.long, device=policy.device)
            self.root(one, one, 1, with_entropy=False)
        self.root.reshard()
        policy.rebuild_optimizer(self.optimizer_names)  # over the sharded parameters (new tensors)

    def update_forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.root(*args, **kwargs)

    def prepare_frozen(self, model: th.nn.Module) -> None:
        from torch.distributed.fsdp import FSDPModule

        if self.shard_frozen_models and not isinstance(model, FSDPModule) and any(True for _ in model.parameters()):
            self._shard(model, frozen=True)

    def _fsdp_modules(self) -> list[Any]:
        from torch.distributed.fsdp import FSDPModule

        return [m for m in self.root.modules() if isinstance(m, FSDPModule)]  # the root first

    @property
    def holds_whole_weights(self) -> bool:
        return self._gathered > 0

    @contextlib.contextmanager
    def whole_weights(self) -> Iterator[None]:
        self._gathered += 1
        modules = self._fsdp_modules()
        try:
            if self._gathered == 1:
                for module in modules:
                    module.unshard()
                    # kept whole between forwards: a generated token does not gather each block again
                    module.set_reshard_after_forward(False, recurse=False)
            yield
        finally:
            self._gathered -= 1
            if self._gathered == 0:
                for module in modules:
                    module.reshard()
                    if module is not self.root:
                        module.set_reshard_after_forward(True, recurse=False)

    def clip_grad_norm(self, max_norm: float) -> th.Tensor:
        norm = th.nn.utils.clip_grad_norm_(self.policy.parameters(), max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor over the mesh

    def full_state_dicts(self) -> tuple[dict[str, Any], dict[str, Any]]:
        if not self._optimizer_stepped():  # no state to gather; its param groups are the same on every rank
            return get_model_state_dict(self.policy, options=_FULL), self.policy.optimizer.state_dict()
        policy_state, optimizer_state = get_state_dict(self.policy, self.policy.optimizer, options=_FULL)
        return policy_state, (_fqn_keyed_to_indexed(optimizer_state) if optimizer_state else optimizer_state)

    def load_full_state_dicts(
        self, policy_state: dict[str, Any] | None, optimizer_state: dict[str, Any] | None, strict: bool = True
    ) -> None:
        options = StateDictOptions(full_state_dict=True, strict=strict)
        if policy_state is not None:
            set_model_state_dict(self.policy, policy_state, options=options)
        if optimizer_state is not None and not optimizer_state["state"]:
            # an optimizer that never stepped: its settings only (loading it would fill it with a step of its own)
            for group, saved in zip(self.policy.optimizer.param_groups, optimizer_state["param_groups"]):
                group.update({k: v for k, v in saved.items() if k != "params"})
        elif optimizer_state is not None:
            state = _indexed_to_fqn_keyed(optimizer_state, self.optimizer_names)
            set_optimizer_state_dict(self.policy, self.policy.optimizer, state, options=options)

    def full_actor_state_dict(self, everywhere: bool = False) -> dict[str, Any]:
        options = StateDictOptions(full_state_dict=True) if everywhere else _FULL
        return get_model_state_dict(self.policy.actor, options=options)
