"""NLPO's masking policy: a frozen copy of the policy's model whose top-p nucleus is the action space."""

from __future__ import annotations

import copy
from typing import Any

import torch as th

from sb3_rlhf.envs.masks import TopPMask
from sb3_rlhf.policies import TransformerActorCriticPolicy


class MaskingPolicy:
    """A frozen copy of ``policy.actor``, brought level with it by :meth:`sync`, and the :class:`TopPMask` of it.

    Only the parameters the policy trains are copied; the others (a LoRA policy's base weights) are the very
    tensors of the policy, shared, never changed, so the copy costs the adapter's memory and not a second model. It
    saves like a module in SB3's zip (:meth:`state_dict` / :meth:`load_state_dict`), those trained copies only. It
    lives where the policy was when it was made (the algorithm builds it after moving the policy to its device).

    :param policy: the policy whose actor is copied.
    :param top_p: the nucleus mass of the mask.
    :param min_tokens_to_keep: the mask keeps at least this many tokens.
    """

    def __init__(self, policy: TransformerActorCriticPolicy, top_p: float, min_tokens_to_keep: int = 1) -> None:
        self.policy = policy
        shared = {id(p): p for p in policy.actor.parameters() if not p.requires_grad}
        self._shared = set(shared)
        self.model = copy.deepcopy(policy.actor, memo=shared).eval().requires_grad_(False)
        self.mask = TopPMask(
            self.model, top_p=top_p, temperature=policy.temperature, min_tokens_to_keep=min_tokens_to_keep
        )

    def _trained(self) -> dict[str, tuple[th.nn.Parameter, th.nn.Parameter]]:
        """``name -> (the policy's parameter, this copy's)`` for every parameter the policy trains."""
        own = dict(self.model.named_parameters())
        return {name: (p, own[name]) for name, p in self.policy.actor.named_parameters() if p.requires_grad}

    @th.no_grad()
    def follow_policy(self) -> None:
        """Move this copy's own parameters and buffers where the policy's are now (after a ``policy.to(...)`` the
        shared weights moved with the policy, the copy's own ones did not)."""
        for theirs, mine in self._trained().values():
            if mine.device != theirs.device or mine.dtype != theirs.dtype:
                mine.data = mine.data.to(device=theirs.device, dtype=theirs.dtype)
        self.model.to(self.policy.device)  # the buffers (the shared weights are there already)

    @th.no_grad()
    def sync(self) -> None:
        """Copy the policy's trained parameters into the masking model (the frozen ones are the policy's own)."""
        unfrozen = [n for n, p in self.policy.actor.named_parameters() if id(p) in self._shared and p.requires_grad]
        if unfrozen:
            raise RuntimeError(
                f"the policy's frozen weights {unfrozen[:3]} were unfrozen after NLPO was built; the masking copy "
                "shares them and would train with the policy: unfreeze before building the algorithm"
            )
        self.follow_policy()
        for theirs, mine in self._trained().values():
            mine.copy_(theirs)
        self.mask.reset()  # its KV cache came from the old weights

    def state_dict(self) -> dict[str, th.Tensor]:
        """The masking model's copies of the parameters the policy trains."""
        return {name: mine.detach().clone() for name, (_, mine) in self._trained().items()}

    @th.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None:
        """Put back what :meth:`state_dict` saved (the frozen parameters are the policy's own).

        :param strict: raise on a missing or unexpected parameter name (SB3 passes ``exact_match``).
        """
        trained = self._trained()
        if strict and set(state_dict) != set(trained):
            missing, unexpected = sorted(set(trained) - set(state_dict)), sorted(set(state_dict) - set(trained))
            raise ValueError(
                f"the saved masking policy does not match the policy's trained parameters (missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}): load it with the policy_kwargs it was saved with"
            )
        for name, value in state_dict.items():
            if name in trained:
                trained[name][1].copy_(value)
        self.mask.reset()
