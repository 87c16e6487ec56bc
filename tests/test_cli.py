import json
import os

import pytest

from sb3_rlhf.cli import main
from sb3_rlhf.common.rollout_engine import RolloutEngine
from sb3_rlhf.reward_modeling import load_reward_model
from tests.helpers import tiny_bert, toy_demos, toy_dpo_pairs, toy_reward_pairs


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


def test_cli_reward_model(tmp_path, tokenizer, capsys):
    backbone = tmp_path / "backbone"
    tiny_bert(len(tokenizer)).save_pretrained(backbone)
    tokenizer.save_pretrained(backbone)
    data = write_jsonl(
        tmp_path / "pairs.jsonl",
        [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in toy_reward_pairs(120)],
    )
    out = tmp_path / "out"
    args = [
        "reward-model",
        "--data",
        data,
        "--model",
        str(backbone),
        "--out",
        str(out),
        "--epochs",
        "3",
        "--learning-rate",
        "3e-3",
        "--test-size",
        "20",
        "--max-length",
        "32",
        "--no-progress-bar",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "pairs: 100 train, 20 held out" in printed
    assert "held-out accuracy:" in printed and "reward model saved to" in printed
    accuracy = float(printed.split("held-out accuracy: ")[1].split(" -> ")[1].split(";")[0])
    assert accuracy >= 0.9
    assert load_reward_model(str(out / "reward_model")) is not None


def test_cli_reward_model_holds_out_whole_conversations(tmp_path, tokenizer, capsys):
    backbone = tmp_path / "backbone"
    tiny_bert(len(tokenizer)).save_pretrained(backbone)
    tokenizer.save_pretrained(backbone)
    records = []  # 12 conversations, each with two comparisons of its answers
    for i in range(12):
        prompt = f"\n\nHuman: the dog {i}\n\nAssistant:"
        records += [
            {"chosen": f"{prompt} good", "rejected": f"{prompt} bad"},
            {"chosen": f"{prompt} nice", "rejected": f"{prompt} sad"},
        ]
    data = write_jsonl(tmp_path / "hh.jsonl", records)
    common = ["reward-model", "--data", data, "--model", str(backbone), "--test-size", "4", "--max-length", "32"]
    common += ["--epochs", "1", "--no-progress-bar"]
    assert main([*common, "--out", str(tmp_path / "by_pair")]) == 0
    assert "pairs: 20 train, 4 held out" in capsys.readouterr().out
    # 4 conversations held out, tested on one pair each; their other pair is not trained on either
    assert main([*common, "--split-by", "conversation", "--out", str(tmp_path / "by_conversation")]) == 0
    assert "pairs: 16 train, 4 held out" in capsys.readouterr().out
    csv = tmp_path / "reviews.csv"
    csv.write_text("review,sentiment\ngood dog,positive\nbad dog,negative\n")
    argv = ["reward-model", "--data", str(csv), "--model", str(backbone), "--out", str(tmp_path / "labels")]
    assert main([*argv, "--split-by", "conversation", "--no-progress-bar"]) == 2
    assert "--split-by conversation groups comparisons by conversation" in capsys.readouterr().err


def test_cli_reward_model_from_labelled_csv(tmp_path, tokenizer, capsys):
    backbone = tmp_path / "backbone"
    tiny_bert(len(tokenizer)).save_pretrained(backbone)
    tokenizer.save_pretrained(backbone)
    rows = (
        ["review,sentiment"]
        + [f"the cat was good {i % 3},positive" for i in range(12)]
        + [f"the dog was bad {i % 3},negative" for i in range(12)]
    )
    (tmp_path / "reviews.csv").write_text("\n".join(rows) + "\n")
    assert (
        main(
            [
                "reward-model",
                "--data",
                str(tmp_path / "reviews.csv"),
                "--model",
                str(backbone),
                "--out",
                str(tmp_path / "o"),
                "--test-size",
                "4",
                "--no-progress-bar",
            ]
        )
        == 0
    )
    assert "pairs: 8 train, 4 held out" in capsys.readouterr().out


def test_cli_sft(tmp_path, model_path, capsys):
    data = write_jsonl(tmp_path / "demos.jsonl", [{"prompt": d.prompt, "response": d.response} for d in toy_demos(60)])
    assert (
        main(
            [
                "sft",
                "--data",
                data,
                "--model",
                model_path,
                "--out",
                str(tmp_path / "sft"),
                "--epochs",
                "2",
                "--learning-rate",
                "3e-3",
                "--no-progress-bar",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    before, after = (float(x) for x in printed.split("held-out perplexity: ")[1].split("\n")[0].split(" -> "))
    assert after < before
    assert os.path.exists(tmp_path / "sft" / "model" / "model.safetensors")
    assert os.listdir(tmp_path / "sft" / "checkpoints")


def test_cli_dpo(tmp_path, model_path, capsys):
    records = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in toy_dpo_pairs(80)]
    data = write_jsonl(tmp_path / "pairs.jsonl", records)
    args = ["dpo", "--data", data, "--model", model_path, "--out", str(tmp_path / "dpo"), "--test-size", "16"]
    assert main([*args, "--epochs", "2", "--learning-rate", "1e-3", "--beta", "0.1", "--no-progress-bar"]) == 0
    printed = capsys.readouterr().out
    before, after = (float(x) for x in printed.split("held-out loss ")[1].split(";")[0].split(" -> "))
    assert after < before
    accuracy = float(printed.split("implicit-reward accuracy ")[1].split(",")[0])
    assert accuracy > 0.8
    assert os.path.exists(tmp_path / "dpo" / "model" / "dpo_config.json")
    assert main([*args, "--beta", "0", "--no-progress-bar"]) == 2
    assert "sb3-rlhf dpo: error: beta must be > 0" in capsys.readouterr().err
    broken = write_jsonl(tmp_path / "broken.jsonl", [{"prompt": "a", "chosen": "b"}] * 3)
    assert main(["dpo", "--data", broken, "--model", model_path, "--out", str(tmp_path / "x")]) == 2
    assert "rejected" in capsys.readouterr().err


def test_cli_errors(tmp_path, model_path, capsys):
    assert main(["sft", "--data", str(tmp_path / "missing.jsonl"), "--model", model_path, "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}] * 4)
    assert main(["sft", "--data", data, "--model", "no-such-model", "--out", str(tmp_path)]) == 2
    assert "does not exist as a local folder and is not a packaged model" in capsys.readouterr().err
    # --traceback gives the exception itself, for debugging
    with pytest.raises(FileNotFoundError, match="does not exist as a local folder and is not a packaged model"):
        main(["--traceback", "sft", "--data", data, "--model", "no-such-model", "--out", str(tmp_path)])


def test_cli_trainers_read_a_datasets_data_set(tmp_path, model_path, tokenizer, capsys):
    """``--dataset`` (a folder laid out as a hub data set, read by ``datasets``) trains exactly as ``--data``."""
    folder = tmp_path / "pairs_dataset"
    folder.mkdir()
    records = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in toy_dpo_pairs(40)]
    data = write_jsonl(folder / "train.jsonl", records)
    common = ["--model", model_path, "--test-size", "8", "--epochs", "1", "--no-progress-bar"]
    printed = []
    for source in (["--data", data], ["--dataset", str(folder), "--split", "train"]):
        assert main(["dpo", *source, "--out", str(tmp_path / source[0]), *common]) == 0
        printed.append(capsys.readouterr().out.split("held-out loss ")[1].splitlines()[0])
    assert printed[0] == printed[1]
    with pytest.raises(SystemExit) as usage_error:  # argparse refuses both at once
        main(["dpo", "--data", data, "--dataset", str(folder), "--out", str(tmp_path / "x"), *common])
    assert usage_error.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
    backbone = tmp_path / "backbone"
    tiny_bert(len(tokenizer)).save_pretrained(backbone)
    tokenizer.save_pretrained(backbone)
    rm = ["reward-model", "--model", str(backbone), "--test-size", "8", "--no-progress-bar"]
    accuracies = []
    for source in (["--data", data], ["--dataset", str(folder)]):
        assert main([*rm, *source, "--out", str(tmp_path / ("rm" + source[0]))]) == 0
        accuracies.append(capsys.readouterr().out.split("held-out accuracy: ")[1].splitlines()[0])
    assert accuracies[0] == accuracies[1]


def test_cli_generate_samples_as_the_policy(tmp_path, model_path, tokenizer, capsys):
    """`sb3-rlhf generate` draws what the policy draws for the same seed, whatever the checkpoint's own
    generation_config says (here a repetition penalty and suppressed tokens)."""
    import shutil

    import torch as th
    from gymnasium import spaces
    from transformers import GenerationConfig

    from sb3_rlhf import TransformerActorCriticPolicy

    folder = tmp_path / "opinionated"
    shutil.copytree(model_path, folder)
    suppressed = tokenizer.convert_tokens_to_ids(["good", "cat"])
    GenerationConfig(repetition_penalty=3.0, suppress_tokens=suppressed, min_new_tokens=6).save_pretrained(folder)
    argv = ["generate", "--model", str(folder), "--prompt", "the dog", "--max-new-tokens", "6", "--top-k", "8"]
    assert main([*argv, "--seed", "3", "--temperature", "1.5"]) == 0
    printed = capsys.readouterr().out
    policy = TransformerActorCriticPolicy(
        spaces.Dict({}),
        spaces.Discrete(len(tokenizer)),
        lambda _: 0.0,
        model_name_or_path=str(folder),
        temperature=1.5,
        top_k=8,
    )
    inputs = tokenizer("the dog", return_tensors="pt")
    th.manual_seed(3)
    response = (
        RolloutEngine()
        .generate(
            policy, inputs["input_ids"], inputs["attention_mask"], 6, (tokenizer.eos_token_id,), tokenizer.pad_token_id
        )
        .responses
    )
    assert printed.strip() == f"'the dog' -> {tokenizer.decode(response[0], skip_special_tokens=True)!r}"
