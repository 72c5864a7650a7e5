"""Session-wide set-up: vLLM is imported once per session (~20 s here)."""

import os

from ucx_env import ucx_tls

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
# The same command runs on a CPU and a GPU machine (tests/ucx_env.py).
os.environ["UCX_TLS"] = ucx_tls()
