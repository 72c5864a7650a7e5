"""Session-wide set-up: vLLM is imported once per session (~20 s here)."""

import os

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
# Keep UCX on loopback-friendly transports; tcp must stay in the list.
os.environ.setdefault("UCX_TLS", "tcp,self,sm")
