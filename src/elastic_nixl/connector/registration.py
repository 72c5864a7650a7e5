"""Keep a NIXL agent's registrations equal to a KV memory's mapped extents.

The side-effecting half of registration (the deciding half is
``planning.plan_registration``). Used by the connector worker, the doctor and
the GPU benchmark, none of which needs vLLM for it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from elastic_nixl.capabilities import (
    KVMemory,
    MappingEvent,
    MappingEventKind,
    MemoryExtent,
)
from elastic_nixl.connector.planning import RegistrationPlan, Span, plan_registration


@dataclass
class RegistrationStats:
    registrations: int = 0
    deregistrations: int = 0
    registered_bytes: int = 0


class ExtentRegistrar:
    """Registers each mapped extent once; deregisters before memory goes away."""

    def __init__(
        self,
        agent: Any,
        backends: list[str] | None = None,
        stats: RegistrationStats | None = None,
    ) -> None:
        self._agent = agent
        self._backends = backends
        self._registered: dict[Span, Any] = {}
        self._lock = threading.RLock()
        # Bumped on every change, so derived views can be cached between.
        self.version = 0
        self.stats = stats if stats is not None else RegistrationStats()

    @property
    def spans(self) -> list[Span]:
        """What is registered now, as ``(base, nbytes)``, sorted."""
        with self._lock:
            return sorted(self._registered)

    def sync(self, memory: KVMemory) -> RegistrationPlan:
        """Register what is mapped and not registered; drop what went away."""
        extents = {(e.base, e.nbytes): e for e in memory.mapped_extents()}
        with self._lock:
            self.version += 1
            plan = plan_registration(self._registered, extents)
            for span in plan.deregister:
                self._deregister(span)
            for span in plan.register:
                self._register(extents[span])
        return plan

    def on_event(self, event: MappingEvent) -> None:
        """Allocator listener, O(the change): UNMAPPING arrives while the
        memory is still mapped, so it is deregistered before it goes; MAPPED
        after mapping, so it is registered."""
        with self._lock:
            self.version += 1
            for e in event.extents:
                span = (e.base, e.nbytes)
                if event.kind is MappingEventKind.UNMAPPING:
                    if span in self._registered:
                        self._deregister(span)
                elif span not in self._registered:
                    self._register(e)

    def close(self) -> None:
        """Deregister everything."""
        with self._lock:
            for span in list(self._registered):
                self._deregister(span)

    def _register(self, e: MemoryExtent) -> None:
        descs = self._agent.get_reg_descs(
            [(e.base, e.nbytes, e.device, "")], e.kind.nixl_mem_type
        )
        if self._backends is None:
            self._agent.register_memory(descs)
        else:
            self._agent.register_memory(descs, backends=self._backends)
        self._registered[(e.base, e.nbytes)] = descs
        self.stats.registrations += 1
        self.stats.registered_bytes += e.nbytes

    def _deregister(self, span: Span) -> None:
        self._agent.deregister_memory(self._registered.pop(span))
        self.stats.deregistrations += 1
        self.stats.registered_bytes -= span[1]
