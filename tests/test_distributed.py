"""Data-parallel training with torch.distributed: two CPU processes over gloo, launched with torchrun."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch as th

from sb3_rlhf.common.rollout_engine import Generation
from tests.distributed_worker import EPISODES_PER_RANK, make_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]


def run_launcher(command: list[str], out=None, prepare=None) -> subprocess.CompletedProcess:
    """Run a two-process launch; launch once more if the first fails (a rendezvous port taken by another program
    on a shared machine fails a launch before any training), and show both failures if it fails again.

    :param prepare: puts the launch's inputs into ``out`` (a checkpoint to resume), before each launch.
    """
    if prepare is not None:
        prepare()
    first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    if first.returncode == 0:
        return first
    if out is not None:
        shutil.rmtree(out, ignore_errors=True)  # start the second launch from nothing, but its inputs
        os.makedirs(out)  # the workers write into the folder, not create it
    if prepare is not None:
        prepare()
    second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, f"{first.stderr[-3000:]}\n--- and again ---\n{second.stderr[-3000:]}"
    return second


RUNS = ["ppo", "ppo_separate", "grpo", "rloo", "p3o", "ppo_micro", "ppo_reward_model"]


def launch(model_path: str, out, strategy: str, *args: str, prepare=None) -> None:
    worker = os.path.join(ROOT, "tests", "distributed_worker.py")
    run_launcher(torchrun(worker, model_path, str(out), "--strategy", strategy, *args), out, prepare)


def load_ranks(out, run: str) -> list[dict]:
    return [th.load(out / f"{run}_rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.fixture(scope="module")
def ddp_runs(model_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    launch(model_path, out, "ddp", "--runs", *RUNS, "ppo_lora")
    return out


@pytest.fixture(scope="module")
def fsdp_runs(model_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    launch(model_path, out, "fsdp", "--runs", *RUNS, "ppo_lora", "--memory", "--save")
    return out


def replay_in_one_process(model_path: str, tokenizer, run: str, ranks: list[dict]):
    """Replay the two ranks' episodes in one process with a minibatch of both: the step a single process takes."""
    single = make_model(model_path, 2 * EPISODES_PER_RANK, run)
    (indices0, responses0), (indices1, responses1) = (r["episodes"][0] for r in ranks)
    width = max(responses0.shape[1], responses1.shape[1])
    pad = tokenizer.pad_token_id
    # a rank whose responses are narrower stopped every one of them at EOS: padding after it is what generate() does
    responses = th.cat([th.nn.functional.pad(r, (0, width - r.shape[1]), value=pad) for r in (responses0, responses1)])
    single._rollout_prompt_indices = lambda env, n: np.array([*indices0, *indices1])
    single.rollout_engine.generate = lambda *args, **kwargs: Generation(responses)
    single.learn(1)
    return single


def assert_matches_one_process(ranks: list[dict], model_path: str, tokenizer, run: str) -> None:
    rank0, rank1 = ranks
    # the prompts are sharded: rank r draws from prompts r, r + 2, r + 4, ...
    assert {i % 2 for i in rank0["prompt_indices"]} == {0} and {i % 2 for i in rank1["prompt_indices"]} == {1}
    assert rank0["kl_coef"] == rank1["kl_coef"] != 0.1  # the KL controller saw every rank's episodes
    assert rank0["num_timesteps"] == rank1["num_timesteps"]  # the counter is global: both stop together
    single = replay_in_one_process(model_path, tokenizer, run, ranks)
    assert single.num_timesteps == rank0["num_timesteps"]
    assert single.reward_wrappers[0].coef == pytest.approx(rank0["kl_coef"], rel=1e-6)
    initial = make_model(model_path, 2, run).policy.state_dict()
    state = single.policy.state_dict()
    assert rank0["state"].keys() == state.keys()
    moved = 0.0
    for name, tensor in state.items():
        th.testing.assert_close(rank0["state"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)
        moved += (tensor - initial[name]).abs().sum().item()
    assert moved > 1e-3  # the update did move the weights (the comparison is not of two untouched models)


@pytest.mark.parametrize("run", [*RUNS, "ppo_lora"])
def test_ddp_matches_one_process_on_the_same_global_batch(ddp_runs, model_path, tokenizer, run):
    """Two DDP ranks (each its half of the episodes) against one process replaying both halves as one minibatch:
    PPO with a shared head and with a separate critic, GRPO, RLOO, P3O, PPO accumulating micro-batches, with a
    reward model, with LoRA. The replicas end equal."""
    ranks = load_ranks(ddp_runs, run)
    for name, tensor in ranks[0]["state"].items():
        assert th.equal(tensor, ranks[1]["state"][name]), name
    if run == "ppo_micro":  # each rank's minibatch was split into micro-batches of at most 40 tokens
        assert all(r["micro_batch_tokens"] == 40 < r["minibatch_tokens"] / 2 for r in ranks)
    assert_matches_one_process(ranks, model_path, tokenizer, run)


@pytest.mark.parametrize("run", [*RUNS, "ppo_lora"])
def test_fsdp_matches_one_process_on_the_same_global_batch(fsdp_runs, model_path, tokenizer, run):
    """The same under FSDP2 (the weights gathered from the shards for the comparison), and with LoRA."""
    assert_matches_one_process(load_ranks(fsdp_runs, run), model_path, tokenizer, run)


@pytest.mark.parametrize("run", ["ppo", "ppo_separate", "ppo_reward_model"])
def test_fsdp_gathers_the_weights_once_per_rollout(fsdp_runs, run):
    """The rollout gathers each sharded module once: the policy's for generate() (not again for each of up to 6
    generated tokens, nor for the teacher-forced pass after it), the frozen reference and reward model's for their
    one scoring pass."""
    for rank in load_ranks(fsdp_runs, run):
        assert rank["fsdp_modules"] >= 4 and rank["frozen_fsdp_modules"] >= 3  # blocks, roots: all sharded
        assert rank["rollout_gathers"] == [rank["fsdp_modules"] + rank["frozen_fsdp_modules"]]


def test_fsdp_holds_about_half_the_training_state_per_rank(fsdp_runs, model_path):
    """Parameters + gradients + AdamW moments of one rank under fsdp against one process holding them all."""
    from sb3_rlhf.common.memory import training_state_bytes

    single = make_model(model_path, EPISODES_PER_RANK, "ppo", optimizer=th.optim.AdamW)
    single.learn(1)
    whole = training_state_bytes(single.policy, single.policy.optimizer)
    per_rank = [th.load(fsdp_runs / f"memory_rank{r}.pt", weights_only=True)["bytes"] for r in range(2)]
    assert max(per_rank) <= 0.6 * whole, (per_rank, whole)
    assert sum(per_rank) >= whole  # the shards together hold everything (a rank holding nothing would pass above)


def test_a_sharded_run_loads_its_own_zip_back_into_its_shards(fsdp_runs):
    """The zip of an fsdp run with AdamW state (gathered, renumbered as a one-process optimizer's), loaded into a
    new sharded run, gathers to the same weights and optimizer state; the one AdamW step stays one, and a zip saved
    before any step loads without one."""
    measured = th.load(fsdp_runs / "memory_rank0.pt", weights_only=True)
    assert measured["round_trip"]
    assert measured["adam_steps"] == [1]  # saving before the first step took none of its own
    assert measured["adam_steps_after_unstepped_load"] == [1]  # nor did loading a zip saved then


@pytest.mark.parametrize("run", ["ppo", "ppo_lora"])
def test_fsdp_saves_the_files_a_single_process_writes(fsdp_runs, model_path, tokenizer, run):
    """model.save() and policy.save_pretrained() under fsdp gather the shards: the zip loads in one process with
    the trained weights and the optimizer state a one-process zip holds, and the export (LoRA merged) is a plain
    transformers model with the actor's weights."""
    from transformers import AutoModelForCausalLM

    from sb3_rlhf import RLHFPPO

    trained = load_ranks(fsdp_runs, run)[0]["state"]
    loaded = RLHFPPO.load(fsdp_runs / f"{run}.zip", trust_pickled_objects=True)  # SGD, a class, in policy_kwargs
    for name, tensor in loaded.policy.state_dict().items():
        assert th.equal(tensor, trained[name]), name
    single = replay_in_one_process(model_path, tokenizer, run, load_ranks(fsdp_runs, run))
    assert loaded.policy.optimizer.state_dict()["param_groups"] == single.policy.optimizer.state_dict()["param_groups"]
    export = AutoModelForCausalLM.from_pretrained(fsdp_runs / f"{run}_policy")
    single_export = single.policy.actor.merge_and_unload() if run == "ppo_lora" else single.policy.actor
    expected = single_export.state_dict()
    for name, tensor in export.state_dict().items():
        th.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_non_finite_loss_on_one_rank_is_skipped_by_every_rank(model_path, tmp_path, strategy):
    """A loss of +inf whose gradient is finite (a constant added, as k3 at a -inf reference log-prob gives): the
    rank that has it skips, and so must the other, or their weights part for good."""
    launch(model_path, tmp_path, strategy, "--infinite-loss-on-rank-1")
    rank0, rank1 = load_ranks(tmp_path, "ppo")
    assert rank0["skipped_updates"] == rank1["skipped_updates"] == 1  # one minibatch, skipped on both ranks
    assert not rank0["changed"]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_run_resumed_from_a_checkpoint_ends_as_the_uninterrupted_run(model_path, tmp_path, strategy):
    """Two iterations (AdamW) checkpointed after each; the checkpoint after the first resumed in new processes
    (each rank its shard of the weights and AdamW's moments under fsdp, and its own random streams) ends with the
    same weights."""
    whole = tmp_path / "whole"
    whole.mkdir()
    launch(model_path, whole, strategy, "--iterations", "2", "--checkpoint", "--adamw")
    checkpoints = sorted(os.listdir(whole / "checkpoints"))
    assert len(checkpoints) == 2
    first = whole / "checkpoints" / checkpoints[0]
    assert (first / "training_state_rank1.json").is_file()
    assert (first / "sharded").is_dir() == (strategy == "fsdp")
    resumed = tmp_path / "resumed"

    def checkpoint_to_resume() -> None:
        (resumed / "checkpoints").mkdir(parents=True, exist_ok=True)
        shutil.copytree(first, resumed / "checkpoints" / checkpoints[0], dirs_exist_ok=True)

    launch(model_path, resumed, strategy, "--iterations", "1", "--resume", "--adamw", prepare=checkpoint_to_resume)
    uninterrupted, after_resume = load_ranks(whole, "ppo")[0], load_ranks(resumed, "ppo")[0]
    if strategy == "fsdp":  # the frozen reference's root gives its gathered weights back: each rollout gathers alike
        assert len(set(uninterrupted["rollout_gathers"])) == 1 and len(uninterrupted["rollout_gathers"]) == 2
    assert after_resume["num_timesteps"] == uninterrupted["num_timesteps"]
    # each rank drew the same prompts and sampled the same responses after the resume as without it
    assert [e[0] for e in after_resume["episodes"]] == [e[0] for e in uninterrupted["episodes"][1:]]
    for name, tensor in uninterrupted["state"].items():
        th.testing.assert_close(after_resume["state"][name], tensor, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("launcher, strategy", [("--nproc", "ddp"), ("accelerate", "fsdp")])
def test_sb3_rlhf_train_runs_the_task_in_two_processes(tmp_path, launcher, strategy):
    """`sb3-rlhf train --nproc 2` (torchrun) or `accelerate launch`, the strategy from the library's own setting:
    rank 0 builds the model, logs, writes the zip, the export and the report; every rank writes its part of the
    checkpoints; the counter is global, so the run stops at the task's total over both ranks."""
    out = tmp_path / "run"
    train = [
        "train", os.path.join(ROOT, "envs", "tiny_synthetic.toml"), "--out", str(out), "--no-progress-bar",
        "--set", "algorithm.total_timesteps=1200", "--set", "algorithm.n_episodes=32", "--strategy", strategy,
    ]  # fmt: skip
    if launcher == "--nproc":
        command = [sys.executable, "-m", "sb3_rlhf.cli", *train, "--nproc", "2"]
    else:
        pytest.importorskip("accelerate")
        # --multi_gpu is accelerate's torchrun launcher (--cpu would start one process); gloo where there is no GPU
        accelerate = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
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
    assert final.strategy == strategy
    checkpoint = out / "checkpoints" / sorted(os.listdir(out / "checkpoints"))[-1]
    assert (checkpoint / "training_state_rank1.json").is_file()
    assert (checkpoint / "sharded").is_dir() == (strategy == "fsdp")
    assert os.path.isfile(out / "policy" / "model.safetensors")


def test_strategy_settings_fail_where_they_are_read(model_path, tokenizer):
    from tests.helpers import make_model as make_single
    from tests.helpers import rule_env

    with pytest.raises(ValueError, match="strategy must be one of"):
        make_single(rule_env(tokenizer), model_path, strategy="deepspeed")
    with pytest.raises(TypeError, match="shard_frozen_models must be True or False"):
        make_single(rule_env(tokenizer), model_path, shard_frozen_models="yes")
    model = make_single(rule_env(tokenizer), model_path, strategy="fsdp")  # one process: the policy as it is
    assert not model.parallel.sharded and model.parallel.holds_whole_weights
    assert type(model.parallel).__name__ == "ParallelStrategy" and model.strategy == "fsdp"


def test_accelerate_settings_the_library_would_ignore_are_refused():
    from sb3_rlhf.common.strategies import check_launcher_settings

    check_launcher_settings("ddp", {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_FSDP": "false"})
    for strategy in ("ddp", "fsdp"):  # FSDP's settings given to accelerate would be ignored either way
        with pytest.raises(ValueError, match="launch without --use_fsdp"):
            check_launcher_settings(strategy, {"ACCELERATE_USE_FSDP": "true"})
    with pytest.raises(ValueError, match="DeepSpeed is not supported"):
        check_launcher_settings("fsdp", {"ACCELERATE_USE_DEEPSPEED": "true"})
    with pytest.raises(ValueError, match="mixed_precision='bf16'"):
        check_launcher_settings("ddp", {"ACCELERATE_MIXED_PRECISION": "bf16"})


def test_the_strategy_is_set_from_the_command_line_and_task_files(tmp_path):
    from sb3_rlhf.cli import make_parser
    from sb3_rlhf.cli.common import with_algorithm
    from sb3_rlhf.tasks import load_task

    args = make_parser().parse_args(["train", os.path.join(ROOT, "envs", "tiny_synthetic.toml"), "--strategy", "fsdp"])
    task = load_task(args.task, with_algorithm(args))
    assert task.algorithm_settings()["strategy"] == "fsdp"
    with pytest.raises(SystemExit):  # argparse names the choices
        make_parser().parse_args(["train", "x.toml", "--strategy", "zero3"])


def test_a_zip_with_a_minibatch_token_cap_is_refused_under_several_processes(
    model_path, tokenizer, tmp_path, monkeypatch
):
    """max_batch_tokens gives each rank its own number of optimizer steps: refused when the model is built, also
    from a zip that a one-process run saved with it."""
    from sb3_rlhf import RLHFPPO
    from sb3_rlhf.common import on_policy_algorithm
    from tests.helpers import make_model as make_single
    from tests.helpers import rule_env

    make_single(rule_env(tokenizer), model_path, max_batch_tokens=64).save(tmp_path / "capped.zip")
    monkeypatch.setattr(on_policy_algorithm, "world_size", lambda: 2)
    with pytest.raises(ValueError, match="max_batch_tokens is not supported with several processes"):
        RLHFPPO.load(tmp_path / "capped.zip", env=rule_env(tokenizer))


def test_a_sharded_checkpoints_zip_alone_names_the_way_to_load_it(model_path, tokenizer, tmp_path):
    from sb3_rlhf import RLHFPPO
    from tests.helpers import make_model as make_single
    from tests.helpers import rule_env

    make_single(rule_env(tokenizer), model_path).save(tmp_path / "weightless.zip", weights=False)
    with pytest.raises(FileNotFoundError, match="load_checkpoint"):
        RLHFPPO.load(tmp_path / "weightless.zip", env=rule_env(tokenizer))


def test_micro_batches_can_be_made_more_alike_across_ranks(model_path, tokenizer):
    """split_minibatch(n_parts=...) halves its largest micro-batch until there are as many as another rank has:
    each within the budget, every row once, groups whole."""
    from sb3_rlhf.buffers import split_minibatch
    from tests.helpers import make_model as make_single
    from tests.helpers import rule_env

    model = make_single(rule_env(tokenizer), model_path, n_episodes=8, batch_size=8)
    model.learn(1)
    batch = next(model.rollout_buffer.get(8))
    budget = batch.input_ids.numel()  # one micro-batch by the budget alone
    assert len(split_minibatch(batch, budget)) == 1
    for n_parts, unit in ((3, 1), (4, 2), (8, 1), (20, 2)):
        parts = split_minibatch(batch, budget, unit, n_parts)
        assert len(parts) == min(n_parts, 8 // unit)
        assert all(p.input_ids.numel() <= budget and p.input_ids.shape[0] % unit == 0 for p in parts)
        assert th.equal(th.cat([p.old_logprobs[:, :1] for p in parts]), batch.old_logprobs[:, :1])  # rows in order
