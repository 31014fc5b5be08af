"""Reused shared-memory batch buffers between DataLoader workers and the main process.

Why not the DataLoader's own transport: every batch tensor a worker returns goes through fresh shared memory
(`shm_open` + first-touch page faults in the worker, the file descriptor handed over a socket, a fresh `mmap` and
page faults again in the main process). For a 64×3×224×224 uint8 batch that cost ~100 µs per sample on the 2-core
development VM, about a tenth of decoding the JPEG (benchmarks/RESULTS.md). Here each worker owns a few fixed slots,
allocated once before the workers start; it collates the big fixed-shape tensors (images, masks) straight into a
free slot and sends only the slot number. Small tensors (labels, boxes) travel pickled by value as numpy arrays, so a
batch crosses the queue without a single file descriptor.

Hand-off, safe by construction: `busy_WS[w, s]` (shared int32) is set to 1 by worker w before it fills slot s. Only
the main process clears it, and only for a slot it has received and whose storages no tensor outside the ring still
uses (the storage use count is back to the ring's own references): a batch the caller keeps, or any view of it, is
never overwritten. A worker with no free slot collates into fresh memory instead (counted in `fallbacks`), so
nothing ever waits. Slots of batches the DataLoader discards (a re-iterated loader) are never received, hence never
cleared: they are lost to the fallback path, never reused while in flight.

Slots stay pageable on purpose: CUDA stages a copy from pageable memory before `.to(device, non_blocking=True)`
returns, so a slot is free to reuse once its tensors are dropped. Pinned slots would make that copy asynchronous and
need a CUDA event per slot before reuse. Each slot keeps one shared-memory file descriptor open per field (e.g.
8 workers × 5 slots × 2 seg fields = 80 per task and process).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
import torch.utils.data

logger = logging.getLogger(__name__)
SLOT_KEY = "_ring_slot"
BY_VALUE_BYTES = 1 << 16  # larger tensors (a fallback batch's images) keep the shared-memory path
_NUMPY_DTYPES = frozenset({torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
                           torch.float32, torch.float64})  # bfloat16 has no numpy twin: it keeps the tensor path


def _use_count(t: torch.Tensor) -> int:
    # Tensors and views each hold one reference to the storage; Python-level refcounts would miss views.
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


class _ByValue:
    """A small tensor shipped as a numpy array (pickled by value) instead of through shared memory + a socket."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray) -> None:
        self.array = array


def _map_leaves(obj: Any, leaf: Callable[[Any], Any]) -> Any:
    """`leaf` applied to every non-container value inside dicts/lists/tuples (structure kept)."""
    if isinstance(obj, dict):
        return {k: _map_leaves(v, leaf) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_leaves(v, leaf) for v in obj)
    return leaf(obj)


def _pack(obj: Any) -> Any:
    if (isinstance(obj, torch.Tensor) and obj.dtype in _NUMPY_DTYPES
            and obj.numel() * obj.element_size() <= BY_VALUE_BYTES):
        return _ByValue(obj.numpy())
    return obj


def pack_small(obj: Any) -> Any:
    """Worker side: small tensors inside dicts/lists/tuples → `_ByValue` numpy arrays."""
    return _map_leaves(obj, _pack)


def unpack_small(obj: Any) -> Any:
    """Main side: inverse of `pack_small` (zero-copy `torch.from_numpy`)."""
    return _map_leaves(obj, lambda v: torch.from_numpy(v.array) if isinstance(v, _ByValue) else v)


class BatchRing:
    """`slots` reusable batch buffers per worker for the fixed-shape fields of one task's training batches.

    Args:
        fields: name → (shape, dtype) of one batch's tensor, e.g. {"images": ((64, 3, 224, 224), torch.uint8)}.
    """

    def __init__(self, num_workers: int, slots: int,
                 fields: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
        if num_workers < 1 or slots < 1:
            raise ValueError(f"BatchRing needs num_workers >= 1 and slots >= 1, got {num_workers}, {slots}")
        self.num_workers, self.slots = num_workers, slots
        # one storage per (field, worker, slot): use counts must be per slot
        self.buffers = {name: [[torch.empty(shape, dtype=dtype).share_memory_() for _ in range(slots)]
                               for _ in range(num_workers)] for name, (shape, dtype) in fields.items()}
        self.busy_WS = torch.zeros(num_workers, slots, dtype=torch.int32).share_memory_()
        self.fallbacks = 0  # per process: counted in the worker that had no free slot
        self._next = [0] * num_workers
        self._received: set[tuple[int, int]] = set()  # main process only
        self._own_refs = {name: _use_count(per_worker[0][0]) for name, per_worker in self.buffers.items()}

    # ------------------------------------------------------------------ worker side
    def acquire(self, worker: int) -> dict[str, torch.Tensor] | None:
        """A free slot's buffers (marked busy, with the slot id under `SLOT_KEY`), or None when all are busy."""
        for i in range(self.slots):
            slot = (self._next[worker] + i) % self.slots
            if int(self.busy_WS[worker, slot]) == 0:
                self.busy_WS[worker, slot] = 1
                self._next[worker] = (slot + 1) % self.slots
                return {SLOT_KEY: (worker, slot), **{n: b[worker][slot] for n, b in self.buffers.items()}}
        self.fallbacks += 1
        if self.fallbacks == 1:  # slower, never wrong: worth one line in the log, not one per batch
            logger.warning("data worker %d: all %d ring slots still in use (batches kept past the next one?); "
                           "collating into fresh shared memory until one is free", worker, self.slots)
        return None

    # ------------------------------------------------------------------ main side
    def receive(self, worker: int, slot: int) -> dict[str, torch.Tensor]:
        """Views of a received slot's buffers; the slot stays busy until `release_unused` finds them dropped."""
        self._received.add((worker, slot))
        return {name: b[worker][slot].detach() for name, b in self.buffers.items()}

    def release_unused(self) -> int:
        """Clear every received slot that nothing outside the ring references any more; returns how many."""
        free = [(w, s) for w, s in self._received
                if all(_use_count(b[w][s]) <= self._own_refs[n] for n, b in self.buffers.items())]
        for w, s in free:
            self._received.discard((w, s))
            self.busy_WS[w, s] = 0
        return len(free)


class RingLoader:
    """Iterates a DataLoader whose workers write into `ring`: puts the slot views back into each batch."""

    def __init__(self, loader: torch.utils.data.DataLoader, ring: BatchRing) -> None:
        self.loader, self.ring = loader, ring

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            self.ring.release_unused()  # the caller has dropped (or still holds) the previous batches by now
            batch = unpack_small(batch)
            slot = batch.pop(SLOT_KEY, None)
            if slot is not None:
                batch.update(self.ring.receive(*slot))
            yield batch
