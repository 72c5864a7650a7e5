"""Pure planning: layout choice, registration diff, per-request descriptors."""

import numpy as np
import pytest

from elastic_nixl.capabilities import (
    ALL_KV_LAYOUTS,
    ExportKind,
    KVMemoryCapabilities,
    MappingStability,
    MemoryKind,
)
from elastic_nixl.config import AllocatorChoice
from elastic_nixl.connector.planning import (
    DescriptorPlanError,
    ExtentIndex,
    RegionGeometry,
    choose_kv_layout,
    plan_read,
    plan_registration,
)
from elastic_nixl.connector.regions import (
    LayerView,
    mapped_prefix_blocks,
    plan_regions,
)
from elastic_nixl.runs import Runs


def caps(layouts, restride):
    return KVMemoryCapabilities(
        "x",
        MemoryKind.HOST,
        frozenset(layouts),
        restride,
        MappingStability.ELASTIC,
        frozenset({ExportKind.HOST}),
    )


class TestLayout:
    def test_static_gets_vllm_preference(self):
        assert choose_kv_layout(AllocatorChoice.STATIC, False, None) == "LBHNC"

    def test_mla_gets_none(self):
        for choice in AllocatorChoice:
            assert choose_kv_layout(choice, True, caps(ALL_KV_LAYOUTS, True)) is None

    def test_unknown_memory_gets_nhd(self):
        assert choose_kv_layout(AllocatorChoice.AUTO, False, None) == "LBNHC"

    def test_restridable_allocator_gets_hnd(self):
        assert (
            choose_kv_layout(AllocatorChoice.VMM, False, caps(ALL_KV_LAYOUTS, True))
            == "LBHNC"
        )

    def test_non_restridable_allocator_gets_nhd(self):
        c = caps({"LBNHC", "LBHNC"}, False)
        assert choose_kv_layout(AllocatorChoice.VMM, False, c) == "LBNHC"


class TestRegistrationPlan:
    def test_dedup_and_diff(self):
        plan = plan_registration([(0, 10), (100, 10)], [(100, 10), (100, 10), (200, 5)])
        assert plan.register == ((200, 5),)
        assert plan.deregister == ((0, 10),)

    def test_noop(self):
        assert plan_registration([(0, 4)], [(0, 4)]).is_noop

    def test_overlap_refused(self):
        with pytest.raises(ValueError, match="exactly once"):
            plan_registration([], [(0, 10), (5, 10)])

    def test_coverage_merges_abutting_and_overlapping(self):
        spans = [(10, 5), (0, 10), (20, 1), (20, 3)]
        assert Runs.from_spans(spans).spans() == [(0, 15), (20, 3)]

    def test_covers_needs_one_run(self):
        cover = Runs.from_spans([(0, 10), (10, 5), (20, 5)])
        assert cover.covers([0, 5, 12, 14, 20, 22], 3).tolist() == [
            True,
            True,
            True,
            False,
            True,
            True,
        ]
        assert not Runs.empty().covers([0], 1).any()


def index(*spans):
    return ExtentIndex.build(spans)


class TestPlanRead:
    L = RegionGeometry(base=0x10000, block_len=64, block_stride=64)
    R = RegionGeometry(base=0x90000, block_len=64, block_stride=64)

    def test_contiguous_runs_coalesce(self):
        plan = plan_read(
            [self.L],
            [self.R],
            [[0, 1, 2, 7]],
            [[5, 6, 7, 9]],
            index((0x10000, 64 * 100)),
            index((0x90000, 64 * 100)),
        )
        assert plan.num_descs == 2
        assert plan.local[:, 1].tolist() == [192, 64]
        assert plan.remote[:, 0].tolist() == [0x90000 + 5 * 64, 0x90000 + 9 * 64]
        assert plan.num_blocks == 4 and plan.nbytes == 256

    def test_cut_at_registration_boundary(self):
        # Two registrations on the remote side; one run crosses the boundary.
        plan = plan_read(
            [self.L],
            [self.R],
            [[0, 1, 2, 3]],
            [[0, 1, 2, 3]],
            index((0x10000, 64 * 100)),
            index((0x90000, 128), (0x90000 + 128, 64 * 10)),
        )
        assert plan.remote[:, 1].tolist() == [128, 128]
        assert plan.local[:, 1].tolist() == [128, 128]

    def test_strided_regions_do_not_coalesce(self):
        lg = RegionGeometry(0x10000, 64, 256)
        rg = RegionGeometry(0x90000, 64, 256)
        plan = plan_read(
            [lg],
            [rg],
            [[0, 1]],
            [[0, 1]],
            index((0x10000, 4096)),
            index((0x90000, 4096)),
        )
        assert plan.num_descs == 2

    def test_unregistered_remote_block_named(self):
        with pytest.raises(DescriptorPlanError) as ei:
            plan_read(
                [self.L],
                [self.R],
                [[0, 1]],
                [[3, 50]],
                index((0x10000, 64 * 100)),
                index((0x90000, 64 * 10)),
            )
        assert ei.value.side == "remote" and ei.value.block_ids == (50,)
        assert "[50]" in str(ei.value)

    def test_unmapped_local_hole_named(self):
        with pytest.raises(DescriptorPlanError) as ei:
            plan_read(
                [self.L],
                [self.R],
                [[0, 4]],
                [[0, 1]],
                index((0x10000, 64 * 2), (0x10000 + 64 * 8, 64 * 8)),
                index((0x90000, 64 * 10)),
            )
        assert ei.value.side == "local" and ei.value.block_ids == (4,)

    def test_negative_ids_refused(self):
        with pytest.raises(DescriptorPlanError):
            plan_read(
                [self.L],
                [self.R],
                [[0]],
                [[-1]],
                index((0x10000, 64)),
                index((0x90000, 64)),
            )

    def test_block_len_mismatch(self):
        with pytest.raises(ValueError, match="block_len"):
            plan_read(
                [self.L],
                [RegionGeometry(0x90000, 32, 64)],
                [[0]],
                [[0]],
                index((0x10000, 64)),
                index((0x90000, 64)),
            )

    def test_descriptor_count_grows_with_runs_not_capacity(self):
        ids = list(range(1000))
        plan = plan_read(
            [self.L],
            [self.R],
            [ids],
            [ids],
            index((0x10000, 64 * 1000)),
            index((0x90000, 64 * 1000)),
        )
        assert plan.num_descs == 1
        assert plan.local.dtype == np.uint64


class TestRegions:
    def view(self, name, ptr, group=0, stride=64, page=64, n=10):
        return LayerView(name, ptr, n, stride, page, group, False)

    def test_shared_bases_dedup_in_natural_order(self):
        regions = plan_regions(
            [
                self.view("layers.10.attn", 0x3000),
                self.view("layers.2.attn", 0x2000),
                self.view("layers.2.other", 0x2000),
            ]
        )
        assert [r.name for r in regions] == ["layers.2.attn", "layers.10.attn"]
        assert [r.geometry.base for r in regions] == [0x2000, 0x3000]

    def test_shared_across_groups_marked(self):
        regions = plan_regions(
            [self.view("a.0", 0x1000, group=0), self.view("a.1", 0x1000, group=1)]
        )
        assert regions[0].group_id == -1

    def test_mapped_prefix(self):
        regions = plan_regions([self.view("l.0", 0x1000), self.view("l.1", 0x2000)])
        cover = [(0x1000, 64 * 4), (0x2000, 64 * 2), (0x2000 + 64 * 5, 64)]
        assert mapped_prefix_blocks(regions, cover) == 2
        assert mapped_prefix_blocks(regions, [(0x1000, 64 * 4)]) == 0


class TestTransferPath:
    def test_vmm_gpu_memory_is_staged_on_auto(self):
        from elastic_nixl.config import TransferPath
        from elastic_nixl.connector.planning import choose_transfer_path

        c = choose_transfer_path(
            MemoryKind.CUDA, frozenset({ExportKind.POSIX_FD}), TransferPath.AUTO
        )
        assert c.path is TransferPath.STAGED and "emulation over TCP" in c.reason

    def test_cudamalloc_and_host_are_direct(self):
        from elastic_nixl.config import TransferPath
        from elastic_nixl.connector.planning import choose_transfer_path

        for kind, export in (
            (MemoryKind.CUDA, ExportKind.LEGACY_CUDA_IPC),
            (MemoryKind.HOST, ExportKind.HOST),
        ):
            c = choose_transfer_path(kind, frozenset({export}), TransferPath.AUTO)
            assert c.path is TransferPath.DIRECT

    def test_explicit_direct_on_vmm_says_it_is_slow(self):
        from elastic_nixl.config import TransferPath
        from elastic_nixl.connector.planning import choose_transfer_path

        c = choose_transfer_path(
            MemoryKind.CUDA, frozenset({ExportKind.POSIX_FD}), TransferPath.DIRECT
        )
        assert c.path is TransferPath.DIRECT and "0.4 GB/s" in c.reason

    def test_cudamalloc_without_nvlink_pushes_through_slots(self):
        """UCX turns cuda_ipc READ off without NVLink: stage (WRITE) instead."""
        from elastic_nixl.config import TransferPath
        from elastic_nixl.connector.planning import choose_transfer_path

        ipc = frozenset({ExportKind.LEGACY_CUDA_IPC})
        c = choose_transfer_path(MemoryKind.CUDA, ipc, TransferPath.AUTO, False)
        assert c.path is TransferPath.STAGED and "NVLink" in c.reason
        for fast in (True, None):  # NVLink, or nothing known: READ directly
            c = choose_transfer_path(MemoryKind.CUDA, ipc, TransferPath.AUTO, fast)
            assert c.path is TransferPath.DIRECT
        c = choose_transfer_path(MemoryKind.CUDA, ipc, TransferPath.DIRECT, False)
        assert c.path is TransferPath.DIRECT and "no active NVLink" in c.reason
        host = frozenset({ExportKind.HOST})
        c = choose_transfer_path(MemoryKind.HOST, host, TransferPath.AUTO, False)
        assert c.path is TransferPath.DIRECT


def test_blocks_beyond_a_static_peers_capacity_are_named() -> None:
    from elastic_nixl.connector.planning import RegionGeometry, blocks_beyond

    regions = [RegionGeometry(1 << 20, 4096, 4096, 100)]
    assert blocks_beyond([[0, 99]], regions, "p") is None
    why = blocks_beyond([[5, 100, 10**9]], regions, "p")
    assert why is not None and "[100, 1000000000]" in why and "100 blocks" in why
    assert "remote_block_ids" in why
