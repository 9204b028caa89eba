"""Top-k tokens of each row and their log-probs, reading the logits once.

One program per row streams the vocabulary in chunks of ``BLOCK_V``, keeping in registers
the online log-sum-exp (fp32 max and sum) and a running top-k (values and ids, ``BLOCK_K``
slots, the unused ones pinned at +inf so they are never the minimum). A chunk only
touches the top-k when its max beats the current k-th value; then its best entries are
moved in one at a time. The full log-softmax is never formed: log-probs are
``top value - logsumexp`` at the end. The (N, k) result is sorted on the host side of the
launch with two small stable sorts (value descending, ties by token id).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

DEFAULT_BLOCK_V = 4096


@triton.jit(do_not_specialize=["vocab_size"])
def _topk_logprobs_kernel(
    # data ptrs
    logits_ptr,  # (N, V) fp32 / bf16 / fp16 / fp64
    token_ids_ptr,  # (N, K) int64 out, unsorted
    logprobs_ptr,  # (N, K) fp32 out, unsorted
    # shapes
    vocab_size,
    # strides
    stride_logits_row,
    # switches
    K: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_logits_ptr = logits_ptr + row * stride_logits_row
    cols = tl.arange(0, BLOCK_V)
    slots = tl.arange(0, BLOCK_K)
    top_values = tl.where(slots < K, -float("inf"), float("inf"))
    top_ids = tl.zeros([BLOCK_K], dtype=tl.int64)
    running_max = tl.zeros([], dtype=tl.float32) - float("inf")
    running_sum = tl.zeros([], dtype=tl.float32)
    for start in range(0, vocab_size, BLOCK_V):
        idx = start + cols
        x = tl.load(row_logits_ptr + idx, mask=idx < vocab_size, other=-float("inf")).to(tl.float32)
        chunk_max = tl.max(x, axis=0)
        new_max = tl.maximum(running_max, chunk_max)
        shift = tl.where(new_max == -float("inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(x - shift), axis=0)
        running_max = new_max
        kth_value = tl.min(top_values, axis=0)
        while chunk_max > kth_value:
            position = tl.argmax(x, axis=0)  # first index of the chunk's max
            # evict the k-th value; among equal ones the largest token id (ties keep the
            # smaller id)
            slot = tl.argmax(tl.where(top_values == kth_value, top_ids, -1), axis=0)
            top_values = tl.where(slots == slot, chunk_max, top_values)
            top_ids = tl.where(slots == slot, (start + position).to(tl.int64), top_ids)
            x = tl.where(cols == position, -float("inf"), x)
            chunk_max = tl.max(x, axis=0)
            kth_value = tl.min(top_values, axis=0)
    lse = running_max + tl.log(running_sum)
    out = row * K + slots
    tl.store(token_ids_ptr + out, top_ids, mask=slots < K)
    tl.store(logprobs_ptr + out, top_values - lse, mask=slots < K)


def topk_logprobs(logits: torch.Tensor, k: int, block_v: int | None = None, num_warps: int | None = None):
    """Launcher (arguments checked by ``powerfast.ops.topk.topk_logprobs``).

    logits: (N, V); k in [1, V]
    returns (token_ids (N, k) int64, logprobs (N, k) fp32) sorted by descending log-prob,
    equal log-probs by ascending token id. A row with fewer than k finite logits fills
    the remaining places with log-prob -inf and token id 0.
    """
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    num_rows, vocab_size = logits.shape
    token_ids = torch.empty(num_rows, k, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(num_rows, k, dtype=torch.float32, device=logits.device)
    if num_rows == 0:
        return token_ids, logprobs
    block_v = block_v or DEFAULT_BLOCK_V
    _topk_logprobs_kernel[(num_rows,)](
        # data ptrs
        logits,
        token_ids,
        logprobs,
        # shapes
        vocab_size,
        # strides
        logits.stride(0),
        # switches
        K=k,
        BLOCK_K=triton.next_power_of_2(k),
        BLOCK_V=block_v,
        num_warps=num_warps or (8 if block_v >= 2048 else 4),
    )
    by_id = torch.argsort(token_ids, dim=1)
    token_ids = token_ids.gather(1, by_id)
    logprobs = logprobs.gather(1, by_id)
    by_value = torch.argsort(logprobs, dim=1, descending=True, stable=True)
    return token_ids.gather(1, by_value), logprobs.gather(1, by_value)
