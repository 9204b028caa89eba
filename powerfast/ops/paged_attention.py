"""The paged attention backends: one function per backend, all with the dense model's result.

Each takes the new tokens' queries, the layer's paged key/value pools and the forward's
metadata (:class:`PagedAttentionContext`) and attends causally over each sequence's cached
positions:

- ``"torch"``: gather the pages, then ``scaled_dot_product_attention``; any device;
- ``"triton"``: the paged kernel of ``powerfast.kernels.paged_attention``; CUDA (or the
  interpreter);
- ``"flash"``: ``flash_attn_with_kvcache`` / ``flash_attn_varlen_func`` with
  ``block_table`` (flash-attn's name for the page table); CUDA, fp16/bf16, page size a
  multiple of 256, flash-attn importable.

``"auto"`` picks flash, then triton on CUDA, and torch elsewhere (:func:`resolve_backend`).
All three apply attention-logit soft-capping (``softcap``: Gemma 2) as ``cap * tanh(s / cap)``
of each scaled score, and a layer's sliding window (``sliding_window`` W: Mistral, Gemma 2 / 3):
a query at position p sees the keys at ``p - W + 1 .. p``, its own included (transformers'
``kv_idx > q_idx - W``); None or 0 is no window. The window is a per-layer constant (a host
int), so a compiled or captured decode step stays one graph. The KV cache keeps every
position: only what a query sees changes.

The model calls them through the ``torch.library`` operator ``powerfast::paged_attention(query,
key_cache, value_cache, <paged metadata>, scale, max_query_len, max_seq_len,
shared_prefix_pages, backend, softcap, sliding_window) -> out`` (:func:`paged_attention_op`),
never directly: ``torch.compile`` and CUDA-graph capture see one opaque operator with a fake
implementation.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["BACKENDS", "BACKEND_FUNCTIONS", "PagedAttentionContext", "flash_attn_available", "paged_attention_op",
           "resolve_backend", "torch_paged_attention"]

BACKENDS = ("auto", "torch", "triton", "flash")
FLASH_PAGE_MULTIPLE = 256


@dataclass(slots=True)
class PagedAttentionContext:
    """Paged metadata of one forward, shared by all layers. Tensors on the model's device.

    The forward's new tokens are flattened sequence after sequence (``num_tokens`` of
    them): the model is called with ``input_ids`` of shape ``(num_seqs, 1)`` for decode or
    ``(1, num_tokens)`` for a packed prefill; both flatten to that order.

    key_caches, value_caches: per layer, (num_pages, page_size, kv_heads, head_dim)
    slot_mapping:     (num_tokens,) int64, the slot each new token's k/v is written to
    page_tables:      (num_seqs, max_pages) int32, padded with 0
    seq_lens:         (num_seqs,) int32, lengths including the new tokens
    cu_seqlens_k:     (num_seqs + 1,) int32, cumulative seq_lens
    query_start_loc:  (num_seqs + 1,) int32, cumulative new-token counts
    query_seq_index:  (num_tokens,) int64, the sequence of each new token
    query_positions:  (num_tokens,) int64, absolute position of each new token
    max_query_len, max_seq_len: host ints
    backend:          "torch", "triton" or "flash" (resolved, not "auto")
    shared_prefix_pages: host int S: the first S entries of every page table are the same
                      pages, visible to every query (a forked prefix). The torch backend
                      attends over them once for the whole batch (cascade); 0 disables.
    """

    key_caches: list[torch.Tensor]
    value_caches: list[torch.Tensor]
    slot_mapping: torch.Tensor
    page_tables: torch.Tensor
    seq_lens: torch.Tensor
    cu_seqlens_k: torch.Tensor
    query_start_loc: torch.Tensor
    query_seq_index: torch.Tensor
    query_positions: torch.Tensor
    max_query_len: int
    max_seq_len: int
    backend: str
    shared_prefix_pages: int = 0

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS[1:]:
            raise ValueError(f"backend must be one of {BACKENDS[1:]} (resolved), got {self.backend!r}")
        num_tokens = self.slot_mapping.shape[0]
        for name in ("query_seq_index", "query_positions"):
            if getattr(self, name).shape != (num_tokens,):
                raise ValueError(f"{name} must have shape ({num_tokens},), got {tuple(getattr(self, name).shape)}")

    @property
    def num_tokens(self) -> int:
        return self.slot_mapping.shape[0]


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype, page_size: int) -> str:
    """The concrete backend for a setting: "auto" -> flash, triton (CUDA) or torch (CPU).

    An explicit choice that cannot run on this device / dtype / page size raises.
    """
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    device = torch.device(device)
    flash_ok = (
        device.type == "cuda"
        and dtype in (torch.float16, torch.bfloat16)
        and page_size % FLASH_PAGE_MULTIPLE == 0
        and flash_attn_available()
    )
    if backend == "auto":
        if flash_ok:
            return "flash"
        return "triton" if device.type == "cuda" else "torch"
    if backend == "flash" and not flash_ok:
        raise ValueError(
            f"the flash backend needs CUDA, fp16/bf16, a page size multiple of {FLASH_PAGE_MULTIPLE} and flash-attn "
            f"installed; got device {device}, dtype {dtype}, page_size {page_size}, "
            f"flash-attn {'found' if flash_attn_available() else 'not found'}"
        )
    if backend == "triton" and device.type != "cuda":
        import os

        if os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"the triton backend needs CUDA (or TRITON_INTERPRET=1), got device {device}")
    return backend


# ---------------------------------------------------------------------------- backends


def torch_paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    ctx: PagedAttentionContext,
    scale: float,
    softcap: float | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Reference backend: gather each sequence's pages, then masked SDPA.

    query: (num_tokens, num_heads, head_dim); caches: (num_pages, page_size, kv_heads, head_dim)
    softcap: scores become ``softcap * tanh(scores / softcap)`` (after scaling); None: off
    sliding_window: W >= 1: a query at position p sees keys ``p - W + 1 .. p`` only; None / 0: off
    Returns (num_tokens, num_heads, head_dim).
    """
    num_tokens, num_heads, head_dim = query.shape
    page_size, kv_heads = key_cache.shape[1], key_cache.shape[2]
    num_seqs = ctx.page_tables.shape[0]
    used_pages = -(-ctx.max_seq_len // page_size)
    if not sliding_window or sliding_window >= ctx.max_seq_len:
        sliding_window = None  # as wide as every sequence: plain causal attention
    if ctx.max_query_len == 1 and num_seqs > 1 and ctx.shared_prefix_pages > 0:
        return _cascade_decode_attention(query, key_cache, value_cache, ctx, scale, used_pages, softcap,
                                         sliding_window)
    page_ids = ctx.page_tables[:, :used_pages].reshape(-1)
    kv_len = used_pages * page_size
    # (num_seqs, kv_heads, kv_len, head_dim); index_select is a plain copy, much faster
    # than advanced indexing on CPU
    keys = key_cache.index_select(0, page_ids).view(num_seqs, kv_len, kv_heads, head_dim).transpose(1, 2)
    values = value_cache.index_select(0, page_ids).view(num_seqs, kv_len, kv_heads, head_dim).transpose(1, 2)
    key_positions = torch.arange(kv_len, device=query.device)
    if ctx.max_query_len == 1:  # decode: token i is sequence i
        queries = query.unsqueeze(2)  # (num_seqs, num_heads, 1, head_dim)
        mask = _visible(key_positions[None, :], ctx.query_positions[:, None], sliding_window)  # (num_seqs, kv_len)
        mask = mask[:, None, None, :]
    else:  # pad the new tokens to (num_seqs, max_query_len)
        index_in_seq = torch.arange(num_tokens, device=query.device) - ctx.query_start_loc[ctx.query_seq_index]
        queries = query.new_zeros(num_seqs, ctx.max_query_len, num_heads, head_dim)
        queries[ctx.query_seq_index, index_in_seq] = query
        queries = queries.transpose(1, 2)
        # padding rows see position 0 only (never all -inf, so no NaN); they are dropped below
        positions = torch.zeros(num_seqs, ctx.max_query_len, dtype=torch.long, device=query.device)
        positions[ctx.query_seq_index, index_in_seq] = ctx.query_positions
        mask = _visible(key_positions[None, None, :], positions[:, :, None], sliding_window)[:, None]
        # mask: (num_seqs, 1, max_q, kv_len)
    if softcap is None:
        out = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=mask, scale=scale, enable_gqa=kv_heads != num_heads
        )  # (num_seqs, num_heads, q_len, head_dim)
    else:
        out = _softcapped_attention(queries, keys, values, mask, scale, softcap)
    out = out.transpose(1, 2)
    if ctx.max_query_len == 1:
        return out.reshape(num_tokens, num_heads, head_dim)
    return out[ctx.query_seq_index, index_in_seq]


def _visible(key_positions: torch.Tensor, query_positions: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """Whether each key is visible to each query (broadcast): causal, and within the window if any."""
    visible = key_positions <= query_positions
    if sliding_window is not None:
        visible = visible & (key_positions > query_positions - sliding_window)
    return visible


def _softcapped_attention(queries, keys, values, mask, scale: float, softcap: float) -> torch.Tensor:
    """softmax(softcap * tanh(q k^T * scale / softcap), masked) v in fp32, in the queries' dtype.

    queries: (B, H, Q, D); keys, values: (B, kv_heads, L, D); mask: bool, broadcastable to (B, H, Q, L)
    """
    group = queries.shape[1] // keys.shape[1]
    keys = keys.repeat_interleave(group, dim=1).float()
    values = values.repeat_interleave(group, dim=1).float()
    scores = torch.matmul(queries.float(), keys.transpose(-1, -2)) * scale
    scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), values).to(queries.dtype)


def _attention_with_lse(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float, mask: torch.Tensor | None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale) v and its log-sum-exp, in fp32; rows with no visible key give (0, -inf).

    queries: (batch, rows, D); keys, values: (batch, L, D); mask: broadcastable to (batch, rows, L)
    softcap: scores become ``softcap * tanh(scores / softcap)``; None: off
    """
    scores = torch.bmm(queries.float(), keys.float().transpose(1, 2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    probs = torch.exp(scores - row_max)
    total = probs.sum(dim=-1, keepdim=True)
    out = torch.bmm(probs, values.float()) / total.clamp_min(torch.finfo(torch.float32).tiny)
    lse = (row_max + total.log()).squeeze(-1)
    return out, lse


def _cascade_decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    ctx: PagedAttentionContext,
    scale: float,
    used_pages: int,
    softcap: float | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Decode over a shared prefix: the prefix pages are read once for all sequences.

    query: (num_seqs, num_heads, head_dim), one token per sequence. The shared pages'
    keys are visible to every query, so all queries (grouped by KV head) attend to them in
    one matrix product; each sequence's own remaining pages are gathered and masked as
    usual; the two partial softmaxes are merged by their log-sum-exps. With a sliding
    window the prefix product is masked per query too (a query whose window starts past
    the prefix gets log-sum-exp -inf there, weight 0); every query sees its own position,
    so the merged log-sum-exp is finite.
    """
    num_seqs, num_heads, head_dim = query.shape
    page_size, kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // kv_heads
    shared = min(ctx.shared_prefix_pages, used_pages)
    shared_len = shared * page_size

    # prefix: (kv_heads, num_seqs * group, D) queries against (kv_heads, shared_len, D) keys
    grouped = query.view(num_seqs, kv_heads, group, head_dim).transpose(0, 1).reshape(kv_heads, -1, head_dim)
    prefix_ids = ctx.page_tables[0, :shared]
    prefix_keys = key_cache.index_select(0, prefix_ids).view(shared_len, kv_heads, head_dim).transpose(0, 1)
    prefix_values = value_cache.index_select(0, prefix_ids).view(shared_len, kv_heads, head_dim).transpose(0, 1)
    prefix_mask = None
    if sliding_window is not None:  # (1, num_seqs * group, shared_len), rows in the grouped order
        prefix_positions = torch.arange(shared_len, device=query.device)
        prefix_mask = _visible(prefix_positions[None, :], ctx.query_positions[:, None], sliding_window)
        prefix_mask = prefix_mask.repeat_interleave(group, dim=0)[None]
    prefix_out, prefix_lse = _attention_with_lse(grouped, prefix_keys, prefix_values, scale, prefix_mask, softcap)
    prefix_out = prefix_out.view(kv_heads, num_seqs, group, head_dim).transpose(0, 1)  # (N, kvh, g, D)
    prefix_lse = prefix_lse.view(kv_heads, num_seqs, group).transpose(0, 1)  # (N, kvh, g)
    if shared == used_pages:
        return prefix_out.reshape(num_seqs, num_heads, head_dim).to(query.dtype)

    # own pages: (num_seqs * kv_heads, group, D) queries against their gathered suffixes
    own = used_pages - shared
    own_ids = ctx.page_tables[:, shared:used_pages].reshape(-1)
    own_len = own * page_size
    own_keys = key_cache.index_select(0, own_ids).view(num_seqs, own_len, kv_heads, head_dim)
    own_values = value_cache.index_select(0, own_ids).view(num_seqs, own_len, kv_heads, head_dim)
    own_keys = own_keys.transpose(1, 2).reshape(num_seqs * kv_heads, own_len, head_dim)
    own_values = own_values.transpose(1, 2).reshape(num_seqs * kv_heads, own_len, head_dim)
    key_positions = shared_len + torch.arange(own_len, device=query.device)
    visible = _visible(key_positions[None, :], ctx.query_positions[:, None], sliding_window)  # (N, own_len)
    visible = visible.repeat_interleave(kv_heads, dim=0)[:, None, :]
    own_out, own_lse = _attention_with_lse(
        query.view(num_seqs * kv_heads, group, head_dim), own_keys, own_values, scale, visible, softcap
    )
    own_out = own_out.view(num_seqs, kv_heads, group, head_dim)
    own_lse = own_lse.view(num_seqs, kv_heads, group)

    lse = torch.logaddexp(prefix_lse, own_lse)
    out = prefix_out * torch.exp(prefix_lse - lse)[..., None] + own_out * torch.exp(own_lse - lse)[..., None]
    return out.reshape(num_seqs, num_heads, head_dim).to(query.dtype)


def _triton_paged_attention(query, key_cache, value_cache, ctx: PagedAttentionContext, scale: float,
                            softcap: float | None = None, sliding_window: int | None = None) -> torch.Tensor:
    from powerfast.kernels.paged_attention import paged_attention

    return paged_attention(
        query,
        key_cache,
        value_cache,
        ctx.page_tables,
        ctx.query_seq_index,
        ctx.query_positions,
        scale,
        max_seq_len=ctx.max_seq_len,
        softcap=softcap,
        sliding_window=sliding_window or None,
    )


def _flash_paged_attention(query, key_cache, value_cache, ctx: PagedAttentionContext, scale: float,
                           softcap: float | None = None, sliding_window: int | None = None) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

    softcap = 0.0 if softcap is None else softcap  # flash-attn's "off"
    # flash-attn's (left, right) window: a query at p sees keys p - left .. p + right, and
    # (-1, -1) is none; W positions ending at p is (W - 1, 0)
    window_size = (sliding_window - 1, 0) if sliding_window else (-1, -1)
    if ctx.max_query_len == 1:
        out = flash_attn_with_kvcache(
            query.unsqueeze(1),
            key_cache,
            value_cache,
            cache_seqlens=ctx.seq_lens,
            block_table=ctx.page_tables,
            softmax_scale=scale,
            causal=True,
            window_size=window_size,
            softcap=softcap,
        )
        return out.squeeze(1)
    return flash_attn_varlen_func(
        query,
        key_cache,
        value_cache,
        cu_seqlens_q=ctx.query_start_loc,
        cu_seqlens_k=ctx.cu_seqlens_k,
        max_seqlen_q=ctx.max_query_len,
        max_seqlen_k=ctx.max_seq_len,
        softmax_scale=scale,
        causal=True,
        window_size=window_size,
        softcap=softcap,
        block_table=ctx.page_tables,
    )


BACKEND_FUNCTIONS = {"torch": torch_paged_attention, "triton": _triton_paged_attention, "flash": _flash_paged_attention}


# ------------------------------------------------------------------- the custom operator


def _paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    page_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    query_start_loc: torch.Tensor,
    query_seq_index: torch.Tensor,
    query_positions: torch.Tensor,
    scale: float,
    max_query_len: int,
    max_seq_len: int,
    shared_prefix_pages: int,
    backend: str,
    softcap: float,
    sliding_window: int = 0,
) -> torch.Tensor:
    """query: (num_tokens, num_heads, head_dim) -> (num_tokens, num_heads, head_dim), in query's dtype.

    The metadata are those of :class:`PagedAttentionContext`;
    softcap: attention-logit soft-capping (Gemma 2), 0.0 for none; sliding_window: the layer's
    window W (a query at position p sees keys p - W + 1 .. p), 0 for none.
    """
    ctx = PagedAttentionContext(
        key_caches=[key_cache],
        value_caches=[value_cache],
        slot_mapping=query_positions,  # unused by the backends
        page_tables=page_tables,
        seq_lens=seq_lens,
        cu_seqlens_k=cu_seqlens_k,
        query_start_loc=query_start_loc,
        query_seq_index=query_seq_index,
        query_positions=query_positions,
        max_query_len=max_query_len,
        max_seq_len=max_seq_len,
        backend=backend,
        shared_prefix_pages=shared_prefix_pages,
    )
    out = BACKEND_FUNCTIONS[backend](query, key_cache, value_cache, ctx, scale, softcap or None, sliding_window or None)
    return out.to(query.dtype).contiguous()


_paged_attention_op = torch.library.custom_op("powerfast::paged_attention", mutates_args=())(_paged_attention)


@_paged_attention_op.register_fake
def _(query, key_cache, value_cache, page_tables, seq_lens, cu_seqlens_k, query_start_loc, query_seq_index,
      query_positions, scale, max_query_len, max_seq_len, shared_prefix_pages, backend, softcap, sliding_window=0):
    return torch.empty_like(query, memory_format=torch.contiguous_format)


def paged_attention_op(*args) -> torch.Tensor:
    """``torch.ops.powerfast.paged_attention`` (see :func:`_paged_attention` for the arguments):
    the operator while ``torch.compile`` traces, its implementation directly otherwise."""
    if torch.compiler.is_compiling():
        return torch.ops.powerfast.paged_attention(*args)
    return _paged_attention(*args)
