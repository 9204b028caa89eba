"""Fused sample + log-prob + accumulate over the vocabulary.

One program per row reads the row's logits once, in chunks of ``BLOCK_V``, and keeps in
fp32 registers:

- the running max ``m`` and ``s = sum exp(x - m)`` (base log-softmax normaliser),
- ``s_t = sum exp((x - m) / T)`` when T != 1 (tempered normaliser),
- a weighted reservoir sample over the chunks seen so far: within a chunk a token is
  drawn by inverse CDF (a cumulative sum of ``exp((x - m) / T)`` against one uniform),
  and it replaces the running choice with probability ``W_chunk / W_seen`` (a second
  uniform). After the last chunk the choice is distributed as softmax(logits / T).

This needs two uniforms per chunk (Philox, counter = (row offset, chunk index)) and one
exp per logit per normaliser, so the kernel stays close to memory-bound, where a
Gumbel-max draw would need a random number and two logs per logit.

The sampled token's logit is re-read once at the end to form its log-probs. Teacher
forcing (``SAMPLE=False``) is the same kernel with the token loaded instead of drawn.

With T != 1 the kernel also returns, per row, ``log c = log sum_x p(x)^(1/T)`` (p =
softmax(logits)), the normaliser of the tempered distribution relative to the base one.
Both running sums are kept relative to the same running max ``m``, so after the online
merge over the chunks ``log c = log s_t - (1/T) log s`` (the ``m`` terms cancel): no extra
pass, no cancellation between two large log-sum-exps.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

DEFAULT_BLOCK_V = 4096
"""Chunk width. The draw depends on it (chunk boundaries fix the random stream), so it is
the same on every device: a seed gives the same tokens under the interpreter and on a GPU
(up to float rounding at the chunk-choice boundaries)."""


# Globals read inside a compiled kernel must be constexpr *instances*: an annotation
# (`X: tl.constexpr = ...`) is accepted by the interpreter but is a NameError when the
# kernel is compiled for a GPU.
PHILOX_KEY_A = tl.constexpr(0x9E3779B9)
PHILOX_KEY_B = tl.constexpr(0xBB67AE85)
PHILOX_ROUND_A = tl.constexpr(0xD2511F53)
PHILOX_ROUND_B = tl.constexpr(0xCD9E8D57)
UINT_TO_UNIFORM = tl.constexpr(4.6566127342e-10)  # largest scale with (2**31 - 1) * scale < 1


@triton.jit(do_not_specialize=["seed", "eos_token_id", "vocab_size"])
def _sample_logprob_kernel(
    # data ptrs
    logits_ptr,  # (N, V) fp32 / bf16 / fp16 / fp64
    tokens_in_ptr,  # (N,) int64 / int32, read when not SAMPLE
    tokens_out_ptr,  # (N,) int64
    base_logprobs_ptr,  # (N,) fp32
    tempered_logprobs_ptr,  # (N,) fp32, written when TEMPERED
    log_power_sums_ptr,  # (N,) fp32 log sum_x p(x)^(1/T), written when TEMPERED
    offsets_ptr,  # (N,) int64 / int32 per-row RNG counter, read when HAS_OFFSETS
    active_ptr,  # (N,) bool, read when HAS_ACTIVE, written when HAS_ACTIVE and HAS_EOS
    logliks_ptr,  # (N,) fp32, updated when HAS_LOGLIKS
    temperatures_ptr,  # (N,) fp64 per-row temperature (0: greedy), read when ROW_PARAMS
    eos_ids_ptr,  # (N,) int64 per-row EOS id (-1: none), read when ROW_PARAMS
    # scalars
    inv_temperature,
    seed,  # int64
    eos_token_id,
    # shapes
    vocab_size,
    # strides
    stride_logits_row,
    # switches
    SAMPLE: tl.constexpr,
    TEMPERED: tl.constexpr,
    HAS_OFFSETS: tl.constexpr,
    HAS_ACTIVE: tl.constexpr,
    HAS_EOS: tl.constexpr,
    HAS_LOGLIKS: tl.constexpr,
    ROW_PARAMS: tl.constexpr,
    BLOCK_V: tl.constexpr,
    PHILOX_ROUNDS: tl.constexpr,
):
    # ROW_PARAMS: temperature and EOS id per row (the engine's one launch for the rows of
    # many requests); it needs SAMPLE and TEMPERED. A row of temperature 0 takes the argmax
    # (the first on ties) and is scored at temperature 1, as greedy decoding is; a row of
    # temperature 1 computes its tempered sums with the factor 1.0, which gives the base
    # sums exactly, so each row gets the token and log-probs of a launch of its own.
    row = tl.program_id(0).to(tl.int64)
    if ROW_PARAMS:
        row_temperature = tl.load(temperatures_ptr + row)
        greedy = row_temperature == 0
        # 1/T in float64, then rounded once to float32: what the scalar launch receives
        inv_t = tl.where(greedy, 1.0, 1.0 / tl.where(greedy, 1.0, row_temperature)).to(tl.float32)
        row_eos = tl.load(eos_ids_ptr + row).to(tl.int64)
        row_has_eos = row_eos >= 0
    else:
        inv_t = inv_temperature
    row_logits_ptr = logits_ptr + row * stride_logits_row
    if HAS_ACTIVE:
        is_active = tl.load(active_ptr + row) != 0
    else:
        is_active = row >= 0
    num_cols = tl.where(is_active, vocab_size, 0)
    if SAMPLE:
        if HAS_OFFSETS:
            row_offset = tl.load(offsets_ptr + row).to(tl.int64)
        else:
            row_offset = row
        # Philox-4x32 key = seed, counter = (chunk index, row offset lo, row offset hi, 0)
        seed64 = seed.to(tl.int64)
        key_lo = (seed64 & 0xFFFFFFFF).to(tl.uint32)
        key_hi = ((seed64 >> 32) & 0xFFFFFFFF).to(tl.uint32)
        offset_lo = (row_offset & 0xFFFFFFFF).to(tl.uint32)
        offset_hi = ((row_offset >> 32) & 0xFFFFFFFF).to(tl.uint32)

    cols = tl.arange(0, BLOCK_V)
    running_max = tl.zeros([], dtype=tl.float32) - float("inf")
    base_sum = tl.zeros([], dtype=tl.float32)
    tempered_sum = tl.zeros([], dtype=tl.float32)
    weight_seen = tl.zeros([], dtype=tl.float32)
    choice = tl.zeros([], dtype=tl.int64)
    best = tl.zeros([], dtype=tl.int64)  # the argmax so far (ROW_PARAMS' greedy rows)
    chunk_index = tl.zeros([], dtype=tl.uint32)
    for start in range(0, num_cols, BLOCK_V):
        idx = start + cols
        x = tl.load(row_logits_ptr + idx, mask=idx < vocab_size, other=-float("inf")).to(tl.float32)
        chunk_max = tl.max(x, axis=0)
        if ROW_PARAMS:
            # strictly greater: an equal maximum in a later chunk keeps the first one
            best = tl.where(chunk_max > running_max, (start + tl.argmax(x, axis=0)).to(tl.int64), best)
        new_max = tl.maximum(running_max, chunk_max)
        shift = tl.where(new_max == -float("inf"), 0.0, new_max)
        base_weights = tl.exp(x - shift)
        base_rescale = tl.exp(running_max - shift)
        base_chunk_weight = tl.sum(base_weights, axis=0)
        base_sum = base_sum * base_rescale + base_chunk_weight
        if TEMPERED:
            weights = tl.exp((x - shift) * inv_t)
            rescale = tl.exp((running_max - shift) * inv_t)
            chunk_weight = tl.sum(weights, axis=0)
            tempered_sum = tempered_sum * rescale + chunk_weight
        else:
            weights = base_weights
            rescale = base_rescale
            chunk_weight = base_chunk_weight
        if SAMPLE:
            # two uniforms for this chunk (Philox rounds inlined: a nested jit call is
            # costly under the interpreter)
            c0 = chunk_index
            chunk_index += 1
            c1 = offset_lo
            c2 = offset_hi
            c3 = offset_hi * 0
            k0 = key_lo
            k1 = key_hi
            for _ in tl.static_range(PHILOX_ROUNDS):
                prev_c0 = c0
                prev_c2 = c2
                c0 = tl.umulhi(c2, PHILOX_ROUND_B) ^ c1 ^ k0
                c2 = tl.umulhi(prev_c0, PHILOX_ROUND_A) ^ c3 ^ k1
                c1 = prev_c2 * PHILOX_ROUND_B
                c3 = prev_c0 * PHILOX_ROUND_A
                k0 = k0 + PHILOX_KEY_A
                k1 = k1 + PHILOX_KEY_B
            r0 = c0.to(tl.int32, bitcast=True)
            r1 = c1.to(tl.int32, bitcast=True)
            u_pick = tl.where(r0 < 0, ~r0, r0).to(tl.float32) * UINT_TO_UNIFORM
            u_keep = tl.where(r1 < 0, ~r1, r1).to(tl.float32) * UINT_TO_UNIFORM
            # inverse CDF inside the chunk: the first positive-weight entry whose
            # cumulative weight exceeds u * W_chunk, else (rounding at u ~ 1) the last
            # positive-weight entry; one min-reduction finds either
            cdf = tl.cumsum(weights, axis=0)
            positive = weights > 0
            key = tl.where(positive & (cdf > u_pick * chunk_weight), cols, tl.where(positive, 2 * BLOCK_V - cols, 3 * BLOCK_V))
            first_key = tl.min(key, axis=0)
            pick = tl.where(first_key < BLOCK_V, first_key, 2 * BLOCK_V - first_key)
            # reservoir step: keep the chunk's token with probability W_chunk / W_seen
            weight_before = weight_seen * rescale
            weight_seen = weight_before + chunk_weight
            take = (u_keep * weight_seen < chunk_weight) | ((weight_before == 0) & (chunk_weight > 0))
            choice = tl.where(take, (start + pick).to(tl.int64), choice)
        running_max = new_max

    if SAMPLE:
        token = choice
        if ROW_PARAMS:
            token = tl.where(greedy, best, choice)
    else:
        token = tl.load(tokens_in_ptr + row).to(tl.int64)
    in_range = (token >= 0) & (token < vocab_size)
    token_logit = tl.load(row_logits_ptr + token, mask=in_range & is_active, other=float("nan")).to(tl.float32)
    base_logprob = tl.where(is_active, token_logit - (running_max + tl.log(base_sum)), 0.0)
    tl.store(base_logprobs_ptr + row, base_logprob)
    if TEMPERED:
        tempered_lse = running_max * inv_t + tl.log(tempered_sum)
        tempered_logprob = tl.where(is_active, token_logit * inv_t - tempered_lse, 0.0)
        tl.store(tempered_logprobs_ptr + row, tempered_logprob)
        log_power_sum = tl.log(tempered_sum) - inv_t * tl.log(base_sum)
        tl.store(log_power_sums_ptr + row, tl.where(is_active, log_power_sum, 0.0))
    if ROW_PARAMS:
        idle_token = tl.where(row_has_eos, row_eos, 0)
    elif HAS_EOS:
        idle_token = tl.zeros([], dtype=tl.int64) + eos_token_id
    else:
        idle_token = tl.zeros([], dtype=tl.int64)
    token = tl.where(is_active, token, idle_token)
    tl.store(tokens_out_ptr + row, token)
    if HAS_LOGLIKS:
        loglik = tl.load(logliks_ptr + row, mask=is_active, other=0.0)
        tl.store(logliks_ptr + row, loglik + base_logprob, mask=is_active)
    if HAS_ACTIVE:
        if ROW_PARAMS:
            tl.store(active_ptr + row, is_active & ~(row_has_eos & (token == row_eos)))
        elif HAS_EOS:
            tl.store(active_ptr + row, is_active & (token != eos_token_id))


def _launch(
    logits: torch.Tensor,
    tokens: Optional[torch.Tensor],
    temperature: float,
    seed: int,
    offsets: Optional[torch.Tensor],
    active: Optional[torch.Tensor],
    eos_token_id: Optional[int],
    logliks: Optional[torch.Tensor],
    block_v: Optional[int],
    num_warps: Optional[int],
    temperatures: Optional[torch.Tensor] = None,
    eos_ids: Optional[torch.Tensor] = None,
):
    row_params = temperatures is not None
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    # the kernel reads tokens[row] / offsets[row] at unit stride (e.g. a column slice
    # tokens[:, t] is not); active and logliks are updated in place and checked by the caller
    if tokens is not None:
        tokens = tokens.contiguous()
    if offsets is not None:
        offsets = offsets.contiguous()
    num_rows, vocab_size = logits.shape
    device = logits.device
    tempered = row_params or temperature != 1.0
    tokens_out = torch.empty(num_rows, dtype=torch.int64, device=device)
    base_logprobs = torch.empty(num_rows, dtype=torch.float32, device=device)
    tempered_logprobs = torch.empty(num_rows, dtype=torch.float32, device=device) if tempered else None
    log_power_sums = torch.empty(num_rows, dtype=torch.float32, device=device) if tempered else None
    block_v = block_v or DEFAULT_BLOCK_V
    if num_rows == 0:
        return tokens_out, base_logprobs, tempered_logprobs, log_power_sums
    dummy = base_logprobs
    _sample_logprob_kernel[(num_rows,)](
        # data ptrs
        logits,
        tokens if tokens is not None else tokens_out,
        tokens_out,
        base_logprobs,
        tempered_logprobs if tempered else dummy,
        log_power_sums if tempered else dummy,
        offsets if offsets is not None else tokens_out,
        active if active is not None else dummy,
        logliks if logliks is not None else dummy,
        temperatures.contiguous() if row_params else dummy,
        eos_ids.contiguous() if row_params else tokens_out,
        # scalars
        1.0 if row_params else 1.0 / temperature,
        seed,
        eos_token_id if eos_token_id is not None else 0,
        # shapes
        vocab_size,
        # strides
        logits.stride(0),
        # switches
        SAMPLE=tokens is None,
        TEMPERED=tempered,
        HAS_OFFSETS=offsets is not None,
        HAS_ACTIVE=active is not None,
        HAS_EOS=eos_token_id is not None,
        HAS_LOGLIKS=logliks is not None,
        ROW_PARAMS=row_params,
        BLOCK_V=block_v,
        PHILOX_ROUNDS=10,
        num_warps=num_warps or (8 if block_v >= 2048 else 4),
    )
    return tokens_out, base_logprobs, tempered_logprobs, log_power_sums


def sample_logprob(
    logits: torch.Tensor,
    temperature: float,
    *,
    seed: int,
    offsets: Optional[torch.Tensor] = None,
    active: Optional[torch.Tensor] = None,
    eos_token_id: Optional[int] = None,
    logliks: Optional[torch.Tensor] = None,
    block_v: Optional[int] = None,
    num_warps: Optional[int] = None,
):
    """Sample from softmax(logits / temperature), score, accumulate (arguments checked by
    ``powerfast.ops.sampling.sample_tokens``).

    logits: (N, V); offsets: (N,) int or None (arange(N)); active: (N,) bool or None;
    logliks: (N,) fp32 or None, updated in place; returns (tokens (N,) int64,
    base_logprobs (N,) fp32, tempered_logprobs (N,) fp32 or None when temperature == 1,
    log_power_sums (N,) fp32 log sum_x softmax(logits)_x^(1/T) (0 for inactive rows) or None
    when temperature == 1).
    """
    return _launch(logits, None, temperature, seed, offsets, active, eos_token_id, logliks, block_v, num_warps)


def score_logprob(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    *,
    active: Optional[torch.Tensor] = None,
    eos_token_id: Optional[int] = None,
    logliks: Optional[torch.Tensor] = None,
    block_v: Optional[int] = None,
    num_warps: Optional[int] = None,
):
    """Teacher forcing: :func:`sample_logprob` with given tokens (N,) int64 / int32."""
    return _launch(logits, tokens, temperature, 0, None, active, eos_token_id, logliks, block_v, num_warps)


def sample_logprob_rows(
    logits: torch.Tensor,
    *,
    offsets: torch.Tensor,
    temperatures: torch.Tensor,
    eos_ids: torch.Tensor,
    active: torch.Tensor,
    logliks: torch.Tensor,
    block_v: Optional[int] = None,
    num_warps: Optional[int] = None,
):
    """:func:`sample_logprob` with a temperature and an EOS id per row, in one launch
    (arguments checked by ``powerfast.ops.sampling.sample_rows``; the Philox key is 0).

    temperatures: (N,) fp64, 0 for greedy rows; eos_ids: (N,) int64, -1 for none.
    Returns (tokens, base_logprobs, tempered_logprobs, log_power_sums), all (N,) tensors:
    at temperature 0 or 1 the tempered log-probs equal the base ones and the log power sums are 0.
    """
    return _launch(logits, None, 1.0, 0, offsets, active, None, logliks, block_v, num_warps,
                   temperatures=temperatures, eos_ids=eos_ids)
