"""Run a task file end to end: reward-model stage (if any), the algorithm (PPO, NLPO, RLOO, GRPO, P3O or DPO),
checkpoints, export, final report; or resume it, or evaluate a finished run again."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import torch.distributed as dist
from stable_baselines3.common.callbacks import CallbackList
from stable_baselines3.common.utils import get_device, set_random_seed

from sb3_rlhf.algorithms import ONLINE_ALGORITHMS
from sb3_rlhf.common.callbacks import HeldOutEvaluationCallback
from sb3_rlhf.common.checkpoints import TrainingCheckpointCallback
from sb3_rlhf.common.distributed import init_distributed, is_main_process, raise_on_every_rank
from sb3_rlhf.common.evaluation import compare_policies, report_markdown
from sb3_rlhf.common.models import check_device, load_tokenizer, pinned_revision, resolve_model_path
from sb3_rlhf.common.progress import ProgressLogCallback, announce, format_duration, show_progress_lines
from sb3_rlhf.policies import TransformerActorCriticPolicy
from sb3_rlhf.rewards import reward_wrappers
from sb3_rlhf.tasks.config import TaskConfig
from sb3_rlhf.tasks.data import load_prompt_forms, policy_conversations, split_prompts
from sb3_rlhf.tasks.folders import (
    MEMORY_SETTINGS,
    RESUMABLE_CHANGES,
    check_same_run,
    claim_run_folder,
    read_record,
    run_record,
    write_record,
)
from sb3_rlhf.tasks.stages import (
    PreparedTask,
    check_reward_model_split,
    exported_policy,
    initial_policy,
    judge_for_task,
    make_dpo_trainer,
    make_online_model,
    policy_model_path,
    train_reward_model_stage,
)


def prepare(
    task: TaskConfig, out: str, train_reward_model: bool, progress_bar: bool = False
) -> tuple[PreparedTask, dict | None]:
    """Resolve the policy, split the prompts (seeded) and get the reward model: trained now into
    ``out/reward_model`` when ``train_reward_model``, else the one a previous run left there."""
    os.makedirs(out, exist_ok=True)
    set_random_seed(task.seed)
    policy_path = policy_model_path(task, out)
    # resolved now, so that a missing model fails before any work
    policy_folder = resolve_model_path(policy_path, task.policy.revision, "policy model")
    policy_revision = pinned_revision(policy_path, task.policy.revision, policy_folder)
    tokenizer = load_tokenizer(policy_folder)
    # with a conversation split, the policy's share only: none of its prompts trained or tested the reward model
    only = policy_conversations(task.reward.train, task.seed)
    prompts, plain_prompts = load_prompt_forms(task.prompts, tokenizer, only)
    train_prompts, eval_prompts = split_prompts(task.prompts, prompts, plain_prompts, task.seed)
    announce(
        f"policy {policy_path}: {len(train_prompts)} prompts to train on, "
        f"{min(len(eval_prompts), task.evaluation.n_prompts)} held out"
    )
    reward_model, metrics = task.reward.model, None
    if task.reward.train is not None:
        if train_reward_model:
            reward_model, info = train_reward_model_stage(
                task.reward.train,
                out,
                task.seed,
                task.device,
                progress_bar,
                judge_share=task.judge.share if task.judge is not None else 0.0,
            )
            metrics = info["after"]
            announce(f"reward model: held-out accuracy {metrics['accuracy']:.3f}")
        else:
            reward_model = os.path.join(out, "reward_model")
            check_reward_model_split(task, reward_model)
            announce(f"reward model: the one in {reward_model}")
    if reward_model is not None:
        # a folder, packaged name or hub id (at [reward] revision) -> a local folder, once for every env built
        revision = task.reward.revision if task.reward.model is not None else None
        reward_model = resolve_model_path(reward_model, revision, "reward model")
    prepared = PreparedTask(
        task,
        out,
        policy_path,
        tokenizer,
        train_prompts,
        eval_prompts[: task.evaluation.n_prompts],
        reward_model,
        policy_revision,
    )
    if task.prompts.chat_template:
        prepared.reward_prompts = dict(zip(prompts, plain_prompts))
    if task.judge is not None:  # trained with the reward model, reused after
        prepared.judge, prepared.judge_metrics = judge_for_task(task, out, train=train_reward_model)
    return prepared, metrics


def evaluate_against_initial(
    prepared: PreparedTask, trained: TransformerActorCriticPolicy, timesteps: int, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Compare ``trained`` with a fresh initial policy on the held-out prompts; write ``report.md``/``.json``
    (with ``extra`` entries, e.g. the reward model's held-out metrics)."""
    task = prepared.task
    announce(f"evaluation: the trained policy against the initial one on {len(prepared.eval_prompts)} held-out prompts")
    eval_env = prepared.env(prepared.eval_prompts)
    initial = initial_policy(prepared, eval_env, trained.device)
    results = compare_policies(
        trained,
        initial,
        eval_env.unwrapped,
        reward_wrappers(eval_env),
        task.seed,
        task.evaluation.n_samples_shown,
        judge=prepared.judge,
    )
    results["algorithm"] = task.algorithm_name
    results["timesteps"] = timesteps
    results.update(extra or {})
    with open(os.path.join(prepared.out, "report.md"), "w") as f:
        f.write(report_markdown(task.name, results, len(prepared.eval_prompts)))
    with open(os.path.join(prepared.out, "report.json"), "w") as f:
        json.dump(results, f, indent=2, default=float)
    return results


def model_file(task: TaskConfig, out: str) -> str:
    """Where an online run saves its SB3 zip: ``<out>/<algorithm>_model.zip``."""
    return os.path.join(out, f"{task.algorithm_name}_model.zip")


def run_task(
    task: TaskConfig,
    out: str,
    progress_bar: bool = True,
    resume: bool = False,
    overwrite: bool = False,
    progress_lines: float | None = None,
) -> dict[str, Any]:
    """Run every stage of ``task`` into ``out``; return the final comparison (also written to ``out/report.md``).

    :param progress_bar: SB3's progress bar on a terminal, a line per rollout elsewhere
        (:class:`~sb3_rlhf.common.progress.ProgressLogCallback`).
    :param progress_lines: progress lines instead of the bar even on a terminal, at most one every this many
        seconds (0: every rollout).
    :param resume: continue an online run from the newest checkpoint in ``out/checkpoints`` (the reward model
        a previous run trained into ``out/reward_model`` is reused); only the run ``out/run.json`` records, with the
        settings it can honour (:func:`~sb3_rlhf.tasks.folders.claim_run_folder`).
    :param overwrite: replace another run's results in ``out`` (without it, a new run refuses them).
    """
    checkpoints = os.path.join(out, "checkpoints")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and task.algorithm_name not in ONLINE_ALGORITHMS:
        # before the folder is touched: a refused run must not have replaced a previous one
        raise ValueError(
            f"several processes train the online algorithms (ppo, rloo, grpo, p3o, nlpo), not {task.algorithm_name}"
        )
    check_device(task.device)  # the GPU the task names is here (a dry run only checks the name)
    started = time.monotonic()
    folder = claim_run_folder(task, out, resume, overwrite)  # every rank reads the same files and decides alike
    distributed = init_distributed()
    if distributed:
        dist.barrier()  # every rank has read the folder before rank 0 changes it
    failed = None
    if is_main_process():
        try:
            folder.apply()
        except Exception as error:  # raised on every rank, not left for the others to wait on
            failed = error
    raise_on_every_rank(failed, f"rank 0 could not prepare the run folder {out}")  # one process: raises it here
    progress_bar = progress_bar and is_main_process()
    if progress_bar or progress_lines is not None:
        show_progress_lines()  # the stages announce themselves too
    announce(f"{task.name}: {task.algorithm_name} into {out}{' (resuming)' if resume else ''}")
    reward_model_ready = resume and os.path.isdir(os.path.join(out, "reward_model"))
    if not is_main_process():
        dist.barrier()  # rank 0 builds the tiny model and trains the reward model into `out` first
    prepared, reward_model_metrics = prepare(
        task, out, train_reward_model=is_main_process() and not reward_model_ready, progress_bar=progress_bar
    )
    if distributed and is_main_process():
        dist.barrier()
    extra: dict[str, Any] = {"reward_model": reward_model_metrics}
    if prepared.judge_metrics is not None:
        extra["judge"] = prepared.judge_metrics
    if task.algorithm_name == "dpo":
        trainer, counts = make_dpo_trainer(prepared)
        trainer.learn(progress_bar=progress_bar)
        trainer.save(os.path.join(out, "policy"))
        env = prepared.env(prepared.eval_prompts)
        trained = exported_policy(prepared, os.path.join(out, "policy"), env, trainer.device)
        extra["dpo"] = {**counts, "gradient_steps": trainer.num_steps}
        results = evaluate_against_initial(prepared, trained, 0, extra)
        write_record(out, run_record(task, finished=True))
        announce(f"{task.name}: done in {format_duration(time.monotonic() - started)}")
        return results
    env = prepared.env(prepared.train_prompts)
    total = task.algorithm.total_timesteps
    assert total is not None  # parse_task requires it of an online algorithm
    if resume:
        # memory settings may change on resume (SB3's load applies them before the model is set up)
        memory = {k: v for k, v in task.algorithm_settings().items() if k in MEMORY_SETTINGS}
        model = ONLINE_ALGORITHMS[task.algorithm_name].load_checkpoint(
            checkpoints, env=env, device=task.device, **memory
        )
        announce(f"resuming from timestep {model.num_timesteps} of {total}")
    else:
        model = make_online_model(prepared, env)
    callback: Any = TrainingCheckpointCallback(
        task.checkpoint.every or max(total // 4, 1), checkpoints, task.checkpoint.keep
    )
    if task.evaluation.every is not None:  # held-out evaluations during training, in TensorBoard under eval/
        evaluation = HeldOutEvaluationCallback(
            prepared.env(prepared.eval_prompts), task.evaluation.every, seed=task.seed, judge=prepared.judge
        )
        callback = CallbackList([callback, evaluation])
    if progress_lines is not None and is_main_process():
        callback = CallbackList([callback, ProgressLogCallback(progress_lines)])
        progress_bar = False
    remaining = total - model.num_timesteps if resume else total
    if remaining > 0:
        model.learn(
            remaining,
            callback=callback,
            progress_bar=progress_bar,
            tb_log_name=task.name,
            reset_num_timesteps=not resume,
        )
    # every rank calls them (a sharded run gathers its weights); rank 0 writes the files
    model.save(model_file(task, out))
    model.policy.save_pretrained(os.path.join(out, "policy"), tokenizer=prepared.tokenizer)
    with model.policy.parallel.whole_weights():
        if not is_main_process():
            return {}  # rank 0 reports for the run
        results = evaluate_against_initial(prepared, model.policy, model.num_timesteps, extra)
    write_record(out, run_record(task, finished=True))
    announce(f"{task.name}: done in {format_duration(time.monotonic() - started)}")
    return results


def evaluate_task(task: TaskConfig, out: str) -> dict[str, Any]:
    """``sb3-rlhf evaluate``: re-run the final comparison of a finished run folder (its SB3 zip, or for DPO its
    exported policy), with the settings the run recorded (only ``[evaluation]`` and the device may differ)."""
    previous = read_record(out)
    if previous is not None:
        check_same_run(previous, run_record(task), out, "evaluate", RESUMABLE_CHANGES)
    prepared, _ = prepare(task, out, train_reward_model=False)
    env = prepared.env(prepared.eval_prompts)
    if task.algorithm_name == "dpo":
        trained = exported_policy(prepared, os.path.join(out, "policy"), env, get_device(task.device))
        return evaluate_against_initial(prepared, trained, 0)
    path = model_file(task, out)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{out} has no {os.path.basename(path)}: run `sb3-rlhf train` with --out {out} first")
    model = ONLINE_ALGORITHMS[task.algorithm_name].load(path, env=env, device=task.device)
    return evaluate_against_initial(prepared, model.policy, model.num_timesteps)
