"""The SAEs a replica serves, resident under a memory budget: loaded on demand, evicted LRU.

A replica may be configured with more SAEs (layers, widths, architectures) than fit in its
memory (Neuronpedia's ``--sae_gpu_budget_gib``). With ``budget_bytes`` set, the pool keeps the
most recently used SAEs whose weights fit in it; a call for one that is not resident loads it
— once: concurrent calls for the same SAE wait on that one load (a single-flight future) — and
evicts the least recently used until the total fits again. Without a budget every SAE stays
resident, as before.

- **At start** every SAE is loaded once, in configured order: so a broken folder, a hash
  mismatch or an SAE of the wrong width fails the replica's start, not some later call, and
  each SAE's ``SaeInfo`` is known while it is out of memory. An SAE larger than the budget on
  its own is refused then, naming it. The first ones that fit stay resident.
- **Accounting** is of the SAE's tensors (weights and any extra tensors, float32 on the model's
  device) — what the budget bounds. A call that already holds an evicted SAE finishes with it
  (its tensors are freed after), so the device may briefly hold more than the budget; the pool's
  own total never exceeds it.
- **Thread-safe**: engine work runs on worker threads. The lock is held only for bookkeeping,
  never during a load, so GetInfo and calls for resident SAEs never wait behind one.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from saescope.service.types import SaeInfo

if TYPE_CHECKING:  # runtime holds a pool: import its types for annotations only
    from saescope.service.runtime import LoadedSae

LOADED, UNLOADED = "loaded", "unloaded"


def sae_bytes(ls: LoadedSae) -> int:
    """Bytes of an SAE's tensors (parameters and buffers) as served."""
    tensors = [*ls.sae.parameters(), *ls.sae.buffers()]
    return int(sum(t.numel() * t.element_size() for t in tensors))


@dataclass
class PoolStats:
    """Counters for tests and benches."""

    loads: int = 0  # loads after start (each a cold call's wait)
    shared: int = 0  # calls that waited on another call's load of the same SAE
    evictions: int = 0
    peak_resident_bytes: int = 0


class SaePool:
    """SAEs by id, resident under ``budget_bytes`` (None: all of them); see the module
    docstring. ``load(sae_id)`` reads one from its folder."""

    def __init__(
        self, ids: list[str], load: Callable[[str], LoadedSae], budget_bytes: int | None
    ) -> None:
        if budget_bytes is not None and budget_bytes <= 0:
            raise ValueError(f"sae_memory_budget: must be > 0 bytes, got {budget_bytes}")
        self._load = load
        self.budget_bytes = budget_bytes
        self._lock = threading.Lock()
        self._resident: OrderedDict[str, LoadedSae] = OrderedDict()  # least recent first
        self._bytes: dict[str, int] = {}
        self._infos: dict[str, SaeInfo] = {}
        self._loading: dict[str, Future[LoadedSae]] = {}
        self.stats = PoolStats()
        for sae_id in ids:
            ls = load(sae_id)
            size = sae_bytes(ls)
            if budget_bytes is not None and size > budget_bytes:
                raise ValueError(
                    f"saes[{sae_id!r}]: its tensors take {size:,} bytes, over the SAE memory "
                    f"budget of {budget_bytes:,} bytes on their own (sae_memory_budget_mib)"
                )
            self._bytes[sae_id] = size
            self._infos[sae_id] = ls.info()
            if budget_bytes is None or self.resident_bytes + size <= budget_bytes:
                self._resident[sae_id] = ls
        self.stats.peak_resident_bytes = self.resident_bytes

    @classmethod
    def empty(cls) -> SaePool:
        """A pool of no SAEs (a runtime before its SAEs are loaded)."""
        return cls([], _no_loader, None)

    # ---- the mapping the engine reads --------------------------------------------------------
    def __contains__(self, sae_id: object) -> bool:
        return sae_id in self._bytes

    def __iter__(self) -> Iterator[str]:
        return iter(self._bytes)

    def __len__(self) -> int:
        return len(self._bytes)

    def __getitem__(self, sae_id: str) -> LoadedSae:
        """The SAE, loading it (and evicting others) when it is not resident."""
        with self._lock:
            ls = self._resident.get(sae_id)
            if ls is not None:
                self._resident.move_to_end(sae_id)
                return ls
            if sae_id not in self._bytes:
                raise KeyError(sae_id)
            future = self._loading.get(sae_id)
            owner = future is None
            if future is None:
                future = self._loading[sae_id] = Future()
        if not owner:
            with self._lock:
                self.stats.shared += 1
            return future.result()  # another call is loading it: wait for that load
        try:
            ls = self._load(sae_id)
        except BaseException as e:
            with self._lock:
                del self._loading[sae_id]
            future.set_exception(e)
            raise
        with self._lock:
            self._make_room(self._bytes[sae_id])
            self._resident[sae_id] = ls
            del self._loading[sae_id]
            self.stats.loads += 1
            self.stats.peak_resident_bytes = max(
                self.stats.peak_resident_bytes, self.resident_bytes
            )
        future.set_result(ls)
        return ls

    def _make_room(self, size: int) -> None:
        """Evict least recently used SAEs until ``size`` more bytes fit (lock held)."""
        if self.budget_bytes is None:
            return
        while self._resident and self.resident_bytes + size > self.budget_bytes:
            self._resident.popitem(last=False)
            self.stats.evictions += 1

    def bytes_of(self, sae_id: str) -> int:
        """Bytes of an SAE's tensors, resident or not."""
        return self._bytes[sae_id]

    # ---- what GetInfo reports -------------------------------------------------------------------
    @property
    def resident_bytes(self) -> int:
        return sum(self._bytes[i] for i in self._resident)

    def infos(self) -> list[SaeInfo]:
        """Every configured SAE's info, in configured order, with its state and bytes."""
        with self._lock:
            resident = set(self._resident)
        return [
            replace(
                info,
                state=LOADED if sae_id in resident else UNLOADED,
                memory_bytes=self._bytes[sae_id],
            )
            for sae_id, info in self._infos.items()
        ]


def _no_loader(sae_id: str) -> LoadedSae:
    raise KeyError(sae_id)
