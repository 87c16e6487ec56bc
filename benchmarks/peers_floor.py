"""The floor of a peers pair: the least work any implementation of the algorithm does per rollout, written
directly with torch and transformers, no env, no SB3, no TRL. Run by ``peers.py`` in its own process, like
the two sides, on the same spec:

    python benchmarks/peers_floor.py SPEC.json RESULT.json

Per rollout: one ``generate()`` (KV cache; the old log-probs are kept from its scores, as TRL's PPO does, so no
teacher-forced pass for them), one reference forward, for PPO the reward model's forward and one forward for the
values (the policy's with a shared head, the critic's with a separate one), then ``n_epochs`` × minibatches of
one forward, backward and AdamW step. Rewards, advantages and losses are the cheapest correct ones (they cost
nothing beside the model passes). No evaluation, no logging, no checks: what is left is the model work, and
neither side can go faster than that by more than its own overhead. ``TRL time / floor time`` bounds the speedup
any implementation could show over TRL here.
"""

from __future__ import annotations

import json
import sys
import warnings
from typing import Any

import torch as th
import torch.nn.functional as F
from peers_common import PeakMemory, Timer, word_score_reward, write_json


def token_logprobs(logits: th.Tensor, tokens: th.Tensor, temperature: float) -> th.Tensor:
    return F.log_softmax(logits.float() / temperature, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def run_floor(spec: dict[str, Any]) -> dict[str, Any]:
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    memory = PeakMemory(spec["device"])
    memory.baseline()
    device, temperature, n = spec["device"], spec["temperature"], spec["n_episodes"]
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    tokenizer.padding_side = "left"
    policy = AutoModelForCausalLM.from_pretrained(spec["model_dir"]).to(device)
    reference = AutoModelForCausalLM.from_pretrained(spec["model_dir"]).to(device).eval().requires_grad_(False)
    trained = list(policy.parameters())
    ppo = spec["algorithm"] == "ppo"
    if ppo:
        reward_model = AutoModelForSequenceClassification.from_pretrained(spec["reward_model_dir"]).to(device).eval()
        reward_model.requires_grad_(False)
        critic = AutoModel.from_pretrained(spec["model_dir"]).to(device) if spec["value_head"] == "separate" else None
        head = th.nn.Linear(policy.config.hidden_size, 1).to(device)
        trained += list(head.parameters()) + (list(critic.parameters()) if critic is not None else [])
    else:
        critic = head = None
    optimizer = th.optim.AdamW(trained, lr=spec["learning_rate"], weight_decay=0.0)
    group = 1 if ppo else spec["samples_per_prompt"]
    rng = th.Generator().manual_seed(spec["seed"])
    T = spec["response_length"]
    episodes = tokens = 0

    def values_of(ids: th.Tensor, mask: th.Tensor) -> th.Tensor:
        assert head is not None
        if critic is not None:
            hidden = critic(input_ids=ids, attention_mask=mask).last_hidden_state
        else:
            hidden = policy(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        return head(hidden[:, -T - 1 : -1]).squeeze(-1)

    # warm-up outside the timer, as both sides' initial evaluation: generate()'s and autograd's first-call costs
    warm = tokenizer(spec["prompts"][:2], return_tensors="pt", padding=True).to(device)
    with th.no_grad():
        policy.generate(**warm, do_sample=True, max_new_tokens=2, pad_token_id=tokenizer.pad_token_id)
    policy(**warm).logits.sum().backward()
    optimizer.zero_grad()
    memory.start()
    with Timer(device) as timer:
        for _ in range(spec["iterations"]):
            picks = th.randint(len(spec["prompts"]), (n // group,), generator=rng).repeat_interleave(group)
            prompts = tokenizer([spec["prompts"][i] for i in picks], return_tensors="pt", padding=True).to(device)
            policy.eval()
            with th.no_grad():
                out = policy.generate(
                    **prompts,
                    do_sample=True,
                    top_k=0,
                    top_p=1.0,
                    temperature=temperature,
                    max_new_tokens=T,
                    min_new_tokens=T,  # every episode the full length, as both sides generate here
                    pad_token_id=tokenizer.pad_token_id,
                    output_scores=True,
                    return_dict_in_generate=True,
                )
                ids = out.sequences
                response = ids[:, -T:]
                mask = th.cat([prompts["attention_mask"], th.ones_like(response)], dim=1)
                old = F.log_softmax(th.stack(out.scores, 1).float(), -1).gather(-1, response.unsqueeze(-1)).squeeze(-1)
                ref = token_logprobs(
                    reference(input_ids=ids, attention_mask=mask, logits_to_keep=T + 1).logits[:, :-1],
                    response,
                    temperature,
                )
                if ppo:
                    score = reward_model(input_ids=ids, attention_mask=mask).logits[:, 0]
                    rewards = -spec["beta"] * (old - ref)
                    rewards[:, -1] += score
                    old_values = values_of(ids, mask)
                    returns = rewards.flip(-1).cumsum(-1).flip(-1)  # γ = λ = 1: the cheapest correct advantage
                    advantages = returns - old_values
                    advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
                else:
                    texts = tokenizer.batch_decode(response, skip_special_tokens=True)
                    score = th.tensor(word_score_reward([spec["prompts"][i] for i in picks], texts), device=device)
                    grouped = score.view(-1, group)
                    advantages = (grouped - grouped.mean(-1, keepdim=True)) / (grouped.std(-1, keepdim=True) + 1e-4)
                    advantages = advantages.reshape(-1, 1).expand(-1, T)
            policy.train()
            size = n // spec["n_minibatches"]
            for _ in range(spec["n_epochs"]):
                for rows in th.randperm(n).split(size):
                    logits = policy(input_ids=ids[rows], attention_mask=mask[rows], logits_to_keep=T + 1).logits[:, :-1]
                    logprobs = token_logprobs(logits, response[rows], temperature)
                    ratio = th.exp(logprobs - old[rows])
                    adv = advantages[rows]
                    clip = spec["clip_range"]
                    loss = th.max(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip)).mean()
                    if ppo:
                        loss = loss + spec["vf_coef"] * ((values_of(ids[rows], mask[rows]) - returns[rows]) ** 2).mean()
                    else:  # the KL term of GRPO's loss (k3); RLOO has it in the reward
                        loss = loss + spec["beta"] * (th.exp(ref[rows] - logprobs) - (ref[rows] - logprobs) - 1).mean()
                    optimizer.zero_grad()
                    loss.backward()
                    if not ppo:
                        th.nn.utils.clip_grad_norm_(trained, spec["max_grad_norm"])
                    optimizer.step()
            episodes, tokens = episodes + n, tokens + n * T
    return {
        "episodes": episodes,
        "tokens": tokens,
        "rollouts": spec["iterations"],
        "seconds": timer.seconds,
        **memory.peak_mib(),
    }


def main(spec_path: str, result_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    th.set_num_threads(spec["threads"])
    th.manual_seed(spec["seed"])
    warnings.filterwarnings("ignore")
    write_json(result_path, run_floor(spec))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
