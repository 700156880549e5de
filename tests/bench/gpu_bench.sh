#!/usr/bin/env bash
# The GPU benchmark in one command, on a machine that has PyTorch (CUDA), transformers and numpy but neither
# this project's other dependencies nor a network. Prints one markdown table (tests/bench/gpu_bench.py).
#
#   tests/bench/gpu_bench.sh WHEELS_DIR [gpu_bench.py flags]     # on the GPU machine, e.g. --cells 'mb64-*'
#   tests/bench/gpu_bench.sh --build-wheels WHEELS_DIR [3.11 3.12 3.13 3.14]   # beforehand, where PyPI is
#
# Run: each distribution of WHEELS below that this python cannot find is installed from WHEELS_DIR alone
# (pip --no-index --no-deps) into a folder of its own, $VLM_BENCH_SITE (default /tmp/vlm-gpu-bench-site),
# put first on PYTHONPATH with this checkout: the machine's python, torch and transformers stay untouched,
# whether that python is a system one, a venv or conda. VLM_PYTHON picks the interpreter (default python3).
# VLM_BENCH_REINSTALL=1 installs every wheel of the list, found or not (a package the machine has is too
# old); VLM_BENCH_ALSO="transformers" also installs those distributions, found or not (the project's own
# transformers over the machine's; it must then be among the wheels, see below).
#
# Build (on a CPU machine with PyPI, from this checkout after `make install`): the versions are those of
# the project's .venv (VLM_PYTHON overrides); the source-only DeepSpeed becomes a pure-python wheel whose
# ops are compiled just in time on the GPU machine (DS_BUILD_OPS=0); the wheels with compiled code are
# fetched for manylinux x86_64 and each CPython version given (the GPU machine's: `python3 --version`).
# VLM_BENCH_ALSO names are fetched too.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# Needed beyond torch, transformers (and what they pull in: tokenizers, safetensors, pyyaml, tqdm,
# packaging, typing-extensions) and numpy: DeepSpeed and its requirements, webdataset, Pillow, matplotlib.
WHEELS=(deepspeed einops hjson msgpack ninja psutil py-cpuinfo pydantic pydantic-core annotated-types
        typing-inspection webdataset braceexpand pillow matplotlib contourpy cycler fonttools kiwisolver
        pyparsing python-dateutil tzdata)
read -r -a ALSO <<< "${VLM_BENCH_ALSO:-}"

usage() {
    sed -n '5,6p' "$0" | sed 's/^#  //' >&2
    exit 2
}

build_wheels() {
    local dir="$1"; shift
    local py="${VLM_PYTHON:-$REPO/.venv/bin/python}"
    local versions=("$@")
    [ ${#versions[@]} -gt 0 ] || versions=(3.11 3.12 3.13 3.14)  # Pillow 13 has no CPython 3.10 wheels
    mkdir -p "$dir"
    version_of() { "$py" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$1"; }
    DS_BUILD_OPS=0 "$py" -m pip wheel --no-cache-dir --no-binary deepspeed --no-deps --no-build-isolation \
        -w "$dir" "deepspeed==$(version_of deepspeed)"
    local pins=() name v
    for name in "${WHEELS[@]}" ${ALSO[@]+"${ALSO[@]}"}; do
        [ "$name" = deepspeed ] || pins+=("$name==$(version_of "$name")")
    done
    for v in "${versions[@]}"; do
        "$py" -m pip download --no-deps --only-binary=:all: --implementation cp --python-version "$v" \
            --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$dir" "${pins[@]}"
    done
    echo "wheels for CPython ${versions[*]} in $dir: copy it to the GPU machine" >&2
}

install_and_run() {
    local dir="$1"; shift
    [ -d "$dir" ] || { echo "error: no wheel folder $dir" >&2; exit 2; }
    local py="${VLM_PYTHON:-python3}"
    local site="${VLM_BENCH_SITE:-/tmp/vlm-gpu-bench-site}"
    export PYTHONPATH="$REPO:$site${PYTHONPATH:+:$PYTHONPATH}"
    export PATH="$site/bin:$PATH"  # DeepSpeed runs `ninja` to compile FusedAdam
    found() { "$py" -c 'import importlib.metadata as m, sys; m.version(sys.argv[1])' "$1" 2>/dev/null; }
    local install=() name
    for name in "${WHEELS[@]}"; do
        if [ "${VLM_BENCH_REINSTALL:-0}" = 1 ] || ! found "$name"; then
            install+=("$name")
        fi
    done
    install+=(${ALSO[@]+"${ALSO[@]}"})
    if [ ${#install[@]} -gt 0 ]; then
        echo "installing from $dir into $site: ${install[*]}" >&2
        "$py" -m pip install --disable-pip-version-check -q --no-index --no-deps --find-links "$dir" \
            --target "$site" --upgrade "${install[@]}"
    fi
    "$py" -c 'import deepspeed, webdataset, matplotlib, vlm.train.trainer' >&2 || {
        echo "error: the project does not import (VLM_BENCH_REINSTALL=1 installs every wheel of the list)" >&2
        exit 1
    }
    exec "$py" "$REPO/tests/bench/gpu_bench.py" "$@"
}

[ $# -ge 1 ] || usage
if [ "$1" = --build-wheels ]; then
    [ $# -ge 2 ] || usage
    shift
    build_wheels "$@"
else
    install_and_run "$@"
fi
