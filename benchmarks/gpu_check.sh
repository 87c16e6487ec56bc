#!/usr/bin/env bash
# The one prepared GPU check (issues 14 and 24): run it whenever a CUDA GPU is at hand and commit what it writes.
#
#     bash benchmarks/gpu_wheels.sh           # here, once: the wheels the device image lacks, into .whl/
#     bash benchmarks/gpu_check.sh            # there: writes benchmarks/results/gpu.md (or $OUT/gpu.md when OUT is set)
#
# 1. tests/test_cuda.py (the bf16 CUDA path of RLHFPPO: learn, save, load; the static cache compiled by
#    transformers, sampling as the dynamic one);
# 2. benchmarks/gpu_throughput.py: RLHFPPO on a model of SmolLM2-135M's shape in bf16 with each generation_cache
#    setting (static, dynamic, continuous), one process each: generated tokens/s, the rollout against bare generate() with the same cache in the
#    same run, the warm-up (compilation) apart, the update's MFU, peak GPU memory;
# 3. benchmarks/peers.py on the GPU with a Llama of SmolLM2-135M's shape (576 wide, 30 layers, 9 heads): float32
#    on both sides, PEERS_REPEATS repeats (3), then bf16 mixed precision on both (TRL's default), one repeat; when
#    the TRL wheels are there (see below).
# Each step has its own time limit (90 + 3 × 60 + 120 + 60 s = 450 s), so that it ends within 8 minutes on one H100,
# installs included: a step cut short says so in gpu.md. Without CUDA it refuses at once: exit 3,
# one line.
#
# The machine needs python3 with torch (CUDA), transformers, peft, pytest and tensorboard (the device image has
# them). Packages it lacks travel as wheels in .whl/ at the repository root (git-ignored), installed here into
# /tmp/site: benchmarks/gpu_wheels.sh downloads them (the versions of constraints.txt), and TRL for the peer
# comparison into .whl/trl-1.12/ and .whl/trl-1.16/; the peers' GPU results land in peers_gpu_<precision>/ beside gpu.md
# (merge their rows into benchmarks/results/peers.csv, which holds one row per pair and device).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
RESULTS=${OUT:-benchmarks/results}/gpu.md

if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA GPU visible to $PYTHON (torch.cuda.is_available() is False, or no torch): run it on a machine with a GPU" >&2
    exit 3
fi

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p "$(dirname "$RESULTS")"

{
    echo "# GPU check"
    echo
    echo "\`bash benchmarks/gpu_check.sh\` on $(date -u +%Y-%m-%d); $("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)')"
    echo
} >"$RESULTS"

echo "== tests/test_cuda.py"
if timeout 90 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee /tmp/gpu_check_tests.log; then
    status=passed
else
    status=FAILED
fi
{
    echo "## tests/test_cuda.py: $status"
    echo
    echo '```'
    tail -n 5 /tmp/gpu_check_tests.log
    echo '```'
    echo
} >>"$RESULTS"

echo "== benchmarks/gpu_throughput.py"
# one process per cache setting, each with its own time limit: one that runs over loses its own row only
for cache in static dynamic continuous; do
    timeout 60 "$PYTHON" benchmarks/gpu_throughput.py --caches "$cache" --out "$RESULTS" \
        || echo "gpu_throughput.py --caches $cache failed or ran out of time (exit $?)" | tee -a "$RESULTS"
done

if [ -f benchmarks/peers.py ] && [ -d .whl/trl-1.12 ] && [ -d .whl/trl-1.16 ]; then
    echo "== benchmarks/peers.py on the GPU"
    # peers.py runs TRL's side with .venv-trl-<version>/bin/python: here a wrapper over this python, with that
    # version's wheels on its path
    for version in 1.12 1.16; do
        if [ ! -x ".venv-trl-$version/bin/python" ]; then
            "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --target "/tmp/trl-$version" ".whl/trl-$version/"*.whl
            mkdir -p ".venv-trl-$version/bin"
            printf '#!/bin/sh\nPYTHONPATH=/tmp/trl-%s:$PYTHONPATH exec %s "$@"\n' "$version" "$(command -v "$PYTHON")" \
                >".venv-trl-$version/bin/python"
            chmod +x ".venv-trl-$version/bin/python"
        fi
    done
    # the issue's shape: 32 episodes × 64 tokens, 4 rollouts per run, the floor runs left out for time; float32 on
    # both sides (PEERS_REPEATS repeats), then bf16 mixed precision on both (one repeat)
    for precision in float32 bf16; do
        peers_dir="$(dirname "$RESULTS")/peers_gpu_$precision"
        repeats=$([ "$precision" = float32 ] && echo "${PEERS_REPEATS:-3}" || echo 1)
        limit=$([ "$precision" = float32 ] && echo 120 || echo 60)
        if timeout "$limit" "$PYTHON" benchmarks/peers.py --device cuda --precision "$precision" \
            --models llama-576x30 --repeats "$repeats" --n-episodes 32 --response-length 64 --iterations 4 \
            --vocab 4096 --no-floor --out-dir "$peers_dir"; then
            { echo; cat "$peers_dir/peers.md"; } >>"$RESULTS"
        else
            echo "peers.py --precision $precision failed or ran out of time (exit $?)" | tee -a "$RESULTS"
        fi
    done
else
    echo "## Peers: not run (benchmarks/peers.py and the TRL wheels in .whl/trl-1.12 and .whl/trl-1.16 are needed)" | tee -a "$RESULTS"
fi
echo "wrote $RESULTS"
