"""The runtime's device work as ``torch.library`` custom operators.

``torch.compile`` and CUDA-graph capture see each of these as one opaque operator with a
fake (meta) implementation for tracing: they never trace into a Triton launcher, a
host-side branch or a ``.tolist()`` of the torch references behind them.

- ``powerfast::write_kv(key_cache!, value_cache!, key, value, slot_mapping)``: write new
  keys / values into their slots (slot -1: written nowhere). CPU: plain torch; CUDA (or
  ``use_triton``): the Triton kernel of :mod:`powerfast.kernels.kv_cache`.
- ``powerfast::paged_attention(query, key_cache, value_cache, <paged metadata>, scale,
  max_query_len, max_seq_len, shared_prefix_blocks, backend, softcap, sliding_window) -> out``: one backend of
  :mod:`powerfast.runtime.paged_attention` ("torch" on the CPU, "triton" / "flash" on CUDA).
- ``powerfast::sample_tokens(logits, offsets, active!, logliks!, temperature,
  eos_token_id) -> (tokens, base_logprobs, tempered_logprobs, log_power_sums)``: the fused sampling kernel
  (or its torch reference) with the RNG counter as a device tensor (``offsets``) and a
  fixed kernel key, so that no Python value changes between steps; temperature 0 is
  greedy. See :func:`powerfast.samplers.decoding.sample_step` for how offsets are derived from a
  device seed and a device step counter.

Importing this module registers the operators (once per process). The functions of
this module with the operators' names call the operator while ``torch.compile`` traces
and its implementation directly otherwise (same result, without the dispatcher's
per-call cost in an eager decode loop; CUDA-graph capture needs no operator).
"""

from __future__ import annotations

import torch

from powerfast.core import ops
from powerfast.runtime.paged_attention import BACKEND_FUNCTIONS, PagedAttentionContext

__all__ = ["paged_attention", "sample_tokens", "write_kv"]


# ------------------------------------------------------------------------------ KV write


def _write_kv(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slot_mapping: torch.Tensor,
    use_triton: bool,
) -> None:
    """key_cache, value_cache: (num_blocks, block_size, kv_heads, head_dim), written in place;
    key, value: (num_tokens, kv_heads, head_dim); slot_mapping: (num_tokens,) int64, -1 = skip.
    ``use_triton`` False on a CPU tensor: plain torch (no interpreted kernel in every layer)."""
    if use_triton or key_cache.is_cuda:
        ops.write_kv(key_cache, value_cache, key, value, slot_mapping)
        return
    kv_heads, head_dim = key_cache.shape[2], key_cache.shape[3]
    flat_keys = key_cache.view(-1, kv_heads, head_dim)
    flat_values = value_cache.view(-1, kv_heads, head_dim)
    if bool((slot_mapping < 0).any()):  # padding rows (a CPU tensor: no device sync)
        keep = slot_mapping >= 0
        slot_mapping, key, value = slot_mapping[keep], key[keep], value[keep]
    flat_keys.index_copy_(0, slot_mapping, key.to(key_cache.dtype))
    flat_values.index_copy_(0, slot_mapping, value.to(value_cache.dtype))


_write_kv_op = torch.library.custom_op("powerfast::write_kv", mutates_args=("key_cache", "value_cache"))(_write_kv)


@_write_kv_op.register_fake
def _(key_cache, value_cache, key, value, slot_mapping, use_triton) -> None:
    return None


# ------------------------------------------------------------------------- attention


def _paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    query_start_loc: torch.Tensor,
    query_seq_index: torch.Tensor,
    query_positions: torch.Tensor,
    scale: float,
    max_query_len: int,
    max_seq_len: int,
    shared_prefix_blocks: int,
    backend: str,
    softcap: float,
    sliding_window: int = 0,
) -> torch.Tensor:
    """query: (num_tokens, num_heads, head_dim) -> (num_tokens, num_heads, head_dim), in query's dtype.

    The metadata are those of :class:`powerfast.runtime.paged_attention.PagedAttentionContext`;
    softcap: attention-logit soft-capping (Gemma 2), 0.0 for none; sliding_window: the layer's
    window W (a query at position p sees keys p - W + 1 .. p), 0 for none.
    """
    ctx = PagedAttentionContext(
        key_caches=[key_cache],
        value_caches=[value_cache],
        slot_mapping=query_positions,  # unused by the backends
        block_tables=block_tables,
        seq_lens=seq_lens,
        cu_seqlens_k=cu_seqlens_k,
        query_start_loc=query_start_loc,
        query_seq_index=query_seq_index,
        query_positions=query_positions,
        max_query_len=max_query_len,
        max_seq_len=max_seq_len,
        backend=backend,
        shared_prefix_blocks=shared_prefix_blocks,
    )
    out = BACKEND_FUNCTIONS[backend](query, key_cache, value_cache, ctx, scale, softcap or None, sliding_window or None)
    return out.to(query.dtype).contiguous()


_paged_attention_op = torch.library.custom_op("powerfast::paged_attention", mutates_args=())(_paged_attention)


@_paged_attention_op.register_fake
def _(query, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_k, query_start_loc, query_seq_index,
      query_positions, scale, max_query_len, max_seq_len, shared_prefix_blocks, backend, softcap, sliding_window=0):
    return torch.empty_like(query, memory_format=torch.contiguous_format)


# -------------------------------------------------------------------------- sampling


def _sample_tokens(
    logits: torch.Tensor,
    offsets: torch.Tensor,
    active: torch.Tensor,
    logliks: torch.Tensor,
    temperature: float,
    eos_token_id: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample (or, at temperature 0, pick the argmax of) one token per row and score it.

    logits: (N, V); offsets: (N,) int64 per-row RNG counters (the kernel key is fixed at 0);
    active: (N,) bool and logliks: (N,) float32, updated in place as by
    :func:`powerfast.core.ops.sample_tokens`; eos_token_id: -1 for none.
    Returns (tokens (N,) int64, base_logprobs (N,) float32, tempered_logprobs (N,) float32,
    equal to base_logprobs at temperature 0 or 1, log_power_sums (N,) float32
    ``log sum_x p(x)^(1/T)``, 0 at temperature 0 or 1 and for inactive rows).
    """
    eos = None if eos_token_id < 0 else eos_token_id
    if temperature == 0:
        chosen = ops.greedy_tokens(logits)
        if eos is not None:
            chosen = torch.where(active, chosen, torch.full_like(chosen, eos))
        out = ops.score_tokens(logits, chosen, active=active, eos_token_id=eos, logliks=logliks)
    else:
        out = ops.sample_tokens(logits, temperature, seed=0, offsets=offsets, active=active, eos_token_id=eos,
                                logliks=logliks)
    tempered = out.base_logprobs.clone() if out.tempered_logprobs is None else out.tempered_logprobs
    log_power_sums = getattr(out, "log_power_sums", None)
    if log_power_sums is None:
        log_power_sums = torch.zeros_like(out.base_logprobs)
    return out.tokens.clone(), out.base_logprobs, tempered, log_power_sums


_sample_tokens_op = torch.library.custom_op("powerfast::sample_tokens", mutates_args=("active", "logliks"))(
    _sample_tokens
)


@_sample_tokens_op.register_fake
def _(logits, offsets, active, logliks, temperature, eos_token_id):
    rows = logits.shape[0]
    return (
        logits.new_empty(rows, dtype=torch.int64),
        logits.new_empty(rows, dtype=torch.float32),
        logits.new_empty(rows, dtype=torch.float32),
        logits.new_empty(rows, dtype=torch.float32),
    )


# ------------------------------------------------------------------- callers' entry points


def write_kv(*args) -> None:
    """``torch.ops.powerfast.write_kv`` (see :func:`_write_kv` for the arguments)."""
    if torch.compiler.is_compiling():
        return torch.ops.powerfast.write_kv(*args)
    return _write_kv(*args)


def paged_attention(*args) -> torch.Tensor:
    """``torch.ops.powerfast.paged_attention`` (see :func:`_paged_attention` for the arguments)."""
    if torch.compiler.is_compiling():
        return torch.ops.powerfast.paged_attention(*args)
    return _paged_attention(*args)


def sample_tokens(*args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.ops.powerfast.sample_tokens`` (see :func:`_sample_tokens` for the arguments)."""
    if torch.compiler.is_compiling():
        return torch.ops.powerfast.sample_tokens(*args)
    return _sample_tokens(*args)
