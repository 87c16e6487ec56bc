import os

import pytest
import torch as th
from transformers import AutoTokenizer

from sb3_rlhf.common.models import load_causal_lm, packaged_model_path, resolve_model_path


def test_unknown_and_missing_models_get_clear_errors(tmp_path):
    with pytest.raises(KeyError, match="unknown packaged model"):
        packaged_model_path("GPT-5")
    with pytest.raises(FileNotFoundError, match="does not exist as a local folder"):
        resolve_model_path(str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_causal_lm(str(tmp_path / "nothing"))
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)


@pytest.mark.real_model
def test_packaged_smollm2_policy_converts_once_and_generates():
    try:
        path = packaged_model_path("SmolLM2-135M-Instruct")
    except ImportError as missing:
        pytest.skip(str(missing))
    stamp = os.path.getmtime(os.path.join(path, "model.safetensors"))
    assert packaged_model_path("SmolLM2-135M-Instruct") == path  # cached: not converted again
    assert os.path.getmtime(os.path.join(path, "model.safetensors")) == stamp
    model = load_causal_lm(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with th.no_grad():
        out = model.generate(**prompt, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer  # the de-quantized weights are the real model, not noise
