#!/usr/bin/env bash
# Download the wheels benchmarks/gpu_check.sh needs on a GPU machine without a network into .whl/ (git-ignored):
# what the device image (torch with CUDA, transformers, peft, accelerate, pytest, tensorboard) lacks, at the
# versions of constraints.txt, and TRL for the peer comparison, each version in its own folder.
#
#     bash benchmarks/gpu_wheels.sh              # for the device image's Python (3.12 unless PYTHON_VERSION says)
#
# Then carry .whl with the device call: gpu_check.sh installs .whl/*.whl into /tmp/site and .whl/trl-<v>/*.whl
# beside it for the TRL side of benchmarks/peers.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
# pinned where constraints.txt pins them: the figures then come from the same versions as on CPU
# (names compared as pip does: case and - or _ alike)
pin() { grep -iE "^${1//[-_]/[-_]}==" constraints.txt | head -1 || true; }
download() {
    local dest=$1
    shift
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$dest" "$@"
}
mkdir -p .whl .whl/trl-1.12 .whl/trl-1.16
packages=()
for name in gymnasium farama-notifications stable-baselines3 sb3-contrib transformers datasets dill multiprocess; do
    spec=$(pin "$name")
    packages+=("${spec:-$name}")
done
download .whl "${packages[@]}"
download .whl/trl-1.12 "trl==1.12.0"
download .whl/trl-1.16 "trl==1.16.0"
du -sh .whl
ls .whl .whl/trl-1.12 .whl/trl-1.16
