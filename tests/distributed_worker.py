"""One rank of a distributed run, for tests/test_distributed.py (launched with torchrun).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_worker.py MODEL OUT \
        --strategy fsdp --runs ppo grpo

Each run trains ``--iterations`` iterations of the tiny rule-reward task with SGD (whose step is linear in the
gradient, so that a run can be compared with one process within floating-point tolerance), then writes what the
test compares to ``OUT/<run>_rank<r>.pt``: the whole weights (gathered under fsdp), β, the counters and the
episodes this rank sampled (``--save``: also its zip and exported policy). ``--memory`` also writes this rank's bytes of parameters, gradients and AdamW state
after one update; ``--checkpoint`` checkpoints the first run after each update, and ``--resume`` resumes it from
the checkpoint in that folder.
"""

import argparse
import os
import sys

import torch as th
import torch.distributed as dist
from stable_baselines3.common.callbacks import BaseCallback, CallbackList

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sb3_rlhf import GRPO, P3O, RLHFPPO, RLOO, TokenGenerationEnv  # noqa: E402
from sb3_rlhf.common.checkpoints import TrainingCheckpointCallback  # noqa: E402
from sb3_rlhf.common.distributed import init_distributed, rank, world_size  # noqa: E402
from sb3_rlhf.common.memory import training_state_bytes  # noqa: E402
from sb3_rlhf.rewards import KLPenaltyWrapper, RewardFunctionWrapper, RewardModelWrapper  # noqa: E402
from tests.helpers import make_prompts, share_of_good, tiny_reward_model  # noqa: E402

EPISODES_PER_RANK = 8

#: the runs the tests compare: the algorithm and its settings
RUNS = {
    "ppo": (RLHFPPO, {}, {}),
    "ppo_separate": (RLHFPPO, {}, {"value_head": "separate"}),
    "ppo_lora": (RLHFPPO, {}, {"lora": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}}),
    "ppo_micro": (RLHFPPO, {"micro_batch_tokens": 40}, {}),
    "grpo": (GRPO, {"samples_per_prompt": 2}, {}),
    "rloo": (RLOO, {"samples_per_prompt": 2}, {}),
    "p3o": (P3O, {"samples_per_prompt": 2}, {}),  # pairwise: each prompt's two responses
    "ppo_reward_model": (RLHFPPO, {}, {}),  # a BERT reward model, sharded with the reference under fsdp
}


def make_env(model_path: str, run: str = "ppo"):
    env = TokenGenerationEnv(make_prompts(), model_path, max_prompt_tokens=8, max_new_tokens=6)
    estimator = "k3" if RUNS[run][0] is GRPO else "k1"  # GRPO's KL is in its loss
    if run == "ppo_reward_model":
        scored = RewardModelWrapper(env, tiny_reward_model(len(env.tokenizer)))
    else:
        scored = RewardFunctionWrapper(env, fn=share_of_good)
    return KLPenaltyWrapper(scored, coef=0.1, target=0.5, horizon=100, estimator=estimator)


def make_model(model_path: str, n_episodes: int, run: str = "ppo", strategy: str = "ddp", optimizer=th.optim.SGD):
    algorithm, kwargs, policy_kwargs = RUNS[run]
    return algorithm(
        "TransformerActorCriticPolicy",
        make_env(model_path, run),
        learning_rate=0.1,
        n_episodes=n_episodes,
        batch_size=n_episodes,
        n_epochs=1,
        seed=0,
        strategy=strategy,
        policy_kwargs=dict(model_name_or_path=model_path, optimizer_class=optimizer, **policy_kwargs),
        **kwargs,
    )


def record_episodes(model) -> list:
    """Keep the prompt indices and responses of every rollout of ``model``."""
    episodes = []
    sample = model.rollout_engine.sample_episodes

    def recording(policy, env, indices, **kwargs):
        batch, values = sample(policy, env, indices, **kwargs)
        episodes.append(([int(i) for i in indices], batch.response_ids.clone()))
        return batch, values

    model.rollout_engine.sample_episodes = recording
    return episodes


class GatherCounter(BaseCallback):
    """Counts the all-gathers of each rollout (FSDP gathers a module's shards with one per call); the rollout runs
    between a callback's rollout start and end."""

    NAMES = [n for n in ("all_gather_into_tensor", "all_gather_single") if hasattr(dist, n)]  # FSDP2's, by version

    def __init__(self) -> None:
        super().__init__()
        self.counts: list[int] = []
        self.gathers = {name: getattr(dist, name) for name in self.NAMES}

    def _counting(self, gather):
        def counting_gather(*a, **k):
            self.counts[-1] += 1
            return gather(*a, **k)

        return counting_gather

    def _on_rollout_start(self) -> None:
        self.counts.append(0)
        for name, gather in self.gathers.items():
            setattr(dist, name, self._counting(gather))

    def _on_rollout_end(self) -> None:
        for name, gather in self.gathers.items():
            setattr(dist, name, gather)

    def _on_step(self) -> bool:
        return True


def fsdp_modules(module) -> int:
    from torch.distributed.fsdp import FSDPModule

    return sum(isinstance(m, FSDPModule) for m in module.modules()) if isinstance(module, th.nn.Module) else 0


def minibatch_tokens(model) -> int:
    """The tokens of the last rollout's one minibatch, as the forward sees them (padding included)."""
    with th.random.fork_rng():  # the buffer shuffles with torch's RNG
        return int(next(model.rollout_buffer.get(EPISODES_PER_RANK)).attention_mask.numel())


def run_one(args, run: str) -> dict:
    optimizer = th.optim.AdamW if args.adamw else th.optim.SGD
    model = make_model(args.model_path, EPISODES_PER_RANK, run, args.strategy, optimizer)
    if args.infinite_loss_on_rank_1 and rank() == 1:
        compute_loss = model.compute_loss

        def infinite_once(*a, **k):
            loss, metrics = compute_loss(*a, **k)
            infinite_once.calls += 1
            return (loss + float("inf") if infinite_once.calls == 1 else loss), metrics

        infinite_once.calls = 0
        model.compute_loss = infinite_once
    initial = {k: v.clone() for k, v in model.get_parameters()["policy"].items()}  # every rank takes part
    checkpoints = os.path.join(args.out, "checkpoints")
    if args.resume:
        # SGD in policy_kwargs is a class, which the safe load refuses: this file is our own
        model = type(model).load_checkpoint(checkpoints, env=make_env(args.model_path, run), trust_pickled_objects=True)
    episodes = record_episodes(model)
    gathers = GatherCounter()
    callbacks = [TrainingCheckpointCallback(1, checkpoints, keep=None)] if args.checkpoint else []
    for i in range(args.iterations):
        # the counter last: the checkpoint callback gathers too, before the rollout
        model.learn(1, callback=CallbackList([*callbacks, gathers]), reset_num_timesteps=i == 0 and not args.resume)
    state = model.get_parameters()["policy"]  # gathered on rank 0 under fsdp
    if args.save:  # every rank calls them; rank 0 writes
        model.save(os.path.join(args.out, f"{run}.zip"))
        model.policy.save_pretrained(os.path.join(args.out, f"{run}_policy"))
    result = {
        "kl_coef": model.reward_wrappers[0].coef,
        "num_timesteps": model.num_timesteps,
        "n_updates": model._n_updates,
        "skipped_updates": model.n_skipped_updates,
        "episodes": episodes,
        "rollout_gathers": gathers.counts,
        "micro_batch_tokens": model._micro_batch_token_budget(),
        "minibatch_tokens": minibatch_tokens(model),
        # the modules FSDP gathers as one: of the policy (with the update's root) and of the frozen models
        "fsdp_modules": fsdp_modules(getattr(model.parallel, "root", None)),
        "frozen_fsdp_modules": sum(fsdp_modules(m) for w in model.reward_wrappers for m in w.frozen_models()),
        "prompt_indices": [i for e in episodes for i in e[0]],
    }
    if rank() == 0 or not model.parallel.sharded:  # a ddp replica's own weights: they must not drift apart
        result["state"] = state
        result["changed"] = any(not th.equal(v, initial[k]) for k, v in state.items()) if not args.resume else None
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_path")
    parser.add_argument("out")
    parser.add_argument("--strategy", default="ddp")
    parser.add_argument("--runs", nargs="+", default=["ppo"])
    parser.add_argument("--iterations", type=int, default=1)
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--checkpoint", action="store_true")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--save", action="store_true", help="save each run's zip and export its policy")
    parser.add_argument("--adamw", action="store_true", help="AdamW instead of SGD (a state to checkpoint)")
    parser.add_argument(
        "--infinite-loss-on-rank-1",
        action="store_true",
        help="rank 1's first loss is +inf with a finite gradient (a constant added): every rank must skip it",
    )
    args = parser.parse_args()
    th.set_num_threads(1)
    assert init_distributed() and world_size() == 2
    for run in args.runs:
        th.save(run_one(args, run), os.path.join(args.out, f"{run}_rank{rank()}.pt"))
    if args.memory:
        model = make_model(args.model_path, EPISODES_PER_RANK, "ppo", args.strategy, optimizer=th.optim.AdamW)
        unstepped_zip = os.path.join(args.out, "unstepped.zip")
        model.save(unstepped_zip)  # a save before the first step must not take a step of its own
        model.learn(1)
        measured = {"bytes": training_state_bytes(model.policy, model.policy.optimizer)}
        # the zip's whole AdamW state, loaded back into shards and gathered again, is what was saved
        zip_path = os.path.join(args.out, "adamw.zip")
        model.save(zip_path)
        saved = model.get_parameters()
        loaded = type(model).load(zip_path, env=make_env(args.model_path), trust_pickled_objects=True)  # AdamW class
        again = loaded.get_parameters()
        if rank() == 0:
            before, after = saved["policy.optimizer"], again["policy.optimizer"]

            def groups(state):  # a tuple of betas comes back a list
                return [
                    {k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in state["param_groups"]
                ]

            measured["round_trip"] = (
                all(th.equal(saved["policy"][k], v) for k, v in again["policy"].items())
                and groups(before) == groups(after)
                and before["state"].keys() == after["state"].keys()
                and all(th.equal(v, after["state"][i][k]) for i, s in before["state"].items() for k, v in s.items())
            )
            measured["adam_steps"] = sorted({int(s["step"]) for s in again["policy.optimizer"]["state"].values()})
        # nor may loading a zip whose optimizer never stepped
        unstepped = type(model).load(unstepped_zip, env=make_env(args.model_path), trust_pickled_objects=True)
        unstepped.learn(1)
        optimizer = unstepped.get_parameters()["policy.optimizer"]
        if rank() == 0:
            measured["adam_steps_after_unstepped_load"] = sorted({int(s["step"]) for s in optimizer["state"].values()})
        th.save(measured, os.path.join(args.out, f"memory_rank{rank()}.pt"))


if __name__ == "__main__":
    main()
