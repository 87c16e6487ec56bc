"""Data-parallel training with torch.distributed: two CPU processes over gloo, launched with torchrun."""

import os
import shutil
import subprocess
import sys

import pytest
import torch as th

from sb3_rlhf.common.rollout_engine import Generation
from tests.distributed_worker import EPISODES_PER_RANK, make_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]


def run_launcher(command: list[str], out=None) -> subprocess.CompletedProcess:
    """Run a two-process launch; launch once more if the first fails (a rendezvous port taken by another program
    on a shared machine fails a launch before any training), and show both failures if it fails again."""
    first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    if first.returncode == 0:
        return first
    if out is not None:
        shutil.rmtree(out, ignore_errors=True)  # start the second launch from nothing
    second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, f"{first.stderr[-3000:]}\n--- and again ---\n{second.stderr[-3000:]}"
    return second


@pytest.fixture(scope="module")
def two_rank_run(model_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    command = torchrun(os.path.join(ROOT, "tests", "distributed_worker.py"), model_path, str(out), "--iterations", "1")
    run_launcher(command)
    return [th.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_ranks_sample_different_episodes_and_end_with_identical_weights(two_rank_run):
    rank0, rank1 = two_rank_run
    # the prompts are sharded: rank r draws from prompts r, r + 2, r + 4, ...
    assert {i % 2 for i in rank0["prompt_indices"]} == {0} and {i % 2 for i in rank1["prompt_indices"]} == {1}
    for name, tensor in rank0["state"].items():
        assert th.equal(tensor, rank1["state"][name]), name  # gradients were averaged: the same step everywhere
    assert rank0["kl_coef"] == rank1["kl_coef"] != 0.1  # the KL controller saw every rank's episodes
    assert rank0["num_timesteps"] == rank1["num_timesteps"]  # the counter is global: both stop together


def test_a_non_finite_loss_on_one_rank_is_skipped_by_every_rank(model_path, tmp_path):
    """A loss of +inf whose gradient is finite (a constant added, as k3 at a -inf reference log-prob gives): the
    rank that has it skips, and so must the other, or their weights part for good."""
    worker = os.path.join(ROOT, "tests", "distributed_worker.py")
    run_launcher(torchrun(worker, model_path, str(tmp_path), "--infinite-loss-on-rank-1"))
    rank0, rank1 = (th.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert rank0["skipped_updates"] == rank1["skipped_updates"] == 1  # one minibatch, skipped on both ranks
    assert not rank0["changed"] and not rank1["changed"]
    for name, tensor in rank0["state"].items():
        assert th.equal(tensor, rank1["state"][name]), name


def test_two_ranks_match_one_process_on_the_same_global_batch(two_rank_run, model_path, tokenizer):
    """Replay the two ranks' episodes in one process with a minibatch of both: same weights, same β."""
    single = make_model(model_path, 2 * EPISODES_PER_RANK)
    (indices0, responses0), (indices1, responses1) = (run["episodes"][0] for run in two_rank_run)
    width = max(responses0.shape[1], responses1.shape[1])
    pad = tokenizer.pad_token_id
    # a rank whose responses are narrower stopped every one of them at EOS: padding after it is what generate() does
    responses = th.cat([th.nn.functional.pad(r, (0, width - r.shape[1]), value=pad) for r in (responses0, responses1)])
    single._rollout_prompt_indices = lambda env, n: [*indices0, *indices1]
    single.rollout_engine.generate = lambda *args, **kwargs: Generation(responses)
    single.learn(1)
    assert single.num_timesteps == two_rank_run[0]["num_timesteps"]
    assert single.reward_wrappers[0].coef == pytest.approx(two_rank_run[0]["kl_coef"], rel=1e-6)
    moved = 0.0
    for name, tensor in single.policy.state_dict().items():
        th.testing.assert_close(two_rank_run[0]["state"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)
        moved += (
            (tensor - make_model(model_path, 2).policy.state_dict()[name]).abs().sum().item()
            if "value_head" not in name
            else 0
        )
    assert moved > 1e-3  # the update did move the weights (the comparison is not of two untouched models)


@pytest.mark.parametrize("launcher", ["--nproc", "accelerate"])
def test_sb3_rlhf_train_runs_the_task_in_two_processes(tmp_path, launcher):
    """`sb3-rlhf train --nproc 2` (torchrun) or `accelerate launch`: rank 0 builds the model, logs, checkpoints,
    saves and reports; the counter is global, so the run stops at the task's total over both ranks."""
    out = tmp_path / "run"
    train = [
        "train", os.path.join(ROOT, "envs", "tiny_synthetic.toml"), "--out", str(out), "--no-progress-bar",
        "--set", "algorithm.total_timesteps=1200", "--set", "algorithm.n_episodes=32",
    ]  # fmt: skip
    if launcher == "--nproc":
        command = [sys.executable, "-m", "sb3_rlhf.cli", *train, "--nproc", "2"]
    else:
        pytest.importorskip("accelerate")
        accelerate = ["-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1"]
        command = [
            sys.executable,
            *accelerate,
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "sb3_rlhf.cli",
            *train,
        ]
    result = run_launcher(command, out)
    assert result.stdout.count("trained policy against the initial one") == 1  # one report, from rank 0
    assert os.listdir(out / "tensorboard") == ["tiny_synthetic_1"]
    from sb3_rlhf import RLHFPPO

    final = RLHFPPO.load(out / "ppo_model.zip")
    # the global count stops the run at the first rollout that crosses 1200 tokens (two ranks × 32 episodes of
    # at most 12 tokens: at most 768 per rollout); a per-rank count would have run to about 2400
    assert 1200 <= final.num_timesteps < 1200 + 768
    assert final._n_updates % 4 == 0 and final._n_updates > 0  # whole updates of 4 epochs
