"""Paged attention: each query token attends to its sequence's cached keys 0..position
(or, in a sliding-window layer, to the last ``window`` of them).

One program handles one query token, one KV head (so all of that head's GQA query
heads at once: the keys and values are loaded once per group) and one split of the key
range. It walks the keys in tiles of ``BLOCK_N`` positions, looking up each position's
page in the sequence's page table (so one tile may span several 16-token pages), and
keeps an online softmax in fp32. With several splits (flash-decoding, for few sequences
over long contexts) each split writes its normalised partial output and log-sum-exp and
a second kernel merges them.

Causality is per query token: a token at absolute position ``p`` sees positions
``0..p``. That covers decode (one token per sequence, ``p = length - 1``) and prefill /
extend (several new tokens per sequence) with the same kernel. A sliding window ``W``
(Mistral, Gemma 2 / 3) narrows that to ``max(0, p - W + 1)..p``: the ``W`` positions ending
at ``p``, the query's own included (transformers' ``kv_idx > q_idx - W``). The key range,
and so the splits, start at that lower bound: a windowed layer reads at most ``W`` keys per
query however long the sequence.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

__all__ = ["paged_attention"]

_LOG2E = 1.4426950408889634

# Triton compiles one variant per distinct "specialisation" of a launch's arguments: an
# int equal to 1 or divisible by 16, a pointer aligned to 16 bytes. Arguments that change
# from step to step would recompile the kernel inside a decode loop (seconds each on a
# GPU), so they are not specialised: the page-table width (``stride_table``), every stride
# that follows the split count, the split count itself, and the runner's metadata
# pointers (slices cut at varying offsets from one host-to-device buffer). What still
# selects a variant is the model's geometry, the dtypes, ``WRITE_LSE`` (one split or
# several) and ``SLIDING`` (a windowed layer or not): at most two variants of the attention
# kernel per kind of layer and one merge kernel per model. The window is a per-layer
# constant, not specialised either (one variant for every window width).
_ATTENTION_VARYING_INTS = ["window", "stride_table", "stride_ot", "stride_oh", "stride_lt", "stride_lh"]
_ATTENTION_VARYING_POINTERS = ["Page_tables", "Query_seq_index", "Query_positions"]
_MERGE_VARYING_INTS = ["num_splits", "stride_pt", "stride_ph", "stride_lt", "stride_lh"]
_MERGE_BLOCK_S = 32  # the default split count's ceiling: one merge variant for every count up to it


@triton.jit(do_not_specialize=_ATTENTION_VARYING_INTS, do_not_specialize_on_alignment=_ATTENTION_VARYING_POINTERS)
def _paged_attention_kernel(
    # data ptrs
    Q,  # (num_tokens, num_heads, head_dim)
    K_cache,  # (num_pages, page_size, kv_heads, head_dim)
    V_cache,  # (num_pages, page_size, kv_heads, head_dim)
    Page_tables,  # (num_seqs, max_pages) int32
    Query_seq_index,  # (num_tokens,) which sequence each query token belongs to
    Query_positions,  # (num_tokens,) absolute position of each query token
    Out,  # (num_tokens, num_heads, num_splits, head_dim), or (num_tokens, num_heads, head_dim)
    Lse,  # (num_tokens, num_heads, num_splits) fp32, log2 units; unused with one split
    # shapes
    scale_log2,  # softmax scale * log2(e)
    softcap_log2,  # with SOFTCAP: cap * log2(e); scores become cap * tanh(scale * q.k / cap)
    window,  # with SLIDING: a token at position p sees p - window + 1 .. p (>= 1)
    tokens_per_split,  # a multiple of BLOCK_N
    # strides
    stride_qt,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_table,
    stride_ot,
    stride_oh,
    stride_os,
    stride_lt,
    stride_lh,
    # switches
    GROUP_SIZE: tl.constexpr,  # query heads per KV head
    BLOCK_G: tl.constexpr,  # >= GROUP_SIZE, >= 16 (tl.dot)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NATIVE_DOT: tl.constexpr,  # dot in the cache dtype (fp16/bf16 on GPUs); else fp32 ieee
    WRITE_LSE: tl.constexpr,
    SOFTCAP: tl.constexpr,  # apply logit soft-capping (Gemma 2)
    SLIDING: tl.constexpr,  # a sliding-window layer: keys before p - window + 1 are skipped
):
    token = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq = tl.load(Query_seq_index + token).to(tl.int64)
    kv_len = tl.load(Query_positions + token).to(tl.int64) + 1
    first = 0  # the first visible key; the splits divide first .. kv_len - 1
    if SLIDING:
        first = tl.maximum(kv_len - window, 0)
    start = first + split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, kv_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    mask_g = offs_g < GROUP_SIZE
    mask_d = offs_d < HEAD_DIM
    heads = kv_head * GROUP_SIZE + offs_g
    q = tl.load(
        Q + token * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
        mask=mask_g[:, None] & mask_d[None, :],
        other=0.0,
    ).to(tl.float32)

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    page_row = Page_tables + seq * stride_table
    for tile_start in range(start, end, BLOCK_N):
        offs_n = tile_start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        pages = tl.load(page_row + offs_n // PAGE_SIZE, mask=mask_n, other=0).to(tl.int64)
        in_page = offs_n % PAGE_SIZE
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(
            K_cache + pages[:, None] * stride_kb + in_page[:, None] * stride_ks + kv_head * stride_kh + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        v = tl.load(
            V_cache + pages[:, None] * stride_vb + in_page[:, None] * stride_vs + kv_head * stride_vh + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        if NATIVE_DOT:
            scores = tl.dot(q.to(k.dtype), tl.trans(k))
        else:
            scores = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        scores = scores * scale_log2
        if SOFTCAP:  # cap * tanh(x / cap) in log2 units, tanh(y) = 2 sigmoid(2y) - 1
            scores = softcap_log2 * (2.0 * tl.sigmoid(2.0 * scores / softcap_log2) - 1.0)
        scores = tl.where(mask_n[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if NATIVE_DOT:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        else:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        m_i = m_new

    empty = l_i == 0.0  # an empty split (start >= end) contributes nothing
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    tl.store(
        Out + token * stride_ot + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :],
        out.to(Out.dtype.element_ty),
        mask=mask_g[:, None] & mask_d[None, :],
    )
    if WRITE_LSE:
        lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
        tl.store(Lse + token * stride_lt + heads * stride_lh + split, lse, mask=mask_g)


@triton.jit(do_not_specialize=_MERGE_VARYING_INTS)
def _merge_splits_kernel(
    # data ptrs
    Partial_out,  # (num_tokens, num_heads, num_splits, head_dim) fp32
    Lse,  # (num_tokens, num_heads, num_splits) fp32, log2 units
    Out,  # (num_tokens, num_heads, head_dim)
    # shapes
    num_splits,
    # strides
    stride_pt,
    stride_ph,
    stride_ps,
    stride_lt,
    stride_lh,
    stride_ot,
    stride_oh,
    # switches
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    token = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < num_splits
    mask_d = offs_d < HEAD_DIM
    lse = tl.load(Lse + token * stride_lt + head * stride_lh + offs_s, mask=mask_s, other=float("-inf"))
    weights = tl.exp2(lse - tl.max(lse, axis=0))  # split 0 is never empty, so the max is finite
    weights = tl.where(mask_s, weights, 0.0)
    partial = tl.load(
        Partial_out + token * stride_pt + head * stride_ph + offs_s[:, None] * stride_ps + offs_d[None, :],
        mask=mask_s[:, None] & mask_d[None, :],
        other=0.0,
    )
    out = tl.sum(weights[:, None] * partial, axis=0) / tl.sum(weights, axis=0)
    tl.store(Out + token * stride_ot + head * stride_oh + offs_d, out.to(Out.dtype.element_ty), mask=mask_d)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _default_num_splits(num_tokens: int, kv_heads: int, max_seq_len: int, device: torch.device) -> int:
    """Enough programs to fill the GPU twice over, but at least 256 keys per split."""
    if device.type != "cuda":
        return 1
    num_sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    programs = num_tokens * kv_heads
    wanted = triton.cdiv(2 * num_sms, programs)
    return max(1, min(wanted, triton.cdiv(max_seq_len, 256), 32))


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    page_tables: torch.Tensor,
    query_seq_index: torch.Tensor,
    query_positions: torch.Tensor,
    scale: float,
    max_seq_len: int | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
    out: torch.Tensor | None = None,
    softcap: float | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal attention of new query tokens over a paged KV cache.

    query:            (num_tokens, num_heads, head_dim), after RoPE
    key_cache:        (num_pages, page_size, kv_heads, head_dim); the new tokens' keys
    value_cache:      (num_pages, page_size, kv_heads, head_dim)  must already be written
    page_tables:      (num_seqs, max_pages) int32 / int64 page ids per sequence
    query_seq_index:  (num_tokens,) int, the sequence (row of page_tables) of each token
    query_positions:  (num_tokens,) int, absolute position p of each token: it sees 0..p
    scale:            softmax scale (usually head_dim ** -0.5)
    max_seq_len:      host bound on max(query_positions) + 1, used to pick the split count
                      (read from the device, a sync, when not given)
    num_splits:       key-range splits per (token, KV head); default: fill the GPU
    block_n:          keys per tile; default 64 (128 under the interpreter)
    out:              optional (num_tokens, num_heads, head_dim) output buffer
    softcap:          logit soft-capping: scores become ``softcap * tanh(scale * q.k / softcap)``
                      (Gemma 2); None: off
    sliding_window:   W >= 1: a token at position p sees only ``max(0, p - W + 1)..p`` (the
                      layer's window, its own position included); None or 0: no window

    Returns (num_tokens, num_heads, head_dim) in the query's dtype.
    """
    num_tokens, num_heads, head_dim = query.shape
    num_pages, page_size, kv_heads, cache_head_dim = key_cache.shape
    if value_cache.shape != key_cache.shape:
        raise ValueError(f"key_cache {tuple(key_cache.shape)} and value_cache {tuple(value_cache.shape)} differ")
    if cache_head_dim != head_dim:
        raise ValueError(f"query head_dim {head_dim} != cache head_dim {cache_head_dim}")
    if num_heads % kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of kv_heads {kv_heads}")
    for name, tensor in (("query", query), ("key_cache", key_cache), ("value_cache", value_cache)):
        if tensor.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim, got strides {tensor.stride()}")
    if query_seq_index.shape != (num_tokens,) or query_positions.shape != (num_tokens,):
        raise ValueError(
            f"query_seq_index {tuple(query_seq_index.shape)} and query_positions {tuple(query_positions.shape)} "
            f"must both be ({num_tokens},)"
        )
    if page_tables.dim() != 2 or page_tables.stride(-1) != 1:
        raise ValueError(f"page_tables must be a contiguous (num_seqs, max_pages) tensor, got {tuple(page_tables.shape)}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap!r}")
    if sliding_window is not None and (isinstance(sliding_window, bool) or not isinstance(sliding_window, int)
                                       or sliding_window < 0):
        raise ValueError(f"sliding_window must be an int >= 1, or 0 / None for none, got {sliding_window!r}")
    if out is None:
        out = torch.empty_like(query)
    if num_tokens == 0:
        return out
    if max_seq_len is None:
        max_seq_len = int(query_positions.max()) + 1
    sliding = bool(sliding_window) and sliding_window < max_seq_len  # a window as wide as the sequences: none
    span = sliding_window if sliding else max_seq_len  # the most keys one query sees
    interpreting = _interpreting()
    if block_n is None:
        block_n = 128 if interpreting else 64
    if num_splits is None:
        num_splits = _default_num_splits(num_tokens, kv_heads, span, query.device)
    num_splits = max(1, min(num_splits, triton.cdiv(span, block_n)))
    tokens_per_split = triton.cdiv(triton.cdiv(span, num_splits), block_n) * block_n

    group_size = num_heads // kv_heads
    block_g = max(16, triton.next_power_of_2(group_size))
    block_d = max(16, triton.next_power_of_2(head_dim))
    native_dot = key_cache.dtype in (torch.float16, torch.bfloat16) and not interpreting
    if num_splits == 1:
        target, lse = out, out  # lse unused
        stride_ot, stride_oh, stride_os = out.stride(0), out.stride(1), 0
        stride_lt = stride_lh = 0
    else:
        target = torch.empty(num_tokens, num_heads, num_splits, head_dim, dtype=torch.float32, device=query.device)
        lse = torch.empty(num_tokens, num_heads, num_splits, dtype=torch.float32, device=query.device)
        stride_ot, stride_oh, stride_os = target.stride(0), target.stride(1), target.stride(2)
        stride_lt, stride_lh = lse.stride(0), lse.stride(1)

    _paged_attention_kernel[(num_tokens, kv_heads, num_splits)](
        query,
        key_cache,
        value_cache,
        page_tables,
        query_seq_index,
        query_positions,
        target,
        lse,
        scale * _LOG2E,
        (softcap or 1.0) * _LOG2E,
        sliding_window if sliding else 0,
        tokens_per_split,
        query.stride(0),
        query.stride(1),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        value_cache.stride(0),
        value_cache.stride(1),
        value_cache.stride(2),
        page_tables.stride(0),
        stride_ot,
        stride_oh,
        stride_os,
        stride_lt,
        stride_lh,
        GROUP_SIZE=group_size,
        BLOCK_G=block_g,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        PAGE_SIZE=page_size,
        BLOCK_N=block_n,
        NATIVE_DOT=native_dot,
        WRITE_LSE=num_splits > 1,
        SOFTCAP=softcap is not None,
        SLIDING=sliding,
    )
    if num_splits > 1:
        _merge_splits_kernel[(num_tokens, num_heads)](
            target,
            lse,
            out,
            num_splits,
            target.stride(0),
            target.stride(1),
            target.stride(2),
            lse.stride(0),
            lse.stride(1),
            out.stride(0),
            out.stride(1),
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            BLOCK_S=max(_MERGE_BLOCK_S, triton.next_power_of_2(num_splits)),
        )
    return out
