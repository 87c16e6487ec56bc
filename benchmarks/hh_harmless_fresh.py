"""HH harmless runs compared on held-out conversations that neither trained the reward model nor chose the method.

    sb3-rlhf train envs/hh_harmless.toml --out runs/hh_harmless_split                  # RLOO, the task's own
    sb3-rlhf train envs/hh_harmless.toml --algorithm ppo --out runs/hh_harmless_split_ppo
    python benchmarks/hh_harmless_fresh.py runs/hh_harmless_split runs/hh_harmless_split_ppo

The task file splits the shipped conversations once (``[reward.train] policy_share``): the reward model's pairs
come from the others, so no held-out conversation trained it (checked here again, conversation by conversation).
The reward model's own held-out pairs are drawn by conversation too (``split_by``, ``policy_share``'s default): the
count of held-out pairs whose conversation it trained on is printed.
RLOO was chosen over PPO for this task on an earlier held-out set, drawn from all the conversations (the task's
seed, ``prompts.test_size`` of them, no conversation split): the held-out conversations that set holds chose the
method, and are left out of the second comparison. Each run's ``report.json`` holds every held-out prompt's
initial and trained score (``per_prompt``); the paired comparison is made again on the fresh ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from sb3_rlhf.common.data import train_test_split
from sb3_rlhf.common.evaluation import paired_preference
from sb3_rlhf.common.models import load_tokenizer, resolve_model_path
from sb3_rlhf.tasks import load_task
from sb3_rlhf.tasks.config import TaskConfig
from sb3_rlhf.tasks.data import (
    conversation_key,
    load_prompt_forms,
    policy_conversations,
    reward_training_pairs,
    split_prompts,
    split_reward_pairs,
)
from sb3_rlhf.tasks.folders import changed_settings, read_record, task_settings


def method_choosers(task: TaskConfig) -> set[str]:
    """The conversations of the earlier held-out set, the one RLOO was chosen on: ``prompts.test_size`` prompts
    of all the file's conversations, split by the task's seed without grouping (the task file before
    ``policy_share``)."""
    plain = dataclasses.replace(task.prompts, chat_template=False)
    prompts, _ = load_prompt_forms(plain, None)
    _, held_out = train_test_split(prompts, task.prompts.test_size, task.seed, "prompts.test_size")
    return {conversation_key(p) for p in held_out}


def paired_line(label: str, before: list[float], after: list[float]) -> str:
    """A table row: ``after`` against ``before``, prompt by prompt (:func:`paired_preference`)."""
    paired = paired_preference(before, after)
    return (
        f"| {label} | {len(before)} | {sum(before) / len(before):.4f} | "
        f"{sum(after) / len(after):.4f} | {paired['mean_difference']:+.4f} "
        f"({paired['ci95_low']:+.4f} to {paired['ci95_high']:+.4f}) | {100 * paired['win_rate']:.0f}% | "
        f"{paired['bradley_terry_preference']:.3f} |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders of envs/hh_harmless.toml (each with its report.json)")
    parser.add_argument("--task", default="envs/hh_harmless.toml")
    args = parser.parse_args()

    task = load_task(args.task)
    assert task.reward.train is not None and task.reward.train.policy_share is not None, "a task with policy_share"
    tokenizer = load_tokenizer(resolve_model_path(task.policy.model, task.policy.revision, "policy model"))
    templated, plain = load_prompt_forms(task.prompts, tokenizer)
    plain_of = dict(zip(templated, plain))
    reward_pairs = reward_training_pairs(task.reward.train, task.seed)[0]
    reward_model_conversations = {conversation_key(p.prompt) for p in reward_pairs}
    reward_train, reward_test = split_reward_pairs(task.reward.train, reward_pairs, task.seed)
    trained_conversations = {conversation_key(p.prompt) for p in reward_train}
    tested_on_trained = sum(conversation_key(p.prompt) in trained_conversations for p in reward_test)
    choosers = method_choosers(task)
    # the held-out prompts the task draws today: a run's report must hold these, in this order
    policy_prompts, policy_plain = load_prompt_forms(
        task.prompts, tokenizer, policy_conversations(task.reward.train, task.seed)
    )
    held_out = split_prompts(task.prompts, policy_prompts, policy_plain, task.seed)[1][: task.evaluation.n_prompts]
    # the settings that decide the data: a run made with others split it otherwise
    data_settings = {k: v for k, v in task_settings(task).items() if k.startswith(("prompts.", "reward.", "task.seed"))}

    lines = [
        "| run | prompts | initial score | trained score | mean difference (95% interval) | trained higher | "
        "Bradley–Terry preference |",
        "|---|---|---|---|---|---|---|",
    ]
    trained_scores: dict[str, dict[str, list[dict]]] = {}  # run → {"every": rows, "fresh": rows}
    for folder in args.runs:
        record = read_record(folder)
        if record is None or record["task"] != task.name:
            parser.error(f"{folder} holds no run of {task.name} (its run.json)")
        # read_record gives a key added later the value the recording run used (pair by pair, before split_by)
        changed = changed_settings({k: record["settings"].get(k) for k in data_settings}, data_settings)
        if changed:
            parser.error(f"{folder} was run with other data settings than {args.task}: {'; '.join(changed)}")
        with open(os.path.join(folder, "report.json")) as f:
            report = json.load(f)
        if "per_prompt" not in report:
            parser.error(f"{folder}/report.json has no per_prompt scores: run `sb3-rlhf evaluate` on it again")
        rows = report["per_prompt"]
        unknown = [r["prompt"][:60] for r in rows if r["prompt"] not in plain_of]
        if unknown:
            parser.error(
                f"{folder}: {len(unknown)} held-out prompts are not prompts of {args.task}, e.g. {unknown[0]!r}"
            )
        keys = [conversation_key(plain_of[r["prompt"]]) for r in rows]
        leaked = sum(k in reward_model_conversations for k in keys)
        if leaked:
            parser.error(f"{folder}: {leaked} held-out conversations trained the reward model")
        if [r["prompt"] for r in rows] != held_out:
            parser.error(f"{folder}: its held-out prompts are not the {len(held_out)} that {args.task} holds out")
        fresh = [r for r, k in zip(rows, keys, strict=True) if k not in choosers]
        name = f"{report['algorithm']} ({os.path.basename(os.path.normpath(folder))})"
        for label, chosen in (
            ("every held-out conversation", rows),
            (f"without the {len(rows) - len(fresh)} that chose the method", fresh),
        ):
            before, after = [r["initial"] for r in chosen], [r["trained"] for r in chosen]
            lines.append(paired_line(f"{name}, {label}", before, after))
        trained_scores[name] = {"every held-out conversation": rows, "without the method choosers": fresh}
    # each later run's trained policy against each earlier one's, on the same conversations (every run holds out the
    # same ones, in the same order: checked above)
    names = list(trained_scores)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            for label in trained_scores[first]:
                before = [r["trained"] for r in trained_scores[first][label]]
                after = [r["trained"] for r in trained_scores[second][label]]
                lines.append(paired_line(f"{second} against {first} ('initial': {first}), {label}", before, after))
    print(
        f"Held-out conversations that trained the reward model: none (of {len(reward_model_conversations)} "
        f"reward-model conversations). Conversations of the earlier held-out set that chose the method: "
        f"{len(choosers)}. The reward model's held-out pairs (split_by = {task.reward.train.split_by!r}): "
        f"{len(reward_test)}, {tested_on_trained} of them in a conversation it trained on.\n"
    )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
