"""One rank of a distributed RLHFPPO run, for tests/test_distributed.py (launched with torchrun).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_worker.py MODEL OUT

Trains ``--iterations`` iterations of the tiny rule-reward task with SGD (whose step is linear in the gradient, so
a run can be compared with one process within floating-point tolerance), then writes what the test compares to
``OUT/rank<r>.pt``: the weights, β, the counters and the episodes this rank sampled.
"""

import argparse
import os
import sys

import torch as th

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sb3_rlhf import RLHFPPO, TokenGenerationEnv  # noqa: E402
from sb3_rlhf.common.distributed import init_distributed, rank, world_size  # noqa: E402
from sb3_rlhf.rewards import KLPenaltyWrapper, RewardFunctionWrapper  # noqa: E402
from tests.helpers import make_prompts, share_of_good  # noqa: E402

EPISODES_PER_RANK = 8


def make_env(model_path: str):
    env = TokenGenerationEnv(make_prompts(), model_path, max_prompt_tokens=8, max_new_tokens=6)
    return KLPenaltyWrapper(RewardFunctionWrapper(env, fn=share_of_good), coef=0.1, target=0.5, horizon=100)


def make_model(model_path: str, n_episodes: int) -> RLHFPPO:
    return RLHFPPO(
        "TransformerActorCriticPolicy",
        make_env(model_path),
        learning_rate=0.1,
        n_episodes=n_episodes,
        batch_size=n_episodes,
        n_epochs=1,
        seed=0,
        policy_kwargs=dict(model_name_or_path=model_path, optimizer_class=th.optim.SGD),
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_path")
    parser.add_argument("out")
    parser.add_argument("--iterations", type=int, default=1)
    parser.add_argument(
        "--infinite-loss-on-rank-1",
        action="store_true",
        help="rank 1's first loss is +inf with a finite gradient (a constant added): every rank must skip it",
    )
    args = parser.parse_args()
    th.set_num_threads(1)
    assert init_distributed() and world_size() == 2
    model = make_model(args.model_path, EPISODES_PER_RANK)
    initial = {k: v.clone() for k, v in model.policy.state_dict().items()}
    if args.infinite_loss_on_rank_1 and rank() == 1:
        compute_loss = model.compute_loss

        def infinite_once(*a, **k):
            loss, metrics = compute_loss(*a, **k)
            infinite_once.calls += 1
            return (loss + float("inf") if infinite_once.calls == 1 else loss), metrics

        infinite_once.calls = 0
        model.compute_loss = infinite_once
    episodes = []
    sample = model.rollout_engine.sample_episodes

    def recording(policy, env, indices, **kwargs):
        batch, values = sample(policy, env, indices, **kwargs)
        episodes.append(([int(i) for i in indices], batch.response_ids.clone()))
        return batch, values

    model.rollout_engine.sample_episodes = recording
    model.learn(1)
    for _ in range(args.iterations - 1):
        model.learn(1, reset_num_timesteps=False)
    th.save(
        {
            "state": model.policy.state_dict(),
            "kl_coef": model.reward_wrappers[0].coef,
            "num_timesteps": model.num_timesteps,
            "n_updates": model._n_updates,
            "skipped_updates": model.n_skipped_updates,
            "changed": any(not th.equal(v, initial[k]) for k, v in model.policy.state_dict().items()),
            "episodes": episodes,
            "prompt_indices": [i for e in episodes for i in e[0]],
        },
        os.path.join(args.out, f"rank{rank()}.pt"),
    )


if __name__ == "__main__":
    main()
