"""Paged KV cache: a page allocator (free list + refcounts) and one KV pool per layer.

A sequence is a page table (list of page ids) and a length. Page ``b`` holds the keys
and values of ``page_size`` consecutive positions in every layer's pool; position ``p``
of a sequence lives in slot ``page_table[p // page_size] * page_size + p % page_size``.

Forking shares pages instead of copying them: the children get a copy of the parent's
page table and every page's refcount goes up by the number of children. The only
page ever written after a fork is a partly filled last page, and it is copied on the
first write by whoever writes it while others still hold it (copy-on-write): a fork of
one 1,000-token prefix (page size 16) into 64 children costs at most 64 new pages,
one per child, instead of 64 x 63. Freeing decrements refcounts; a page returns to
the free list at refcount 0, so parents and children can be freed in any order.

Only Python lists are touched here; tensors are the pools and the page copies, which
go through :func:`powerfast.ops.kv_cache.copy_pages` on CUDA and plain torch on the CPU.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from powerfast.ops.device import upload_ints
from powerfast.ops.kv_cache import copy_pages

__all__ = [
    "PageAllocator", "CacheConfig", "KVCacheTooSmallError", "KVSequence", "OutOfPagesError", "PagedKVCache",
]

_DEFAULT_GPU_MEMORY_FRACTION = 0.5  # of the free device memory, when no size is given on CUDA
_DEFAULT_CPU_MEMORY_BYTES = 256 * 2**20  # when no size is given on the CPU


class OutOfPagesError(RuntimeError):
    """The KV pool has fewer free pages than an operation needs. Nothing was changed."""

    def __init__(self, needed: int, available: int, num_pages: int, what: str = "") -> None:
        self.needed = needed
        self.available = available
        self.num_pages = num_pages
        where = f" to {what}" if what else ""
        super().__init__(
            f"KV cache out of pages{where}: {needed} pages needed, {available} free of {num_pages}. "
            f"Free finished sequences or size the cache larger (num_pages / max_memory)."
        )


class KVCacheTooSmallError(ValueError):
    """A generation's peak KV need exceeds the free pages of the pool; raised before any work.

    needed:      peak pages the settings need; free: pages free now; num_pages: pool size
    page_bytes: bytes of one page (all layers, keys and values): the least pool that
                 would do holds ``needed + (num_pages - free)`` pages
    """

    def __init__(self, what: str, needed: int, free: int, num_pages: int, page_size: int, page_bytes: int) -> None:
        self.needed = needed
        self.free = free
        self.num_pages = num_pages
        self.page_bytes = page_bytes
        self.least_bytes = (needed + num_pages - free) * page_bytes
        in_use = f", {num_pages - free} in use" if free != num_pages else ""
        super().__init__(
            f"KV cache too small for {what}: it needs up to {needed} pages of {page_size} positions "
            f"({_mib(needed * page_bytes)} MiB) and the pool has {free} free of {num_pages} "
            f"({_mib(num_pages * page_bytes)} MiB{in_use}); give a pool of at least "
            f"{_mib(self.least_bytes)} MiB (max_memory, num_pages >= {needed + num_pages - free}) or smaller settings"
        )


def _mib(num_bytes: int) -> int:
    return -(-num_bytes // 2**20)


@dataclass(slots=True)
class CacheConfig:
    """Shape and size of the paged KV cache.

    num_layers, num_kv_heads, head_dim: the model's attention geometry
    dtype, device:        of the pools (the model's)
    page_size:            positions per page
    num_pages:            pool size in pages; or give instead
    max_memory:           a budget in bytes for all layers' keys and values, or
    gpu_memory_fraction:  a fraction in (0, 1] of the device memory free now (CUDA only).
    With none of the three, CUDA takes 0.5 of the free memory and the CPU 256 MiB.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.float32
    device: torch.device | str = "cpu"
    page_size: int = 16
    num_pages: int | None = None
    max_memory: int | None = None
    gpu_memory_fraction: float | None = None

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "page_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating torch.dtype, got {self.dtype!r}")
        self.device = torch.device(self.device)
        given = [n for n in ("num_pages", "max_memory", "gpu_memory_fraction") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of num_pages, max_memory, gpu_memory_fraction; got {given}")
        if self.num_pages is not None and (not isinstance(self.num_pages, int) or self.num_pages < 1):
            raise ValueError(f"num_pages must be a positive int, got {self.num_pages!r}")
        if self.max_memory is not None and (not isinstance(self.max_memory, int) or self.max_memory < self.bytes_per_page):
            raise ValueError(
                f"max_memory must be an int number of bytes >= one page ({self.bytes_per_page} bytes), "
                f"got {self.max_memory!r}"
            )
        if self.gpu_memory_fraction is not None:
            if not 0.0 < self.gpu_memory_fraction <= 1.0:
                raise ValueError(f"gpu_memory_fraction must be in (0, 1], got {self.gpu_memory_fraction!r}")
            if self.device.type != "cuda":
                raise ValueError(f"gpu_memory_fraction needs a CUDA device, got device {self.device}")

    @property
    def bytes_per_page(self) -> int:
        """Bytes of one page across all layers, keys and values."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.page_size * self.num_kv_heads * self.head_dim * itemsize

    def resolve_num_pages(self) -> int:
        """The pool size in pages this config asks for (reads free device memory if needed)."""
        if self.num_pages is not None:
            return self.num_pages
        budget = self.max_memory
        if budget is None:
            if self.device.type == "cuda":
                fraction = self.gpu_memory_fraction or _DEFAULT_GPU_MEMORY_FRACTION
                free_bytes, _ = torch.cuda.mem_get_info(self.device)
                budget = int(free_bytes * fraction)
            else:
                budget = _DEFAULT_CPU_MEMORY_BYTES
        num_pages = budget // self.bytes_per_page
        if num_pages < 1:
            raise ValueError(f"a budget of {budget} bytes holds no page of {self.bytes_per_page} bytes")
        return num_pages


class PageAllocator:
    """Free list and refcounts of ``num_pages`` pages. Pure Python, no tensors."""

    def __init__(self, num_pages: int) -> None:
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        self.num_pages = num_pages
        self.refcounts = [0] * num_pages
        self._free: deque[int] = deque(range(num_pages))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_in_use(self) -> int:
        return self.num_pages - len(self._free)

    def allocate(self, n: int, what: str = "") -> list[int]:
        """n fresh pages at refcount 1; raises :class:`OutOfPagesError` (allocating none) if short."""
        if n > len(self._free):
            raise OutOfPagesError(n, len(self._free), self.num_pages, what)
        pages = [self._free.popleft() for _ in range(n)]
        for page in pages:
            self.refcounts[page] = 1
        return pages

    def share(self, pages: Iterable[int], times: int = 1) -> None:
        """Add ``times`` references to each (already allocated) page."""
        for page in pages:
            if self.refcounts[page] < 1:
                raise RuntimeError(f"page {page} is free: it cannot be shared")
            self.refcounts[page] += times

    def release(self, pages: Iterable[int]) -> None:
        """Drop one reference to each page; pages reaching 0 go back to the free list."""
        for page in pages:
            count = self.refcounts[page]
            if count < 1:
                raise RuntimeError(f"page {page} released while free (double free)")
            self.refcounts[page] = count - 1
            if count == 1:
                self._free.append(page)


@dataclass(slots=True, eq=False)
class KVSequence:
    """A handle on cached positions: ``length`` positions in the pages of ``page_table``.

    Made by :meth:`PagedKVCache.new_sequence` / :meth:`PagedKVCache.fork`; treat as read-only.
    """

    seq_id: int
    page_table: list[int] = field(default_factory=list)
    length: int = 0
    freed: bool = False

    def __repr__(self) -> str:
        state = ", freed" if self.freed else ""
        return f"KVSequence(id={self.seq_id}, length={self.length}, pages={len(self.page_table)}{state})"


class PagedKVCache:
    """The KV pools of all layers and the sequences living in them.

    key_caches[layer], value_caches[layer]: (num_pages, page_size, kv_heads, head_dim)
    """

    def __init__(self, config: CacheConfig) -> None:
        self.config = config
        self.page_size = config.page_size
        self.num_pages = config.resolve_num_pages()
        self.allocator = PageAllocator(self.num_pages)
        shape = (self.num_pages, config.page_size, config.num_kv_heads, config.head_dim)
        # zeros, not empty: never-written slots are read (and masked) by some backends,
        # and 0 * NaN garbage would still be NaN
        self.key_caches = [torch.zeros(shape, dtype=config.dtype, device=config.device) for _ in range(config.num_layers)]
        self.value_caches = [
            torch.zeros(shape, dtype=config.dtype, device=config.device) for _ in range(config.num_layers)
        ]
        self._seq_ids = itertools.count()

    # ------------------------------------------------------------------ accounting

    @property
    def pages_in_use(self) -> int:
        return self.allocator.num_in_use

    @property
    def pages_free(self) -> int:
        return self.allocator.num_free

    @property
    def bytes_per_page(self) -> int:
        """Bytes of one page over all layers, keys and values."""
        return self.config.bytes_per_page

    @property
    def bytes_total(self) -> int:
        return self.num_pages * self.bytes_per_page

    @property
    def bytes_in_use(self) -> int:
        return self.pages_in_use * self.bytes_per_page

    def __repr__(self) -> str:
        return (
            f"PagedKVCache(pages {self.pages_in_use}/{self.num_pages} in use, page_size={self.page_size}, "
            f"{self.bytes_in_use / 2**20:.1f}/{self.bytes_total / 2**20:.1f} MiB)"
        )

    # ------------------------------------------------------------------ sequences

    def new_sequence(self) -> KVSequence:
        """An empty sequence (no pages until something is appended)."""
        return KVSequence(seq_id=next(self._seq_ids))

    def fork(self, seq: KVSequence, n: int, length: int | None = None) -> list[KVSequence]:
        """n children sharing ``seq``'s first ``length`` positions (default: all of them).

        No KV is copied and no page is allocated: the shared pages' refcounts go up by n.
        A shared, partly filled last page is copied later by whoever appends to it first.
        """
        self._check_live(seq)
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        length = seq.length if length is None else length
        if not 0 <= length <= seq.length:
            raise ValueError(f"fork length must be in [0, {seq.length}] for {seq}, got {length}")
        table = seq.page_table[: -(-length // self.page_size)]
        self.allocator.share(table, times=n)
        return [KVSequence(seq_id=next(self._seq_ids), page_table=list(table), length=length) for _ in range(n)]

    def free(self, seqs: Iterable[KVSequence]) -> None:
        """Release the pages of each sequence. A sequence can be freed once."""
        seqs = list(seqs)
        seen: set[int] = set()
        for seq in seqs:
            self._check_live(seq)
            if seq.seq_id in seen:
                raise ValueError(f"{seq} appears twice in one free()")
            seen.add(seq.seq_id)
        for seq in seqs:
            self.allocator.release(seq.page_table)
            seq.page_table = []
            seq.freed = True

    def append_slots(self, seqs: Sequence[KVSequence], num_new_tokens: Sequence[int]) -> list[int]:
        """Make room for ``num_new_tokens[i]`` more positions of ``seqs[i]`` and advance the lengths.

        Allocates the pages needed and copies shared, partly filled last pages before
        they are written (in every layer). All or nothing: if the pool is short, raises
        :class:`OutOfPagesError` before changing anything.

        Returns the flat slot ids of the new positions, sequence after sequence.
        """
        if len(seqs) != len(num_new_tokens):
            raise ValueError(f"{len(seqs)} sequences but {len(num_new_tokens)} token counts")
        bs = self.page_size
        refcounts = self.allocator.refcounts
        # pass 1: count the pages needed, simulating the copy-on-write refcount drops
        pending_drops: dict[int, int] = {}
        needed = 0
        for seq, count in zip(seqs, num_new_tokens):
            self._check_live(seq)
            if count < 0:
                raise ValueError(f"cannot append {count} tokens to {seq}")
            if count and seq.length % bs:
                last = seq.page_table[-1]
                if refcounts[last] - pending_drops.get(last, 0) > 1:
                    pending_drops[last] = pending_drops.get(last, 0) + 1
                    needed += 1
            needed += -(-(seq.length + count) // bs) - len(seq.page_table)
        if needed > self.allocator.num_free:
            raise OutOfPagesError(needed, self.allocator.num_free, self.num_pages, f"append to {len(seqs)} sequences")
        # pass 2: allocate, copy on write, compute slots
        copy_src: list[int] = []
        copy_dst: list[int] = []
        slots: list[int] = []
        for seq, count in zip(seqs, num_new_tokens):
            if count == 0:
                continue
            table = seq.page_table
            if seq.length % bs and refcounts[table[-1]] > 1:
                (fresh,) = self.allocator.allocate(1)
                copy_src.append(table[-1])
                copy_dst.append(fresh)
                self.allocator.release([table[-1]])
                table[-1] = fresh
            missing = -(-(seq.length + count) // bs) - len(table)
            if missing > 0:
                table.extend(self.allocator.allocate(missing))
            start = seq.length
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + count))
            seq.length = start + count
        if copy_src:
            self._copy_pages(copy_src, copy_dst)
        return slots

    # ------------------------------------------------------------------ internals

    def _copy_pages(self, src: list[int], dst: list[int]) -> None:
        device = self.config.device
        src_pages = upload_ints(src, torch.int64, device)  # pinned, non-blocking: no sync per copy-on-write
        dst_pages = upload_ints(dst, torch.int64, device)
        for key_cache, value_cache in zip(self.key_caches, self.value_caches):
            if key_cache.is_cuda:
                copy_pages(key_cache, value_cache, src_pages, dst_pages)
            else:  # plain torch on the CPU (ops would interpret its Triton kernel under TRITON_INTERPRET=1)
                key_cache.index_copy_(0, dst_pages, key_cache.index_select(0, src_pages))
                value_cache.index_copy_(0, dst_pages, value_cache.index_select(0, src_pages))

    @staticmethod
    def _check_live(seq: KVSequence) -> None:
        if not isinstance(seq, KVSequence):
            raise TypeError(f"expected a powerfast.runtime.cache.KVSequence, got {type(seq).__name__}")
        if seq.freed:
            raise ValueError(f"{seq} was freed")
