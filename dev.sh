#!/usr/bin/env bash
# One entry point for a fresh machine: installs what it needs the first time.
#   ./dev.sh demo [args]   the main job: real prefill->decode transfers (elastic-nixl demo)
#   ./dev.sh test [args]   the test suite (what CI runs)
#   ./dev.sh doctor|bench  other elastic-nixl commands
set -euo pipefail
cd "$(dirname "$0")"

VENV=.venv
PY="$VENV/bin/python"

bootstrap() {
    if "$PY" -c "import elastic_nixl, vllm, nixl, pytest, ruff" >/dev/null 2>&1; then
        return
    fi
    echo "dev.sh: setting up $VENV (vLLM 0.32, NIXL 1.5, torch; ~8 GB, first run only)" >&2
    if ! command -v uv >/dev/null 2>&1; then
        python3 -m pip install --quiet --user uv || python3 -m pip install --quiet uv
        export PATH="$HOME/.local/bin:$PATH"
    fi
    # The machine's own Python: uv must not try to download one.
    uv venv --quiet --allow-existing --python "$(command -v python3)" "$VENV"
    uv pip install --quiet --python "$PY" -e ".[test]"
}

cmd="${1:-demo}"
shift || true
bootstrap
# No GPU here: vLLM's CPU platform is the one whose NIXL worker takes DRAM.
export VLLM_TARGET_DEVICE="${VLLM_TARGET_DEVICE:-cpu}"
case "$cmd" in
    test)
        "$VENV/bin/ruff" check src tests
        "$PY" -m mypy
        exec "$PY" -m pytest -q "$@"
        ;;
    demo | doctor | bench)
        exec "$VENV/bin/elastic-nixl" "$cmd" "$@"
        ;;
    *)
        echo "usage: ./dev.sh {demo|test|doctor|bench} [args]" >&2
        exit 2
        ;;
esac
