"""The floor of a peers pair: the least work any implementation of the algorithm does per rollout, written
directly with torch and transformers, no env, no SB3, no TRL. Run by ``peers.py`` in its own process, like
the two sides, on the same spec:

    python benchmarks/peers_floor.py SPEC.json RESULT.json

Per rollout: one ``generate()`` (KV cache; the old log-probs recorded from the scores it samples with, one
``(batch, vocab)`` at a time: no teacher-forced pass for them and no stored scores), one reference forward, for
PPO the reward model's forward and one forward for the values (the policy's, its LM head on one position, with a
shared head; the critic's with a separate one), then ``n_epochs`` × minibatches of one forward (a shared head
reads that forward's last hidden states; a separate critic runs its own), backward and AdamW step. Rewards,
advantages and losses are the cheapest correct ones (they cost nothing beside the model passes). No evaluation,
no logging, no checks: what is left is the model work. ``TRL time / floor time`` bounds the speedup any
implementation of the same algorithm could show over TRL here. The shared-value-head floor is that of a lighter
algorithm than TRL's PPO (which always trains a separate value model).
"""

from __future__ import annotations

import json
import sys
import warnings
from typing import Any

import torch as th
import torch.nn.functional as F
from peers_common import PeakMemory, Timer, word_score_reward, write_json
from transformers import LogitsProcessor, LogitsProcessorList


def token_logprobs(logits: th.Tensor, tokens: th.Tensor, temperature: float) -> th.Tensor:
    return F.log_softmax(logits.float() / temperature, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


class SampledLogprobs(LogitsProcessor):
    """The log-prob of each drawn token, from the (temperature-scaled) scores generate() samples with, one
    ``(batch, vocab)`` alive at a time."""

    def __init__(self) -> None:
        self.last: th.Tensor | None = None
        self.logprobs: list[th.Tensor] = []

    def __call__(self, input_ids: th.Tensor, scores: th.Tensor) -> th.Tensor:
        if self.last is not None:
            self.logprobs.append(self.last.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.last = F.log_softmax(scores.float(), -1)
        return scores

    def finish(self, response: th.Tensor) -> th.Tensor:
        assert self.last is not None
        logprobs = th.stack([*self.logprobs, self.last.gather(-1, response[:, -1:]).squeeze(-1)], 1)
        self.last, self.logprobs = None, []
        return logprobs[:, : response.shape[1]]


def run_floor(spec: dict[str, Any]) -> dict[str, Any]:
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    memory = PeakMemory(spec["device"])
    memory.baseline()
    device, temperature, n, T = spec["device"], spec["temperature"], spec["n_episodes"], spec["response_length"]
    algorithm, beta = spec["algorithm"], spec["beta"]
    ppo = algorithm == "ppo"
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    tokenizer.padding_side = "left"
    policy = AutoModelForCausalLM.from_pretrained(spec["model_dir"]).to(device)
    reference = AutoModelForCausalLM.from_pretrained(spec["model_dir"]).to(device).eval().requires_grad_(False)
    trained = list(policy.parameters())
    reward_model = critic = head = None
    if ppo:
        reward_model = AutoModelForSequenceClassification.from_pretrained(spec["reward_model_dir"]).to(device).eval()
        reward_model.requires_grad_(False)
        if spec["value_head"] == "separate":
            critic = AutoModel.from_pretrained(spec["model_dir"]).to(device)
            trained += list(critic.parameters())
        head = th.nn.Linear(policy.config.hidden_size, 1).to(device)
        trained += list(head.parameters())
    optimizer = th.optim.AdamW(trained, lr=spec["learning_rate"], weight_decay=0.0)
    group = 1 if ppo else spec["samples_per_prompt"]
    rng = th.Generator().manual_seed(spec["seed"])
    recorder = SampledLogprobs()

    def policy_pass(ids: th.Tensor, mask: th.Tensor, keep: int) -> tuple[th.Tensor, th.Tensor | None]:
        """The policy's logits of the last ``keep`` positions and, for PPO, the values V(s_0..s_T-1): from the same
        forward's last hidden states with a shared head, from the critic's forward with a separate one."""
        shared = ppo and critic is None
        out = policy(input_ids=ids, attention_mask=mask, logits_to_keep=keep, output_hidden_states=shared)
        if not ppo:
            return out.logits, None
        assert head is not None
        hidden = (
            out.hidden_states[-1] if critic is None else critic(input_ids=ids, attention_mask=mask).last_hidden_state
        )
        return out.logits, head(hidden[:, -T - 1 : -1]).squeeze(-1)

    # warm-up outside the timer, as both sides' initial evaluation: generate()'s and autograd's first-call costs
    warm = tokenizer(spec["prompts"][:2], return_tensors="pt", padding=True).to(device)
    with th.no_grad():
        policy.generate(**warm, do_sample=True, max_new_tokens=2, pad_token_id=tokenizer.pad_token_id)
    policy(**warm).logits.sum().backward()
    optimizer.zero_grad()
    episodes = tokens = 0
    memory.start()
    with Timer(device) as timer:
        for _ in range(spec["iterations"]):
            picks = th.randint(len(spec["prompts"]), (n // group,), generator=rng).repeat_interleave(group)
            prompts = tokenizer([spec["prompts"][i] for i in picks], return_tensors="pt", padding=True).to(device)
            policy.eval()
            with th.no_grad():
                ids = policy.generate(
                    **prompts,
                    do_sample=True,
                    top_k=0,
                    top_p=1.0,
                    temperature=temperature,
                    max_new_tokens=T,
                    min_new_tokens=T,  # every episode the full length, as both sides generate here
                    pad_token_id=tokenizer.pad_token_id,
                    logits_processor=LogitsProcessorList([recorder]),  # after the temperature warper
                )
                response = ids[:, -T:]
                mask = th.cat([prompts["attention_mask"], th.ones_like(response)], dim=1)
                old = recorder.finish(response)
                ref_logits = reference(input_ids=ids, attention_mask=mask, logits_to_keep=T + 1).logits[:, :-1]
                ref = token_logprobs(ref_logits, response, temperature)
                if reward_model is not None:
                    score = reward_model(input_ids=ids, attention_mask=mask).logits[:, 0]
                    rewards = -beta * (old - ref)
                    rewards[:, -1] += score
                    _, old_values = policy_pass(ids, mask, keep=1)  # the values; the LM head on one position
                    assert old_values is not None
                    returns = rewards.flip(-1).cumsum(-1).flip(-1)  # γ = λ = 1: the cheapest correct advantage
                    advantages = returns - old_values
                    advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
                else:
                    texts = tokenizer.batch_decode(response, skip_special_tokens=True)
                    score = th.tensor(word_score_reward([spec["prompts"][i] for i in picks], texts), device=device)
                    if algorithm == "rloo":  # β·KL in the return, the leave-one-out baseline
                        grouped = (score - beta * (old - ref).sum(-1)).view(-1, group)
                        advantages = grouped - (grouped.sum(-1, keepdim=True) - grouped) / (group - 1)
                    else:  # GRPO: group-normalised scores, the KL in the loss
                        grouped = score.view(-1, group)
                        advantages = (grouped - grouped.mean(-1, keepdim=True)) / (grouped.std(-1, keepdim=True) + 1e-4)
                    advantages = advantages.reshape(-1, 1).expand(-1, T)
            policy.train()
            for _ in range(spec["n_epochs"]):
                for rows in th.randperm(n).split(n // spec["n_minibatches"]):
                    logits, values = policy_pass(ids[rows], mask[rows], keep=T + 1)
                    logprobs = token_logprobs(logits[:, :-1], response[rows], temperature)
                    ratio = th.exp(logprobs - old[rows])
                    adv, clip = advantages[rows], spec["clip_range"]
                    loss = th.max(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip)).mean()
                    if values is not None:
                        loss = loss + spec["vf_coef"] * ((values - returns[rows]) ** 2).mean()
                    if algorithm == "grpo":  # the k3 KL term; RLOO has the KL in the return
                        log_ratio = ref[rows] - logprobs
                        loss = loss + beta * (th.exp(log_ratio) - log_ratio - 1).mean()
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
