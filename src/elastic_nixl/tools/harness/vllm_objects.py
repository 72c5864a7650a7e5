"""The vLLM objects a connector needs, without loading a model.

A real ``VllmConfig`` for a tiny local Llama config (no downloads), vLLM's own
KV placement (``get_kv_cache_config_from_groups``) and single-process
distributed state. Used by the tests, ``elastic-nixl demo`` and the bench.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from elastic_nixl.tools.ports import free_port


@dataclass(frozen=True)
class TinyModel:
    num_layers: int = 2
    num_kv_heads: int = 2
    head_dim: int = 16
    dtype: str = "bfloat16"

    def write(self, root: Path | None = None) -> Path:
        """A HF config directory vLLM can read offline."""
        root = root or Path(tempfile.gettempdir())
        path = root / (
            f"elastic-nixl-tiny-l{self.num_layers}-h{self.num_kv_heads}-d{self.head_dim}"
        )
        path.mkdir(parents=True, exist_ok=True)
        cfg = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.num_kv_heads * 2 * self.head_dim,
            "intermediate_size": 128,
            "num_attention_heads": self.num_kv_heads * 2,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "num_hidden_layers": self.num_layers,
            "vocab_size": 256,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5,
            "torch_dtype": self.dtype,
        }
        (path / "config.json").write_text(json.dumps(cfg))
        return path


def init_distributed(vllm_config: Any) -> None:
    """Single-rank TP/PP groups, once per process (vLLM's workers need them)."""
    from vllm.config import set_current_vllm_config
    from vllm.distributed import parallel_state as ps

    if ps.model_parallel_is_initialized():
        return
    with set_current_vllm_config(vllm_config):
        ps.init_distributed_environment(
            world_size=1,
            rank=0,
            distributed_init_method=f"tcp://127.0.0.1:{free_port()}",
            local_rank=0,
            backend="gloo",
        )
        ps.initialize_model_parallel(1, 1)


_MODEL_CONFIGS: dict[tuple[TinyModel, int], Any] = {}


def make_vllm_config(
    kv_role: str,
    connector: str = "ElasticNixlConnector",
    extra: dict[str, Any] | None = None,
    layout: str | None = "LBHNC",
    block_size: int = 32,
    engine_id: str | None = None,
    model: TinyModel | None = None,
    side_channel_port: int | None = None,
    module_path: str | None = None,
    enable_permute_local_kv: bool = False,
) -> Any:
    """A real VllmConfig for ``model``; ``layout`` is pre-resolved as vLLM's
    engine core would (``None`` leaves it unresolved)."""
    from vllm.config import CacheConfig, KVTransferConfig, ModelConfig, VllmConfig
    from vllm.plugins import load_general_plugins

    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    # What vLLM's engine does at start-up: our entry point registers the
    # connector name, so VllmConfig accepts kv_connector="ElasticNixlConnector".
    load_general_plugins()
    if side_channel_port is not None:
        os.environ["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(side_channel_port)
    model = model or TinyModel()
    key = (model, 4096)
    if key not in _MODEL_CONFIGS:
        _MODEL_CONFIGS[key] = ModelConfig(
            model=str(model.write()),
            skip_tokenizer_init=True,
            dtype=model.dtype,  # type: ignore[arg-type]
            max_model_len=4096,
            enforce_eager=True,
        )
    kv = KVTransferConfig(
        kv_connector=connector,
        kv_role=kv_role,  # type: ignore[arg-type]
        kv_buffer_device="cpu",
        engine_id=engine_id,
        kv_connector_extra_config=dict(extra or {}),
        kv_connector_module_path=module_path,
        enable_permute_local_kv=enable_permute_local_kv,
    )
    config = VllmConfig(
        model_config=_MODEL_CONFIGS[key],
        cache_config=CacheConfig(block_size=block_size),
        kv_transfer_config=kv,
    )
    if layout is not None:
        config.cache_config.kv_cache_layout = layout
    return config


def make_kv_cache_config(vllm_config: Any, num_blocks: int) -> Any:
    """vLLM's placement of ``num_blocks`` blocks for every attention layer."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheGroupSpec

    from elastic_nixl.releases import get_kv_cache_config_from_groups

    mc = vllm_config.model_config
    spec = FullAttentionSpec(
        block_size=vllm_config.cache_config.block_size,
        num_kv_heads=mc.get_total_num_kv_heads(),
        head_size=mc.get_head_size(),
        dtype=mc.dtype if isinstance(mc.dtype, torch.dtype) else torch.bfloat16,
    )
    names = [
        f"model.layers.{i}.self_attn.attn"
        for i in range(mc.get_total_num_hidden_layers())
    ]
    groups = [KVCacheGroupSpec(names, spec)]
    return get_kv_cache_config_from_groups(
        vllm_config, groups, num_blocks * spec.page_size_bytes * len(names)
    )
