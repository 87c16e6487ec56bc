"""Safety: no code runs from a model file, weights are safetensors, no network at run time."""

import base64
import json
import os
import pickle
import socket
import zipfile

import pytest
import torch as th

from sb3_rlhf import RLHFPPO
from sb3_rlhf.common.models import load_causal_lm
from sb3_rlhf.common.safe_load import UnsafeZipError
from sb3_rlhf.rewards import KLPenaltyWrapper, RewardModelWrapper
from tests.helpers import make_model, rule_env, tiny_reward_model


class Payload:
    """What a crafted zip would hide: unpickling it runs a command (here it would only create a file)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def rewrite_data(path, key, value) -> None:
    with zipfile.ZipFile(path) as archive:
        files = {name: archive.read(name) for name in archive.namelist()}
    data = json.loads(files["data"])
    data[key] = {":type:": "<class 'object'>", ":serialized:": base64.b64encode(pickle.dumps(value)).decode()}
    files["data"] = json.dumps(data).encode()
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in files.items():
            archive.writestr(name, content)


def test_loading_a_zip_never_calls_cloudpickle(tokenizer, model_path, tmp_path, monkeypatch):
    model = make_model(rule_env(tokenizer), model_path, n_episodes=8)
    model.learn(30)
    model.save(tmp_path / "model.zip")

    def refuse(*args, **kwargs):
        raise AssertionError("cloudpickle.loads was called")

    monkeypatch.setattr("stable_baselines3.common.save_util.cloudpickle.loads", refuse)
    loaded = RLHFPPO.load(tmp_path / "model.zip", env=rule_env(tokenizer))
    assert loaded.num_timesteps == model.num_timesteps
    assert loaded.clip_range(1.0) == 0.2 and loaded.lr_schedule(1.0) == 1e-3
    for name, tensor in model.policy.state_dict().items():
        assert th.equal(tensor, loaded.policy.state_dict()[name]), name
    with open(tmp_path / "model.zip", "rb") as f:  # a file object goes through the same allowlist
        assert RLHFPPO.load(f, env=rule_env(tokenizer)).num_timesteps == model.num_timesteps


def test_a_crafted_zip_is_refused_before_its_code_runs(tokenizer, model_path, tmp_path):
    model = make_model(rule_env(tokenizer), model_path, n_episodes=8)
    model.save(tmp_path / "model.zip")
    marker = tmp_path / "pwned"
    rewrite_data(tmp_path / "model.zip", "clip_range", Payload(str(marker)))
    with pytest.raises(UnsafeZipError, match=r"'clip_range' references posix\.system.*trust_pickled_objects=True"):
        RLHFPPO.load(tmp_path / "model.zip", env=rule_env(tokenizer))
    assert not marker.exists()


def test_a_zip_with_code_of_its_own_loads_only_when_trusted(tokenizer, model_path, tmp_path):
    model = make_model(rule_env(tokenizer), model_path, n_episodes=8, learning_rate=lambda progress: 1e-3 * progress)
    model.save(tmp_path / "model.zip")
    with pytest.raises(UnsafeZipError, match="learning_rate"):
        RLHFPPO.load(tmp_path / "model.zip", env=rule_env(tokenizer))
    trusted = RLHFPPO.load(tmp_path / "model.zip", env=rule_env(tokenizer), trust_pickled_objects=True)
    assert trusted.lr_schedule(0.5) == pytest.approx(5e-4)
    # or the user supplies the objects the zip cannot give safely
    schedule = {"learning_rate": lambda p: 2e-3 * p, "lr_schedule": lambda p: 2e-3 * p}
    given = RLHFPPO.load(tmp_path / "model.zip", env=rule_env(tokenizer), custom_objects=schedule)
    assert given.lr_schedule(0.5) == pytest.approx(1e-3)


def test_remote_code_in_a_model_folder_never_runs_unless_asked(model_path, tmp_path):
    folder = tmp_path / "custom_model"
    folder.mkdir()
    marker = tmp_path / "imported"
    for module in ("configuration_custom", "modeling_custom"):
        (folder / f"{module}.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads(open(os.path.join(model_path, "config.json")).read())
    config.update(
        model_type="custom_llama",
        auto_map={
            "AutoConfig": "configuration_custom.CustomConfig",
            "AutoModelForCausalLM": "modeling_custom.CustomModel",
        },
    )
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_causal_lm(str(folder))
    assert not marker.exists()


def test_weights_are_written_as_safetensors(tokenizer, model_path, tmp_path):
    model = make_model(rule_env(tokenizer), model_path, n_episodes=8)
    model.policy.save_pretrained(str(tmp_path / "policy"), tokenizer=tokenizer)
    files = os.listdir(tmp_path / "policy")
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files)


def test_a_run_makes_no_network_call(tokenizer, model_path, tmp_path, monkeypatch):
    """Every socket connection fails: loading models by path, training, saving and loading still work."""

    def no_network(*args, **kwargs):
        raise AssertionError(f"network access at run time: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    tiny_reward_model(len(tokenizer)).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    env = KLPenaltyWrapper(RewardModelWrapper(rule_env(tokenizer).env.env, str(tmp_path / "rm")), coef=0.05)
    model = make_model(env, model_path, n_episodes=8)
    model.learn(50)
    model.save(tmp_path / "model.zip")
    RLHFPPO.load(tmp_path / "model.zip", env=env)
    model.policy.save_pretrained(str(tmp_path / "policy"), tokenizer=tokenizer)
    load_causal_lm(str(tmp_path / "policy"))
