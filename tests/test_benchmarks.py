"""The reward-versus-KL benchmark runs end to end on the tiny task and writes its table, CSV and plot."""

import csv
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kl_reward_frontier_on_the_tiny_task(tmp_path):
    out = tmp_path / "frontier"
    command = [
        sys.executable,
        os.path.join(ROOT, "benchmarks", "kl_reward_frontier.py"),
        "--task",
        os.path.join(ROOT, "envs", "tiny_synthetic.toml"),
        "--methods",
        "ppo",
        "nlpo",
        "p3o-joint",
        "grpo",
        "dpo",
        "--betas",
        "0.02",
        "0.1",
        "--seeds",
        "0",
        "1",
        "--timesteps",
        "400",
        "--dpo-epochs",
        "2",
        "--out",
        str(out),
        "--run-dir",
        str(tmp_path / "run"),
    ]
    subprocess.run(command, check=True, cwd=tmp_path, capture_output=True, text=True)
    with open(f"{out}.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["method"] for r in rows} == {"ppo", "nlpo", "p3o-joint", "grpo", "dpo"}
    for method in ("ppo", "nlpo", "p3o-joint", "grpo", "dpo"):
        run = [r for r in rows if r["method"] == method]
        if method == "nlpo":
            # the initial policy on its own nucleus: KL = Σ_t -log(the reference's mass there), each term <= -log 0.9
            assert 0.01 < float(run[0]["kl"]) <= 12 * -np.log(0.9) + 1e-4  # 12 tokens at most
        else:
            assert float(run[0]["kl"]) == 0.0 or abs(float(run[0]["kl"])) < 1e-4  # starts at the initial policy
        assert float(run[-1]["gradient_steps"]) > 0
    # two β and two seeds per method; the seeds train differently, the evaluations are the same for all
    for method in ("ppo", "nlpo", "p3o-joint", "grpo", "dpo"):
        run = [r for r in rows if r["method"] == method]
        assert {(float(r["beta"]), int(r["seed"])) for r in run} == {(b, s) for b in (0.02, 0.1) for s in (0, 1)}
        finals = {
            int(r["seed"]): r for r in run if float(r["beta"]) == 0.1 and r["evaluation"] == run[-1]["evaluation"]
        }
        assert finals[0]["score"] != finals[1]["score"]
        assert len({r["score"] for r in run if r["evaluation"] == "0"}) == 1  # every run starts from one point
        assert all(0 < float(r["distinct_2"]) <= 1 and float(r["reference_perplexity"]) > 1 for r in run)
    dpo = [r for r in rows if r["method"] == "dpo" and float(r["beta"]) == 0.1 and r["seed"] == "1"]
    assert len(dpo) == 3 and float(dpo[1]["gradient_steps"]) > 0  # before training and after each of its 2 epochs
    table = open(f"{out}.md").read()
    assert "| p3o-joint | 0.02 |" in table and "gradient steps" in table and "distinct-2" in table
    assert "p3o-joint against ppo" in table and "p3o-joint against dpo" in table and "nlpo against ppo" in table
    assert "KL, mean over its points (each its seeds' mean): ppo" in table and "; nlpo " in table
    assert os.path.getsize(f"{out}.png") > 10_000


def test_kl_reward_frontier_resumes_from_its_run_log(tmp_path):
    """A second invocation with --resume takes the finished runs from <out>.runs.jsonl instead of running them
    again (the reward model too), runs only what is missing, and reports all of them; a log made with other
    settings is not reused, and an invocation without --resume starts a new log."""
    out = tmp_path / "frontier"
    cut_short = '{"settings": {"task": "tiny_syn'  # the last line of a log whose process was killed mid-write

    def frontier(*args: str) -> str:
        command = [
            sys.executable,
            os.path.join(ROOT, "benchmarks", "kl_reward_frontier.py"),
            *("--task", os.path.join(ROOT, "envs", "tiny_synthetic.toml"), "--betas", "0.1", "--seeds", "0"),
            *("--out", str(out), "--run-dir", str(tmp_path / "run"), *args),
        ]
        return subprocess.run(command, check=True, cwd=tmp_path, capture_output=True, text=True).stdout

    def log_lines() -> list[dict]:
        with open(f"{out}.runs.jsonl") as f:
            return [json.loads(line) for line in f if line != cut_short + "\n"]

    def csv_rows(method: str) -> list[dict]:
        with open(f"{out}.csv") as f:
            return [r for r in csv.DictReader(f) if r["method"] == method]

    frontier("--methods", "ppo", "--timesteps", "400")
    first = csv_rows("ppo")
    assert [record["method"] for record in log_lines()] == ["ppo"]  # the tiny task has no reward model to train

    # --report-only: the report of the logged runs, naming the missing ones, which it does not run
    stdout = frontier("--methods", "ppo", "grpo", "--timesteps", "400", "--report-only")
    assert "**Partial: 1 of 2 runs.** Not run yet: grpo β=0.1 seed 0." in open(f"{out}.md").read()
    assert "**Provisional:** the readings below use the 1 runs logged so far" in open(f"{out}.md").read()
    assert "| ppo | 0.1 |" in open(f"{out}.md").read() and csv_rows("ppo") == first and not csv_rows("grpo")
    assert "grpo          β=0.1          seed 0: score" not in stdout and len(log_lines()) == 1
    with pytest.raises(subprocess.CalledProcessError) as refused:  # no run with these settings
        frontier("--methods", "ppo", "--timesteps", "800", "--report-only")
    assert "holds no run made with these settings" in refused.value.stderr
    with pytest.raises(subprocess.CalledProcessError) as refused:  # runs of these settings, but none of these methods
        frontier("--methods", "grpo", "--timesteps", "400", "--report-only")
    assert "holds none of the runs asked for (grpo β=0.1 seed 0)" in refused.value.stderr
    with open(f"{out}.runs.jsonl", "a") as f:
        f.write(cut_short)  # skipped when read, and ended before the next record

    stdout = frontier("--methods", "ppo", "grpo", "--timesteps", "400", "--resume")
    assert (
        "ppo           β=0.1          seed 0: from" in stdout and "grpo          β=0.1          seed 0: score" in stdout
    )
    assert csv_rows("ppo") == first and len(csv_rows("grpo")) > 1
    assert "runs taken from frontier.runs.jsonl: 1." in open(f"{out}.md").read()
    assert [record["method"] for record in log_lines()] == ["ppo", "grpo"]

    # a third seed for one method only: its points ask for it, the others' do not
    frontier("--methods", "ppo", "grpo", "--timesteps", "400", "--report-only", "--extra-seeds", "ppo=1")
    report = open(f"{out}.md").read()
    assert (
        "**Partial: 2 of 3 runs.** Not run yet: ppo β=0.1 seed 1." in report
        and "Seeds per point: 0; for ppo: 0, 1 (" in report
    )
    for wrong, error in [
        ("ppo=x", "'ppo=x': seeds are whole numbers"),
        ("rlhf=1", "'rlhf=1': expected METHOD=SEED[,SEED]"),
        ("dpo=1", "--extra-seeds dpo=...: dpo is not among --methods ppo grpo"),
        ("ppo=1,0", "--extra-seeds ppo=...: seed 0 is in --seeds already"),
    ]:
        with pytest.raises(subprocess.CalledProcessError) as refused:
            frontier("--methods", "ppo", "grpo", "--timesteps", "400", "--report-only", "--extra-seeds", wrong)
        assert error in refused.value.stderr

    # DPO's settings are DPO's own: other epochs do not make the online runs again
    stdout = frontier("--methods", "ppo", "--timesteps", "400", "--dpo-epochs", "5", "--resume")
    assert "ppo           β=0.1          seed 0: from" in stdout, stdout
    stdout = frontier("--methods", "ppo", "--timesteps", "400", "--eval-samples", "2", "--resume")  # other settings
    assert "ppo           β=0.1          seed 0: score" in stdout, stdout
    frontier("--methods", "ppo", "--timesteps", "400")  # no --resume: a new log
    assert len(log_lines()) == 1


def test_a_logged_run_is_reused_under_its_own_methods_settings(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    from kl_reward_frontier import same_settings

    logged = {
        "task": "t",
        "set": [],
        "timesteps": 20000,
        "eval_freq": 8,
        "eval_samples": 1,
        "dpo_samples": 1250,
        "dpo_epochs": 3,
        "adaptive": False,
        "kl_targets": [2.0, 4.0],
        "rollout_kl": True,
    }
    assert same_settings(logged, {**logged, "dpo_epochs": 5}, "ppo") and not same_settings(
        logged, {**logged, "dpo_epochs": 5}, "dpo"
    )
    assert same_settings(logged, {**logged, "timesteps": 400}, "dpo") and not same_settings(
        logged, {**logged, "timesteps": 400}, "ppo"
    )
    assert same_settings(logged, {**logged, "kl_targets": [2.0, 4.0, 8.0]}, "ppo")  # each run's target is its key
    fixed_beta = {k: v for k, v in logged.items() if k not in ("kl_targets", "rollout_kl")}
    assert not same_settings(fixed_beta, logged, "ppo") and same_settings(fixed_beta, logged, "dpo")
    assert same_settings(logged, {**logged, "eval_samples": 2}, None)  # the reward model: the task alone
    # an override of the KL controller makes other online runs, but the same reward model and DPO runs
    faster = {**logged, "set": ["kl.horizon=100"]}
    assert not same_settings(logged, faster, "ppo") and same_settings(faster, faster, "ppo")
    assert same_settings(logged, faster, None) and same_settings(logged, faster, "dpo")
    assert not same_settings(logged, {**logged, "set": ["algorithm.dpo.pairs_per_prompt=2"]}, "dpo")
    assert not same_settings(logged, {**logged, "set": ["reward.train.n_epochs=1"]}, None)
    longer = {**logged, "set": ["algorithm.n_epochs=4"]}  # the reward model never reads [algorithm]; PPO does
    assert same_settings(logged, longer, None) and not same_settings(logged, longer, "ppo")
    assert not same_settings(logged, {**logged, "set": ["kl_free.x=1"]}, None)  # a section, not a prefix of a name
    assert not same_settings(logged, {**logged, "set": ["kl.horizon=100", "task.seed=1"]}, "dpo")
    assert not same_settings(logged, {**logged, "eval_samples": 2}, "dpo")


def test_throughput_benchmark_runs_on_a_small_setting(tmp_path):
    command = [
        sys.executable,
        os.path.join(ROOT, "benchmarks", "throughput.py"),
        *("--batch", "2", "--new-tokens", "4", "--epochs", "1", "--minibatch", "2", "--repeats", "1"),
        *("--naive-steps", "8", "--scaling-tokens", "2", "4", "--scaling-batch", "2", "4", "--no-write"),
    ]
    result = subprocess.run(command, check=True, cwd=tmp_path, capture_output=True, text=True)
    report = result.stdout[result.stdout.index("# Throughput") :]
    batch, new_tokens = 2, 4

    # 1. one iteration against the floor: the ratio and tokens/s columns follow from the two timings
    ((_, parameters, floor, ours, ratio, tokens_per_second),) = markdown_table(report, "| model | parameters |")
    floor, ours = float(floor), float(ours)
    assert float(parameters.rstrip("M")) > 0 and floor > 0 and ours > 0
    assert float(ratio) == pytest.approx(floor / ours, rel=0.02, abs=0.006)
    assert float(tokens_per_second) == pytest.approx(batch * new_tokens / ours, rel=0.02, abs=0.5)
    assert re.search(rf"\(B={batch} prompts, T={new_tokens} new tokens, E=1 epochs, minibatches of 2,", report)

    # the breakdown: each stage's share is its seconds over the iteration's, and the stages add up to it
    stages = markdown_table(report, "| stage | seconds | share of the iteration |")
    assert len(stages) >= 3 and stages[-1][0].startswith("the rest")
    for name, seconds, share in stages:
        if not name.startswith("the rest"):  # the rest is the difference, negative when timings jitter
            assert float(seconds) >= 0, name
        # seconds are printed to 0.0001 and shares to 0.1%: a stage of 0.0001 s may have taken 0.00005 s
        printed = 100 * 0.00005 / ours + 0.05
        assert float(share.rstrip("%")) == pytest.approx(100 * float(seconds) / ours, rel=0.02, abs=printed), name
    assert sum(float(seconds) for _, seconds, _ in stages) == pytest.approx(ours, abs=0.0005 + 0.00005 * len(stages))

    # 2. against naive stepping: the speed-up is the ratio of the two per-token costs
    (_, naive, one), (label, per_token, speed_up) = markdown_table(report, "| | seconds per generated token")
    naive, per_token = float(naive), float(per_token)
    assert naive > 0 and per_token > 0 and one == "1×"
    assert re.fullmatch(r"RLHFPPO \(B=(\d+), T=(\d+)\)", label).groups() == (str(batch), str(new_tokens))
    assert float(speed_up.rstrip("×")) == pytest.approx(naive / per_token, rel=0.02, abs=0.05)

    # 3. scaling: the shapes asked for (T at B=16, B at T=32), and the exponents fitted to the table's timings
    scaling = [(int(b), int(t), float(it), float(gen)) for b, t, it, gen in markdown_table(report, "| B | T |")]
    assert [(b, t) for b, t, _, _ in scaling] == [(16, 2), (16, 4), (2, 32), (4, 32)]
    assert all(it > 0 and gen > 0 for _, _, it, gen in scaling)
    fitted = re.findall(r"Fitted exponent in (\w) .*: iteration a = (\S+), generate\(\) a = (\S+)\.", report)
    fits = {axis: (float(it), float(gen)) for axis, it, gen in fitted}
    assert set(fits) == {"T", "B"}
    for axis, rows in (("T", scaling[:2]), ("B", scaling[2:])):
        xs = np.log([t if axis == "T" else b for b, t, _, _ in rows])
        weights = (xs - xs.mean()) / ((xs - xs.mean()) ** 2).sum()  # a = Σ w·log y: a's error from rounded y
        for shown, ys in zip(fits[axis], ([it for *_, it, _ in rows], [gen for *_, gen in rows])):
            tolerance = 0.005 + float(np.sum(np.abs(weights) * 0.0005 / np.array(ys)))
            assert shown == pytest.approx(np.polyfit(xs, np.log(ys), 1)[0], abs=tolerance), (axis, rows)


def markdown_table(text: str, header: str) -> list[list[str]]:
    """The body rows of the Markdown table whose header row starts with ``header``, as lists of cell texts."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:  # after the header and its |---| line
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def test_memory_benchmark_runs_and_python_objects_stay_flat(tmp_path):
    """The memory benchmark on a short run; the count of live Python objects must not grow once warm (after the
    first checkpoint has imported what saving needs). A leak of a per-iteration object, e.g. a list of rollout
    statistics that is never cleared, would show here."""
    command = [
        sys.executable,
        os.path.join(ROOT, "benchmarks", "memory_growth.py"),
        *("--algorithms", "ppo", "--iterations", "25", "--warmup", "12", "--n-episodes", "16", "--no-write"),
    ]
    result = subprocess.run(command, check=True, cwd=tmp_path, capture_output=True, text=True)
    row = next(line for line in result.stdout.splitlines() if line.startswith("| ppo | 25 |"))
    objects_growth = int(row.strip("|").split("|")[-1])
    # exactly flat: one object kept per iteration would already fail (the benchmark shows +0 here and over 200)
    assert objects_growth <= 0, row


def test_gpu_check_is_valid_bash_and_refuses_cleanly_without_cuda(tmp_path):
    import torch as th

    script = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0  # parses
    assert subprocess.run(["bash", "-n", os.path.join(ROOT, "benchmarks", "gpu_wheels.sh")]).returncode == 0
    if th.cuda.is_available():
        pytest.skip("a GPU is here: the script would run for real")
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 3
    assert "no CUDA GPU visible" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not os.listdir(tmp_path)  # refused before writing anything
    direct = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_throughput.py")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert direct.returncode == 3 and "no CUDA device visible" in direct.stderr


def test_peers_benchmark_our_side_and_its_tables(tmp_path, monkeypatch):
    """Our side of the TRL side-by-side on the tiniest setting, in this process (no TRL needed), then the CSV and
    Markdown writers on it and a made-up TRL run: the ratios must come from the two sides' own numbers."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import peers
    from peers_common import parameter_checksum
    from transformers import AutoModelForCausalLM

    options = ["--models", "gpt2-tiny", "--pairs", "grpo", "--repeats", "1", "--n-episodes", "4"]
    options += ["--samples-per-prompt", "2", "--response-length", "4", "--eval-prompts", "2", "--eval-samples", "2"]
    args = peers.parse_args(options)
    (pair,) = peers.PAIRS["grpo"]
    policy_dir, reward_dir = peers.build_models(str(tmp_path / "models"), "gpt2-tiny", args.vocab, args.seed)
    spec = peers.make_spec(args, "gpt2-tiny", pair, policy_dir, reward_dir)
    ours = peers.run_ours(spec)

    # one rollout of 4 responses; EOS is made improbable, so every response runs to the 4-token limit
    assert (ours["rollouts"], ours["episodes"], ours["tokens"]) == (1, 4, 16)
    assert ours["seconds"] > 0 and ours["peak_memory_mib"] > 0
    assert ours["initial_checksum"] == parameter_checksum(AutoModelForCausalLM.from_pretrained(policy_dir))
    assert -1 <= ours["initial_reward"] <= 1 and ours["final_length"] == 4
    assert ours["final_kl"] > 0  # the exact KL to the initial model after one update at lr 1e-3

    ours.update(model="gpt2-tiny", side=pair.ours_side, algorithm="grpo", repeat=0)
    # TRL: the same run, three times slower and with twice the memory
    trl = dict(ours, side=pair.trl_side, seconds=3 * ours["seconds"], peak_memory_mib=2 * ours["peak_memory_mib"])
    (row,) = peers.summarize([ours, trl], [pair], ["gpt2-tiny"], "cpu")
    assert row["speedup"] == pytest.approx(3.0) and row["memory_ratio"] == pytest.approx(0.5)
    assert row["same_initial_policy"] and row["comparable"] and row["targets_met"]
    meta = peers.run_metadata(options, 1.0, {"trl-grpo": {"trl": "1.16.0"}})
    peers.write_results([row], [ours, trl], args, meta, str(tmp_path))

    with open(tmp_path / "peers.csv") as f:
        reader = csv.DictReader(f)
        named = ["pair", "device", "ours_episodes_per_s", "trl_episodes_per_s", "ours_tokens_per_s", "trl_tokens_per_s"]
        named += ["ours_peak_memory_mib", "trl_peak_memory_mib", "speedup", "memory_ratio"]
        assert reader.fieldnames[:10] == named
        (written,) = list(reader)
    value = {k: float(v) for k, v in written.items() if k in named[2:]}
    assert (written["pair"], written["device"]) == ("grpo/gpt2-tiny", "cpu")
    assert value["ours_episodes_per_s"] == pytest.approx(4 / ours["seconds"], rel=1e-5)
    assert value["trl_tokens_per_s"] == pytest.approx(16 / (3 * ours["seconds"]), rel=1e-5)
    assert value["speedup"] == pytest.approx(value["ours_episodes_per_s"] / value["trl_episodes_per_s"], rel=1e-5)
    ratio = value["ours_peak_memory_mib"] / value["trl_peak_memory_mib"]
    assert value["memory_ratio"] == pytest.approx(ratio, rel=1e-5)
    report = (tmp_path / "peers.md").read_text()
    assert "**Targets met for every pair.**" in report and "| GRPO vs TRL 1.16 GRPOTrainer | GPT-2 16×1" in report
    assert "Every run generated exactly 4 tokens per episode" in report and "trl-grpo: trl 1.16.0" in report

    # a TRL run as fast as ours and lighter: no speed-up, more memory than TRL, targets missed
    slow = dict(trl, seconds=ours["seconds"], peak_memory_mib=ours["peak_memory_mib"] / 2)
    (row,) = peers.summarize([ours, slow], [pair], ["gpt2-tiny"], "cpu")
    assert row["speedup"] == pytest.approx(1.0) and row["memory_ratio"] == pytest.approx(2.0)
    assert not row["targets_met"]
    peers.write_markdown([row], str(tmp_path / "peers.md"), args, meta, [ours, slow])
    report = (tmp_path / "peers.md").read_text()
    assert "**Targets not met**: 0 of 1 rows" in report and "Speed target met by: none." in report


def test_kl_reward_frontier_at_controlled_kl(tmp_path, monkeypatch):
    """--kl-targets: every online method runs the adaptive controller towards each target, DPO sweeps its β; the
    report says whether each run settled near its target and reads every method's score at the targets' KL."""
    out = tmp_path / "frontier"
    command = [
        sys.executable,
        os.path.join(ROOT, "benchmarks", "kl_reward_frontier.py"),
        *("--task", os.path.join(ROOT, "envs", "tiny_synthetic.toml"), "--methods", "ppo", "p3o-joint", "dpo"),
        *("--kl-targets", "0.5", "2", "--dpo-betas", "0.05", "0.5", "--seeds", "0", "1", "--timesteps", "2000"),
        *("--set", "kl.target=1", "--set", "kl.horizon=200", "--set", "kl.proportional_gain=1.5"),  # its controller
        *("--dpo-epochs", "1"),
        *("--out", str(out), "--run-dir", str(tmp_path / "run")),
    ]
    subprocess.run(command, check=True, cwd=tmp_path, capture_output=True, text=True)
    with open(f"{out}.csv") as f:
        rows = list(csv.DictReader(f))
    online = {(r["method"], r["target"], r["beta"]) for r in rows if r["method"] != "dpo"}
    assert online == {(m, t, "0.02") for m in ("ppo", "p3o-joint") for t in ("0.5", "2.0")}  # from the task's β
    assert {(r["target"], r["beta"]) for r in rows if r["method"] == "dpo"} == {("", "0.05"), ("", "0.5")}

    def final_kl(target: str) -> float:
        ppo = [r for r in rows if r["method"] == "ppo" and r["target"] == target]
        last = max(int(r["evaluation"]) for r in ppo)
        return float(np.mean([float(r["kl"]) for r in ppo if int(r["evaluation"]) == last]))

    assert final_kl("2.0") > final_kl("0.5")  # the controller steers the KL: a higher target, a higher KL
    table = open(f"{out}.md").read()
    assert "| ppo | KL target 0.5 | yes (" in table or "| ppo | KL target 0.5 | no (" in table
    assert "| dpo | β=0.05 | – |" in table and "towards each KL target: horizon 200 episodes" in table
    assert "Each method's score at each target's KL" in table and "| method | KL 0.5 | KL 2 | starting point |" in table
    # every method starts from the same untrained policy: one starting point, read off its first evaluations
    starts = set(re.findall(r"^\| (?:ppo|p3o-joint|dpo) \|.*\| (KL -?\d+\.\d\d, score \d+\.\d+) \|$", table, re.M))
    assert len(starts) == 1 and len(re.findall(r"^\| (?:ppo|p3o-joint|dpo) \|.*\| KL -?\d", table, re.M)) == 3
    assert "p3o-joint against ppo" in table and "p3o-joint against dpo" in table
    # the same readings from each online run's settled last third, DPO's from its last epoch
    late = table.split("replaced by its mean over the last third")[1]
    assert len(re.findall(r"^\| (?:ppo|p3o-joint) \| KL target (?:0\.5|2) \| \d", late, re.M)) == 4
    assert "| dpo |" not in late and "no final point" not in late
    assert "p3o-joint against ppo" in late and "p3o-joint against dpo" in late
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    from kl_reward_frontier import comparison_lines, frontier_points

    # the late points and the comparison read off them, again from the CSV
    numbers = [
        {
            **r,
            **{key: float(r[key]) for key in ("beta", "target", "kl", "score")},
            **{key: int(r[key]) for key in ("seed", "evaluation")},
        }
        for r in rows
        if r["method"] != "dpo"
    ]
    late_points = frontier_points(numbers, "ppo", late=True) + frontier_points(numbers, "p3o-joint", late=True)
    two = late_points[1]
    assert f"| ppo | KL target 2 | {two['score']:.3f} (range {two['score_range']:.3f}) | {two['kl']:.2f} |" in late
    assert comparison_lines(late_points, "p3o-joint", ["ppo"])[0] in late
    # settling is read from each training rollout's KL, as the controller measured it
    with open(f"{out}.runs.jsonl") as f:
        logged = [json.loads(line)["run"] for line in f if '"run"' in line]
    for run in logged:
        assert (len(run["rollout_kl"]) > 1) == (run["method"] != "dpo")


def test_a_run_settles_when_its_last_third_stays_near_the_target(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    from kl_reward_frontier import settled

    # the mean of the last third of the rollouts counts, however far the first ones were or one rollout strays
    assert settled([9.0, 9.0, 9.0, 3.0, 5.5, 3.5], 4.0) == (True, 4.5, 3.5, 5.5)
    assert settled([4.0, 4.0, 4.0, 4.0, 5.0, 5.2], 4.0) == (False, 5.1, 5.0, 5.2)  # 27.5% over at the end
    assert settled([4.1], 4.0) == (True, 4.1, 4.1, 4.1)
    assert settled([6.0], 5.0)[0] and not settled([6.001], 5.0)[0] and settled([4.0], 5.0)[0]  # the band's edges


def test_frontier_reads_where_one_method_lies_against_another(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    from kl_reward_frontier import comparison_lines, score_at_kl, seed_mean, seed_spread, where_it_lies

    # unsorted points, two at one KL (their mean counts), outside the range: None
    points = [(4.0, 2.0), (1.0, 0.5), (2.0, 1.0), (2.0, 2.0)]
    assert score_at_kl(points, 3.0) == pytest.approx(1.75) and score_at_kl(points, 2.0) == pytest.approx(1.5)
    assert score_at_kl(points, 0.5) is None and score_at_kl(points, 4.5) is None
    # run on: past either end along its end segment, inside as before
    assert score_at_kl(points, 0.5, run_on=True) == pytest.approx(0.0)
    assert score_at_kl(points, 5.0, run_on=True) == pytest.approx(2.25)
    assert score_at_kl(points, 3.0, run_on=True) == pytest.approx(1.75)

    def finals(method, pairs, spread=0.01, seeds=2):
        """Points at the means of ``pairs``, their seeds ``spread`` apart at the same KL (one seed: the mean)."""
        by_seed = lambda k, s: {0: (k, s)} if seeds == 1 else {0: (k, s - spread / 2), 1: (k, s + spread / 2)}  # noqa: E731
        return [{"method": method, "kl": k, "score": s, "by_seed": by_seed(k, s)} for k, s in pairs]

    ppo_points = [(1.0, 1.0), (3.0, 2.0), (5.0, 3.0)]
    ppo = finals("ppo", ppo_points)
    above = finals("p3o", [(2.0, 2.0), (6.0, 4.0)])  # 0.5 higher than PPO's line at every shared KL
    crossing = finals("p3o", [(1.0, 0.5), (5.0, 3.5)])
    apart = finals("p3o", [(6.0, 1.0), (8.0, 2.0)])
    close = finals("p3o", [(1.0, 1.1), (5.0, 3.1)], spread=0.5)  # 0.1 above, inside a seed range of 0.5
    nan = finals("p3o", [(float("nan"), 1.0), (2.0, 1.0)])
    read = {
        name: comparison_lines(ppo + f, "p3o", ["ppo"])[0]
        for name, f in [("above", above), ("crossing", crossing), ("apart", apart), ("close", close), ("nan", nan)]
    }
    assert "KL 2.00–5.00" in read["above"] and "+0.500" in read["above"]
    assert read["above"].endswith(
        " (seeds' spread there 0.010, 0.010, 0.010, 0.010, 0.010); p3o lies above ppo; the gap exceeds the seeds' "
        "spread at all five KLs."
    )
    assert read["crossing"].endswith(
        "; the lines cross, p3o below ppo at KL 1.00–2.00, level with it at KL 3.00 and above it at KL 4.00–5.00; "
        "the gap exceeds the seeds' spread only at KL 1.00–2.00 and 4.00–5.00."
    )
    # above everywhere, but at KL 1 by 0.05, inside a seed range of 0.1
    partly = comparison_lines(
        finals("ppo", ppo_points, 0.1) + finals("p3o", [(1.0, 1.05), (5.0, 3.5)], 0.1), "p3o", ["ppo"]
    )
    assert partly[0].endswith("p3o lies above ppo; the gap exceeds the seeds' spread only at KL 2.00–5.00.")
    assert "do not overlap" in read["apart"]
    assert read["close"].endswith(
        "(seeds' spread there 0.255, 0.255, 0.255, 0.255, 0.255); p3o lies within the seeds' spread of ppo."
    )
    assert "no line to read" in read["nan"]
    # beyond the spread below PPO at KL 1 and above it at 2–4: two stretches, never one across the change of sign
    sharp = comparison_lines(
        finals("ppo", ppo_points, 0.1) + finals("p3o", [(1.0, 0.5), (2.0, 2.0), (5.0, 3.05)], 0.1), "p3o", ["ppo"]
    )
    assert sharp[0].endswith("spread only at KL 1.00 and 2.00–4.00.")
    # one seed per point: no range, so no spread is claimed either way; a one-seed point counts in no spread
    single = comparison_lines(ppo + finals("p3o", [(2.0, 2.0), (6.0, 4.0)], 0.0, seeds=1), "p3o", ["ppo"])
    assert single[0].endswith("; p3o lies above ppo; p3o has one seed per point, no seed range to judge by.")
    mixed = finals("p3o", [(2.0, 2.0)], 0.3) + finals("p3o", [(6.0, 4.0)], 0.0, seeds=1)
    assert comparison_lines(ppo + mixed, "p3o", ["ppo"])[0].endswith(
        "(seeds' spread there 0.155, 0.155, 0.155, 0.155, 0.155); p3o lies above ppo; the gap exceeds the seeds' "
        "spread at all five KLs."
    )
    # a gap as wide as the spread is within it
    level = finals("ppo", [(1.0, 1.0), (5.0, 1.0)], 0.5) + finals("p3o", [(1.0, 1.5), (5.0, 1.5)], 0.5)
    assert comparison_lines(level, "p3o", ["ppo"])[0].endswith("p3o lies within the seeds' spread of ppo.")
    # the spread is read where the gap is: PPO's seeds 0.1 apart at KL 1, 1.0 at KL 5, so a gap of 0.3 exceeds
    # it at the low end only, not against a spread taken over every point
    widening = [*finals("ppo", [(1.0, 1.0)], 0.1), *finals("ppo", [(5.0, 3.0)], 1.0)]
    local = comparison_lines(widening + finals("p3o", [(1.0, 1.3), (5.0, 3.3)], 0.1), "p3o", ["ppo"])[0]
    assert local.endswith(
        "(seeds' spread there 0.100, 0.213, 0.325, 0.437, 0.550); p3o lies above ppo; the gap exceeds the seeds' "
        "spread only at KL 1.00–2.00."
    )
    # each seed measured from its method's line at its own KL: seeds that moved along the line differ by nothing;
    # one above the line and one below it by their distance from it, past the line's ends too (its end segment run on)
    along = {"method": "ppo", "kl": 2.0, "score": 1.5, "by_seed": {0: (1.0, 1.0), 1: (3.0, 2.0)}}
    ends = [
        {"method": "ppo", "kl": 0.0, "score": 0.5, "by_seed": {0: (0.0, 0.5)}},
        {"method": "ppo", "kl": 4.0, "score": 2.5, "by_seed": {0: (3.0, 2.5), 1: (5.0, 2.5)}},
    ]
    assert seed_spread([along, *ends], "ppo") == [(2.0, pytest.approx(0.0)), (4.0, pytest.approx(1.0))]
    assert seed_spread(ends[:1], "ppo") == [] and seed_spread([along, *ends], "dpo") == []
    # every stretch in order, a zero gap level; crossing twice; one stretch alone
    assert where_it_lies([1.0, 2.0, 3.0, 4.0], [0.2, 0.0, -0.1, -0.3], "dpo") == (
        "above dpo at KL 1.00, level with it at KL 2.00 and below it at KL 3.00–4.00"
    )
    assert where_it_lies([1.0, 2.0, 3.0], [0.2, -0.1, 0.3], "dpo") == (
        "above dpo at KL 1.00, below it at KL 2.00 and above it at KL 3.00"
    )
    assert where_it_lies([1.0, 2.0], [0.2, 0.1], "dpo") == "above dpo at KL 1.00–2.00"
    # three equal seeds: the mean stays inside [min, max], so the plot's error bars are never negative
    for value in np.random.default_rng(0).random(200):
        mean, low, high = seed_mean([{"kl": value}] * 3, "kl")
        assert low <= mean <= high


def test_a_methods_line_starts_at_its_runs_first_evaluation(monkeypatch):
    """The KL-target table reads below a method's lowest final KL off the stretch to its measured start (marked *):
    the mean of its runs' first evaluations, whatever their target, never the later ones."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    from kl_reward_frontier import initial_point, kl_gained_line, per_seed, target_row

    def run(method, target, seed, evaluations):
        return [
            {"method": method, "beta": 0.1, "target": target, "seed": seed, "evaluation": i, "kl": k, "score": s}
            for i, (k, s) in enumerate(evaluations)
        ]

    rows = [
        *run("ppo", 2.0, 0, [(0.0, 0.4), (1.0, 0.8), (2.4, 1.2)]),
        *run("ppo", 2.0, 1, [(-0.003, 0.2), (2.0, 1.0)]),  # a k1 mean just below zero
        *run("ppo", 8.0, 0, [(0.0, 0.3), (8.0, 2.5)]),
        *run("nlpo", 2.0, 0, [(2.5, 0.5), (2.1, 1.1)]),  # starts past its final point: no stretch to it
        *run("nlpo", 4.0, 0, [(2.5, 0.5), (4.1, 2.0)]),
    ]
    assert initial_point(rows, "ppo") == (pytest.approx(-0.001), pytest.approx(0.3))
    assert initial_point(rows, "nlpo") == (2.5, 0.5) and initial_point(rows, "grpo") is None
    # a mean over points of their seeds' means: target 2's two seeds (2.4, 2.0) weigh as much as target 8's one
    assert kl_gained_line(rows, ["ppo", "rloo"]) == (
        "- KL, mean over its points (each its seeds' mean): ppo 0.00 before training → 5.10 at the end (+5.10); "
        "rloo not run yet."
    )

    def finals(method, pairs):
        return [{"method": method, "kl": k, "score": s} for k, s in pairs]

    # PPO's final points at KL 2.2 and 8: KL 1.1 halfway up the stretch from its start (0.3 → 1.1), starred; KL 2.2
    # is the point itself; past KL 8 nothing
    assert target_row(finals("ppo", [(2.2, 1.1), (8.0, 2.5)]), rows, "ppo", [1.1, 2.2, 9.0]) == (
        "| ppo | 0.700* | 1.100 | – | KL 0.00, score 0.300 |"
    )
    # NLPO starts at KL 2.5, past its lowest final point (2.1): read off the final points alone, nothing below 2.1
    assert target_row(finals("nlpo", [(2.1, 1.1), (4.1, 2.0)]), rows, "nlpo", [1.0, 3.1]) == (
        "| nlpo | – | 1.550 | KL 2.50, score 0.500 |"
    )
    assert target_row([], rows, "grpo", [1.0, 3.1]) == "| grpo | – | – | not run yet |"
    assert per_seed(["316", "316", "316"]) == "316" and per_seed(["320", "316", "320"]) == "320 / 316 / 320"


def test_late_points_average_each_runs_last_third_after_its_first_evaluation(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    from kl_reward_frontier import frontier_points

    def run(seed, target, evaluations):
        return [
            {"method": "ppo", "beta": 0.1, "target": target, "seed": seed, "evaluation": i, "kl": k, "score": s}
            for i, (k, s) in enumerate(evaluations)
        ]

    rows = [
        # six evaluations after the first, in no order: the last two count (KL 2.2 and 1.8, scores 1.0 and 1.4)
        *run(0, 2.0, [(0.0, 0.3), (9.0, 9.0), (9.0, 9.0), (9.0, 9.0), (9.0, 9.0), (2.2, 1.0), (1.8, 1.4)])[::-1],
        *run(1, 2.0, [(0.0, 0.3), (5.0, 5.0), (5.0, 5.0), (5.0, 5.0), (5.0, 5.0), (2.0, 0.8)]),  # five: the last
        *run(0, 8.0, [(0.0, 0.3)]),  # never updated: its one evaluation
        # nine after the first: the last three, a mean (KL 1.0, score 0.4), not their median
        *run(0, 0.5, [(0.0, 0.3), *[(9.0, 9.0)] * 6, (0.3, 0.1), (0.3, 0.1), (2.4, 1.0)]),
        {"method": "dpo", "beta": 0.1, "target": None, "seed": 0, "evaluation": 1, "kl": 1.0, "score": 1.0},
    ]
    half, two, eight = frontier_points(rows, "ppo", late=True)  # in order of target
    assert (half["point"], half["kl"], half["score"], half["seeds"]) == (
        (0.1, 0.5),
        pytest.approx(1.0),
        pytest.approx(0.4),
        1,
    )
    assert two == {
        "method": "ppo",
        "point": (0.1, 2.0),
        "kl": pytest.approx(2.0),
        "score": pytest.approx(1.0),  # seeds 1.2 and 0.8
        "score_range": pytest.approx(0.4),
        "seeds": 2,
        "by_seed": {0: pytest.approx((2.0, 1.2)), 1: pytest.approx((2.0, 0.8))},
    }
    assert (eight["point"], eight["kl"], eight["score"], eight["seeds"]) == ((0.1, 8.0), 0.0, 0.3, 1)
    # without late: each run's last evaluation, in the order of evaluation whatever the rows' order
    last = frontier_points(rows, "ppo")[1]
    assert last["by_seed"] == {0: (1.8, 1.4), 1: (2.0, 0.8)} and (last["kl"], last["score"]) == pytest.approx(
        (1.9, 1.1)
    )


def test_the_memory_plan_follows_its_formulas():
    """docs/scaling.md's formulas, as benchmarks/memory_plan.py computes them: ddp holds everything on every device,
    fsdp a 1/W share plus the gathered policy during the rollout; LoRA drops the reference copy and the critic."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from memory_plan import per_device

    n = 8.03e9
    ddp = per_device(n, 8, "ddp", lora=False, trained_bytes=8, lora_fraction=0.005)
    assert ddp["states"] == ddp["peak"] == (8 + 8 + 2 + 2) * n  # actor, critic, reference, reward model
    fsdp = per_device(n, 8, "fsdp", lora=False, trained_bytes=8, lora_fraction=0.005)
    assert fsdp["states"] == pytest.approx(ddp["states"] / 8)
    assert fsdp["peak"] - fsdp["states"] == pytest.approx(2 * 2 * n)  # actor and critic, whole, in bf16
    lora = per_device(n, 1, "ddp", lora=True, trained_bytes=16, lora_fraction=0.005)
    assert lora["reference"] == lora["critic"] == 0 and lora["actor"] == pytest.approx((2 + 16 * 0.005) * n)


@pytest.mark.real_model
def test_hh_fresh_comparison_checks_the_split_and_leaves_out_the_method_choosers(tmp_path):
    """benchmarks/hh_harmless_fresh.py on run folders made from the task's own split (scores made up): it pairs
    each run with its initial policy with and without the earlier held-out conversations, pairs the runs with each
    other, and refuses a folder whose held-out prompts trained the reward model."""
    from sb3_rlhf.common.models import load_tokenizer, packaged_model_path
    from sb3_rlhf.tasks import load_task
    from sb3_rlhf.tasks.data import load_prompt_forms, policy_conversations, split_prompts
    from sb3_rlhf.tasks.folders import run_record

    try:
        tokenizer = load_tokenizer(packaged_model_path("SmolLM2-135M-Instruct"))
    except (ImportError, FileNotFoundError) as missing:
        pytest.skip(str(missing))
    task_file = os.path.join(ROOT, "envs", "hh_harmless.toml")
    task = load_task(task_file)
    prompts, plain = load_prompt_forms(task.prompts, tokenizer, policy_conversations(task.reward.train, task.seed))
    eval_prompts = split_prompts(task.prompts, prompts, plain, task.seed)[1]
    initial = np.random.default_rng(0).normal(1.0, 0.5, len(eval_prompts))  # the initial policy's, in every run

    def run_folder(name: str, held_out: list[str], gain: float) -> str:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "run.json").write_text(json.dumps(run_record(task)))
        per_prompt = [{"prompt": p, "initial": s, "trained": s + gain} for p, s in zip(held_out, initial)]
        (folder / "report.json").write_text(json.dumps({"algorithm": "rloo", "per_prompt": per_prompt}))
        return str(folder)

    def fresh(*folders: str) -> subprocess.CompletedProcess:
        command = [sys.executable, os.path.join(ROOT, "benchmarks", "hh_harmless_fresh.py"), *folders]
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True)

    result = fresh(run_folder("a", eval_prompts, 0.25), run_folder("b", eval_prompts, 0.5))
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| rloo")]
    assert len(rows) == 6 and "| 64 |" in rows[0] and "+0.2500 (+0.2500 to +0.2500)" in rows[0]
    # the reward model's own held-out pairs, by conversation: none whose conversation it trained on (52 by pair)
    assert "held-out pairs (split_by = 'conversation'): 512, 0 of them in a conversation it trained on" in result.stdout
    assert "without the 6 that chose the method | 58 |" in rows[1]  # the task's split, as measured
    for row, n in zip(rows[4:], (64, 58)):  # b's trained scores against a's, prompt by prompt
        assert "rloo (b) against rloo (a)" in row and f"| {n} |" in row and "+0.2500 (+0.2500 to +0.2500)" in row

    # a held-out prompt the reward model trained on (the first of its conversations, outside the policy's share)
    policy_prompts = set(prompts)
    outside = [p for p in load_prompt_forms(task.prompts, tokenizer)[0] if p not in policy_prompts]
    leaked = fresh(run_folder("c", eval_prompts[:-1] + outside[:1], 0.25))
    assert leaked.returncode != 0 and "1 held-out conversations trained the reward model" in leaked.stderr
    shuffled = fresh(run_folder("d", eval_prompts[::-1], 0.25))  # the task's prompts, in another order
    assert shuffled.returncode != 0 and "are not the 64 that" in shuffled.stderr
    # a run recorded before reward.train.split_by drew the reward model's held-out pairs pair by pair
    before = run_folder("e", eval_prompts, 0.25)
    record = json.loads((tmp_path / "e" / "run.json").read_text())
    del record["settings"]["reward.train.split_by"]
    (tmp_path / "e" / "run.json").write_text(json.dumps(record))
    older = fresh(before)
    assert older.returncode != 0 and "reward.train.split_by 'pair' -> 'conversation'" in older.stderr
