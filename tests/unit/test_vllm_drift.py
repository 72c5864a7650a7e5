"""vLLM state our subclasses touch, listed by name: a vLLM upgrade fails here first.

``ElasticNixlConnectorWorker`` and ``ElasticNixlConnectorScheduler`` subclass
vLLM's NIXL classes and read, assign or override their attributes. Each such
name is listed below with the kind vLLM gives it, and checked on real vanilla
instances of the installed release. A scan of our classes' source fails when
they touch a ``self.`` name that is on neither list, so the lists stay
complete. Every ``from vllm... import`` in the package is resolved too.

Per release: the lists are what every supported release has;
:data:`RELEASES` says, per NIXL connector version (one per vLLM release
line), which names that release lacks or adds. An installed release that is
not in the table fails, as does one whose classes differ from its entry.
"""

from __future__ import annotations

import ast
import importlib
import queue
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import elastic_nixl
from elastic_nixl import compat, releases

SRC = Path(elastic_nixl.__file__).parent
METHOD = "method"

# vLLM release lines by NIXL connector version: the vLLM state the worker /
# scheduler lists below assume that this release lacks ("gone"). vLLM names
# added by a release that we do not touch need no entry.
RELEASES: dict[int, dict[str, object]] = {
    14: {"vllm": "0.32", "gone": set()},
    15: {"vllm": "0.33", "gone": set()},
}

# vLLM NixlPullConnectorWorker (and its base) names our worker touches: the
# kind each has after vLLM's register_kv_caches on a static cache.
WORKER_INHERITED: dict[str, object] = {
    # methods we call
    "_apply_prefix_caching": METHOD,
    "_handle_failed_transfer": METHOD,
    "_log_failure": METHOD,
    "_set_region_layers": METHOD,
    "_validate_remote_agent_handshake": METHOD,
    # methods we override
    "_cleanup_remote_engine": METHOD,
    "_nixl_handshake": METHOD,
    "_pop_done_transfers": METHOD,
    # The producer's lease verdicts (connector/reading.py): notified first,
    # then the ended holds reaped, in one get_finished.
    "_get_new_notifs": METHOD,
    "_reap_expired_send_leases": METHOD,
    "_read_blocks": METHOD,
    "_read_blocks_for_req": METHOD,
    "add_remote_agent": METHOD,
    "get_transfer_results": METHOD,
    "register_kv_caches": METHOD,
    "shutdown": METHOD,
    "start_load_kv": METHOD,
    # state we read
    "_TRANSFER_MODE": str,
    "_failed_recv_reqs": queue.Queue,
    "_group_spec_types": tuple,
    "_layer_specs": dict,
    "_mamba_ssm_size": tuple,
    "_physical_blocks_per_logical_kv_block": int,
    "_ready_requests": queue.Queue,
    "_recv_failures": set,
    "_recving_metadata": dict,
    "_recving_transfers": dict,
    "_remote_agents": dict,
    "attn_backends": list,
    "backend_name": str,
    "block_size": int,
    "dcp_size": int,
    "dst_num_blocks": dict,
    "dst_region_group_ids": dict,
    "dst_region_mem_types": dict,
    "dst_region_num_blocks": dict,
    "dst_uses_region_group_mapping": dict,
    "dst_xfer_side_handles": dict,
    "engine_id": str,
    "kv_cache_config": object,
    "kv_cache_layout": str,
    "kv_caches_base_addr": dict,
    "model_config": object,
    "nixl_backends": list,
    "nixl_memory_type": str,
    "num_blocks": int,
    "pcp_size": int,
    "pp_size": int,
    "region_members": list,
    "src_xfer_handles_by_block_size": dict,
    "tp_mappings": dict,
    "tp_rank": int,
    "transfer_tp_rank": int,
    "transfer_tp_size": int,
    "use_host_buffer": bool,
    "use_mla": bool,
    "vllm_config": object,
    # state we assign (elastic memory builds what register_kv_caches would)
    "_mixed_mem_types": bool,
    "_region_is_mla": list,
    "_skip_dram_xfer": bool,
    "_uses_region_group_mapping": bool,
    "block_len_per_layer": list,
    "block_stride_per_layer": list,
    "compat_hash": str,
    "device_id": int,
    "device_kv_caches": dict,
    "nixl_wrapper": object,
    "num_descs": int,
    "num_regions": int,
    "region_group_ids": list,
    "region_mem_types": list,
    "region_names": list,
    "region_num_blocks": list,
    "src_blocks_data": np.ndarray,
    "transfer_topo": object,
    "xfer_handshake_metadata": object,
    # Replaced by our subclass (connector/stats.py): vLLM logs its reduce().
    "xfer_stats": object,
}

# Names our worker adds: none may exist on vLLM's worker (we would shadow it).
WORKER_OURS = {
    "_add_per_request_agent",
    "_handshake_deadline_s",
    "_on_refreshed",
    "_producer_clock",
    "_read_leases",
    "_read_was_late",
    "_ask_producer",
    "_fetch_verdicts",
    "_on_verdicts",
    "_released",
    "_take_lease_verdicts",
    "_verdict_lock",
    "_verdict_waiter",
    "_verdicts_asked",
    "_verdicts_in",
    "_vouch_for_reads",
    "_fetched_lock",
    "_note_heartbeats",
    "_refresh_metas",
    "_refresher",
    "apply_pool_changes",
    "_pool",
    "_apply_fetched",
    "_offer_slots_with_vllm_payload",
    "_uses_slots_of",
    "_extent_index",
    "_handshake_stale",
    "_apply_peer",
    "_fetch_peer",
    "_fetched_for_refresh",
    "_refreshed_for",
    "_refused_reads",
    "_check_elastic_supported",
    "_check_transfer_path",
    "_collect_staged",
    "_ids_by_region",
    "_is_producer",
    "_layer_views",
    "_lease_for_send",
    "_local_extents",
    "_local_geometry",
    "_on_mapping_event",
    "_publish_handshake",
    "_read_staged",
    "_reads_staged",
    "_refresh_then_read",
    "_register_elastic",
    "_release_recv_lease",
    "_remote_blocks_unknown",
    "_remote_mem_type",
    "build_worker_meta",
    "_recv_leases",
    "_reg_lock",
    "_regions",
    "_registrar",
    "_reported_epoch",
    "_required_epochs",
    "_send_leases",
    "_unsubscribe",
    "elastic",
    "elastic_stats",
    "memory",
    "peers",
    "settings",
    "staged",
    "transfer_path",
}

SCHEDULER_INHERITED: dict[str, object] = {
    "build_connector_meta": METHOD,
    "on_new_request": METHOD,
    "request_finished": METHOD,
    "set_xfer_handshake_metadata": METHOD,
    "update_connector_output": METHOD,
    "_nixl_handshake_listener_t": (threading.Thread, type(None)),
    "_reqs_need_recv": dict,
    "_reqs_need_send": dict,
    "_kv_lease_duration": int,
    "_stop_event": threading.Event,
    "side_channel_host": str,
    "side_channel_port": int,
    "has_pending_push_work": METHOD,
    "kv_cache_config": object,
    "vllm_config": object,
}
SCHEDULER_OURS = {
    "_read_leases",
    "_lease_verdicts",
    "_blocks_to_lease",
    "bind_block_pool",
    "pool_policy",
    "_epochs",
    "_refused",
    "_producer_epoch",
    "_served_payloads",
    "producer_epoch",
}


def self_names(classes: list[tuple[str, str]]) -> set[str]:
    """Every ``self.X`` our classes touch, and every method they define."""
    names: set[str] = set()
    for path, cls in classes:
        tree = ast.parse((SRC / path).read_text())
        node = next(
            n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls
        )
        names |= {
            f.name
            for f in node.body
            if isinstance(f, ast.FunctionDef) and not f.name.startswith("__")
        }
        for sub in ast.walk(node):
            if (
                isinstance(sub, ast.Attribute)
                and isinstance(sub.value, ast.Name)
                and sub.value.id == "self"
            ):
                names.add(sub.attr)
    return names


# Our classes over vLLM's: the worker stacks the handshake layer under it.
WORKER_CLASSES = [
    ("connector/handshake.py", "HandshakeWorker"),
    ("connector/reading.py", "ReadingWorker"),
    ("connector/worker.py", "ElasticNixlConnectorWorker"),
]
SCHEDULER_CLASSES = [("connector/scheduler.py", "ElasticNixlConnectorScheduler")]


@pytest.mark.parametrize(
    ("classes", "inherited", "ours"),
    [
        (WORKER_CLASSES, WORKER_INHERITED, WORKER_OURS),
        (SCHEDULER_CLASSES, SCHEDULER_INHERITED, SCHEDULER_OURS),
    ],
    ids=["worker", "scheduler"],
)
def test_every_name_we_touch_is_listed(
    classes: list[tuple[str, str]], inherited: dict[str, object], ours: set[str]
) -> None:
    used = self_names(classes)
    unlisted = used - set(inherited) - ours
    assert not unlisted, (
        f"{classes} touch {sorted(unlisted)}: list each in this test, as vLLM "
        "state (with its kind) or as ours"
    )
    stale = (set(inherited) | ours) - used
    assert not stale, f"listed but no longer used: {sorted(stale)}"


def check_kinds(instance: object, inherited: dict[str, object], ours: set[str]) -> None:
    missing, wrong = [], []
    for name, kind in inherited.items():
        if not hasattr(instance, name):
            missing.append(name)
            continue
        if kind == METHOD:
            if not callable(getattr(type(instance), name, None)):
                wrong.append(f"{name}: not a method")
        elif not isinstance(getattr(instance, name), kind):  # type: ignore[arg-type]
            wrong.append(f"{name}: {type(getattr(instance, name)).__name__}")
    shadowed = sorted(n for n in ours if hasattr(instance, n))
    assert not missing, f"vLLM no longer has {missing}"
    assert not wrong, f"vLLM changed the kind of {wrong}"
    assert not shadowed, f"our names now exist in vLLM too: {shadowed}"


def release_id() -> str:
    found = compat.installed_vllm()
    version = found.version if found else "none"
    return f"vllm-{version} (NIXL connector v{releases.NIXL_CONNECTOR_VERSION})"


def test_installed_release_is_in_the_table() -> None:
    entry = RELEASES.get(releases.NIXL_CONNECTOR_VERSION)
    found = compat.installed_vllm()
    assert entry is not None, (
        f"vLLM {found} speaks NIXL connector version "
        f"{releases.NIXL_CONNECTOR_VERSION}, which RELEASES does not list: "
        "check what its NIXL classes changed and add an entry"
    )
    assert found is not None and found.version.startswith(f"{entry['vllm']}."), (
        f"NIXL connector version {releases.NIXL_CONNECTOR_VERSION} is vLLM "
        f"{entry['vllm']} in RELEASES, but {found} is installed"
    )


def vllm_imports() -> list[tuple[str, str, str]]:
    """(our file, vLLM module, name) of every ``from vllm... import name`` in
    the package, but those inside ``try: ... except ImportError`` (a release
    fallback, resolved by importing its module: see test_releases_import)."""
    found: list[tuple[str, str, str]] = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text())
        guarded: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id == "ImportError"
                for h in node.handlers
            ):
                guarded |= {id(n) for n in ast.walk(node)}
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.module.split(".")[0] == "vllm"
                and id(node) not in guarded
            ):
                rel = str(path.relative_to(SRC))
                found += [(rel, node.module, a.name) for a in node.names]
    return found


def test_every_vllm_name_we_import_resolves() -> None:
    missing = []
    for ours, module, name in vllm_imports():
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            missing.append(f"{ours}: {module} ({e})")
            continue
        if not hasattr(mod, name):
            try:
                importlib.import_module(f"{module}.{name}")
            except ImportError:
                missing.append(f"{ours}: {module}.{name}")
    assert not missing, f"{release_id()} lacks what we import: {missing}"


def test_releases_import() -> None:
    """The per-release fallbacks resolve on the installed release."""
    assert callable(releases.get_kv_cache_config_from_groups)


def test_vanilla_nixl_classes_still_have_them(
    make_engine: Callable[..., object],
) -> None:
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl.pull_scheduler import (
        NixlPullConnectorScheduler,
    )
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl.pull_worker import (
        NixlPullConnectorWorker,
    )

    eng = make_engine(
        "kv_consumer", "drift", connector="NixlConnector", memory="static"
    )
    worker = eng.worker.connector_worker  # type: ignore[attr-defined]
    sched = eng.scheduler.connector_scheduler  # type: ignore[attr-defined]
    assert type(worker) is NixlPullConnectorWorker
    assert type(sched) is NixlPullConnectorScheduler
    entry = RELEASES.get(releases.NIXL_CONNECTOR_VERSION)
    assert entry is not None, f"{release_id()} is not in RELEASES"
    gone = entry["gone"]
    assert isinstance(gone, set)
    for name in sorted(gone):
        assert not hasattr(worker, name), (
            f"{release_id()} has {name} again: drop it from RELEASES' 'gone'"
        )
    worker_names = {k: v for k, v in WORKER_INHERITED.items() if k not in gone}
    check_kinds(worker, worker_names, WORKER_OURS)
    check_kinds(sched, SCHEDULER_INHERITED, SCHEDULER_OURS)
