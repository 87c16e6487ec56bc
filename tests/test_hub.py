"""Models by hub id, offline: a hub-style cache built in a temporary HF_HOME from a tiny saved model.

huggingface_hub reads ``HF_HOME`` and ``HF_HUB_OFFLINE`` when it is imported, so the end-to-end run happens in a
fresh Python process with those variables set, as a user's would.
"""

import json
import os
import re
import subprocess
import sys
import textwrap
import zipfile

import huggingface_hub
import pytest

from sb3_rlhf.common.models import PACKAGED_MODELS, resolve_model_path
from tests.helpers import build_hub_cache

REPO_ID = "tiny-org/tiny-llama"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def hub_home(tmp_path, model_path):
    """``$HF_HOME`` whose hub cache holds the tiny Llama as ``tiny-org/tiny-llama`` (revision ``main``)."""
    home = tmp_path / "hf_home"
    commit = build_hub_cache(home, REPO_ID, model_path)
    return home, commit


@pytest.fixture
def offline_cache(hub_home, monkeypatch):
    """This process's huggingface_hub pointed at the temporary cache, offline."""
    home, commit = hub_home
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return home, commit


def test_a_cached_hub_id_resolves_to_its_snapshot(offline_cache):
    home, commit = offline_cache
    path = resolve_model_path(REPO_ID)
    assert path == str(home / "hub" / "models--tiny-org--tiny-llama" / "snapshots" / commit)
    assert resolve_model_path(REPO_ID, revision=commit) == path  # a pinned commit
    assert os.path.isfile(os.path.join(path, "model.safetensors"))


def test_hub_errors_are_one_line_and_name_the_fix(offline_cache, tmp_path, model_path):
    with pytest.raises(FileNotFoundError) as error:
        resolve_model_path("someone/not-cached")
    message = str(error.value)
    assert "\n" not in message
    assert "'someone/not-cached'" in message and "HF_HUB_OFFLINE=1" in message
    assert all(name in message for name in PACKAGED_MODELS)  # the offline alternatives
    with pytest.raises(FileNotFoundError, match="as a hub id at revision 'v9' it is not in the Hugging Face cache"):
        resolve_model_path(REPO_ID, revision="v9")
    with pytest.raises(FileNotFoundError, match="does not exist as a local folder"):
        resolve_model_path(str(tmp_path / "missing" / "folder"))
    with pytest.raises(ValueError, match="applies to hub ids only"):
        resolve_model_path(model_path, revision="main")


def test_an_unknown_revision_online_is_named(monkeypatch):
    from huggingface_hub.errors import RevisionNotFoundError

    def no_such_revision(repo_id, revision=None, **kwargs):
        # built without an HTTP response object, whose class differs between huggingface_hub versions
        error = RevisionNotFoundError.__new__(RevisionNotFoundError)
        Exception.__init__(error, f"404: {repo_id}@{revision}")
        raise error

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_such_revision)
    with pytest.raises(FileNotFoundError, match="'org/model' has no revision 'v2' on the hub"):
        resolve_model_path("org/model", revision="v2")


def test_pickled_weights_from_the_hub_are_refused(tmp_path, monkeypatch):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    home = tmp_path / "home"
    build_hub_cache(home, "org/pickled", folder)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="no safetensors weights"):
        resolve_model_path("org/pickled")


END_TO_END = textwrap.dedent(
    """
    import json, os, socket, sys, zipfile
    import torch as th
    from transformers import AutoModelForCausalLM

    if os.environ.get("REFUSE_SOCKETS"):
        def refuse(*args, **kwargs):
            raise ConnectionRefusedError("no network in this test")
        socket.socket.connect = refuse
        socket.create_connection = refuse

    from sb3_rlhf import RLHFPPO, TokenGenerationEnv, TransformerActorCriticPolicy
    from sb3_rlhf.common.rollout_engine import RolloutEngine
    from sb3_rlhf.common.tiny import tiny_prompts
    from sb3_rlhf.rewards import KLPenaltyWrapper, RewardFunctionWrapper
    from sb3_rlhf.rewards.rules import share_of_good

    repo_id, revision, out = sys.argv[1], sys.argv[2], sys.argv[3]

    def make_env():
        env = TokenGenerationEnv(tiny_prompts(16, 0), repo_id, max_prompt_tokens=8, max_new_tokens=6)
        return KLPenaltyWrapper(RewardFunctionWrapper(env, share_of_good), coef=0.05)

    kwargs = dict(model_name_or_path=repo_id, revision=revision)
    model = RLHFPPO(TransformerActorCriticPolicy, make_env(), policy_kwargs=kwargs, n_episodes=8, batch_size=4,
                    n_epochs=1, learning_rate=1e-3, seed=0)
    model.learn(48)
    model.save(os.path.join(out, "ppo.zip"))
    loaded = RLHFPPO.load(os.path.join(out, "ppo.zip"), env=make_env())
    env = make_env().unwrapped
    samples = []
    for policy in (model.policy, loaded.policy):
        th.manual_seed(7)
        samples.append(RolloutEngine().sample_episodes(policy, env, list(range(8)))[0].response_ids.tolist())
    model.policy.save_pretrained(os.path.join(out, "export"), tokenizer=env.tokenizer)
    exported = AutoModelForCausalLM.from_pretrained(os.path.join(out, "export"), local_files_only=True)
    weights = loaded.policy.actor.state_dict()
    same = all(th.equal(weights[k], v) for k, v in exported.state_dict().items())
    with zipfile.ZipFile(os.path.join(out, "ppo.zip")) as archive:
        data = json.loads(archive.read("data"))
    print(json.dumps({
        "timesteps": loaded.num_timesteps,
        "same_samples": samples[0] == samples[1],
        "export_matches": same,
        "zip_policy_kwargs": data["policy_kwargs"],
    }))
    """
)


@pytest.mark.parametrize("mode", ["HF_HUB_OFFLINE=1", "sockets refused"])
def test_train_save_load_export_by_hub_id_offline(hub_home, tmp_path, mode):
    """The whole PPO path by hub id from the cache alone: env tokenizer, policy, KL reference, save, load, export."""
    home, commit = hub_home
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(home), PYTHONPATH=ROOT, OMP_NUM_THREADS="2")
    env["HF_HUB_OFFLINE" if mode == "HF_HUB_OFFLINE=1" else "REFUSE_SOCKETS"] = "1"
    revision = commit if mode == "sockets refused" else "main"
    result = subprocess.run(
        [sys.executable, "-c", END_TO_END, REPO_ID, revision, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["timesteps"] >= 48
    assert report["same_samples"] and report["export_matches"]
    # the zip names the model by its id and the commit "main" resolved to, never by a machine's cache path
    kwargs = report["zip_policy_kwargs"]
    assert kwargs["model_name_or_path"] == REPO_ID and kwargs["revision"] == commit
    with zipfile.ZipFile(tmp_path / "ppo.zip") as archive:
        assert str(home) not in archive.read("data").decode()


def test_every_model_slot_takes_a_hub_id(offline_cache, tokenizer, model_path):
    """The KL reference, the tokenizer, a reward-model backbone, SFT and DPO by hub id, from the cache."""
    import torch as th

    from sb3_rlhf import TokenGenerationEnv
    from sb3_rlhf.common.data import Demonstration, PreferencePair
    from sb3_rlhf.common.models import load_causal_lm, load_tokenizer
    from sb3_rlhf.dpo import DPOTrainer
    from sb3_rlhf.reward_modeling import RewardModel
    from sb3_rlhf.rewards import KLPenaltyWrapper
    from sb3_rlhf.sft import SFTTrainer

    _, commit = offline_cache
    local = load_causal_lm(model_path)
    env = TokenGenerationEnv(["the cat"], REPO_ID, max_prompt_tokens=4, max_new_tokens=2)
    assert env.tokenizer.get_vocab() == load_tokenizer(model_path).get_vocab()
    kl = KLPenaltyWrapper(env, 0.1, ref_model=REPO_ID, ref_revision=commit)
    for name, tensor in local.state_dict().items():
        assert th.equal(kl.ref_model.state_dict()[name], tensor), name
    backbone = RewardModel.from_backbone(REPO_ID).backbone
    assert th.equal(backbone.get_input_embeddings().weight, local.get_input_embeddings().weight)
    sft = SFTTrainer(REPO_ID, None, [Demonstration("the cat", "sat on the mat")], n_epochs=1)
    assert len(sft.train_examples) == 1
    dpo = DPOTrainer(REPO_ID, None, [PreferencePair("the cat", "sat", "ran")])
    assert dpo.reference_path == REPO_ID


TASKS = os.path.join(ROOT, "envs")


def test_dry_run_resolves_a_hub_policy_and_counts_it(offline_cache, tmp_path, capsys, model_path):
    """``train --dry-run`` with the policy named by hub id: resolved from the cache, counted, nothing written."""
    from sb3_rlhf.cli import main
    from sb3_rlhf.common.models import load_causal_lm

    out = tmp_path / "run"
    _, commit = offline_cache
    argv = ["train", os.path.join(TASKS, "tiny_synthetic.toml"), "--out", str(out), "--dry-run"]
    argv += ["--set", f"policy.model={REPO_ID}", "--set", f"policy.revision={commit}"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    parameters = sum(p.numel() for p in load_causal_lm(model_path).parameters())
    assert f"policy: {REPO_ID}@{commit} -> " in printed and f"({parameters:,} parameters)" in printed
    assert "prompts: inline: total 20, train 15, held out 5" in printed
    # 20000 tokens of 64 responses of at most 12 tokens: ceil(20000 / 768) = 27 rollouts at least
    assert "20000 generated tokens in 27–313 rollouts of 64 responses; 16 gradient steps each" in printed
    assert not out.exists()


@pytest.mark.parametrize(
    "override, words",
    [
        ("policy.model=org/missing", "'org/missing' does not exist as a local folder"),
        ("prompts.source=file", "prompts.texts are inline prompts: with source = 'file' remove them"),
        ("reward.function=no_such_module:f", "cannot import 'no_such_module'"),
    ],
)
def test_dry_run_names_what_is_missing(offline_cache, tmp_path, capsys, override, words):
    from sb3_rlhf.cli import main

    argv = ["train", os.path.join(TASKS, "tiny_synthetic.toml"), "--out", str(tmp_path / "run"), "--dry-run"]
    assert main([*argv, "--set", override]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]  # besides warnings of keys that do nothing
    assert words in err and len(errors) == 1 and "Traceback" not in err, err


def test_dry_run_checks_the_policy_tokenizer_and_the_classifier_label(offline_cache, tmp_path, tokenizer, capsys):
    """What would stop the run at its first step also stops the dry run: a tokenizer that pads with EOS and has
    no spare special token, a classifier reward without a label it has."""
    from sb3_rlhf.cli import main
    from sb3_rlhf.common.tiny import tiny_causal_lm, tiny_tokenizer
    from tests.helpers import tiny_classifier

    task = ["train", os.path.join(TASKS, "tiny_synthetic.toml"), "--out", str(tmp_path / "run"), "--dry-run"]
    classifier = tmp_path / "sentiment"
    tiny_classifier(len(tokenizer)).save_pretrained(classifier)
    tokenizer.save_pretrained(classifier)
    with open(os.path.join(TASKS, "tiny_synthetic.toml")) as f:
        text = f.read().replace('function = "sb3_rlhf.rewards.rules:share_of_good"', f'model = "{classifier}"')
    (tmp_path / "classifier.toml").write_text(text)
    task[1] = str(tmp_path / "classifier.toml")
    assert main(task) == 2
    assert "2 labels ['NEGATIVE', 'POSITIVE']: pass label=" in capsys.readouterr().err
    assert main([*task, "--set", "reward.label=happy"]) == 2
    assert "'happy'" in capsys.readouterr().err
    assert main([*task, "--set", "reward.label=POSITIVE"]) == 0
    assert "reward_model: " in capsys.readouterr().out

    eos_padded = tiny_tokenizer(["the", "cat"])
    eos_padded.pad_token = eos_padded.eos_token  # and no other special token to pad with
    eos_padded.add_special_tokens({"unk_token": eos_padded.eos_token})
    folder = tmp_path / "eos_padded"
    tiny_causal_lm(len(eos_padded)).save_pretrained(folder)
    eos_padded.save_pretrained(folder)
    assert main([*task, "--set", f"policy.model={folder}"]) == 2
    assert "pad token equals its EOS token" in capsys.readouterr().err


def test_a_tokenizer_padding_with_eos_gets_a_spare_special_token(tmp_path):
    """Hub causal LMs often pad with EOS (or not at all): loading by name reuses a special token that is not EOS,
    so the env accepts it without resizing the model; a tokenizer object is left as the user gave it."""
    from sb3_rlhf import TokenGenerationEnv
    from sb3_rlhf.common.models import load_tokenizer
    from sb3_rlhf.common.tiny import tiny_tokenizer

    chat_like = tiny_tokenizer(["the", "cat", "<|endoftext|>"])
    chat_like.add_special_tokens({"additional_special_tokens": ["<|endoftext|>"]})
    chat_like.pad_token = chat_like.eos_token
    chat_like.save_pretrained(tmp_path / "tok")
    size = len(chat_like)
    with pytest.warns(UserWarning, match=re.escape("using its special token '<|endoftext|>'")):
        loaded = load_tokenizer(str(tmp_path / "tok"))
    assert loaded.pad_token == "<|endoftext|>" and loaded.pad_token_id != loaded.eos_token_id
    assert len(loaded) == size  # no new token: the model's embeddings fit as they are
    with pytest.warns(UserWarning):
        env = TokenGenerationEnv(["the cat"], str(tmp_path / "tok"), max_prompt_tokens=4, max_new_tokens=2)
    assert env.pad_token_id == loaded.pad_token_id
    with pytest.raises(ValueError, match="pad token equals its EOS token"):
        TokenGenerationEnv(["the cat"], chat_like, max_prompt_tokens=4, max_new_tokens=2)
