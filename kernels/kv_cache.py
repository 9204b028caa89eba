"""Paged KV cache writes: new tokens into their slots, and whole-page copies (copy-on-write).

Cache layout (one pool per layer): ``(num_pages, page_size, kv_heads, head_dim)``; a
slot is ``page_id * page_size + offset_in_page``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(
    # data ptrs
    key_cache_ptr,  # (num_pages, page_size, kv_heads, head_dim)
    value_cache_ptr,  # (num_pages, page_size, kv_heads, head_dim)
    key_ptr,  # (num_tokens, kv_heads, head_dim)
    value_ptr,  # (num_tokens, kv_heads, head_dim)
    slot_mapping_ptr,  # (num_tokens,) int64 / int32, -1 = skip
    # shapes
    page_size,
    kv_heads,
    head_dim,
    # strides
    stride_cache_page,
    stride_cache_offset,
    stride_cache_head,
    stride_cache_dim,
    stride_kv_token,
    stride_kv_head,
    stride_kv_dim,
    # switches
    BLOCK_HD: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    page_id = slot // page_size
    page_offset = slot % page_size
    idx = part * BLOCK_HD + tl.arange(0, BLOCK_HD)
    head = idx // head_dim
    dim = idx % head_dim
    mask = (idx < kv_heads * head_dim) & ((idx * 0 + slot) >= 0)
    src = token * stride_kv_token + head * stride_kv_head + dim * stride_kv_dim
    dst = page_id * stride_cache_page + page_offset * stride_cache_offset + head * stride_cache_head + dim * stride_cache_dim
    key = tl.load(key_ptr + src, mask=mask)
    value = tl.load(value_ptr + src, mask=mask)
    tl.store(key_cache_ptr + dst, key.to(key_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(value_cache_ptr + dst, value.to(value_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _copy_pages_kernel(
    # data ptrs
    key_cache_ptr,  # (num_pages, page_size, kv_heads, head_dim)
    value_cache_ptr,  # (num_pages, page_size, kv_heads, head_dim)
    src_pages_ptr,  # (n,) int64 / int32
    dst_pages_ptr,  # (n,) int64 / int32
    # shapes
    page_size,
    kv_heads,
    head_dim,
    # strides
    stride_page,
    stride_offset,
    stride_head,
    stride_dim,
    # switches
    BLOCK: tl.constexpr,
):
    pair = tl.program_id(0)
    part = tl.program_id(1)
    src_page = tl.load(src_pages_ptr + pair).to(tl.int64)
    dst_page = tl.load(dst_pages_ptr + pair).to(tl.int64)
    idx = part * BLOCK + tl.arange(0, BLOCK)
    per_offset = kv_heads * head_dim
    offset = idx // per_offset
    head = (idx % per_offset) // head_dim
    dim = idx % head_dim
    mask = idx < page_size * per_offset
    within = offset * stride_offset + head * stride_head + dim * stride_dim
    src = src_page * stride_page + within
    dst = dst_page * stride_page + within
    tl.store(key_cache_ptr + dst, tl.load(key_cache_ptr + src, mask=mask), mask=mask)
    tl.store(value_cache_ptr + dst, tl.load(value_cache_ptr + src, mask=mask), mask=mask)


def _same_strides(key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
    if key_cache.stride() != value_cache.stride():
        raise ValueError(f"key_cache strides {key_cache.stride()} differ from value_cache strides {value_cache.stride()}")


def write_kv(key_cache, value_cache, key, value, slot_mapping) -> None:
    """Launcher (arguments checked by ``powerfast.ops.kv_cache.write_kv``).

    key_cache, value_cache: (num_pages, page_size, kv_heads, head_dim), written in place
    key, value: (num_tokens, kv_heads, head_dim); slot_mapping: (num_tokens,), -1 = skip
    """
    _same_strides(key_cache, value_cache)
    if key.stride() != value.stride():
        value = value.contiguous()
        key = key.contiguous()
    num_tokens = key.shape[0]
    if num_tokens == 0:
        return
    slot_mapping = slot_mapping.contiguous()  # read at unit stride
    _, page_size, kv_heads, head_dim = key_cache.shape
    block_hd = min(triton.next_power_of_2(kv_heads * head_dim), 4096)
    grid = (num_tokens, triton.cdiv(kv_heads * head_dim, block_hd))
    _write_kv_kernel[grid](
        # data ptrs
        key_cache,
        value_cache,
        key,
        value,
        slot_mapping,
        # shapes
        page_size,
        kv_heads,
        head_dim,
        # strides
        *key_cache.stride(),
        *key.stride(),
        # switches
        BLOCK_HD=block_hd,
        num_warps=4,
    )


def copy_pages(key_cache, value_cache, src_pages, dst_pages) -> None:
    """Launcher (arguments checked by ``powerfast.ops.kv_cache.copy_pages``).

    key_cache, value_cache: (num_pages, page_size, kv_heads, head_dim), written in place
    src_pages, dst_pages: (n,) page ids; page src[i] is copied onto dst[i]
    """
    _same_strides(key_cache, value_cache)
    _, page_size, kv_heads, head_dim = key_cache.shape
    per_page = page_size * kv_heads * head_dim
    src_pages = src_pages.contiguous()  # read at unit stride
    dst_pages = dst_pages.contiguous()
    tile = min(triton.next_power_of_2(per_page), 8192)
    grid = (src_pages.shape[0], triton.cdiv(per_page, tile))
    _copy_pages_kernel[grid](
        # data ptrs
        key_cache,
        value_cache,
        src_pages,
        dst_pages,
        # shapes
        page_size,
        kv_heads,
        head_dim,
        # strides
        *key_cache.stride(),
        # switches
        BLOCK=tile,
        num_warps=4,
    )
