"""Settings validation and the expandable_segments guard (no vLLM needed)."""

import pytest

from elastic_nixl.compat import (
    check_expandable_segments,
    expandable_segments_source,
    parse_alloc_conf,
)
from elastic_nixl.config import AllocatorChoice, ElasticNixlSettings, TransferPath


def test_defaults():
    s = ElasticNixlSettings.from_extra_config(None)
    assert s.allocator is AllocatorChoice.AUTO
    assert s.transfer_path is TransferPath.AUTO


def test_values_and_vllm_keys_pass_through():
    s = ElasticNixlSettings.from_extra_config(
        {
            "allocator": "VMM",
            "chunk_bytes": 1 << 21,
            "backends": ["UCX"],
            "num_threads": 2,
            "enforce_handshake_compat": False,
        }
    )
    assert s.allocator is AllocatorChoice.VMM
    assert s.chunk_bytes == 1 << 21


def test_vmm_sizes_accept_their_defaults_written_out():
    # idle_mapped_bytes 0 (the default: keep nothing cached when idle) was
    # refused when written explicitly, and `bench vmm`'s decode died at start.
    s = ElasticNixlSettings.from_extra_config(
        {"allocator": "vmm", "idle_mapped_bytes": 0, "max_mapped_bytes": None}
    )
    assert s.idle_mapped_bytes == 0 and s.max_mapped_bytes is None
    assert ElasticNixlSettings.from_extra_config({"idle_mapped_bytes": 8 << 20}) == (
        ElasticNixlSettings(idle_mapped_bytes=8 << 20)
    )


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"alocator": "vmm"}, "unknown key(s) ['alocator']"),
        ({"allocator": "cuda"}, "choose one of ['auto', 'vmm', 'static']"),
        ({"staging_slots": True}, "'staging_slots'] must be an integer from 1"),
        # Absurd sizes are refused by name, not left to overflow later.
        ({"max_mapped_bytes": 10**18}, "'max_mapped_bytes'] must be an integer"),
        ({"chunk_bytes": 1 << 40}, "'chunk_bytes'] must be an integer from 4096"),
        ({"chunk_bytes": 1000}, "'chunk_bytes'] must be an integer from 4096"),
        ({"staging_slots": 10**6}, "'staging_slots'] must be an integer from 1 to"),
        ({"staging_slot_bytes": 10**15}, "'staging_slot_bytes'] must be an integer"),
        ({"staging_slots": "4"}, "'staging_slots'] must be an integer from 1 to"),
        ({"chunk_bytes": 5000}, "multiple of 4096"),
        ({"transfer_path": "fast"}, "choose one of ['auto', 'direct', 'staged']"),
        ({"idle_mapped_bytes": -1}, "'idle_mapped_bytes'] must be an integer from 0"),
        ({"max_mapped_bytes": 0}, "'max_mapped_bytes'] must be an integer from 1"),
    ],
)
def test_bad_values_name_the_key(extra, needle):
    with pytest.raises(ValueError) as ei:
        ElasticNixlSettings.from_extra_config(extra)
    assert needle in str(ei.value)


@pytest.mark.parametrize("value", [4096, None, 0])
def test_virtual_blocks_is_refused_with_what_to_set_instead(value):
    # vllm serve sizes the reservation from vLLM's block count
    # (vllm_seam.elastic_kv_allocation): the key would be silently ignored.
    with pytest.raises(ValueError) as ei:
        ElasticNixlSettings.from_extra_config({"virtual_blocks": value})
    assert "'virtual_blocks'] is not read" in str(ei.value)
    assert "--num-gpu-blocks-override" in str(ei.value)


def test_parse_alloc_conf():
    assert parse_alloc_conf("max_split_size_mb:128, expandable_segments:True") == {
        "max_split_size_mb": "128",
        "expandable_segments": "True",
    }


@pytest.mark.parametrize(
    ("env", "source"),
    [
        (
            {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"},
            "PYTORCH_CUDA_ALLOC_CONF",
        ),
        (
            {"PYTORCH_ALLOC_CONF": "foo:1,expandable_segments:true"},
            "PYTORCH_ALLOC_CONF",
        ),
        ({"PYTORCH_ALLOC_CONF": "expandable_segments:False"}, None),
        # A substring match would misfire on these.
        ({"PYTORCH_ALLOC_CONF": "not_expandable_segments:True"}, None),
        ({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:Truest"}, None),
        ({}, None),
    ],
)
def test_expandable_segments_source(env, source):
    assert expandable_segments_source(env) == source


def test_guard_message_says_why_and_what_to_do():
    with pytest.raises(ValueError) as ei:
        check_expandable_segments({"PYTORCH_ALLOC_CONF": "expandable_segments:True"})
    msg = str(ei.value)
    assert "PYTORCH_ALLOC_CONF" in msg and "allocator" in msg and "remap" in msg
