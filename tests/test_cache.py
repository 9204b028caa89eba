"""Page allocator and paged KV store: refcounts, copy-on-write fork, accounting, sizing.

The randomized state machine keeps a dense reference of every live sequence's content
(one marker value per position, written into its slot) and checks after every step that
reading the sequence's slots gives exactly that content, that no page leaks and that
refcounts equal the number of tables holding each page.
"""

from __future__ import annotations

import pathlib
import tokenize

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from powerfast.runtime.cache import CacheConfig, OutOfPagesError, PageAllocator, PagedKVCache


def make_cache(num_pages=32, page_size=4, num_layers=2, kv_heads=1, head_dim=2) -> PagedKVCache:
    return PagedKVCache(
        CacheConfig(num_layers=num_layers, num_kv_heads=kv_heads, head_dim=head_dim, page_size=page_size, num_pages=num_pages)
    )


def write_markers(cache: PagedKVCache, slots: list[int], markers: list[float]) -> None:
    """Store marker m at slot s in every layer (keys m, values -m)."""
    flat = torch.tensor(slots)
    values = torch.tensor(markers, dtype=cache.config.dtype)[:, None, None]
    for key_cache, value_cache in zip(cache.key_caches, cache.value_caches):
        key_cache.view(-1, *key_cache.shape[2:])[flat] = values
        value_cache.view(-1, *value_cache.shape[2:])[flat] = -values


def read_markers(cache: PagedKVCache, seq) -> list[list[float]]:
    """Per layer, the markers stored at the sequence's positions (checks keys == -values)."""
    bs = cache.page_size
    slots = torch.tensor([seq.page_table[p // bs] * bs + p % bs for p in range(seq.length)], dtype=torch.long)
    out = []
    for key_cache, value_cache in zip(cache.key_caches, cache.value_caches):
        keys = key_cache.view(-1, *key_cache.shape[2:])[slots]
        values = value_cache.view(-1, *value_cache.shape[2:])[slots]
        assert torch.equal(keys, -values)
        assert torch.equal(keys, keys[:, :1, :1].expand_as(keys))
        out.append(keys[:, 0, 0].tolist())
    return out


# ------------------------------------------------------------------ allocator


def test_allocator_refcounts_and_free_list():
    allocator = PageAllocator(4)
    pages = allocator.allocate(3)
    assert len(set(pages)) == 3 and allocator.num_in_use == 3 and allocator.num_free == 1
    allocator.share(pages[:2], times=2)
    assert [allocator.refcounts[b] for b in pages] == [3, 3, 1]
    allocator.release(pages)
    assert allocator.num_in_use == 2  # pages[2] went back
    allocator.release(pages[:2])
    allocator.release(pages[:2])
    assert allocator.num_in_use == 0 and allocator.num_free == 4
    with pytest.raises(RuntimeError, match="double free"):
        allocator.release(pages[:1])
    with pytest.raises(RuntimeError, match="is free"):
        allocator.share(pages[:1])


def test_allocator_out_of_pages_says_needed_and_available():
    allocator = PageAllocator(5)
    allocator.allocate(3)
    with pytest.raises(OutOfPagesError, match=r"3 pages needed, 2 free of 5") as info:
        allocator.allocate(3)
    assert (info.value.needed, info.value.available) == (3, 2)
    assert allocator.num_free == 2  # nothing taken


# ------------------------------------------------------------------ store


def test_append_slots_follow_the_page_table():
    cache = make_cache(num_pages=8, page_size=4)
    seq = cache.new_sequence()
    slots = cache.append_slots([seq], [6])
    assert seq.length == 6 and len(seq.page_table) == 2
    table = seq.page_table
    assert slots == [table[0] * 4 + i for i in range(4)] + [table[1] * 4 + i for i in range(2)]
    assert cache.append_slots([seq], [3]) == [table[1] * 4 + 2, table[1] * 4 + 3, seq.page_table[2] * 4]
    assert cache.pages_in_use == 3


def test_fork_shares_pages_and_copies_the_partial_page_on_first_write():
    cache = make_cache(num_pages=16, page_size=4)
    parent = cache.new_sequence()
    write_markers(cache, cache.append_slots([parent], [10]), [float(i) for i in range(10)])
    assert cache.pages_in_use == 3
    children = cache.fork(parent, 3)
    assert cache.pages_in_use == 3  # fork allocates nothing
    assert all(child.page_table == parent.page_table for child in children)
    assert all(cache.allocator.refcounts[b] == 4 for b in parent.page_table)

    # each child appends a different marker: its partial page is copied first
    for k, child in enumerate(children):
        write_markers(cache, cache.append_slots([child], [1]), [100.0 + k])
    assert cache.pages_in_use == 3 + 3
    for k, child in enumerate(children):
        assert child.page_table[:2] == parent.page_table[:2]
        assert child.page_table[2] != parent.page_table[2]
        assert read_markers(cache, child) == [list(map(float, range(10))) + [100.0 + k]] * 2
    assert read_markers(cache, parent) == [list(map(float, range(10)))] * 2

    # the parent, last holder of its partial page, writes in place
    write_markers(cache, cache.append_slots([parent], [1]), [50.0])
    assert cache.pages_in_use == 6
    cache.free([parent])
    assert cache.pages_in_use == 5  # the shared full pages stay
    cache.free(children)
    assert cache.pages_in_use == 0


def test_fork_at_a_page_boundary_copies_nothing_and_prefix_fork_truncates():
    cache = make_cache(num_pages=16, page_size=4)
    parent = cache.new_sequence()
    write_markers(cache, cache.append_slots([parent], [8]), [float(i) for i in range(8)])
    (child,) = cache.fork(parent, 1)
    cache.append_slots([child], [1])
    assert cache.pages_in_use == 3  # one new page, no copy
    (prefix,) = cache.fork(parent, 1, length=6)
    assert prefix.length == 6 and prefix.page_table == parent.page_table[:2]
    write_markers(cache, cache.append_slots([prefix], [1]), [-7.0])  # copy-on-write of page 1
    assert read_markers(cache, prefix) == [[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, -7.0]] * 2
    assert read_markers(cache, parent) == [list(map(float, range(8)))] * 2
    with pytest.raises(ValueError, match="fork length"):
        cache.fork(parent, 1, length=9)
    cache.free([child, prefix, parent])
    assert cache.pages_in_use == 0


def test_siblings_sharing_a_partial_page_copy_only_while_shared():
    cache = make_cache(num_pages=8, page_size=4)
    parent = cache.new_sequence()
    cache.append_slots([parent], [2])
    a, b = cache.fork(parent, 2)
    cache.free([parent])  # refcount 2: a and b
    cache.append_slots([a, b], [1, 1])  # a copies, then b is the last holder and writes in place
    assert cache.pages_in_use == 2
    assert a.page_table != b.page_table


def test_out_of_pages_changes_nothing():
    cache = make_cache(num_pages=4, page_size=4)
    seq = cache.new_sequence()
    cache.append_slots([seq], [6])
    children = cache.fork(seq, 3)
    before = (cache.pages_in_use, [list(c.page_table) for c in children], [c.length for c in children])
    # each child needs a copy of its partial page: 3 needed, 2 free
    with pytest.raises(OutOfPagesError, match="3 pages needed, 2 free of 4"):
        cache.append_slots(children, [1, 1, 1])
    assert before == (cache.pages_in_use, [list(c.page_table) for c in children], [c.length for c in children])
    cache.free(children + [seq])
    assert cache.pages_in_use == 0


def test_freed_sequences_are_refused():
    cache = make_cache()
    seq = cache.new_sequence()
    cache.append_slots([seq], [3])
    cache.free([seq])
    with pytest.raises(ValueError, match="was freed"):
        cache.free([seq])
    with pytest.raises(ValueError, match="was freed"):
        cache.fork(seq, 2)
    with pytest.raises(ValueError, match="was freed"):
        cache.append_slots([seq], [1])
    other = cache.new_sequence()
    with pytest.raises(ValueError, match="twice"):
        cache.free([other, other])


def test_sizing_from_a_budget_and_accounting():
    config = CacheConfig(num_layers=3, num_kv_heads=2, head_dim=8, page_size=16, max_memory=100_000)
    assert config.bytes_per_page == 2 * 3 * 16 * 2 * 8 * 4
    cache = PagedKVCache(config)
    assert cache.num_pages == 100_000 // config.bytes_per_page
    assert cache.key_caches[0].shape == (cache.num_pages, 16, 2, 8)
    assert len(cache.key_caches) == len(cache.value_caches) == 3
    assert cache.bytes_total == cache.num_pages * config.bytes_per_page
    seq = cache.new_sequence()
    cache.append_slots([seq], [17])
    assert cache.bytes_in_use == 2 * config.bytes_per_page
    bf16 = CacheConfig(num_layers=3, num_kv_heads=2, head_dim=8, dtype=torch.bfloat16, num_pages=4)
    assert bf16.bytes_per_page == config.bytes_per_page // 2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_pages=4, max_memory=10**6), "at most one"),
        (dict(num_pages=0), "num_pages"),
        (dict(max_memory=10), "max_memory"),
        (dict(gpu_memory_fraction=0.5), "CUDA"),
        (dict(page_size=0), "page_size"),
        (dict(dtype=torch.int32), "dtype"),
    ],
)
def test_config_errors_name_the_offending_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CacheConfig(num_layers=2, num_kv_heads=1, head_dim=4, **kwargs)


# ------------------------------------------------------------------ randomized


class CacheMachine(RuleBasedStateMachine):
    """Random prefill / fork / append / free against a dense per-sequence reference."""

    seqs = Bundle("seqs")

    def __init__(self):
        super().__init__()
        self.cache = make_cache(num_pages=24, page_size=4, num_layers=2)
        self.content: dict[int, list[float]] = {}  # seq_id -> markers
        self.live: dict[int, object] = {}
        self.next_marker = 1.0

    def _markers(self, n: int) -> list[float]:
        markers = [self.next_marker + i for i in range(n)]
        self.next_marker += n
        return markers

    @rule(target=seqs, length=st.integers(1, 14))
    def prefill(self, length):
        seq = self.cache.new_sequence()
        self.live[seq.seq_id] = seq
        try:
            slots = self.cache.append_slots([seq], [length])
        except OutOfPagesError:
            return seq  # still a valid, empty sequence
        markers = self._markers(length)
        write_markers(self.cache, slots, markers)
        self.content[seq.seq_id] = markers
        return seq

    @rule(target=seqs, parent=seqs, n=st.integers(1, 3), cut=st.floats(0.0, 1.0))
    def fork(self, parent, n, cut):
        if parent.freed:
            return parent
        length = int(round(parent.length * cut))
        children = self.cache.fork(parent, n, length=length)
        for child in children:
            self.content[child.seq_id] = self.content.get(parent.seq_id, [])[:length]
            self.live[child.seq_id] = child
        return children[0]

    @rule(data=st.data())
    def append(self, data):
        live = list(self.live.values())
        if not live:
            return
        chosen = data.draw(st.lists(st.sampled_from(live), min_size=1, max_size=4, unique_by=lambda s: s.seq_id))
        counts = data.draw(st.lists(st.integers(1, 6), min_size=len(chosen), max_size=len(chosen)))
        in_use = self.cache.pages_in_use
        try:
            slots = self.cache.append_slots(chosen, counts)
        except OutOfPagesError:
            assert self.cache.pages_in_use == in_use
            return
        markers = self._markers(sum(counts))
        write_markers(self.cache, slots, markers)
        start = 0
        for seq, count in zip(chosen, counts):
            self.content[seq.seq_id] = self.content.get(seq.seq_id, []) + markers[start : start + count]
            start += count

    @rule(seq=consumes(seqs))
    def free(self, seq):
        if seq.freed:
            return
        self.cache.free([seq])
        del self.live[seq.seq_id]
        self.content.pop(seq.seq_id, None)

    @invariant()
    def contents_match_and_refcounts_balance(self):
        holders = [0] * self.cache.num_pages
        for seq in self.live.values():
            assert len(seq.page_table) == -(-seq.length // self.cache.page_size)
            for page in seq.page_table:
                holders[page] += 1
            expected = self.content.get(seq.seq_id, [])
            assert read_markers(self.cache, seq) == [expected] * 2
        assert holders == self.cache.allocator.refcounts
        assert self.cache.pages_in_use == sum(1 for h in holders if h)

    def teardown(self):
        self.cache.free(list(self.live.values()))
        assert self.cache.pages_in_use == 0


TestCacheMachine = CacheMachine.TestCase
TestCacheMachine.settings = settings(max_examples=40, stateful_step_count=20, deadline=None)


# ------------------------------------------------------------------ host -> device, no sync


def no_sync_allowed(device: str):
    """On CUDA, any synchronising call inside the block raises; on the CPU nothing to check."""
    import contextlib

    if device != "cuda":
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def strict():
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(0)

    return strict()


def copy_on_write_copies_without_sync(device: str) -> None:
    from powerfast.ops.device import upload_ints

    values = [5, -1, 2**40, 0, 7]
    with no_sync_allowed(device):
        uploaded = upload_ints(values, torch.int64, torch.device(device))
    assert uploaded.device.type == device and uploaded.dtype == torch.int64 and uploaded.tolist() == values

    cache = PagedKVCache(CacheConfig(num_layers=2, num_kv_heads=1, head_dim=2, page_size=4, num_pages=16, device=device))
    for pool in (*cache.key_caches, *cache.value_caches):
        pool.copy_(torch.randn(pool.shape))
    parent = cache.new_sequence()
    cache.append_slots([parent], [10])  # a partly filled third page
    children = cache.fork(parent, 3)
    with no_sync_allowed(device):
        cache.append_slots(children, [1, 1, 1])  # each child copies the shared partial page
    shared = parent.page_table[2]
    copies = [child.page_table[2] for child in children]
    assert len({shared, *copies}) == 4
    for pool in (*cache.key_caches, *cache.value_caches):
        for copy in copies:
            assert torch.equal(pool[copy].cpu(), pool[shared].cpu())
    cache.free([parent, *children])
    assert cache.pages_in_use == 0


def test_copy_on_write_uploads_page_ids_and_copies():
    copy_on_write_copies_without_sync("cpu")


@pytest.mark.cuda
def test_copy_on_write_on_cuda_never_synchronises():
    copy_on_write_copies_without_sync("cuda")


ROOT = pathlib.Path(__file__).resolve().parents[1]
# Triton tile sizes and program blocks (not KV pages), flash-attn's keyword for its page
# table, and torch's non_blocking: the only identifiers under runtime/, ops/ and kernels/
# that may say "block"
TILE_AND_FOREIGN_NAMES = {"BLOCK", "BLOCK_D", "BLOCK_G", "BLOCK_HD", "BLOCK_K", "BLOCK_M", "BLOCK_N", "BLOCK_S",
                          "BLOCK_V", "DEFAULT_BLOCK_V", "_MERGE_BLOCK_S", "block_d", "block_g", "block_hd", "block_k",
                          "block_m", "block_n", "block_v", "block_table", "non_blocking"}


def _block_names(*folders: str) -> dict[str, set[str]]:
    """Identifiers containing "block" in the Python files under ``folders``, by file."""
    found: dict[str, set[str]] = {}
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            with open(path, "rb") as handle:
                names = {token.string for token in tokenize.tokenize(handle.readline)
                         if token.type == tokenize.NAME and "block" in token.string.lower()}
            if names:
                found[str(path.relative_to(ROOT))] = names
    return found


def test_the_kv_unit_is_a_page_in_the_runtime_ops_kernels_and_serving():
    """"Block" is the decision block B of power sampling and MCMC (``block_size``); the KV
    cache's unit is the page (``page_size``, ``num_pages``, page tables). The runtime, the
    ops and the kernels never hold a decision block, so no identifier there says block but
    a Triton tile or a foreign keyword; in serving the one block is B (``block_size`` of
    SamplingParams), next to ``blocking=`` of a lock."""
    kv = _block_names("powerfast/runtime", "powerfast/ops", "kernels")
    assert {path: names - TILE_AND_FOREIGN_NAMES for path, names in kv.items() if names - TILE_AND_FOREIGN_NAMES} == {}
    serving = _block_names("powerfast/serving")
    assert set().union(*serving.values()) == {"block_size", "blocking"}, serving
    # the scan reads real code: the page names are there
    with open(ROOT / "powerfast/runtime/cache.py", "rb") as handle:
        names = {token.string for token in tokenize.tokenize(handle.readline) if token.type == tokenize.NAME}
    assert {"page_size", "num_pages", "page_table", "pages_in_use", "PageAllocator", "OutOfPagesError"} <= names
